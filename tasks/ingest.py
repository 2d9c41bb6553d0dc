"""Ingest: read a drop's files in bounded batches, detect each file's format, normalise to canonical rows.

Pure parts (`normalize_record`, `detect_format`, the readers over open files) take and return plain
data; the task `read_drop` wires them to the file system and writes two staging tables: the
normalised rows (with their raw text) and the rows that could not be normalised (quarantine).

A corrupt line or record never stops a drop: it becomes a quarantined row with its raw text,
file, row number and reasons.
"""

from __future__ import annotations

import csv
import gc
import multiprocessing as mp
import os
import hashlib
import io
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
import ijson
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from ijson.common import ObjectBuilder
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from schemas.config import IngestConfig
from schemas.tables import QUARANTINE_SCHEMA, ROLES, STAGED_SCHEMA
from foundation import staging
from foundation.errors import DropError

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
DROP_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

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

csv.field_size_limit(sys.maxsize)


class RawRecord(NamedTuple):
    """One record as read from a file: its parsed value, or the reasons it could not be parsed."""

    source_row: int
    raw: str
    value: Any
    reasons: tuple[str, ...] = ()
    details: str = ""


class Rejection(NamedTuple):
    reasons: tuple[str, ...]
    details: str


Message = tuple[str, str]  # (role, content): Arrow builds struct arrays from tuples twice as fast as dicts


class CanonicalRow(NamedTuple):
    id: str
    messages: list[Message]
    tools: str | None


# ---------------------------------------------------------------------------------------------
# Drop ids and file discovery
# ---------------------------------------------------------------------------------------------


def check_drop_id(drop_id: str) -> str:
    """A drop id names a directory in the workspace, so it must not be able to escape it."""
    if not DROP_ID_PATTERN.fullmatch(drop_id) or ".." in drop_id:
        raise DropError(
            f"drop id {drop_id!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit, with no '..' and no '/' (e.g. --drop-id 2026-11-orders)"
        )
    return drop_id


def default_drop_id(paths: list[str], fingerprint: str) -> str:
    name = Path(paths[0].rstrip("/")).name
    for suffix in (".gz", *SUPPORTED_SUFFIXES):
        name = name.removesuffix(suffix)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-_") or "drop"
    return f"{stem[:100]}-{fingerprint[:12]}"


def _suffix(path: str) -> str:
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return Path(name).suffix


def refuse_escaping_links(path: Path) -> None:
    """A local drop must not lead outside itself: a symlink (to a file or a directory) whose target is
    outside the drop directory is refused, never followed. A file named directly counts its own
    directory as the drop."""
    root = (path if path.is_dir() else path.parent).resolve()
    candidates = [path] if not path.is_dir() else []
    if path.is_dir():
        for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
            candidates += [Path(dirpath) / name for name in [*dirnames, *filenames]]
    for candidate in candidates:
        if candidate.is_symlink() and not candidate.resolve().is_relative_to(root):
            raise DropError(
                f"{candidate}: a symlink to {os.readlink(candidate)}, outside the drop directory {root}; "
                "symlinks out of a drop are never followed: copy the file into the drop instead"
            )


def list_drop_files(paths: list[str]) -> list[str]:
    """Expand each PATH (file or directory, local or fsspec URL) to the data files it holds, sorted.

    In a directory, files with an unsupported suffix, hidden files and markers such as `_SUCCESS`
    are skipped; a file named explicitly must have a supported suffix.
    """
    files: list[str] = []
    for path in paths:
        fs, fs_path = fsspec.core.url_to_fs(path)
        if not fs.exists(fs_path):
            raise DropError(f"{path}: no such file or directory; pass a file or a directory of data files")
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        if prefix == "":
            refuse_escaping_links(Path(fs_path))
        if fs.isdir(fs_path):
            found = sorted(
                p
                for p in fs.find(fs_path)
                if _suffix(p) in SUPPORTED_SUFFIXES and not Path(p).name.startswith((".", "_"))
            )
            files.extend(prefix + p for p in found)
        elif _suffix(fs_path) in SUPPORTED_SUFFIXES:
            files.append(prefix + fs_path)
        else:
            raise DropError(
                f"{path}: unsupported file type; rename it or convert it to one of "
                f"{', '.join(SUPPORTED_SUFFIXES)} (optionally .gz)"
            )
    if not files:
        raise DropError(f"{', '.join(paths)}: no data files ({', '.join(SUPPORTED_SUFFIXES)}, optionally .gz) found")
    return files


def fingerprint_files(files: list[str]) -> str:
    """sha256 over every file's name and bytes: the identity of a drop's content."""
    digest = hashlib.sha256()
    for url in files:
        digest.update(Path(url).name.encode() + b"\0")
        with fsspec.open(url, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Readers: an open binary file -> RawRecords. Each isolates a bad record to its own row.
# ---------------------------------------------------------------------------------------------


def _decode(line: bytes) -> tuple[str, bool]:
    try:
        return line.decode("utf-8"), True
    except UnicodeDecodeError:
        return line.decode("utf-8", errors="backslashreplace"), False


def read_jsonl(fh: io.BufferedIOBase) -> Iterator[RawRecord]:
    for lineno, line in enumerate(fh, 1):
        if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        text, valid = _decode(line)
        if not valid:
            yield RawRecord(lineno, text, None, ("invalid_utf8",), "line is not valid UTF-8; re-encode the file as UTF-8")
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            yield RawRecord(lineno, text, None, ("malformed_json",), f"not a JSON value: {exc}; fix or remove the line")
            continue
        yield RawRecord(lineno, text, value)


class _SkipBOM:
    """A file wrapper for ijson: drops a UTF-8 byte-order mark (ijson's C parser rejects one; files
    written by Windows tools start with one) and can peek at the first non-blank byte."""

    _BLANK = b" \t\r\n"

    def __init__(self, fh):
        self._fh = fh
        self._buffer = b""
        self._started = False
        self.blank = True  # nothing but whitespace read so far

    def first_char(self) -> bytes:
        while not self._buffer.lstrip(self._BLANK):
            chunk = self._read(1 << 16)
            if not chunk:
                return b""
            self._buffer += chunk
        return self._buffer.lstrip(self._BLANK)[:1]

    def _read(self, size: int) -> bytes:
        data = self._fh.read(size)
        if not self._started and data:
            self._started = True
            data = data.removeprefix(b"\xef\xbb\xbf")
        if self.blank and data.strip(self._BLANK):
            self.blank = False
        return data

    def read(self, size: int = -1) -> bytes:
        if self._buffer:  # ijson first calls read(0) to learn whether the file is binary
            if size == 0:
                return b""
            data, self._buffer = self._buffer, b""
            return data
        return self._read(size)


# A top-level JSON object whose first key is one of these is a single record; any other object is
# an "object of arrays" ({"train": [...], "test": [...]}) whose arrays hold the records.
_RECORD_KEYS = {"messages", "conversations", "instruction", "input", "output", "system", "prompt", "completion"}


TOO_DEEP = "too_deeply_nested"
TOO_DEEP_DETAIL = "nests lists/objects more than 255 levels deep; flatten it (no instruction format needs that)"


def _dump_raw(value: Any) -> str:
    try:
        return orjson.dumps(value, default=str).decode()
    except orjson.JSONEncodeError:  # deeper than orjson writes: the row is rejected where it is used
        return f"<a value that {TOO_DEEP_DETAIL.split(';')[0]}>"


def _next(events: Iterator[tuple[str, str, Any]]) -> tuple[str, str, Any]:
    # StopIteration must not escape into a generator (PEP 479 turns it into RuntimeError)
    for item in events:
        return item
    raise ValueError("the JSON document ended early")


def _build(event: str, value: Any, events: Iterator[tuple[str, str, Any]], builder: ObjectBuilder) -> Any:
    """Consume the events of one complete JSON value that starts with (event, value)."""
    builder.event(event, value)
    depth = 1 if event in ("start_map", "start_array") else 0
    while depth:
        _prefix, event, value = _next(events)
        builder.event(event, value)
        if event in ("start_map", "start_array"):
            depth += 1
        elif event in ("end_map", "end_array"):
            depth -= 1
    return builder.value


def _json_records(events: Iterator[tuple[str, str, Any]], builder_box: list) -> Iterator[tuple[Any, tuple, str]]:
    """(value, reasons, details) for each record of an array, an object of arrays, or a single object."""

    def build(event: str, value: Any) -> Any:
        builder_box[0] = ObjectBuilder()
        return _build(event, value, events, builder_box[0])

    _prefix, event, value = _next(events)
    if event == "start_array":
        for _prefix, event, value in events:
            if event == "end_array":
                return
            yield build(event, value), (), ""
        return
    if event != "start_map":
        yield value, ("not_an_object",), "the file holds a single JSON scalar; a JSON drop is an array of objects"
        return
    _prefix, event, key = _next(events)
    if event == "end_map":
        return
    if key in _RECORD_KEYS:  # one record: rebuild the object from its first key on
        builder_box[0] = builder = ObjectBuilder()
        builder.event("start_map", None)
        builder.event("map_key", key)
        depth = 1
        while depth:
            _prefix, event, value = _next(events)
            builder.event(event, value)
            depth += event in ("start_map", "start_array")
            depth -= event in ("end_map", "end_array")
        yield builder.value, (), ""
        return
    while event == "map_key":
        _prefix, event, value = _next(events)
        if event == "start_array":
            for _prefix, event, value in events:
                if event == "end_array":
                    break
                yield build(event, value), (), ""
        else:
            yield (
                {key: build(event, value)},
                ("not_an_object",),
                f"key {key!r} holds no array; an object-of-arrays JSON file maps split names to arrays of records",
            )
        _prefix, event, key = _next(events)


def read_json(fh: io.BufferedIOBase) -> Iterator[RawRecord]:
    """Stream a JSON array, an object of arrays or a single object without loading the whole file."""
    builder_box: list = [None]
    index = 0
    source = _SkipBOM(fh)
    if source.first_char() == b"[":  # the common case: ijson's C backend builds the records
        records: Iterator = ((value, (), "") for value in ijson.items(source, "item", use_float=True))
    else:
        records = _json_records(ijson.parse(source, use_float=True), builder_box)
    try:
        for value, reasons, details in records:
            index += 1
            yield RawRecord(index, _dump_raw(value), None if reasons else value, reasons, details)
    except (ijson.JSONError, ijson.IncompleteJSONError, UnicodeDecodeError, ValueError) as exc:
        if source.blank:  # an empty file has no rows
            return
        builder = builder_box[0]
        partial = _dump_raw(builder.value) if builder is not None and hasattr(builder, "value") else ""
        index += 1
        yield RawRecord(
            index,
            partial,
            None,
            ("malformed_json",),
            f"the JSON document is corrupt after record {index - 1} ({str(exc).splitlines()[0][:200]}); "
            "the records before it were read; fix the file and drop it again",
        )


def read_csv(fh: io.BufferedIOBase) -> Iterator[RawRecord]:
    """CSV with a header row. Cells are strings; a cell holding JSON (e.g. `messages`) is parsed later."""
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad row does not stop the file.
    text = io.TextIOWrapper(fh, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(text)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        yield RawRecord(1, "", None, ("malformed_csv",), f"unreadable header: {exc}")
        return
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield RawRecord(start, "", None, ("malformed_csv",), f"unparseable CSV record: {exc}")
            if reader.line_num < start:
                return
            continue
        if not cells or (len(cells) == 1 and not cells[0].strip()):
            continue
        raw = ",".join(cells)
        if any(_has_surrogates(cell) for cell in cells):
            raw = raw.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            yield RawRecord(start, raw, None, ("invalid_utf8",), "row is not valid UTF-8; re-encode the file as UTF-8")
            continue
        if len(cells) != len(header):
            yield RawRecord(
                start,
                raw,
                None,
                ("malformed_csv",),
                f"row has {len(cells)} fields, the header has {len(header)}; quote fields that contain commas",
            )
            continue
        yield RawRecord(start, raw, dict(zip(header, cells)))


def read_parquet(fh: io.BufferedIOBase, batch_rows: int) -> Iterator[RawRecord]:
    index = 0
    try:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=batch_rows):
            try:
                values = batch.to_pylist()
            except UnicodeDecodeError:  # a corrupt string somewhere in the batch: find its rows
                values = [_parquet_row(batch, i) for i in range(batch.num_rows)]
            for value in values:
                index += 1
                if isinstance(value, RawRecord):
                    yield value._replace(source_row=index)
                else:
                    yield RawRecord(index, _dump_raw(value), value)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:  # corrupt pages, footer or schema names
        index += 1
        yield RawRecord(
            index, "", None, ("unreadable_file",), f"Parquet file unreadable after {index - 1} rows: {exc}"
        )


def _parquet_row(batch: pa.RecordBatch, i: int) -> Any:
    try:
        return batch.slice(i, 1).to_pylist()[0]
    except UnicodeDecodeError as exc:
        return RawRecord(0, "", None, ("invalid_utf8",),
                         f"a string in this row is not valid UTF-8 ({exc.reason}); rewrite the file with valid UTF-8 text")


def iter_file_records(url: str, batch_rows: int) -> Iterator[RawRecord]:
    suffix = _suffix(url)
    try:
        with fsspec.open(url, "rb", compression="infer") as fh:
            if suffix == ".jsonl":
                yield from read_jsonl(fh)
            elif suffix == ".json":
                yield from read_json(fh)
            elif suffix == ".csv":
                yield from read_csv(fh)
            else:
                yield from read_parquet(fh, batch_rows)
    except (OSError, EOFError) as exc:  # e.g. a truncated .gz stream
        yield RawRecord(0, "", None, ("unreadable_file",), f"file could not be read to the end: {exc}")


# ---------------------------------------------------------------------------------------------
# Format detection and normalisation (pure)
# ---------------------------------------------------------------------------------------------


def record_format(value: Any) -> str | None:
    if not isinstance(value, dict):
        return None
    if "messages" in value:
        return "openai"
    if "conversations" in value:
        return "sharegpt"
    if "instruction" in value or ("output" in value and "input" in value):
        return "alpaca"
    if "prompt" in value or "completion" in value:
        return "prompt_completion"
    return None


def detect_format(values: Iterable[Any]) -> str | None:
    """The most common record format among sample records, or None when none is recognisable."""
    votes = Counter(fmt for fmt in map(record_format, values) if fmt)
    return votes.most_common(1)[0][0] if votes else None


class _Problems:
    """Collects every problem of one record, so the quarantine lists all reasons, not the first."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.details: list[str] = []

    def add(self, reason: str, detail: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)
        self.details.append(detail)


def _maybe_json(value: Any) -> Any:
    """CSV and Parquet cells carry nested fields as JSON strings."""
    if isinstance(value, str) and value[:1] in ("[", "{"):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value


def _text(record: dict, key: str, problems: _Problems, *, required: bool) -> str | None:
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


def _content_text(content: Any, where: str, problems: _Problems) -> str | None:
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


def _role(raw_role: Any) -> str:
    """Map an alias to its canonical role; an unknown role is kept as given so validation names it."""
    role = ROLE_ALIASES.get(raw_role) if isinstance(raw_role, str) else None
    if role is None:
        if not isinstance(raw_role, str):
            return str(raw_role)
        role = ROLE_ALIASES.get(raw_role.strip().lower(), raw_role)
    return role


def _alpaca(record: dict, problems: _Problems) -> tuple[list[Message], Any]:
    messages = _system(record, problems)
    history = _maybe_json(record.get("history"))
    if history not in (None, "", []):
        if not isinstance(history, list) or not all(
            isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn) for turn in history
        ):
            problems.add("wrong_type:history", "field 'history' must be a list of [instruction, response] string pairs")
        else:
            for user, assistant in history:
                messages += [("user", user), ("assistant", assistant)]
    instruction = _text(record, "instruction", problems, required=True)
    extra_input = _text(record, "input", problems, required=False)
    output = _text(record, "output", problems, required=True)
    if instruction is not None:
        user = f"{instruction}\n{extra_input}" if extra_input else instruction
        messages.append(("user", user))
    if output is not None:
        messages.append(("assistant", output))
    return messages, record.get("tools")


def _turns(record: dict, field: str, role_key: str, content_key: str, problems: _Problems) -> list[Message]:
    """A list of turns: ShareGPT's {from, value} or OpenAI's {role, content} (each accepts the other)."""
    messages: list[Message] = []
    turns = _maybe_json(record.get(field))
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
            text = _content_text(content, where, problems)
        if text is not None:
            messages.append((_role(role), text))
    return messages


def _system(record: dict, problems: _Problems) -> list[Message]:
    system = _text(record, "system", problems, required=False)
    return [("system", system)] if system else []


def _sharegpt(record: dict, problems: _Problems) -> tuple[list[Message], Any]:
    return _system(record, problems) + _turns(record, "conversations", "from", "value", problems), record.get("tools")


def _openai(record: dict, problems: _Problems) -> tuple[list[Message], Any]:
    return _turns(record, "messages", "role", "content", problems), record.get("tools")


def _prompt_completion(record: dict, problems: _Problems) -> tuple[list[Message], Any]:
    messages = _system(record, problems)
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = _maybe_json(record.get(key))
        if isinstance(value, list):  # TRL's conversational prompt/completion: lists of messages
            messages += _turns({key: value}, key, "role", "content", problems)
        elif value is None:
            problems.add(f"missing_field:{key}", f"field {key!r} is missing; every record needs it")
        elif not isinstance(value, str):
            problems.add(f"wrong_type:{key}", f"field {key!r} is {type(value).__name__}, expected a string or a list of messages")
        else:
            messages.append((role, value))
    return messages, record.get("tools")


_NORMALISERS = {
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "openai": _openai,
    "prompt_completion": _prompt_completion,
}

_FORMAT_KEYS = {
    "alpaca": "instruction/input/output",
    "sharegpt": "conversations",
    "openai": "messages",
    "prompt_completion": "prompt/completion",
}


def _tools_json(tools: Any, problems: _Problems) -> str | None:
    """Tool definitions as compact JSON with sorted keys, so equal tools give equal row ids."""
    tools = _maybe_json(tools)
    if tools in (None, "", [], {}):
        return None
    if isinstance(tools, str):
        problems.add("invalid_tools_json", "field 'tools' is a string that is not JSON; give the tool list as JSON")
        return None
    if not isinstance(tools, (list, dict)):
        problems.add("wrong_type:tools", f"field 'tools' is {type(tools).__name__}, expected a JSON list of tools")
        return None
    try:
        return orjson.dumps(tools, option=orjson.OPT_SORT_KEYS).decode()
    except orjson.JSONEncodeError:
        problems.add(TOO_DEEP, f"field 'tools' {TOO_DEEP_DETAIL}")
        return None


def row_id(messages: list[Message], tools: str | None) -> str:
    """sha256 of the normalised conversation: equal conversations (and tools) get equal ids."""
    payload = orjson.dumps([*messages, tools])
    return hashlib.sha256(payload).hexdigest()


def normalize_record(value: Any, fmt: str) -> CanonicalRow | Rejection:
    """Turn one parsed record of the given source format into a canonical row, or say why not."""
    if not isinstance(value, dict):
        return Rejection(("not_an_object",), f"record is {type(value).__name__}, expected a JSON object")
    looks_like = record_format(value)
    if looks_like != fmt and looks_like is not None and fmt != "alpaca":
        return Rejection(
            ("format_mismatch",),
            f"record looks like {looks_like}, but the file is {fmt} (fields {_FORMAT_KEYS[fmt]}); "
            "split mixed files by format or pass --format",
        )
    problems = _Problems()
    messages, tools = _NORMALISERS[fmt](value, problems)
    tools_json = _tools_json(tools, problems)
    if problems.reasons:
        return Rejection(tuple(problems.reasons), "; ".join(problems.details))
    try:
        rid = row_id(messages, tools_json)
    except orjson.JSONEncodeError:  # lone surrogates from \\ud800-style escapes
        return Rejection(("invalid_utf8",), "text holds unpaired UTF-16 surrogates; re-encode the source as UTF-8")
    return CanonicalRow(rid, messages, tools_json)


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# ---------------------------------------------------------------------------------------------
# The task: files -> staged canonical rows + quarantined rows (Parquet, in bounded batches)
# ---------------------------------------------------------------------------------------------

DETECT_SAMPLE = 1000


@dataclass
class StagedDrop:
    """What `read_drop` wrote: references and counts, no payloads."""

    drop_id: str
    files: dict[str, dict] = field(default_factory=dict)  # url -> {format, rows, quarantined_on_read}
    rows_in: int = 0
    staged_rows: int = 0
    quarantined: int = 0
    staged_paths: list[str] = field(default_factory=list)
    quarantine_paths: list[str] = field(default_factory=list)


class _BatchWriter:
    """Buffers rows (tuples in schema order) and writes them as staging record batches."""

    def __init__(self, path: Path, schema: pa.Schema, batch_rows: int):
        self.schema, self.batch_rows = schema, batch_rows
        self.rows: list[tuple] = []
        self.writer = staging.open_writer(path, schema)

    def add(self, row: tuple) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.batch_rows:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            columns = [pa.array(col, type=f.type) for col, f in zip(zip(*self.rows), self.schema)]
            self.writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


def stage_records(
    url: str,
    records: Iterable[RawRecord],
    fmt: str | None,
    drop_id: str,
    staged: _BatchWriter,
    quarantine: _BatchWriter,
) -> Counter:
    """Normalise each record of one file into `staged`, or quarantine it; returns counts by outcome."""
    counts: Counter = Counter()
    for rec in records:
        counts["rows_in"] += 1
        if rec.reasons:
            result: CanonicalRow | Rejection = Rejection(rec.reasons, rec.details)
        elif fmt is None:
            result = Rejection(
                ("unknown_format",),
                "no record in the file has the fields of a known format (messages, conversations, "
                "instruction/output, prompt/completion); pass --format or fix the field names",
            )
        else:
            result = normalize_record(rec.value, fmt)
        if isinstance(result, Rejection):
            counts["quarantined"] += 1
            # QUARANTINE_SCHEMA order
            quarantine.add((drop_id, url, rec.source_row, fmt, list(result.reasons), result.details, rec.raw))
        else:
            counts["staged"] += 1
            # STAGED_SCHEMA order
            staged.add((result.id, result.messages, result.tools, drop_id, url, rec.source_row, fmt, rec.raw))
    return counts


def _records_with_format(url: str, fmt_option: str, batch_rows: int) -> tuple[str | None, Iterator[RawRecord]]:
    records = iter_file_records(url, batch_rows)
    if fmt_option != "auto":
        return fmt_option, records
    head: list[RawRecord] = []
    for rec in records:
        head.append(rec)
        if len(head) >= DETECT_SAMPLE:
            break
    fmt = detect_format(r.value for r in head if not r.reasons)

    def chained() -> Iterator[RawRecord]:
        yield from head
        yield from records

    return fmt, chained()


def stage_file(index: int, url: str, drop_id: str, config: IngestConfig, staging_dir: Path) -> dict:
    """Read one file into its own staging tables; returns its counts and their paths."""
    staged_path, quarantine_path = staging_dir / f"normalized-{index:05d}.arrow", staging_dir / f"quarantine-{index:05d}.arrow"
    staged = _BatchWriter(staged_path, STAGED_SCHEMA, config.batch_rows)
    quarantine = _BatchWriter(quarantine_path, QUARANTINE_SCHEMA, config.batch_rows)
    # The loop allocates millions of short-lived, acyclic objects; default GC thresholds make the
    # collector rescan the batch buffers over and over (~20% of the time). Batches bound memory.
    gc_threshold = gc.get_threshold()
    gc.set_threshold(200_000, 50, 100)
    try:
        fmt, records = _records_with_format(url, config.format, config.batch_rows)
        counts = stage_records(url, records, fmt, drop_id, staged, quarantine)
    finally:
        gc.set_threshold(*gc_threshold)
        staged.close()
        quarantine.close()
    return {"url": url, "format": fmt, "counts": counts, "staged_path": str(staged_path),
            "quarantine_path": str(quarantine_path)}


def _parallel_map(fn, *args_lists) -> list:
    """Run fn over files on every core. Fork, not spawn: a spawned worker would spend seconds
    re-importing Prefect; the forked ones only read files and write their own staging tables."""
    workers = min(len(args_lists[0]), os.cpu_count() or 1)
    if workers < 2 or "fork" not in mp.get_all_start_methods():
        return list(map(fn, *args_lists))
    gc.freeze()  # keep the children's collector off the parent's pages (copy-on-write)
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            return list(pool.map(fn, *args_lists))
    finally:
        gc.unfreeze()


@task(cache_policy=NO_CACHE)
def read_drop(files: list[str], drop_id: str, config: IngestConfig, staging_dir: Path) -> StagedDrop:
    """Read every file of the drop (files in parallel), normalise records, stage rows and quarantine."""
    logger = get_run_logger()
    staging_dir.mkdir(parents=True, exist_ok=True)
    n = len(files)
    outcomes = _parallel_map(stage_file, range(n), files, [drop_id] * n, [config] * n, [staging_dir] * n)
    result = StagedDrop(drop_id=drop_id)
    for outcome in outcomes:
        counts = outcome["counts"]
        result.files[outcome["url"]] = {"format": outcome["format"], "rows": counts["rows_in"],
                                        "quarantined_on_read": counts["quarantined"]}
        result.rows_in += counts["rows_in"]
        result.staged_rows += counts["staged"]
        result.quarantined += counts["quarantined"]
        result.staged_paths.append(outcome["staged_path"])
        result.quarantine_paths.append(outcome["quarantine_path"])
        logger.info("%s: %s rows, format %s, %s unreadable", outcome["url"], counts["rows_in"], outcome["format"],
                    counts["quarantined"])
    return result
