"""Preference pairs, as DPO data is written: the chosen conversation is kept, the rejected reply is not
(sftflow trains supervised; the drop report says how many rows were pairs).

Shapes read (TRL's, LLaMA-Factory's `ranking` datasets, and common exports):
- {"prompt": str | [messages], "chosen": str | [messages], "rejected": ...}: the prompt, then the chosen reply;
- {"chosen": [messages], "rejected": [messages]} (TRL's implicit prompt): the chosen conversation whole;
- {"conversations" | "messages": [...], "chosen": {turn}, "rejected": {turn}} (LLaMA-Factory sharegpt ranking);
- {"instruction", "input", "chosen": str, "rejected": str} (LLaMA-Factory alpaca ranking), {"question", ...};
each with an optional "system" and "tools".
"""

from __future__ import annotations

from typing import Any

from tasks.ingest.formats.messages import Message, Problems, maybe_json, message, string_field, system_messages, turn_messages
from tasks.ingest.formats.row import Format


def detect(record: dict) -> bool:
    return "chosen" in record


def _prompt(record: dict, problems: Problems) -> list[Message] | None:
    """The conversation before the chosen reply, or None when the record has no prompt fields."""
    for field in ("conversations", "messages"):
        if field in record:
            return turn_messages(record, field, "role", "content", problems)
    for field in ("prompt", "question"):
        value = maybe_json(record.get(field))
        if isinstance(value, list):
            return turn_messages({field: value}, field, "role", "content", problems)
        if value is not None:
            text = string_field(record, field, problems, required=True)
            return [message("user", text)] if text is not None else []
    if "instruction" in record or "input" in record:
        instruction = record.get("instruction") or ""
        extra = record.get("input") or ""
        if not isinstance(instruction, str) or not isinstance(extra, str):
            problems.add("wrong_type:instruction", "fields 'instruction' and 'input' must be strings")
            return []
        text = f"{instruction}\n{extra}" if instruction.strip() and extra.strip() else instruction or extra
        if not text.strip():
            problems.add("empty_content", "fields 'instruction' and 'input' are blank; the pair needs its prompt")
            return []
        return [message("user", text)]
    return None


def normalise(record: dict, problems: Problems) -> tuple[list[Message], Any]:
    messages = system_messages(record, problems)
    prompt = _prompt(record, problems)
    chosen = maybe_json(record.get("chosen"))
    if isinstance(chosen, list):  # turns: the reply (explicit prompt) or the whole conversation (implicit)
        turns = turn_messages({"chosen": chosen}, "chosen", "role", "content", problems)
        messages += (prompt or []) + turns
    elif isinstance(chosen, dict):  # one turn, after the prompt's turns
        messages += (prompt or []) + turn_messages({"chosen": [chosen]}, "chosen", "role", "content", problems)
        if prompt is None:
            problems.add("missing_field:prompt", "field 'chosen' is one turn but the record has no prompt, "
                         "conversations or messages before it")
    elif isinstance(chosen, str):
        if prompt is None:
            problems.add("missing_field:prompt", "field 'chosen' is a text but the record has no prompt "
                         "(prompt, question, instruction, conversations or messages); map the prompt's column")
        else:
            reply = string_field(record, "chosen", problems, required=True)
            messages += prompt + ([message("assistant", reply)] if reply is not None else [])
    else:
        problems.add("wrong_type:chosen", f"field 'chosen' is {type(chosen).__name__}, expected a text, a turn or a list of turns")
    return messages, record.get("tools")


FORMAT = Format(name="preference", fields="chosen/rejected", detect=detect, normalise=normalise)
