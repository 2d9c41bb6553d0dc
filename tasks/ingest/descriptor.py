"""Descriptors: how a drop's columns, turn keys and role names map onto the fields the formats read.

A drop may carry a descriptor beside its data files, or `sftflow ingest PATH --map FILE` passes one.
Three kinds are read, each into the same normalised `Descriptor`s (one per group of files):

- sftflow's own, `drop.yaml` (or `drop.yml`):

      format: sharegpt          # optional: auto (default) or a name of formats.FORMAT_NAMES
      files: "*.jsonl"          # optional: glob(s) over the files' names (default: every file)
      columns:                  # optional: OUR field -> THE DATA's column
        messages: conversation  #   ours: FIELDS below
      message_keys:             # optional: inside each turn, OUR key -> THE DATA's key
        role: speaker           #   ours: TURN_KEYS below
        content: text
      roles:                    # optional: THE DATA's role name -> OUR role (ROLES below)
        customer: user
        agent: assistant
      system: "You are a helpful assistant."   # optional: the system prompt of each row that has none
      tags: [support, 2026-11]  # optional: recorded in the drop report

  or `datasets: [{files: ..., columns: ...}, ...]` for several groups of files; the other top-level
  keys are then the defaults of every entry.
- LLaMA-Factory's `dataset_info.json` (its data directory's registry: a dataset name -> {file_name,
  formatting, ranking, columns, tags}). Not the `dataset_info.json` that `datasets`' save_to_disk writes
  beside `state.json`: that one is metadata of the Arrow files and never a descriptor.
- an Axolotl config: its `datasets:` entries (path, type, field_messages, message_property_mappings,
  roles, field_system, ...); the rest of the config (the model, the training) is not read.

A descriptor is validated whole before anything is read: an unknown key, a wrong type or a name that is
not ours is a ConfigError of one line naming the file and the key (`drop.yaml: columns.instrction:
unknown field; did you mean 'instruction'?`).

Applying one to a record (`record_mapper`) renames the record's columns to our fields, the keys inside
each turn of its turn lists, and the role names, and adds the system prompt where the row has none;
columns it does not mention pass through. The formats then read the record as any other.

Pure, except `read_descriptor`, `find_descriptor` and `find_mapped_drop`, which read the descriptor
file and list the drop. No Prefect: the CLI checks a descriptor before Prefect starts.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

import fsspec
import orjson
import yaml

from foundation.errors import ConfigError, DropError
from tasks.ingest.discovery import (
    HF_SCHEME,
    DropSource,
    check_drop_id,
    default_drop_id,
    find_drop,
    fingerprint_files,
    hub_dataset_path,
    list_drop_files,
)
from tasks.ingest.formats import FORMAT_NAMES
from tasks.ingest.formats.messages import canonical_role, maybe_json
from tasks.ingest.readers import SUPPORTED_SUFFIXES, file_suffix

MAX_DESCRIPTOR_BYTES = 16 << 20  # a mapping, not data: far more than any real drop.yaml or dataset_info.json

# Our record fields: what the formats read (images/videos/audios only so that rows carrying media are
# quarantined by name, never trained as text with their media dropped).
FIELDS = ("messages", "conversations", "system", "tools", "instruction", "input", "output", "history", "prompt",
          "completion", "text", "chosen", "rejected", "images", "videos", "audios")
# Our keys inside a turn.
TURN_KEYS = ("role", "content", "weight", "train", "tool_calls", "reasoning_content")
# Our roles. `function_call` is ShareGPT's: the assistant calling a tool, its content the call as JSON
# (LLaMA-Factory's function_tag maps to it, so the call is read as a tool call, not as text).
ROLES = ("system", "user", "assistant", "tool", "function_call")
# The record fields that hold lists of turns (`chosen`/`rejected` may also be one turn: LLaMA-Factory's
# sharegpt ranking rows).
TURN_FIELDS = ("messages", "conversations", "prompt", "completion", "chosen", "rejected")
KEYS = ("format", "files", "columns", "message_keys", "roles", "system", "tags")

DROP_DESCRIPTORS = ("drop.yaml", "drop.yml")  # sftflow's descriptor, found in a drop directory
LLAMAFACTORY_INFO = "dataset_info.json"  # LLaMA-Factory's, found in a drop directory
SAVED_STATE = "state.json"  # beside it, a dataset_info.json is save_to_disk's metadata, not a descriptor

Kind = Literal["sftflow", "llamafactory", "axolotl"]


@dataclass(frozen=True)
class Descriptor:
    """One group of files and how its records map onto our fields (plain data: it crosses into the
    forked workers that read the files)."""

    name: str  # where it is in its file: "" (the whole file), "datasets[1]", a LLaMA-Factory dataset name
    files: tuple[str, ...] = ("*",)  # globs over the files' names (or paths inside the drop)
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)  # our field -> the data's column
    message_keys: dict[str, str] = field(default_factory=dict)  # our turn key -> the data's key
    roles: dict[str, str] = field(default_factory=dict)  # the data's role -> ours
    system: str | None = None
    tags: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "files": list(self.files), "format": self.format, "columns": self.columns,
                "message_keys": self.message_keys, "roles": self.roles, "system": self.system,
                "tags": list(self.tags)}

    def matches(self, relative: str) -> bool:
        """Whether a file (its path inside the drop) is one of this group's: a glob matches the path or
        the file's name."""
        name = relative.rpartition("/")[2]
        return any(fnmatch.fnmatchcase(relative, g) or fnmatch.fnmatchcase(name, g) for g in self.files)


@dataclass(frozen=True)
class DescriptorFile:
    """A descriptor file, read and normalised: its entries, and notes on what of it was not applied."""

    source: str
    kind: Kind
    entries: tuple[Descriptor, ...]
    notes: tuple[str, ...] = ()

    def digest(self) -> str:
        """sha256 of what the entries mean (not of the file's bytes: a comment changes nothing)."""
        meaning = [{k: v for k, v in e.as_dict().items() if k != "name"} for e in self.entries]
        return hashlib.sha256(orjson.dumps(meaning, option=orjson.OPT_SORT_KEYS)).hexdigest()

    def label(self, entry: Descriptor) -> str:
        return entry.name or self.source.rpartition("/")[2]


# ---------------------------------------------------------------------------------------------
# Errors: one line naming the file and the key
# ---------------------------------------------------------------------------------------------


def _at(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _fail(source: str, where: str, problem: str) -> NoReturn:
    raise ConfigError(f"{source}: {where}: {problem}" if where else f"{source}: {problem}")


def _hint(value: Any, choices: Iterable[str]) -> str:
    choices = list(choices)
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(choices)}"


def _known_keys(raw: dict, choices: Iterable[str], source: str, where: str) -> None:
    choices = tuple(choices)
    for key in raw:
        if key not in choices:
            _fail(source, _at(where, key), f"unknown field; {_hint(key, choices)}")


def _mapping(value: Any, source: str, where: str, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail(source, where, f"expected {what}, got {_kind_of(value)}")
    return value


def _kind_of(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
    return "an empty string" if value == "" else names.get(type(value), type(value).__name__)


def _text(value: Any, source: str, where: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        _fail(source, where, f"expected {what} (a non-empty string), got {_kind_of(value)}")
    return value


def _texts(value: Any, source: str, where: str, what: str) -> tuple[str, ...]:
    """A string or a list of strings."""
    if isinstance(value, list) and value:
        return tuple(_text(v, source, f"{where}[{i}]", what) for i, v in enumerate(value))
    return (_text(value, source, where, f"{what}, or a list of them"),)


def _format_name(value: Any, source: str, where: str) -> str:
    choices = ("auto", *FORMAT_NAMES)  # read now: the formats table grows
    if value not in choices:
        _fail(source, where, f"{value!r} is not a format; {_hint(value, choices)} (formats: {', '.join(choices)})")
    return value


def _renames(value: Any, ours: tuple[str, ...], source: str, where: str, what: str) -> dict[str, str]:
    """A mapping of our names (`ours`) -> the data's names, checked."""
    our_what = "field" if what == "column" else "turn key"
    renames = _mapping(value, source, where, f"a mapping of our {our_what} -> the data's {what}")
    _known_keys(renames, ours, source, where)
    return {k: _text(v, source, _at(where, k), f"the data's {what}") for k, v in renames.items()}


def _our_role(value: Any, source: str, where: str) -> str:
    if value not in ROLES:
        _fail(source, where, f"{value!r} is not a role; {_hint(value, ROLES)} (roles: {', '.join(ROLES)})")
    return value


# ---------------------------------------------------------------------------------------------
# sftflow's descriptor
# ---------------------------------------------------------------------------------------------


def _sftflow_entry(raw: Any, source: str, where: str, name: str) -> Descriptor:
    raw = _mapping(raw, source, where, "a mapping of descriptor keys (" + ", ".join(KEYS) + ")")
    _known_keys(raw, KEYS, source, where)
    roles = _mapping(raw.get("roles"), source, _at(where, "roles"), "a mapping of the data's role -> ours")
    for theirs in roles:
        if not isinstance(theirs, str):
            _fail(source, _at(where, f"roles.{theirs}"), "a role name must be a string; quote it")
    tags = raw.get("tags") or ()
    if not isinstance(tags, (list, tuple)):
        tags = [tags]
    for i, tag in enumerate(tags):
        if isinstance(tag, (dict, list)) or tag is None:
            _fail(source, _at(where, f"tags[{i}]"), f"expected a tag (a string), got {_kind_of(tag)}")
    system = raw.get("system")
    files = raw.get("files")
    return Descriptor(
        name=name,
        files=_texts(files, source, _at(where, "files"), "a glob over the files' names") if files is not None else ("*",),
        format=_format_name(raw.get("format") or "auto", source, _at(where, "format")),
        columns=_renames(raw.get("columns"), FIELDS, source, _at(where, "columns"), "column"),
        message_keys=_renames(raw.get("message_keys"), TURN_KEYS, source, _at(where, "message_keys"), "key"),
        roles={theirs: _our_role(ours, source, _at(where, f"roles.{theirs}")) for theirs, ours in roles.items()},
        system=_text(system, source, _at(where, "system"), "a system prompt") if system is not None else None,
        tags=tuple(str(t) for t in tags),
    )


def _parse_sftflow(data: dict, source: str) -> DescriptorFile:
    if "datasets" not in data:
        return DescriptorFile(source, "sftflow", (_sftflow_entry(data, source, "", ""),))
    datasets = data["datasets"]
    if not isinstance(datasets, list) or not datasets:
        _fail(source, "datasets", "expected a list of descriptors (each with its files: glob)")
    defaults = {k: v for k, v in data.items() if k != "datasets"}
    _sftflow_entry(defaults, source, "", "")  # the defaults' own errors name their top-level keys
    entries = []
    for i, entry in enumerate(datasets):
        where = f"datasets[{i}]"
        entry = _mapping(entry, source, where, "a descriptor (a mapping with files, columns, ...)")
        _known_keys(entry, KEYS, source, where)
        entries.append(_sftflow_entry({**defaults, **entry}, source, where, where))
    return DescriptorFile(source, "sftflow", tuple(entries))


# ---------------------------------------------------------------------------------------------
# LLaMA-Factory's dataset_info.json
# ---------------------------------------------------------------------------------------------

# Where an entry's data is when it is not a file beside it: nothing of the drop's (sftflow never downloads).
LF_ELSEWHERE = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
LF_IGNORED = ("file_sha1", "subset", "split", "folder", "num_samples", "revision")
LF_KEYS = ("file_name", "formatting", "ranking", "columns", "tags", *LF_ELSEWHERE, *LF_IGNORED)
# LLaMA-Factory's column names -> ours. `messages` is ShareGPT's list of turns: our `conversations`.
LF_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
              "messages": "conversations", "system": "system", "tools": "tools", "chosen": "chosen",
              "rejected": "rejected", "images": "images", "videos": "videos", "audios": "audios", "kto_tag": None}
LF_TURN_TAGS = {"role_tag": "role", "content_tag": "content"}
LF_ROLE_TAGS = {"user_tag": "user", "assistant_tag": "assistant", "observation_tag": "tool",
                "function_tag": "function_call", "system_tag": "system"}
# What datasets' DatasetInfo (save_to_disk's dataset_info.json) holds at its top level.
DATASETS_INFO_KEYS = {"builder_name", "citation", "features", "splits", "download_checksums", "dataset_size"}


def _is_llamafactory(data: Any) -> bool:
    return isinstance(data, dict) and bool(data) and all(
        isinstance(v, dict) and bool(set(v) & {"file_name", *LF_ELSEWHERE}) for v in data.values())


def is_datasets_info(data: Any) -> bool:
    """Whether a dataset_info.json is the one `datasets`' save_to_disk writes (metadata, not a descriptor)."""
    return isinstance(data, dict) and bool(set(data) & DATASETS_INFO_KEYS) and not _is_llamafactory(data)


def _llamafactory_entry(name: str, raw: Any, source: str) -> tuple[Descriptor | None, list[str]]:
    """One dataset of the registry: its descriptor (None when its data is not in the drop), and notes."""
    raw = _mapping(raw, source, name, "a dataset entry (file_name, formatting, columns, ...)")
    _known_keys(raw, LF_KEYS, source, name)
    elsewhere = [k for k in LF_ELSEWHERE if k in raw]
    if elsewhere:
        return None, [f"{name}: its data is at {elsewhere[0]} {raw[elsewhere[0]]!r}, not in the drop: not applied "
                      "(sftflow reads only the drop's files and never downloads)"]
    if "file_name" not in raw:
        _fail(source, name, "no file_name; name the entry's file in the drop (file_name: data.json)")
    file_name = _text(raw["file_name"], source, _at(name, "file_name"), "the name of the entry's file or folder")
    formatting = raw.get("formatting") or "alpaca"
    if formatting not in ("alpaca", "sharegpt"):
        _fail(source, _at(name, "formatting"), f"{formatting!r} is not a LLaMA-Factory formatting; "
              f"{_hint(formatting, ('alpaca', 'sharegpt'))} (alpaca, sharegpt)")
    ranking = raw.get("ranking", False)
    if not isinstance(ranking, bool):
        _fail(source, _at(name, "ranking"), f"expected true or false, got {ranking!r}")
    columns = _mapping(raw.get("columns"), source, _at(name, "columns"),
                       "a mapping of LLaMA-Factory's column -> the data's")
    _known_keys(columns, LF_COLUMNS, source, _at(name, "columns"))
    if "kto_tag" in columns:
        _fail(source, _at(name, "columns.kto_tag"), "KTO data (each answer labelled good or bad) is not supported: "
              "sftflow would train on the bad answers too; keep only the rows labelled true and remove kto_tag")
    tags = _mapping(raw.get("tags"), source, _at(name, "tags"), "a mapping of LLaMA-Factory's tags")
    _known_keys(tags, (*LF_TURN_TAGS, *LF_ROLE_TAGS), source, _at(name, "tags"))
    if ranking and "preference" not in FORMAT_NAMES:
        _fail(source, _at(name, "ranking"), "preference rows need the format 'preference', which this sftflow does not "
              f"have (formats: {', '.join(FORMAT_NAMES)}); remove ranking: true")
    notes = [f"{name}: {key} {raw[key]!r} not applied (sftflow ingests every row of the file)"
             for key in LF_IGNORED if key in raw and not (key == "split" and raw[key] == "train")]
    files = (file_name,) if file_suffix(file_name) in SUPPORTED_SUFFIXES else (f"{file_name.rstrip('/')}/*",)
    descriptor = Descriptor(
        name=name,
        files=files,
        format="preference" if ranking else formatting,
        columns={LF_COLUMNS[k]: _text(v, source, _at(name, f"columns.{k}"), "the data's column")
                 for k, v in columns.items()},
        message_keys={LF_TURN_TAGS[k]: _text(v, source, _at(name, f"tags.{k}"), "the data's key")
                      for k, v in tags.items() if k in LF_TURN_TAGS},
        roles={_text(v, source, _at(name, f"tags.{k}"), "the data's role name"): LF_ROLE_TAGS[k]
               for k, v in tags.items() if k in LF_ROLE_TAGS},
    )
    return descriptor, notes


def _parse_llamafactory(data: dict, source: str) -> DescriptorFile:
    if is_datasets_info(data):
        _fail(source, "", "the dataset_info.json of a Hugging Face save_to_disk dataset, not LLaMA-Factory's; pass "
              "LLaMA-Factory's dataset_info.json (a dataset name -> {file_name, formatting, columns}) or a drop.yaml")
    entries, notes = [], []
    for name, raw in data.items():
        entry, entry_notes = _llamafactory_entry(str(name), raw, source)
        entries += [entry] if entry else []
        notes += entry_notes
    return DescriptorFile(source, "llamafactory", tuple(entries), tuple(notes))


# ---------------------------------------------------------------------------------------------
# An Axolotl config's datasets
# ---------------------------------------------------------------------------------------------

AXOLOTL_TYPES = ("chat_template", "sharegpt", "alpaca", "completion")
AXOLOTL_MAPPED = ("path", "data_files", "type", "field_messages", "message_property_mappings", "message_field_role",
                  "message_field_content", "message_field_training", "field_thinking", "field_tools", "field_system",
                  "roles", "field")
# How Axolotl loads, renders and masks: sftflow reads the drop's files as they are, renders with the model's
# own chat template and trains on the assistant turns (and the turns' train/weight keys).
AXOLOTL_IGNORED = ("split", "ds_type", "name", "revision", "chat_template", "chat_template_jinja", "roles_to_train",
                   "train_on_eos", "shards", "shards_idx", "preprocess_shards", "trust_remote_code", "split_thinking",
                   "template_thinking_key", "drop_system_message", "input_format", "conversation",
                   "message_field_training_detail", "logprobs_field", "temperature", "input_transform",
                   "field_human", "field_model")
AXOLOTL_PROMPT_TYPE = ("field_instruction", "field_input", "field_output", "field_system", "system_prompt",
                       "system_format", "format", "no_input_format")


def _axolotl_files(raw: dict, source: str, where: str) -> tuple[tuple[str, ...], list[str]]:
    """The files an entry names in the drop: its data_files' names, or its path's file name. A path that
    names no file (a Hub id, a directory) applies to every file of the drop."""
    if raw.get("data_files") is not None:
        names = _texts(raw["data_files"], source, _at(where, "data_files"), "a data file")
        return tuple(n.rstrip("/").rpartition("/")[2] for n in names), []
    path = _text(raw.get("path"), source, _at(where, "path"), "the dataset's file (path: data/train.jsonl)")
    if file_suffix(path) in SUPPORTED_SUFFIXES:
        return (path.rstrip("/").rpartition("/")[2],), []
    return ("*",), [f"{where}: path {path!r} names no data file: applied to every file of the drop"]


def _axolotl_entry(raw: Any, source: str, where: str) -> tuple[Descriptor, list[str]]:
    raw = _mapping(raw, source, where, "a dataset entry (path, type, ...)")
    _known_keys(raw, (*AXOLOTL_MAPPED, *AXOLOTL_IGNORED), source, where)
    files, notes = _axolotl_files(raw, source, where)
    columns: dict[str, str] = {}
    keys: dict[str, str] = {}
    roles: dict[str, str] = {}
    system = None
    kind = raw.get("type")
    type_where = _at(where, "type")
    if isinstance(kind, dict):  # a user-defined prompt type: alpaca-like fields
        _known_keys(kind, AXOLOTL_PROMPT_TYPE, source, type_where)
        for ours in ("instruction", "input", "output", "system"):
            if kind.get(f"field_{ours}") is not None:
                columns[ours] = _text(kind[f"field_{ours}"], source, _at(type_where, f"field_{ours}"),
                                      "the data's column")
        if kind.get("system_prompt") is not None:
            system = _text(kind["system_prompt"], source, _at(type_where, "system_prompt"), "a system prompt")
        templates = [k for k in ("system_format", "format", "no_input_format") if kind.get(k) is not None]
        if templates:
            notes.append(f"{where}: type.{', type.'.join(templates)} not applied (sftflow renders rows with the "
                         "model's own chat template)")
        fmt = "alpaca"
    elif kind in ("chat_template", "sharegpt"):
        fmt = "openai"
        field_messages = raw.get("field_messages") or ("conversations" if kind == "sharegpt" else None)
        if field_messages is not None:
            columns["messages"] = _text(field_messages, source, _at(where, "field_messages"), "the data's column")
        keys = _renames(raw.get("message_property_mappings"), TURN_KEYS, source,
                        _at(where, "message_property_mappings"), "key")
        for legacy, ours in (("message_field_role", "role"), ("message_field_content", "content"),
                             ("message_field_training", "train"), ("field_thinking", "reasoning_content")):
            if raw.get(legacy) is not None:
                theirs = _text(raw[legacy], source, _at(where, legacy), "the data's key")
                if keys.get(ours, theirs) != theirs:
                    _fail(source, _at(where, legacy), f"{theirs!r} contradicts message_property_mappings.{ours} "
                          f"{keys[ours]!r}; keep one")
                keys[ours] = theirs
        given = _mapping(raw.get("roles"), source, _at(where, "roles"), "a mapping of our role -> a list of the data's")
        for ours, names in given.items():
            _our_role(ours, source, _at(where, f"roles.{ours}"))
            for theirs in names if isinstance(names, list) else [names]:
                theirs = _text(theirs, source, _at(where, f"roles.{ours}"), "the data's role names")
                if roles.get(theirs, ours) != ours:
                    _fail(source, _at(where, f"roles.{ours}"), f"{theirs!r} is also listed under {roles[theirs]}; "
                          "list a role name under one role")
                roles[theirs] = ours
    elif kind == "alpaca":
        fmt = "alpaca"
    elif kind == "completion":
        if "text" not in FORMAT_NAMES:
            _fail(source, type_where, "completion rows (plain text) need the format 'text', which this sftflow does "
                  f"not have (formats: {', '.join(FORMAT_NAMES)})")
        fmt = "text"
        columns["text"] = _text(raw.get("field") or "text", source, _at(where, "field"), "the data's column")
    elif kind is None:
        _fail(source, type_where,
              f"missing; choose one of {', '.join(AXOLOTL_TYPES)} (pre-tokenized rows are not read)")
    else:
        _fail(source, type_where, f"{kind!r} is not supported; choose one of {', '.join(AXOLOTL_TYPES)}, or a "
              "mapping of field_instruction/field_input/field_output")
    for key, ours in (("field_system", "system"), ("field_tools", "tools")):
        if raw.get(key) is not None:
            columns[ours] = _text(raw[key], source, _at(where, key), "the data's column")
    ignored = [k for k in AXOLOTL_IGNORED if raw.get(k) is not None]
    if ignored:
        notes.append(f"{where}: {', '.join(ignored)} not applied (sftflow reads the drop's files as they are, renders "
                     "with the model's chat template and trains on the assistant turns)")
    return Descriptor(name=where, files=files, format=fmt, columns=columns, message_keys=keys, roles=roles,
                      system=system), notes


def _parse_axolotl(data: dict, source: str) -> DescriptorFile:
    datasets = data.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        _fail(source, "datasets", "expected a list of dataset entries (an Axolotl config's datasets:)")
    entries, notes = [], []
    for i, raw in enumerate(datasets):
        entry, entry_notes = _axolotl_entry(raw, source, f"datasets[{i}]")
        entries.append(entry)
        notes += entry_notes
    return DescriptorFile(source, "axolotl", tuple(entries), tuple(notes))


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def descriptor_kind(data: dict, source: str) -> Kind:
    """Which kind of descriptor a parsed file is, by its name and its keys."""
    if source.rpartition("/")[2] == LLAMAFACTORY_INFO:
        return "llamafactory"
    datasets = data.get("datasets")
    if isinstance(datasets, list) and any(isinstance(e, dict) and {"path", "type", "data_files"} & set(e)
                                          for e in datasets):
        return "axolotl"
    if set(data) <= {*KEYS, "datasets"}:
        return "sftflow"
    if "datasets" in data:
        return "axolotl"
    if _is_llamafactory(data):
        return "llamafactory"
    return "sftflow"  # whose check names the unknown keys


def parse_descriptor(data: Any, source: str) -> DescriptorFile:
    """A parsed descriptor file (YAML or JSON) -> its normalised entries; ConfigError naming the key."""
    if not isinstance(data, dict):
        _fail(source, "", f"expected a mapping of descriptor keys ({', '.join(KEYS)}, or datasets), got "
              f"{'nothing' if data is None else _kind_of(data)}")
    kind = descriptor_kind(data, source)
    parse = {"sftflow": _parse_sftflow, "llamafactory": _parse_llamafactory, "axolotl": _parse_axolotl}[kind]
    return parse(data, source)


def _load(text: bytes, source: str) -> Any:
    if source.lower().endswith(".json"):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            _fail(source, "", f"not valid JSON ({exc}); fix the syntax")
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        _fail(source, "", f"not valid YAML ({at}{exc.problem}); fix the syntax")
    except yaml.YAMLError as exc:
        _fail(source, "", f"not valid YAML ({str(exc).splitlines()[0]}); fix the syntax")


def read_descriptor(url: str) -> DescriptorFile:
    """Read and check a descriptor file (local path or fsspec URL). A local one must be a regular file of at
    most 16 MiB: a FIFO is never waited on, a device never read to its end."""
    local = fsspec.core.url_to_fs(url)[1] if "://" not in url or url.startswith("file://") else None
    if local is not None and os.path.exists(local):
        mode = os.stat(local).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{url}: not a regular file (a FIFO, socket, device or directory); pass the descriptor "
                              "file itself (drop.yaml, dataset_info.json or an Axolotl config)")
        if os.stat(local).st_size > MAX_DESCRIPTOR_BYTES:
            raise ConfigError(f"{url}: {os.stat(local).st_size} bytes, over {MAX_DESCRIPTOR_BYTES} for a descriptor; "
                              "pass the small mapping file, not a data file")
    try:
        with fsspec.open(url, "rb") as fh:
            text = fh.read(MAX_DESCRIPTOR_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{url}: no such descriptor file; pass a drop.yaml, a LLaMA-Factory dataset_info.json or "
                          "an Axolotl config") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{url}: cannot be read ({str(exc).splitlines()[0][:200]})") from exc
    return parse_descriptor(_load(text, url), url)


def _directory(path: str) -> tuple[fsspec.AbstractFileSystem, str, str] | None:
    """(file system, directory, URL prefix) of a drop path that is a directory, else None."""
    if path.startswith(HF_SCHEME):
        local = hub_dataset_path(path)[0]
        return (fsspec.filesystem("file"), str(local), "") if local.is_dir() else None
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.isdir(fs_path):
        return None
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return fs, fs_path.rstrip("/") or fs_path, "" if protocol in ("file", "local") else f"{protocol}://"


def _file_key(url: str) -> str:
    """A file's URL as the drop's file list spells it (local paths absolute)."""
    fs, fs_path = fsspec.core.url_to_fs(url)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return fs_path if protocol in ("file", "local") else f"{protocol}://{fs_path}"


def descriptor_files(path: str) -> list[tuple[str, str]]:
    """The descriptor files in a drop directory, as (how to name it, its URL in the drop's file list): its
    drop.yaml, and a LLaMA-Factory dataset_info.json (not save_to_disk's)."""
    found = _directory(path)
    if found is None:
        return []
    fs, folder, prefix = found
    shown = path.rstrip("/") if not path.startswith(HF_SCHEME) else prefix + folder
    names = [n for n in DROP_DESCRIPTORS if fs.isfile(f"{folder}/{n}")]
    info = f"{folder}/{LLAMAFACTORY_INFO}"
    if fs.isfile(info) and not fs.exists(f"{folder}/{SAVED_STATE}"):
        try:
            data = json.loads(fs.cat_file(info))
        except ValueError:
            data = None  # not JSON: a data file's problem, not a descriptor
        if not is_datasets_info(data) and isinstance(data, dict):
            names.append(LLAMAFACTORY_INFO)
    return [(f"{shown}/{n}", prefix + f"{folder}/{n}") for n in names]


def find_descriptor(paths: list[str], map_file: str | None = None) -> tuple[DescriptorFile | None, set[str]]:
    """The drop's descriptor (`map_file`, else the one in its directories), checked, and the files it is
    (as the drop's file list spells them: never read as data). A path that does not exist is left to
    find_drop to report."""
    found: list[tuple[str, str]] = []
    for path in paths:
        try:
            found += descriptor_files(path)
        except FileNotFoundError:
            continue
    consumed = {key for _shown, key in found}
    if map_file is not None:
        descriptor = read_descriptor(map_file)
        consumed.add(_file_key(map_file))
        if found:
            unused = f"{', '.join(s for s, _ in found)}: not applied, --map {map_file} was given instead"
            descriptor = DescriptorFile(descriptor.source, descriptor.kind, descriptor.entries,
                                        (*descriptor.notes, unused))
        return descriptor, consumed
    if len(found) > 1:
        raise ConfigError(f"{found[0][0]}, {found[1][0]}: a drop has one descriptor; keep one, or pick one with --map")
    return (read_descriptor(found[0][0]) if found else None), consumed


def check_descriptor(paths: list[str], map_file: str | None = None) -> None:
    """The CLI's check before anything runs: the descriptor (given or in the drop) reads and validates."""
    find_descriptor(paths, map_file)


# ---------------------------------------------------------------------------------------------
# The drop: its files, each file's descriptor, the fingerprint of both
# ---------------------------------------------------------------------------------------------


def _relative_names(files: list[str], paths: list[str]) -> dict[str, str]:
    """Each file's path inside the drop path that holds it (its name when named directly)."""
    roots = []
    for path in paths:
        try:
            found = _directory(path)
        except (FileNotFoundError, DropError):
            found = None
        if found is not None:
            roots.append(found[2] + found[1])
    names = {}
    for url in files:
        root = next((r for r in roots if url.startswith(r + "/")), None)
        names[url] = url[len(root) + 1:] if root else url.rpartition("/")[2]
    return names


def assign_files(descriptor: DescriptorFile, files: list[str],
                 paths: list[str]) -> tuple[dict[str, Descriptor], list[str]]:
    """Which entry maps each file (a file matched by none is read as it is), and notes on entries that
    matched no file. ConfigError when a file matches two entries, or an entry of sftflow's own
    descriptor matches no file (a mistyped glob)."""
    names = _relative_names(files, paths)
    assigned: dict[str, Descriptor] = {}
    notes: list[str] = []
    for entry in descriptor.entries:
        matched = [url for url in files if entry.matches(names[url])]
        for url in matched:
            if url in assigned:
                raise ConfigError(f"{descriptor.source}: {names[url]} matches both {descriptor.label(assigned[url])} "
                                  f"and {descriptor.label(entry)}; a file is read one way: narrow their files")
            assigned[url] = entry
        if not matched:
            globs = ", ".join(repr(g) for g in entry.files)
            if descriptor.kind == "sftflow":
                shown = ", ".join(list(names.values())[:5]) + (", ..." if len(names) > 5 else "")
                _fail(descriptor.source, _at(entry.name, "files"),
                      f"{globs} matches none of the drop's files ({shown}); fix the glob")
            notes.append(f"{descriptor.label(entry)}: {globs} matches no file of the drop: not applied")
    return assigned, notes


@dataclass(frozen=True)
class MappedDrop:
    """A drop as found, with its descriptor: each file's entry, and what the drop report records."""

    drop: DropSource
    descriptors: dict[str, Descriptor] = field(default_factory=dict)  # url -> the entry mapping its records
    record: dict[str, Any] | None = None  # the drop report's `descriptor`


def find_mapped_drop(paths: list[str], drop_id: str | None = None, map_file: str | None = None) -> MappedDrop:
    """`discovery.find_drop`, with the descriptor: its file(s) are not data, and what it means is part of
    the drop's fingerprint, so the same files mapped another way are another drop (not a no-op)."""
    descriptor, consumed = find_descriptor(paths, map_file)
    if descriptor is None:
        return MappedDrop(find_drop(paths, drop_id))
    files = [url for url in list_drop_files(paths) if url not in consumed]
    if not files:
        raise DropError(f"{', '.join(paths)}: no data files beside the descriptor {descriptor.source}")
    fingerprint = fingerprint_files(files)
    fingerprint = hashlib.sha256(f"{fingerprint}\0descriptor\0{descriptor.digest()}".encode()).hexdigest()
    assigned, notes = assign_files(descriptor, files, paths)
    drop = DropSource(check_drop_id(drop_id or default_drop_id(paths, fingerprint)), files, fingerprint)
    record = {
        "source": descriptor.source,
        "kind": descriptor.kind,
        "sha256": descriptor.digest(),
        "datasets": [entry.as_dict() for entry in descriptor.entries],
        "files": {url: descriptor.label(entry) for url, entry in assigned.items()},
        "notes": [*descriptor.notes, *notes],
    }
    return MappedDrop(drop, assigned, record)


def file_format(config_format: str, descriptor: Descriptor | None) -> str:
    """The format a file is read in: its descriptor's, else the config's (--format); both given and
    different is a ConfigError."""
    if descriptor is None or descriptor.format == "auto":
        return config_format
    if config_format not in ("auto", descriptor.format):
        entry = f" ({descriptor.name})" if descriptor.name else ""
        raise ConfigError(f"--format {config_format} contradicts the descriptor's format {descriptor.format}{entry}; "
                          "leave out --format, or the descriptor's format")
    return descriptor.format


# ---------------------------------------------------------------------------------------------
# Applying a descriptor to a record
# ---------------------------------------------------------------------------------------------


def _has_system(record: dict) -> bool:
    system = record.get("system")
    if isinstance(system, str) and system.strip():
        return True
    for name in ("messages", "conversations", "prompt"):
        turns = record.get(name)
        if isinstance(turns, list) and any(
                isinstance(t, dict) and canonical_role(t.get("role", t.get("from"))) == "system" for t in turns):
            return True
    return False


def record_mapper(descriptor: Descriptor) -> Callable[[Any], Any]:
    """A function: one parsed record -> the record with our field names, turn keys and roles (and the
    system prompt where it has none). A record that is not an object is returned as it is."""
    columns = tuple(descriptor.columns.items())
    column_sources = frozenset(descriptor.columns.values())
    keys = tuple(descriptor.message_keys.items())
    key_sources = frozenset(descriptor.message_keys.values())
    roles = descriptor.roles
    system = descriptor.system
    touches_turns = bool(keys or roles or system)

    def map_turn(turn: Any) -> Any:
        if not isinstance(turn, dict):
            return turn
        if keys:
            mapped = {k: v for k, v in turn.items() if k not in key_sources}
            for ours, theirs in keys:
                if theirs in turn:
                    mapped[ours] = turn[theirs]
        else:
            mapped = dict(turn)
        if roles:
            role_key = "role" if "role" in mapped else "from"
            role = mapped.get(role_key)
            if isinstance(role, str) and role in roles:
                mapped[role_key] = roles[role]
        return mapped

    def apply(value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        if columns:
            record = {k: v for k, v in value.items() if k not in column_sources}
            for ours, theirs in columns:
                if theirs in value:
                    record[ours] = value[theirs]
        else:
            record = dict(value)
        if touches_turns:
            for name in TURN_FIELDS:
                if name not in record:
                    continue
                turns = maybe_json(record[name])  # CSV and Parquet cells hold turn lists as JSON
                if isinstance(turns, list) and any(isinstance(t, dict) for t in turns):
                    record[name] = [map_turn(t) for t in turns]
                elif isinstance(turns, dict) and name in ("chosen", "rejected"):
                    record[name] = map_turn(turns)
            if system and not _has_system(record):
                if isinstance(record.get("messages"), list):
                    record["messages"] = [{"role": "system", "content": system}, *record["messages"]]
                else:
                    record["system"] = system
        return record

    return apply
