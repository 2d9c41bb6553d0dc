"""JSON: an array of records, an object of arrays ({"train": [...], "test": [...]}) or a single record,
streamed with ijson so the whole file is never loaded. A corrupt document keeps the records before it; a
record over `raw.MAX_RECORD_BYTES` is skipped while it is read and quarantined as `too_long`."""

from __future__ import annotations

import io
import itertools
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

import ijson
import orjson
from ijson.common import ObjectBuilder

from tasks.ingest.readers.raw import EXCERPT_BYTES, RawRecord, dump_raw, max_record_bytes, too_long


class _RecordTooLong(Exception):
    """Raised by `_Stream.read` out of ijson: the record being parsed is over the cap."""


class _Stream:
    """What ijson reads: `prefix`, then the file from where it is. Drops a UTF-8 byte-order mark at the
    start of the file (ijson's C parser rejects one; files written by Windows tools start with one), can
    peek at the first non-blank byte, and counts the bytes it delivers: once more than `cap` were
    delivered since the last record ended (`mark`, set by the reader), the next read raises
    `_RecordTooLong`, so ijson never holds more than `cap` and one read of a record.

    `origin` (the prefix and the file offset after it) is where the stream starts, to lex it again."""

    _BLANK = b" \t\r\n"

    def __init__(self, fh, cap: int, prefix: bytes = b""):
        self._fh = fh
        self._buffer = prefix
        self._started = bool(prefix)  # a resumed stream is in the middle of the file: no BOM there
        self.origin = (prefix, _tell(fh))
        self.cap = cap
        self.blank = True  # nothing but whitespace read so far
        self.delivered = 0
        self.mark = 0

    def first_char(self) -> bytes:
        """The first non-blank byte (read ahead, not delivered); blanks before it are dropped."""
        while not self._buffer.lstrip(self._BLANK):
            if self.origin[1] is not None:
                self.origin = (b"", self.origin[1] + len(self._buffer))
            self._buffer = self._read(1 << 16)
            if not self._buffer:
                return b""
        return self._buffer.lstrip(self._BLANK)[:1]

    def _read(self, size: int) -> bytes:
        data = self._fh.read(size)
        if not self._started and data:
            self._started = True
            if data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
                if self.origin[1] is not None:
                    self.origin = (b"", self.origin[1] + 3)
        if self.blank and data.strip(self._BLANK):
            self.blank = False
        return data

    def read(self, size: int = -1) -> bytes:
        if size == 0:  # ijson first calls read(0) to learn whether the file is binary
            return b""
        if self.delivered - self.mark > self.cap:
            raise _RecordTooLong
        if size < 0:  # ijson reads in chunks; were it to ask for everything, it still gets one
            size = 1 << 16
        if self._buffer:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
            if self.blank and data.strip(self._BLANK):
                self.blank = False
        else:
            data = self._read(size)
        self.delivered += len(data)
        return data


def _tell(fh) -> int | None:
    try:
        return fh.tell()
    except (OSError, ValueError, AttributeError):
        return None


# A top-level JSON object whose first key is one of these is a single record; any other object is
# an "object of arrays" ({"train": [...], "test": [...]}) whose arrays hold the records.
_RECORD_KEYS = {"messages", "conversations", "instruction", "input", "output", "system", "prompt", "completion"}


def _next(events: Iterator[tuple[str, str, Any]]) -> tuple[str, str, Any]:
    # StopIteration must not escape into a generator (PEP 479 turns it into RuntimeError)
    for item in events:
        return item
    raise ValueError("the JSON document ended early")


def _build(event: str, value: Any, events: Iterator[tuple[str, str, Any]], builder: ObjectBuilder) -> Any:
    """Consume the events of one complete JSON value that starts with (event, value)."""
    builder.event(event, value)
    depth = 1 if event in ("start_map", "start_array") else 0
    while depth:
        _prefix, event, value = _next(events)
        builder.event(event, value)
        if event in ("start_map", "start_array"):
            depth += 1
        elif event in ("end_map", "end_array"):
            depth -= 1
    return builder.value


class _Place:
    """Where the records being read are in the document, for resuming after one over the cap: `depth`, the
    nesting depth of the records (0: the document is the record), and `prefix`, the bytes that reopen
    their container in a new stream (None: nothing can follow the record)."""

    def __init__(self, depth: int = 0, prefix: bytes | None = None):
        self.depth, self.prefix = depth, prefix


def _json_records(events: Iterator[tuple[str, str, Any]], builder_box: list, place: _Place,
                  resumed: bool = False) -> Iterator[tuple[Any, tuple, str]]:
    """(value, reasons, details) for each record of an array, an object of arrays, or a single object.
    `resumed`: the object was reopened after a record over the cap, so it is an object of arrays."""

    def build(event: str, value: Any) -> Any:
        builder_box[0] = ObjectBuilder()
        return _build(event, value, events, builder_box[0])

    place.depth, place.prefix = 0, None
    _prefix, event, value = _next(events)
    if event == "start_array":
        place.depth, place.prefix = 1, b"["
        for _prefix, event, value in events:
            if event == "end_array":
                return
            yield build(event, value), (), ""
        return
    if event != "start_map":
        yield value, ("not_an_object",), "the file holds a single JSON scalar; a JSON drop is an array of objects"
        return
    place.depth, place.prefix = 1, b"{"
    _prefix, event, key = _next(events)
    if event == "end_map":
        return
    if key in _RECORD_KEYS and not resumed:  # one record: rebuild the object from its first key on
        place.depth, place.prefix = 0, None
        builder_box[0] = builder = ObjectBuilder()
        builder.event("start_map", None)
        builder.event("map_key", key)
        depth = 1
        while depth:
            _prefix, event, value = _next(events)
            builder.event(event, value)
            depth += event in ("start_map", "start_array")
            depth -= event in ("end_map", "end_array")
        yield builder.value, (), ""
        return
    while event == "map_key":
        _prefix, event, value = _next(events)
        if event == "start_array":
            place.depth, place.prefix = 2, b"{" + orjson.dumps(key) + b":["
            for _prefix, event, value in events:
                if event == "end_array":
                    break
                yield build(event, value), (), ""
            place.depth, place.prefix = 1, b"{"
        else:
            yield (
                {key: build(event, value)},
                ("not_an_object",),
                f"key {key!r} holds no array; an object-of-arrays JSON file maps split names to arrays of records",
            )
        _prefix, event, key = _next(events)


class _IntegerOverflow(Exception):
    """ijson's C parser stops at an integer beyond 64 bits, which JSON allows: the file is read again."""


def read_json(fh: io.BufferedIOBase) -> Iterator[RawRecord]:
    """Stream a JSON array, an object of arrays or a single object without loading the whole file. A record
    over `raw.MAX_RECORD_BYTES` is quarantined as `too_long` and the file is read on after it (`_skim`).
    A file with an integer beyond 64 bits is read again, from its start, by ijson's Python parser (slower,
    exact), its records after those already given."""
    given = 0
    try:
        for record in _read_json(fh, ijson):
            given += 1
            yield record
        return
    except _IntegerOverflow:
        pass
    fh.seek(0)
    for i, record in enumerate(_read_json(fh, ijson.get_backend("python"))):
        if i >= given:
            yield record


def _read_json(fh: io.BufferedIOBase, parser) -> Iterator[RawRecord]:
    index = 0
    stream = _Stream(fh, max_record_bytes())
    is_array = stream.first_char() == b"["
    place, resumed = _Place(), False
    while True:
        builder_box: list = [None]
        if is_array:  # the common case: ijson's C backend builds the records
            place.depth, place.prefix = 1, b"["
            records: Iterator = ((value, (), "") for value in parser.items(stream, "item", use_float=True))
        else:
            records = _json_records(parser.parse(stream, use_float=True), builder_box, place, resumed)
        try:
            for value, reasons, details in records:
                index += 1
                stream.mark = stream.delivered
                yield RawRecord(index, dump_raw(value), None if reasons else value, reasons, details)
            return
        except _RecordTooLong:
            skimmed = _skim(fh, stream.origin, stream.delivered, place.depth)
            if skimmed is None:
                yield too_long(index + 1, b"", stream.delivered - stream.mark, f"record {index + 1}", at_least=True,
                               more="the records after it were not read: split the file, or write it as JSON Lines")
                return
            if skimmed.size:  # else the cap was reached on blanks between records: nothing to skip
                index += 1
                yield too_long(index, skimmed.head, skimmed.size, f"record {index}", at_least=skimmed.rest is None,
                               more="" if skimmed.rest is not None else "the file ends inside it")
            if skimmed.rest is None or place.prefix is None:  # the file or the record that was the document ended
                return
            stream = _Stream(fh, stream.cap, place.prefix + skimmed.rest)
            resumed = True
        except (ijson.JSONError, ijson.IncompleteJSONError, UnicodeDecodeError, ValueError) as exc:
            if stream.blank:  # an empty file has no rows
                return
            if "integer overflow" in str(exc) and parser is ijson and fh.seekable():
                raise _IntegerOverflow from exc
            builder = builder_box[0]
            partial = dump_raw(builder.value) if builder is not None and hasattr(builder, "value") else ""
            index += 1
            yield RawRecord(
                index,
                partial,
                None,
                ("malformed_json",),
                f"the JSON document is corrupt after record {index - 1} ({str(exc).splitlines()[0][:200]}); "
                "the records before it were read; fix the file and drop it again",
            )
            return


# ---------------------------------------------------------------------------------------------
# Skipping a record over the cap. ijson holds a value (even a single string) whole until it ends, so the
# stream stops it at the cap; `_skim` then reads the same bytes again with a lexer that keeps nothing but
# the nesting depth, finds where that record ends, and a new stream reopens its container after it.
# ---------------------------------------------------------------------------------------------

SKIM_BYTES = 1 << 20
_BLANKS = re.compile(rb"[ \t\r\n]+")
_SCALAR = re.compile(rb'[^ \t\r\n\[\]{},:"]*')  # a number, true, false, null (or a run of garbage)
_STRING_REST = re.compile(rb'(?:[^"\\]++|\\.)*+', re.S)  # a string's bytes up to its closing quote


class _Skimmed(NamedTuple):
    head: bytes  # the record's first bytes
    size: int  # its length in bytes (to the end of the file, if the file ends inside it); 0: no record was
    # open, the cap was reached on blanks between records, and `rest` starts with the next one
    rest: bytes | None  # what follows it (its separator dropped), as far as read; None: the file ended (in
    # the record, or after the records' container was closed)


def _skim(fh, origin: tuple[bytes, int | None], delivered: int, depth_of_records: int) -> _Skimmed | None:
    """Lex the stream that starts at `origin` again, to the end of the record that was open after its first
    `delivered` bytes: the value at nesting depth `depth_of_records` that ends after them. None when the
    file cannot be read again (no seek)."""
    prefix, offset = origin
    if offset is None:
        return None
    try:
        fh.seek(offset)
    except (OSError, ValueError, io.UnsupportedOperation):
        return None
    depth, pos = 0, 0  # the nesting depth; the stream offset of the chunk's first byte
    in_string, escaped, in_scalar = False, False, False  # a token that goes on into the next chunk
    start, head = None, b""  # the value at depth_of_records being read: its offset and first bytes
    chunks = itertools.chain([prefix], iter(lambda: fh.read(SKIM_BYTES), b""))
    for chunk in chunks:
        n, i = len(chunk), 0
        if start is not None and len(head) < EXCERPT_BYTES:
            head += chunk[:EXCERPT_BYTES - len(head)]
        while i < n:
            ended, scalar = None, False  # the offset where a value at depth_of_records ends, if one does here
            if in_string:
                j = _STRING_REST.match(chunk, i + escaped).end()
                escaped = False
                if j == n:
                    i = n
                elif chunk[j] == 0x22:  # the closing quote
                    in_string, i = False, j + 1
                    ended = pos + i if depth == depth_of_records else None
                else:  # a backslash, the chunk's last byte
                    escaped, i = True, n
            elif in_scalar:
                i = _SCALAR.match(chunk, i).end()
                if i < n:
                    in_scalar, scalar = False, True
                    ended = pos + i if depth == depth_of_records else None
            else:
                c = chunk[i]
                if c in b" \t\r\n":
                    i = _BLANKS.match(chunk, i).end()
                    continue
                if start is None and pos + i >= delivered and c not in b",:":
                    return _Skimmed(b"", 0, chunk[i:])  # no record was open: the cap was hit on blanks
                if c in b",:":
                    i += 1
                    continue
                if c in b"]}":
                    depth -= 1
                    i += 1
                    if depth == depth_of_records:
                        ended = pos + i
                else:  # a value begins: a string, an array, an object or a scalar
                    if depth == depth_of_records:
                        start, head = pos + i, chunk[i:i + EXCERPT_BYTES]
                    if c == 0x22:
                        in_string, i = True, i + 1
                    elif c in b"[{":
                        depth, i = depth + 1, i + 1
                    else:
                        i = _SCALAR.match(chunk, i).end()
                        in_scalar = i == n
                        if not in_scalar and depth == depth_of_records:
                            ended, scalar = pos + i, True
            if ended is not None and start is not None:
                # ijson has a string or a container once it read its last byte, a scalar only after it
                if ended > delivered or scalar and ended == delivered:  # the record that was open
                    return _Skimmed(head[:ended - start], ended - start, _after(chunk[i:], chunks))
                start = None
        pos += n
    if start is not None:
        return _Skimmed(head, pos - start, None)
    # blanks to the end: after the records' container was closed, or cut off (a new stream reports that)
    return _Skimmed(b"", 0, None if depth < depth_of_records else b"")


def _after(rest: bytes, chunks: Iterator[bytes]) -> bytes:
    """The bytes after a record, from its first non-blank one, without the comma that separates records."""
    rest = rest.lstrip(_Stream._BLANK)
    while not rest:
        rest = next(chunks, None)
        if rest is None:
            return b""
        rest = rest.lstrip(_Stream._BLANK)
    return rest[1:] if rest[:1] == b"," else rest
