"""What the format modules share: the canonical message, the problem collector, and readers of the
fields several formats hold (text fields, OpenAI content, roles, lists of turns, a system prompt)."""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

from tasks.ingest.nesting import TOO_DEEP, TOO_DEEP_DETAIL, sorted_json

# (role, content, weight, tool_calls, reasoning), the fields of schemas.tables.MESSAGE_TYPE in order: Arrow
# builds struct arrays from tuples twice as fast as from dicts. weight: None (the role's default), 0.0 or 1.0;
# tool_calls: OpenAI-shaped calls as JSON; reasoning: the model's thinking before its answer.
Message = tuple[str, str, "float | None", "str | None", "str | None"]


def message(role: str, content: str, weight: float | None = None, tool_calls: str | None = None,
            reasoning: str | None = None) -> Message:
    return (role, content, weight, tool_calls, reasoning)


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


# Content parts the pipeline cannot train a text model on, by the part types their owners use.
MEDIA_PARTS = {"image", "image_url", "input_image", "audio", "input_audio", "audio_url", "video", "video_url", "file"}
# Record fields that carry media for placeholders such as <image> in the text (LLaMA-Factory, Axolotl, TRL).
MEDIA_FIELDS = frozenset(("images", "image", "audios", "audio", "videos", "video"))


class Content(NamedTuple):
    """What one turn's content holds: its text, reasoning parts and tool-call parts."""

    text: str
    reasoning: list[str]
    tool_calls: list[Any]


def content_parts(content: Any, where: str, problems: Problems) -> Content | None:
    """A turn's content: a string, or a list of parts. Text parts carry `text` (OpenAI, TRL) or `value`
    (LLaMA-Factory); `reasoning`/`thinking` parts are the model's reasoning and `tool_call` parts its
    calls, both kept. A media part (image, audio, video) is a problem naming it: a text model cannot
    learn from it, and dropping it would change what the row says."""
    if isinstance(content, str):
        return Content(content, [], [])
    if not isinstance(content, list):
        problems.add("wrong_type:content",
                     f"{where}: content is {type(content).__name__}, expected a string or a list of parts")
        return None
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[Any] = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type", "text") if isinstance(part, dict) else type(part).__name__
        body = (part.get("text", part.get("value")) if isinstance(part, dict) else None)
        if kind == "text" and isinstance(body, str):
            texts.append(body)
        elif kind in ("reasoning", "thinking") and isinstance(body if body is not None else part.get(kind), str):
            reasoning.append(body if body is not None else part[kind])
        elif kind in ("tool_call", "function_call") and isinstance(part, dict):
            call = part.get("tool_call", part.get("function_call", body))
            calls.append(maybe_json(call) if call is not None else {k: v for k, v in part.items() if k != "type"})
        elif kind in MEDIA_PARTS:
            problems.add(f"unsupported_content:{kind}",
                         f"{where}.content[{j}] is a part of type {kind!r}; sftflow trains text models: remove the "
                         "row or its media part (and any placeholder for it) from the source")
            return None
        else:
            problems.add("unsupported_content",
                         f"{where}.content[{j}]: a part of type {kind!r} without a text; parts of type text "
                         "(with 'text' or 'value'), reasoning and tool_call are read")
            return None
    return Content("\n".join(texts), reasoning, calls)


def content_text(content: Any, where: str, problems: Problems) -> str | None:
    """A content's text (for fields that hold a prompt or answer, not a turn): its text parts joined."""
    parts = content_parts(content, where, problems)
    if parts is None:
        return None
    if parts.reasoning or parts.tool_calls:
        problems.add("unsupported_content", f"{where}: reasoning or tool-call parts outside a turn; give them in "
                     "an assistant turn of a messages list")
        return None
    return parts.text


def _openai_call(call: Any) -> Any:
    """A tool call in OpenAI's shape ({"type": "function", "function": {"name", "arguments"}}), as chat
    templates read it; arguments given as a JSON string become the object they encode."""
    call = maybe_json(call)
    if isinstance(call, dict) and "function" not in call and "name" in call:  # {"name", "arguments"}: a bare call
        call = {"type": "function", "function": {k: v for k, v in call.items() if k != "type"}}
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        function = dict(call["function"])
        if "arguments" not in function and "parameters" in function:  # Llama 3.x's spelling
            function["arguments"] = function.pop("parameters")
        function["arguments"] = maybe_json(function.get("arguments", {}))
        call = {**call, "type": call.get("type", "function"), "function": function}
    return call


def tool_calls_json(calls: Any, where: str, problems: Problems) -> str | None:
    """A turn's tool calls as sorted-key JSON (equal calls, equal row ids), or None when there are none."""
    calls = maybe_json(calls)
    if calls in (None, "", []):
        return None
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list):
        problems.add("wrong_type:tool_calls", f"{where}: tool_calls is {type(calls).__name__}, expected a list of calls")
        return None
    calls = [_openai_call(c) for c in calls]
    if not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
               and isinstance(c["function"].get("name"), str) for c in calls):
        problems.add("invalid_tool_call", f"{where}: each tool call needs a function name, as "
                     '{"type": "function", "function": {"name": ..., "arguments": {...}}}')
        return None
    if (text := sorted_json(calls)) is None:
        problems.add(TOO_DEEP, f"{where}: tool_calls {TOO_DEEP_DETAIL}")
    return text


def turn_weight(turn: dict, where: str, problems: Problems) -> float | None:
    """A turn's loss weight as the data gives it: LLaMA-Factory's `loss_weight`, Axolotl's `weight` or
    `train`/`training` (a boolean). None when absent (the role's default); 0.0 or 1.0 otherwise."""
    for key in ("weight", "loss_weight", "train", "training"):
        if key not in turn or turn[key] is None:
            continue
        value = turn[key]
        if isinstance(value, bool):
            return 1.0 if value else 0.0
        if isinstance(value, (int, float)) and value in (0, 1):
            return float(value)
        problems.add(f"invalid_weight:{key}",
                     f"{where}: {key} is {value!r}; a turn is trained (1 or true) or not (0 or false), set it to one of those")
        return None
    return None


def media_problems(record: dict, problems: Problems) -> None:
    """A record that carries images, audio or video: quarantined naming the field, never trained as text
    with its media silently dropped."""
    if record.keys().isdisjoint(MEDIA_FIELDS):
        return
    for key in MEDIA_FIELDS:
        value = maybe_json(record.get(key))
        if value not in (None, "", [], {}):
            problems.add(f"unsupported_content:{key}",
                         f"field {key!r} holds media; sftflow trains text models: drop the field and its placeholders "
                         "(<image>, <audio>, <video>) from the text, or remove the row")


def canonical_role(raw_role: Any) -> str:
    """Map an alias to its canonical role; an unknown role is kept as given so validation names it."""
    role = ROLE_ALIASES.get(raw_role) if isinstance(raw_role, str) else None
    if role is None:
        if not isinstance(raw_role, str):
            return str(raw_role)
        role = ROLE_ALIASES.get(raw_role.strip().lower(), raw_role)
    return role


def turn_messages(record: dict, field: str, role_key: str, content_key: str, problems: Problems) -> list[Message]:
    """A list of turns: ShareGPT's {from, value} or OpenAI's {role, content} (each accepts the other), with
    a turn's tool calls (`tool_calls`, ShareGPT's `function_call` role), reasoning (`reasoning_content`,
    `reasoning`, `thinking`, or reasoning parts) and loss weight kept beside its text."""
    messages: list[Message] = []
    turns = maybe_json(record.get(field))
    if not isinstance(turns, list):
        kind = "missing" if turns is None else type(turns).__name__
        problems.add(f"wrong_type:{field}", f"field {field!r} is {kind}, expected a list of {{{role_key}, {content_key}}} turns")
        return messages
    for i, turn in enumerate(turns):
        if len(turn) == 2 if isinstance(turn, dict) else False:  # the common turn: a role and a text, nothing else
            raw_role, content = turn.get(role_key, turn.get("role", turn.get("from"))), \
                turn.get(content_key, turn.get("content", turn.get("value")))
            if isinstance(content, str) and isinstance(raw_role, str) and raw_role not in ("function_call", "tool_call"):
                messages.append((canonical_role(raw_role), content, None, None, None))
                continue
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            problems.add(f"wrong_type:{field}", f"{where} is {type(turn).__name__}, expected an object")
            continue
        raw_role = turn.get(role_key, turn.get("role", turn.get("from")))
        content = turn.get(content_key, turn.get("content", turn.get("value")))
        if raw_role is None:
            problems.add(f"missing_field:{role_key}", f"{where} has no {role_key!r}")
            continue
        role = canonical_role(raw_role)
        calls = turn.get("tool_calls") or turn.get("function_call")
        if content is None and not calls:
            problems.add(f"missing_field:{content_key}", f"{where} has no {content_key!r}")
            continue
        parts = content_parts("" if content is None else content, where, problems)
        if parts is None:
            continue
        text, reasoning, part_calls = parts
        if isinstance(raw_role, str) and raw_role.strip().lower() == "function_call" and not calls and not part_calls:
            # ShareGPT's function_call turn: its value is the call, as JSON
            parsed = maybe_json(text)
            if isinstance(parsed, (dict, list)):
                part_calls, text = parsed if isinstance(parsed, list) else [parsed], ""
        all_calls = [*(calls if isinstance(calls, list) else [calls] if calls else []), *part_calls]
        calls_json = tool_calls_json(all_calls, where, problems) if all_calls else None
        if calls_json is not None and role != "assistant":
            problems.add("tool_calls_outside_assistant", f"{where}: a {role} turn with tool_calls; only the assistant calls tools")
            continue
        thought = turn.get("reasoning_content", turn.get("reasoning", turn.get("thinking")))
        if thought is not None and not isinstance(thought, str):
            problems.add("wrong_type:reasoning_content", f"{where}: reasoning_content is {type(thought).__name__}, expected a string")
            continue
        thoughts = [t for t in ([thought] if thought else []) + reasoning if t.strip()]
        weight = turn_weight(turn, where, problems)
        messages.append(message(role, text, weight, calls_json, "\n".join(thoughts) if thoughts else None))
    return messages


def system_messages(record: dict, problems: Problems) -> list[Message]:
    """The record's optional `system` field as a system message (none when absent or empty)."""
    system = string_field(record, "system", problems, required=False)
    return [message("system", system)] if system else []
