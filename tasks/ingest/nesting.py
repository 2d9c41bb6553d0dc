"""Values nested deeper than orjson writes (255 levels): readers and formats reject them alike."""

from __future__ import annotations

import json

import orjson

TOO_DEEP = "too_deeply_nested"
TOO_DEEP_DETAIL = "nests lists/objects more than 255 levels deep; flatten it (no instruction format needs that)"


def sorted_json(value) -> str | None:
    """Compact JSON with sorted keys (equal values, equal text), or None when `value` nests too deep. JSON
    allows any integer and orjson writes only 64-bit ones: a bigger one is written, exactly, by the standard
    library (the row keeps it instead of being refused for a depth it does not have); so is a lone surrogate,
    which the row's id then refuses as invalid UTF-8 (formats.row_id)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except orjson.JSONEncodeError as exc:
        if "Recursion" in str(exc):
            return None
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except RecursionError:
        return None
