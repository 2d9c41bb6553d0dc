"""`Format`: one row of the formats table, as each format module defines it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tasks.ingest.formats.messages import Message, Problems


@dataclass(frozen=True)
class Format:
    """An input format: the fields that identify its records, and how one becomes canonical messages."""

    name: str  # as `--format` takes it and the staging tables record it
    fields: str  # the fields it is recognised by, as messages name them: "instruction/input/output"
    detect: Callable[[dict], bool]  # does this record (an object) have the format's fields?
    # (messages, tools) of a record, noting every problem in `problems` instead of stopping at the first
    normalise: Callable[[dict, Problems], tuple[list[Message], Any]]
    # A record of a file in this format that looks like another format is quarantined as format_mismatch.
    rejects_other_formats: bool = True
