"""JSON Lines: one JSON value per line; a bad line is its own quarantined row, numbered by its line."""

from __future__ import annotations

import io
from collections.abc import Iterator

import orjson

from tasks.ingest.readers.raw import RawRecord


def _decode(line: bytes) -> tuple[str, bool]:
    try:
        return line.decode("utf-8"), True
    except UnicodeDecodeError:
        return line.decode("utf-8", errors="backslashreplace"), False


def read_jsonl(fh: io.BufferedIOBase) -> Iterator[RawRecord]:
    for lineno, line in enumerate(fh, 1):
        if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        text, valid = _decode(line)
        if not valid:
            yield RawRecord(lineno, text, None, ("invalid_utf8",), "line is not valid UTF-8; re-encode the file as UTF-8")
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            yield RawRecord(lineno, text, None, ("malformed_json",), f"not a JSON value: {exc}; fix or remove the line")
            continue
        yield RawRecord(lineno, text, value)
