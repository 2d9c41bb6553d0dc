"""What every reader yields: `RawRecord`, with the raw text kept for a parsed value."""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

from tasks.ingest.nesting import TOO_DEEP_DETAIL


class RawRecord(NamedTuple):
    """One record as read from a file: its parsed value, or the reasons it could not be parsed."""

    source_row: int
    raw: str
    value: Any
    reasons: tuple[str, ...] = ()
    details: str = ""


def dump_raw(value: Any) -> str:
    """The raw text of a parsed value (JSON, Parquet): compact JSON."""
    try:
        return orjson.dumps(value, default=str).decode()
    except orjson.JSONEncodeError:  # deeper than orjson writes: the row is rejected where it is used
        return f"<a value that {TOO_DEEP_DETAIL.split(';')[0]}>"
