"""Prompt/completion: {"prompt": ..., "completion": ...}, each a string or (TRL's conversational
variant) a list of {role, content} messages; an optional "system"."""

from __future__ import annotations

from typing import Any

from tasks.ingest.formats.messages import Message, Problems, maybe_json, message, system_messages, turn_messages
from tasks.ingest.formats.row import Format


def detect(record: dict) -> bool:
    return "prompt" in record or "completion" in record


def normalise(record: dict, problems: Problems) -> tuple[list[Message], Any]:
    messages = system_messages(record, problems)
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = maybe_json(record.get(key))
        if isinstance(value, list):  # TRL's conversational prompt/completion: lists of messages
            messages += turn_messages({key: value}, key, "role", "content", problems)
        elif value is None:
            problems.add(f"missing_field:{key}", f"field {key!r} is missing; every record needs it")
        elif not isinstance(value, str):
            problems.add(f"wrong_type:{key}", f"field {key!r} is {type(value).__name__}, expected a string or a list of messages")
        else:
            messages.append(message(role, value))
    return messages, record.get("tools")


FORMAT = Format(name="prompt_completion", fields="prompt/completion", detect=detect, normalise=normalise)
