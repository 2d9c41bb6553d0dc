"""JSON: an array of records, an object of arrays ({"train": [...], "test": [...]}) or a single record,
streamed with ijson so the whole file is never loaded. A corrupt document keeps the records before it."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import ijson
from ijson.common import ObjectBuilder

from tasks.ingest.readers.raw import RawRecord, dump_raw


class _SkipBOM:
    """A file wrapper for ijson: drops a UTF-8 byte-order mark (ijson's C parser rejects one; files
    written by Windows tools start with one) and can peek at the first non-blank byte."""

    _BLANK = b" \t\r\n"

    def __init__(self, fh):
        self._fh = fh
        self._buffer = b""
        self._started = False
        self.blank = True  # nothing but whitespace read so far

    def first_char(self) -> bytes:
        while not self._buffer.lstrip(self._BLANK):
            chunk = self._read(1 << 16)
            if not chunk:
                return b""
            self._buffer += chunk
        return self._buffer.lstrip(self._BLANK)[:1]

    def _read(self, size: int) -> bytes:
        data = self._fh.read(size)
        if not self._started and data:
            self._started = True
            data = data.removeprefix(b"\xef\xbb\xbf")
        if self.blank and data.strip(self._BLANK):
            self.blank = False
        return data

    def read(self, size: int = -1) -> bytes:
        if self._buffer:  # ijson first calls read(0) to learn whether the file is binary
            if size == 0:
                return b""
            data, self._buffer = self._buffer, b""
            return data
        return self._read(size)


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


def _json_records(events: Iterator[tuple[str, str, Any]], builder_box: list) -> Iterator[tuple[Any, tuple, str]]:
    """(value, reasons, details) for each record of an array, an object of arrays, or a single object."""

    def build(event: str, value: Any) -> Any:
        builder_box[0] = ObjectBuilder()
        return _build(event, value, events, builder_box[0])

    _prefix, event, value = _next(events)
    if event == "start_array":
        for _prefix, event, value in events:
            if event == "end_array":
                return
            yield build(event, value), (), ""
        return
    if event != "start_map":
        yield value, ("not_an_object",), "the file holds a single JSON scalar; a JSON drop is an array of objects"
        return
    _prefix, event, key = _next(events)
    if event == "end_map":
        return
    if key in _RECORD_KEYS:  # one record: rebuild the object from its first key on
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
            for _prefix, event, value in events:
                if event == "end_array":
                    break
                yield build(event, value), (), ""
        else:
            yield (
                {key: build(event, value)},
                ("not_an_object",),
                f"key {key!r} holds no array; an object-of-arrays JSON file maps split names to arrays of records",
            )
        _prefix, event, key = _next(events)


def read_json(fh: io.BufferedIOBase) -> Iterator[RawRecord]:
    """Stream a JSON array, an object of arrays or a single object without loading the whole file."""
    builder_box: list = [None]
    index = 0
    source = _SkipBOM(fh)
    if source.first_char() == b"[":  # the common case: ijson's C backend builds the records
        records: Iterator = ((value, (), "") for value in ijson.items(source, "item", use_float=True))
    else:
        records = _json_records(ijson.parse(source, use_float=True), builder_box)
    try:
        for value, reasons, details in records:
            index += 1
            yield RawRecord(index, dump_raw(value), None if reasons else value, reasons, details)
    except (ijson.JSONError, ijson.IncompleteJSONError, UnicodeDecodeError, ValueError) as exc:
        if source.blank:  # an empty file has no rows
            return
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
