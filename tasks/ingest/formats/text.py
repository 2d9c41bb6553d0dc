"""Plain text: {"text": ...}, a document trained on every token (continued pre-training; Axolotl's
`completion` type, TRL's language-modeling rows). It becomes one message of role `text`, which the
tokenizer writes without a chat template and closes with the end-of-sequence token."""

from __future__ import annotations

from typing import Any

from tasks.ingest.formats.messages import Message, Problems, message, string_field
from tasks.ingest.formats.row import Format


def detect(record: dict) -> bool:
    return "text" in record


def normalise(record: dict, problems: Problems) -> tuple[list[Message], Any]:
    text = string_field(record, "text", problems, required=True)
    return ([message("text", text)] if text is not None else []), None


FORMAT = Format(name="text", fields="text", detect=detect, normalise=normalise)
