"""CSV with a header row: a row per record, numbered by the line it starts on."""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Iterator

from tasks.ingest.readers.raw import RawRecord

csv.field_size_limit(sys.maxsize)


def read_csv(fh: io.BufferedIOBase) -> Iterator[RawRecord]:
    """CSV with a header row. Cells are strings; a cell holding JSON (e.g. `messages`) is parsed later."""
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad row does not stop the file.
    text = io.TextIOWrapper(fh, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(text)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        yield RawRecord(1, "", None, ("malformed_csv",), f"unreadable header: {exc}")
        return
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield RawRecord(start, "", None, ("malformed_csv",), f"unparseable CSV record: {exc}")
            if reader.line_num < start:
                return
            continue
        if not cells or (len(cells) == 1 and not cells[0].strip()):
            continue
        raw = ",".join(cells)
        if any(_has_surrogates(cell) for cell in cells):
            raw = raw.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            yield RawRecord(start, raw, None, ("invalid_utf8",), "row is not valid UTF-8; re-encode the file as UTF-8")
            continue
        if len(cells) != len(header):
            yield RawRecord(
                start,
                raw,
                None,
                ("malformed_csv",),
                f"row has {len(cells)} fields, the header has {len(header)}; quote fields that contain commas",
            )
            continue
        yield RawRecord(start, raw, dict(zip(header, cells)))


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
