"""JSON Lines: one JSON value per line; a bad line is its own quarantined row, numbered by its line. A line
over `raw.MAX_RECORD_BYTES` is skipped while it is read and quarantined as `too_long`."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import NamedTuple

import orjson

from tasks.ingest.readers.raw import EXCERPT_BYTES, RawRecord, max_record_bytes, too_long


READ_BYTES = 1 << 20  # read at a time


class _LongLine(NamedTuple):
    """A line over the cap, in place of its bytes: its first `EXCERPT_BYTES` and its length (no newline)."""

    head: bytes
    size: int


def _capped_lines(fh: io.BufferedIOBase, cap: int) -> Iterator[bytes | _LongLine]:
    """Each line of `fh` split at b"\\n" (the newline dropped, a "\\r" kept), or a `_LongLine` for one longer
    than `cap` bytes. Reads `READ_BYTES` at a time and never holds more than `cap + READ_BYTES` of a line."""
    pending: list[bytes] = []  # the start of the current line, read in earlier chunks
    pending_size = 0
    skipping: _LongLine | None = None  # the line over the cap being read past
    for chunk in iter(lambda: fh.read(READ_BYTES), b""):
        if skipping is not None:
            end = chunk.find(b"\n")
            if end < 0:
                skipping = skipping._replace(size=skipping.size + len(chunk))
                continue
            yield skipping._replace(size=skipping.size + end)
            skipping, chunk = None, chunk[end + 1:]
        parts = chunk.split(b"\n")
        if len(parts) > 1:
            first = b"".join([*pending, parts[0]]) if pending else parts[0]
            pending, pending_size = [], 0
            for line in (first, *parts[1:-1]):
                yield line if len(line) <= cap else _LongLine(line[:EXCERPT_BYTES], len(line))
        pending.append(parts[-1])
        pending_size += len(parts[-1])
        if pending_size > cap:
            skipping = _LongLine(_head(pending), pending_size)
            pending, pending_size = [], 0
    if skipping is not None:
        yield skipping
    elif pending_size:
        yield b"".join(pending)


def _head(pieces: list[bytes]) -> bytes:
    head = b""
    for piece in pieces:
        head += piece[:EXCERPT_BYTES - len(head)]
        if len(head) >= EXCERPT_BYTES:
            break
    return head


def _decode(line: bytes) -> tuple[str, bool]:
    try:
        return line.decode("utf-8"), True
    except UnicodeDecodeError:
        return line.decode("utf-8", errors="backslashreplace"), False


def read_jsonl(fh: io.BufferedIOBase) -> Iterator[RawRecord]:
    for lineno, line in enumerate(_capped_lines(fh, max_record_bytes()), 1):
        if isinstance(line, _LongLine):
            yield too_long(lineno, line.head, line.size, f"line {lineno}")
            continue
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
