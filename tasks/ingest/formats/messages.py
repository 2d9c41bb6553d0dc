"""What the format modules share: the canonical message, the problem collector, and readers of the
fields several formats hold (text fields, OpenAI content, roles, lists of turns, a system prompt)."""

from __future__ import annotations

from typing import Any

import orjson

from tasks.ingest.nesting import TOO_DEEP, TOO_DEEP_DETAIL

Message = tuple[str, str]  # (role, content): Arrow builds struct arrays from tuples twice as fast as dicts

# Every spelling of a role seen in public instruction data, mapped to the four canonical roles.
# ShareGPT's function_call is the assistant calling a tool; an observation is the tool's answer.
ROLE_ALIASES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function": "tool",
    "ipython": "tool",
}


class Problems:
    """Collects every problem of one record, so the quarantine lists all reasons, not the first."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.details: list[str] = []

    def add(self, reason: str, detail: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)
        self.details.append(detail)


def maybe_json(value: Any) -> Any:
    """CSV and Parquet cells carry nested fields as JSON strings."""
    if isinstance(value, str) and value[:1] in ("[", "{"):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value


def string_field(record: dict, key: str, problems: Problems, *, required: bool) -> str | None:
    """The string in `record[key]`, or None with the problem noted (a missing or empty optional field is
    no problem)."""
    value = record.get(key)
    if value is None or (value == "" and not required):
        if required:
            problems.add(f"missing_field:{key}", f"field {key!r} is missing; every record needs it")
        return None
    if not isinstance(value, str):
        problems.add(f"wrong_type:{key}", f"field {key!r} is {type(value).__name__}, expected a string")
        return None
    if required and not value.strip():
        problems.add("empty_content", f"field {key!r} is blank; every record needs it filled")
        return None
    return value


def content_text(content: Any, where: str, problems: Problems) -> str | None:
    """OpenAI content: a string, or a list of parts of which only text parts are supported."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                problems.add("unsupported_content", f"{where}: content part of type {kind!r}; only text parts are supported")
                return None
        return "\n".join(texts)
    problems.add("wrong_type:content", f"{where}: content is {type(content).__name__}, expected a string or a list of text parts")
    return None


def canonical_role(raw_role: Any) -> str:
    """Map an alias to its canonical role; an unknown role is kept as given so validation names it."""
    role = ROLE_ALIASES.get(raw_role) if isinstance(raw_role, str) else None
    if role is None:
        if not isinstance(raw_role, str):
            return str(raw_role)
        role = ROLE_ALIASES.get(raw_role.strip().lower(), raw_role)
    return role


def turn_messages(record: dict, field: str, role_key: str, content_key: str, problems: Problems) -> list[Message]:
    """A list of turns: ShareGPT's {from, value} or OpenAI's {role, content} (each accepts the other)."""
    messages: list[Message] = []
    turns = maybe_json(record.get(field))
    if not isinstance(turns, list):
        kind = "missing" if turns is None else type(turns).__name__
        problems.add(f"wrong_type:{field}", f"field {field!r} is {kind}, expected a list of {{{role_key}, {content_key}}} turns")
        return messages
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            problems.add(f"wrong_type:{field}", f"{where} is {type(turn).__name__}, expected an object")
            continue
        role = turn.get(role_key, turn.get("role", turn.get("from")))
        content = turn.get(content_key, turn.get("content", turn.get("value")))
        if role is None:
            problems.add(f"missing_field:{role_key}", f"{where} has no {role_key!r}")
            continue
        calls = turn.get("tool_calls") or turn.get("function_call")
        if content in (None, "") and calls:
            # An assistant turn that only calls tools: its content is the calls, as JSON.
            try:
                text = orjson.dumps(calls, option=orjson.OPT_SORT_KEYS).decode()
            except orjson.JSONEncodeError:
                problems.add(TOO_DEEP, f"{where}: tool_calls {TOO_DEEP_DETAIL}")
                continue
        elif content is None:
            problems.add(f"missing_field:{content_key}", f"{where} has no {content_key!r}")
            continue
        else:
            text = content_text(content, where, problems)
        if text is not None:
            messages.append((canonical_role(role), text))
    return messages


def system_messages(record: dict, problems: Problems) -> list[Message]:
    """The record's optional `system` field as a system message (none when absent or empty)."""
    system = string_field(record, "system", problems, required=False)
    return [("system", system)] if system else []
