"""ShareGPT: {"system": ..., "conversations": [{"from": "human", "value": ...}, ...], "tools": ...}.

Roles are spelled many ways (`human`, `gpt`, `function_call`, `observation`, ...): see
`messages.ROLE_ALIASES`.
"""

from __future__ import annotations

from typing import Any

from tasks.ingest.formats.messages import Message, Problems, system_messages, turn_messages
from tasks.ingest.formats.row import Format


def detect(record: dict) -> bool:
    return "conversations" in record


def normalise(record: dict, problems: Problems) -> tuple[list[Message], Any]:
    messages = system_messages(record, problems) + turn_messages(record, "conversations", "from", "value", problems)
    return messages, record.get("tools")


FORMAT = Format(name="sharegpt", fields="conversations", detect=detect, normalise=normalise)
