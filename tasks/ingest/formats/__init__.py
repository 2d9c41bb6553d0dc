"""Input formats: the table of formats a record may be in, detection, and normalisation to canonical rows.

`FORMATS` is ordered: a record is of the first format whose `detect` accepts it, so a record with
`messages` is OpenAI even when it also has a `prompt`. A new format is one module defining its
`FORMAT` row (see `row.Format`), one row in `FORMATS` and its test.

Pure: no I/O, and no Prefect or pyarrow import, so the CLI can check `--format` against the table quickly.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from typing import Any, NamedTuple

import orjson

from foundation.errors import ConfigError
from tasks.ingest.formats import alpaca, openai, preference, prompt_completion, sharegpt, text
from tasks.ingest.formats.messages import Message, Problems, maybe_json, media_problems
from tasks.ingest.formats.row import Format
from tasks.ingest.nesting import TOO_DEEP, TOO_DEEP_DETAIL, sorted_json

FORMATS: tuple[Format, ...] = (
    preference.FORMAT,  # chosen (and rejected): the chosen conversation
    openai.FORMAT,  # messages
    sharegpt.FORMAT,  # conversations
    alpaca.FORMAT,  # instruction, or output with input
    prompt_completion.FORMAT,  # prompt or completion
    text.FORMAT,  # text: a document trained on every token
)
FORMAT_NAMES = tuple(fmt.name for fmt in FORMATS)
_BY_NAME = {fmt.name: fmt for fmt in FORMATS}

# Why a file none of whose sampled records has a known format's fields is quarantined whole.
UNKNOWN_FORMAT_DETAIL = (
    "no record in the file has the fields of a known format (messages, conversations, "
    "instruction/output, prompt/completion, chosen/rejected, text); map its columns with a drop.yaml "
    "(columns: {instruction: <your question column>, output: <your answer column>}) or --map"
)


class Rejection(NamedTuple):
    reasons: tuple[str, ...]
    details: str


class CanonicalRow(NamedTuple):
    id: str
    messages: list[Message]
    tools: str | None


def check_format(name: str) -> str:
    """`name` when it is `auto` or a format of `FORMATS`; otherwise a ConfigError naming the choices."""
    if name != "auto" and name not in _BY_NAME:
        raise ConfigError(f"--format {name}: choose from {', '.join(('auto', *FORMAT_NAMES))}")
    return name


def record_format(value: Any) -> str | None:
    """The name of the first format in `FORMATS` that the record has the fields of, or None."""
    if not isinstance(value, dict):
        return None
    for fmt in FORMATS:
        if fmt.detect(value):
            return fmt.name
    return None


def detect_format(values: Iterable[Any]) -> str | None:
    """The most common record format among sample records, or None when none is recognisable."""
    votes = Counter(fmt for fmt in map(record_format, values) if fmt)
    return votes.most_common(1)[0][0] if votes else None


def _tools_json(tools: Any, problems: Problems) -> str | None:
    """Tool definitions as compact JSON with sorted keys, so equal tools give equal row ids."""
    tools = maybe_json(tools)
    if tools in (None, "", [], {}):
        return None
    if isinstance(tools, str):
        problems.add("invalid_tools_json", "field 'tools' is a string that is not JSON; give the tool list as JSON")
        return None
    if not isinstance(tools, (list, dict)):
        problems.add("wrong_type:tools", f"field 'tools' is {type(tools).__name__}, expected a JSON list of tools")
        return None
    if (text := sorted_json(tools)) is None:
        problems.add(TOO_DEEP, f"field 'tools' {TOO_DEEP_DETAIL}")
    return text


def row_id(messages: list[Message], tools: str | None) -> str:
    """sha256 of the normalised conversation: equal conversations (and tools) get equal ids. A message
    with no weight, tool calls or reasoning hashes as (role, content), as in canonical-row/1, so rows
    ingested before those fields existed keep their ids (and deduplicate against new drops)."""
    payload = orjson.dumps([m if m[2] is not None or m[3] is not None or m[4] is not None else m[:2]
                            for m in messages] + [tools])
    return hashlib.sha256(payload).hexdigest()


def normalize_record(value: Any, fmt: str) -> CanonicalRow | Rejection:
    """Turn one parsed record of the given source format into a canonical row, or say why not."""
    if not isinstance(value, dict):
        return Rejection(("not_an_object",), f"record is {type(value).__name__}, expected a JSON object")
    file_format = _BY_NAME[fmt]
    if file_format.rejects_other_formats:
        looks_like = record_format(value)
        if looks_like not in (fmt, None):
            return Rejection(
                ("format_mismatch",),
                f"record looks like {looks_like}, but the file is {fmt} (fields {file_format.fields}); "
                "split mixed files by format or pass --format",
            )
    problems = Problems()
    media_problems(value, problems)
    messages, tools = file_format.normalise(value, problems)
    tools_json = _tools_json(tools, problems)
    if not problems.reasons and any(m[2] is not None for m in messages) and not any(
            m[0] == "text" or (m[2] if m[2] is not None else m[0] == "assistant") for m in messages):
        problems.add("no_trained_turn", "every assistant turn has weight 0 (loss_weight / weight / train), so the row "
                     "teaches nothing; give the turn to learn weight 1, or remove the row")
    if problems.reasons:
        return Rejection(tuple(problems.reasons), "; ".join(problems.details))
    try:
        rid = row_id(messages, tools_json)
    except orjson.JSONEncodeError:  # lone surrogates from \\ud800-style escapes
        return Rejection(("invalid_utf8",), "text holds unpaired UTF-16 surrogates; re-encode the source as UTF-8")
    return CanonicalRow(rid, messages, tools_json)
