"""Alpaca: {"instruction": ..., "input": ..., "output": ...}, with optional "system", "history" (earlier
[instruction, response] pairs) and "tools". A non-empty input is appended to the instruction; a row whose
instruction is empty and whose input holds the question (as many exported files have it) is that input."""

from __future__ import annotations

from typing import Any

from tasks.ingest.formats.messages import Message, Problems, maybe_json, message, string_field, system_messages
from tasks.ingest.formats.row import Format


def detect(record: dict) -> bool:
    return "instruction" in record or ("output" in record and "input" in record)


def normalise(record: dict, problems: Problems) -> tuple[list[Message], Any]:
    messages = system_messages(record, problems)
    history = maybe_json(record.get("history"))
    if history not in (None, "", []):
        if not isinstance(history, list) or not all(
            isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn) for turn in history
        ):
            problems.add("wrong_type:history", "field 'history' must be a list of [instruction, response] string pairs")
        else:
            for user, assistant in history:
                messages += [message("user", user), message("assistant", assistant)]
    extra_input = string_field(record, "input", problems, required=False)
    instruction = record.get("instruction")
    if isinstance(instruction, str) and instruction.strip():
        user = f"{instruction}\n{extra_input}" if extra_input else instruction
    elif (instruction is None or isinstance(instruction, str)) and extra_input and extra_input.strip():
        user = extra_input  # no instruction: the question is in the input
    else:
        string_field(record, "instruction", problems, required=True)  # notes what is wrong with it
        user = None
    output = string_field(record, "output", problems, required=True)
    if user is not None:
        messages.append(message("user", user))
    if output is not None:
        messages.append(message("assistant", output))
    return messages, record.get("tools")


FORMAT = Format(
    name="alpaca",
    fields="instruction/input/output",
    detect=detect,
    normalise=normalise,
    # A file read as Alpaca (detected or passed as --format alpaca) never quarantines a record as
    # format_mismatch: every record is read for its Alpaca fields, whatever else it holds, and one
    # without them is quarantined naming the missing field (missing_field:instruction, ...).
    rejects_other_formats=False,
)
