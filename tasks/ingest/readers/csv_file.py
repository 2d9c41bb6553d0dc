"""CSV with a header row: a row per record, numbered by the line it starts on. A record over
`raw.MAX_RECORD_BYTES` (counted in characters) is skipped while it is read and quarantined as `too_long`."""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Iterator

from tasks.ingest.readers.raw import EXCERPT_BYTES, RawRecord, max_record_bytes, too_long

csv.field_size_limit(sys.maxsize)  # `_CappedLines` caps a whole record, before the csv module sees it

SKIP_CHARS = 1 << 20  # read at a time while skipping a record over the cap


class _RecordTooLong(Exception):
    def __init__(self, head: str, size: int):
        super().__init__(head, size)
        self.head, self.size = head, size


class _CappedLines:
    """The lines of a text file, for csv.reader, with no record held past `cap` characters.

    `start_record()` begins a record; a line that takes the record past `cap` is read to the end of the
    record (the first line end with an even count of quote characters since the record began: a quoted
    field may hold line breaks) without being kept, and `_RecordTooLong` is raised in its place. The
    csv module passes it on, and starts its next record afresh. `line_num` counts the lines read."""

    def __init__(self, text: io.TextIOBase, cap: int):
        self.text, self.cap = text, cap
        self.line_num = 0
        self.start_record()

    def start_record(self) -> None:
        self.size, self.quotes, self.head = 0, 0, ""

    def __iter__(self) -> _CappedLines:
        return self

    def __next__(self) -> str:
        line = self.text.readline(self.cap - self.size + 1)
        if not line:
            raise StopIteration
        if not self.size:
            self.head = line
        elif len(self.head) < EXCERPT_BYTES:
            self.head += line[:EXCERPT_BYTES]
        self.size += len(line)
        self.quotes += line.count('"')
        if self.size <= self.cap:
            self.line_num += 1  # a line, or the last one, without a line break
            return line
        ended = line.endswith(("\n", "\r"))
        self.line_num += ended
        while not (ended and self.quotes % 2 == 0):
            piece = self.text.readline(SKIP_CHARS)
            if not piece:
                self.line_num += not ended
                break
            self.size += len(piece)
            self.quotes += piece.count('"')
            ended = piece.endswith(("\n", "\r"))
            self.line_num += ended
        raise _RecordTooLong(self.head[:EXCERPT_BYTES], self.size)


def read_csv(fh: io.BufferedIOBase) -> Iterator[RawRecord]:
    """CSV with a header row. Cells are strings; a cell holding JSON (e.g. `messages`) is parsed later."""
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad row does not stop the file.
    text = io.TextIOWrapper(fh, encoding="utf-8-sig", errors="surrogateescape", newline="")
    lines = _CappedLines(text, max_record_bytes())
    reader = csv.reader(lines)
    try:
        header = next(reader)
    except StopIteration:
        return
    except _RecordTooLong as exc:
        yield too_long(1, exc.head, exc.size, "the header row", "characters", "no row of the file was read")
        return
    except csv.Error as exc:
        yield RawRecord(1, "", None, ("malformed_csv",), f"unreadable header: {exc}")
        return
    while True:
        start = lines.line_num + 1
        lines.start_record()
        try:
            cells = next(reader)
        except StopIteration:
            return
        except _RecordTooLong as exc:
            yield too_long(start, exc.head, exc.size, f"the row at line {start}", "characters")
            continue
        except csv.Error as exc:
            yield RawRecord(start, "", None, ("malformed_csv",), f"unparseable CSV record: {exc}")
            if lines.line_num < start:
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
