"""What every reader yields: `RawRecord`, with the raw text kept for a parsed value."""

from __future__ import annotations

import json
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
    except orjson.JSONEncodeError as exc:
        too_deep = "Recursion" in str(exc)
    if not too_deep:  # an integer beyond 64 bits or a lone surrogate, which orjson refuses: the standard library
        try:
            return json.dumps(value, default=str, separators=(",", ":"))  # ASCII: escapes lone surrogates too
        except RecursionError:
            pass
    return f"<a value that {TOO_DEEP_DETAIL.split(';')[0]}>"  # the row is rejected where it is used


# The most bytes one record may take in its file. A reader holds a record whole in memory (and a parsed
# JSON value takes several times its size), so without a cap a single line can take all the memory: 1 GB
# of zeros gzips to 4 MB. No conversation that long can be accepted anyway: `ingest.max_chars` (32,000
# characters by default) is checked on the normalised rows, and 16 MiB is 500 times that default. A
# longer record is skipped while it is read, never held, and quarantined as `too_long` with its start.
MAX_RECORD_BYTES = 16 * 2**20
EXCERPT_BYTES = 256  # how much of a too-long record its quarantined row keeps
TOO_LONG = "too_long"


def max_record_bytes() -> int:
    """`MAX_RECORD_BYTES`, looked up when a file is opened (so a test can lower it)."""
    return MAX_RECORD_BYTES


def too_long(source_row: int, head: bytes | str, size: int, what: str, unit: str = "bytes", more: str = "",
             at_least: bool = False) -> RawRecord:
    """The quarantined row of a record over `MAX_RECORD_BYTES`: its first bytes and its size as `raw`, and
    `details` naming the record (`what`), its size (`at_least` that many) and the fix; `more` adds what else
    happened (one clause)."""
    if isinstance(head, bytes):
        head = head[:EXCERPT_BYTES].decode("utf-8", errors="backslashreplace")
    amount = f"{'at least ' if at_least else ''}{size:,} {unit}"
    excerpt = f"{head[:EXCERPT_BYTES]}... [{amount} in all]"
    cap = f"{MAX_RECORD_BYTES / 2**20:g} MiB" if MAX_RECORD_BYTES >= 2**20 else f"{MAX_RECORD_BYTES:,} bytes"
    details = (f"{what} is {amount}, more than the {cap} a record may have: it was skipped"
               f"{'; ' + more if more else ''}; shorten or split it, or remove it (no conversation that long is "
               "accepted: ingest.max_chars)")
    return RawRecord(source_row, excerpt, None, (TOO_LONG,), details)
