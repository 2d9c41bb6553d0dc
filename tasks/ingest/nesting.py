"""Values nested deeper than orjson writes (255 levels): readers and formats reject them alike."""

from __future__ import annotations

TOO_DEEP = "too_deeply_nested"
TOO_DEEP_DETAIL = "nests lists/objects more than 255 levels deep; flatten it (no instruction format needs that)"
