"""OpenAI chat: {"messages": [{"role": ..., "content": ...}, ...], "tools": [...]}.

Content may be a list of parts (only text parts are supported); an assistant turn that only calls
tools (`tool_calls`) keeps the calls, as JSON, as its content.
"""

from __future__ import annotations

from typing import Any

from tasks.ingest.formats.messages import Message, Problems, turn_messages
from tasks.ingest.formats.row import Format


def detect(record: dict) -> bool:
    return "messages" in record


def normalise(record: dict, problems: Problems) -> tuple[list[Message], Any]:
    return turn_messages(record, "messages", "role", "content", problems), record.get("tools")


FORMAT = Format(name="openai", fields="messages", detect=detect, normalise=normalise)
