"""Tokenize: canonical rows -> (input_ids, labels) with the model's chat template, and the gates.

Labels cover exactly each assistant message's content and the end-of-turn token that closes it, and
nothing else (system, user and tool turns, role headers and template scaffolding such as an empty
think block are context). They are found in one rendering of the whole conversation: each assistant
content is located in the rendered text in order, its characters mapped to tokens through the
tokenizer's offsets, and the template's end-of-turn token (`tasks.engines.chat_format`, derived from
the template, never a list of known markers) must follow it. So a template that renders a
conversation's prefixes differently from the whole (Qwen3's think blocks, Mistral's system prompt in
the last user turn) masks correctly; one that does not render an assistant's content as given is
reported, never silently mis-masked.

The gates run here, on the CPU, before any GPU minute is spent:
- every example has at least one trainable token;
- every assistant turn's end-of-turn token is a label (or the row was truncated, which is counted);
- padding does not mask the end-of-turn token (checked through the real collator);
- the truncation rate is at most `train.max_truncation_rate`.

A dataset version's tokenized rows are cached on the machine and reused by every later run (and dry run)
with the same tokenizer and settings: a retry, a learning-rate change, a scheduled retrain with no new
data. Such a run's `tokenized/` files are hard links to the cached ones; it loads no tokenizer and imports
no trl (~17-21 s of every GPU run's way to its first step). The key is a sha256 over everything that
decides the rows and gate counts (`cache_key`): the version's name (versions are content-addressed), the
bytes of the tokenizer's files in the model directory, `model.chat_template`'s text, `model.revision`,
`train.max_seq_length`, `train.max_truncation_rate`, the source of the code that tokenizes (this module,
tasks/engines/chat_format.py and tokenizer.py: a change of it invalidates every entry, with no version
number to remember) and the versions of the libraries that render, tokenize, gate and write the rows.
A model with remote code, or one that is not a local directory, is never cached (`cache_key` says why).

The entries live with their dataset version, `datasets/<version>/tokenized/<key>/`
(`foundation.stores.datasets.TokenizedEntry`), not under the workspace's `cache/`: deleting a version
deletes its entries, and nothing reads a version's directory by listing it (the store finds versions by
their manifest, the manifest lists the files it covers, `sftflow datasets` reads manifests and splits),
so the extra directory disturbs no reader. `cache/` may also be shared between workspaces (SFTFLOW_CACHE),
and with it every test session that keeps a model cache: an entry there would outlive its version. An
entry is written whole (staged beside it, then renamed into place) and only after the gates passed; one
that is unreadable or incomplete is a miss, tokenized again and replaced. Remove `datasets/*/tokenized/`
to clear the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from foundation import processes
from foundation.artifacts import Tokenized, TokenizedSplit
from foundation.atomic import exclusive_lock, remove_stale_tmp, sha256_of, staged_dir, tmp_sibling
from foundation.errors import SftflowError, WorkspaceError
from foundation.stores.datasets import SPLITS, DatasetVersion, TokenizedEntry
from foundation.workspace import Workspace
from schemas.chat_templates import template_text
from schemas.config import RunConfig
from tasks.engines.chat_format import chat_format, end_of_turn_ids, render
from tasks.engines.tokenizer import TemplateError, load_tokenizer

IGNORE = -100

TOKENIZED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("labels", pa.list_(pa.int32()), nullable=False),
    ],
    metadata={"schema_version": "tokenized-row/1"},
)


class GateError(SftflowError):
    """A training-data gate failed; the message names the rows and the fix."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    turns_missing_eot: list[int] = field(default_factory=list)  # assistant turn indexes
    truncated: bool = False


@dataclass
class Rendered:
    """A conversation as the template renders it, tokenized, with each token's character span."""

    text: str
    ids: list[int]
    starts: list[int]
    ends: list[int]
    special: set[int]  # ids of special tokens: content never starts inside one

    def find_content(self, content: str, cursor: int) -> int:
        """Where `content` starts at or after `cursor`, not inside a special token; -1 when nowhere."""
        at = self.text.find(content, cursor) if content else -1
        while at >= 0 and self.ids[bisect_right(self.ends, at)] in self.special:
            at = self.text.find(content, at + 1)
        return at

    def assistant_tokens(self, content: str, cursor: int, eot_id: int) -> tuple[int, int, bool, int] | None:
        """(first token, last token, whether the last is the end-of-turn token, where the content ends) of one
        assistant content found from `cursor`; None when the template did not render it as given."""
        content = content.strip()
        start = self.find_content(content, cursor)
        if start < 0:
            return None
        end = start + len(content)
        first = bisect_right(self.ends, start)  # the first token reaching into the content
        after = k = bisect_left(self.starts, end)  # the first token after it
        while k < len(self.ids) and self.ids[k] != eot_id and not self.text[self.starts[k]:self.ends[k]].strip():
            k += 1  # whitespace the template put between the content and its end-of-turn token
        if k < len(self.ids) and self.ids[k] == eot_id:
            return first, k, True, end
        return first, max(first, after - 1), False, end

    def turn_tokens(self, message: dict, cursor: int, eot_id: int, header_found: bool,
                    results: list[str]) -> tuple[int, int, bool, int] | None:
        """(first token, last token, ends with end-of-turn, where the turn ends) of an assistant turn with
        reasoning or tool calls: everything the model writes after its turn's header (`cursor`, when the
        header was found: a think block's tags too), through the next end-of-turn token, so reasoning and
        calls are trained as the template writes them. None when the template dropped its text or a call."""
        starts = [at for piece in (message.get("reasoning"), message["content"])
                  if piece and piece.strip() and (at := self.find_content(piece.strip(), cursor)) >= 0]
        if message["content"].strip() and self.find_content(message["content"].strip(), cursor) < 0:
            return None  # the template dropped the text (Llama 3's renders only the call of a turn that has one)
        start = min([cursor, *starts]) if header_found else min(starts, default=cursor)
        while start < len(self.text) and self.text[start].isspace():
            start += 1
        first = bisect_right(self.ends, start)
        k = first
        while k < len(self.ids) and self.ids[k] != eot_id:
            k += 1
        turn = self.text[self.starts[first]:self.ends[min(k, len(self.ids) - 1)]] if first < len(self.ids) else ""
        calls_part = turn.replace(message["content"].strip(), "", 1) if message["content"].strip() else turn
        for call in json.loads(message["tool_calls"]) if message.get("tool_calls") else []:
            if call["function"]["name"] not in calls_part:
                return None  # the template dropped the call (Phi-3.5's renders no tool calls)
        if any(result in calls_part for result in results):
            return None  # the template writes the tool's answer inside the assistant's turn (Gemma 4's): not separable
        if k < len(self.ids):
            return first, k, True, self.ends[k]
        return first, len(self.ids) - 1, False, len(self.text)


def trained_turn(message: dict) -> bool:
    """Is this turn's content learned? As the data says (weight 0 or 1), else assistant turns only."""
    weight = message.get("weight")
    return message["role"] == "assistant" if weight is None else weight > 0


def tokenize_text(tokenizer, text: str, max_length: int) -> Example:
    """A plain-text row: the document as the tokenizer encodes it (its bos, if it adds one) and eos, every
    token trained."""
    if tokenizer.eos_token_id is None:
        raise TemplateError("the tokenizer has no eos token to end a plain-text row; set one in its config")
    ids = list(tokenizer(text)["input_ids"]) + [tokenizer.eos_token_id]
    return Example(ids[:max_length], ids[:max_length], [], len(ids) > max_length)


def tokenize_conversation(tokenizer, messages: list[dict], tools_json: str | None, max_length: int,
                          eot_id: int) -> Example:
    """input_ids and labels for one conversation; labels are -100 outside the trained turns: each assistant
    turn's content (with its reasoning and tool calls as rendered) and the end-of-turn token that closes it,
    unless the data gives the turn weight 0, and a user turn the data gives weight 1."""
    if len(messages) == 1 and messages[0]["role"] == "text":
        return tokenize_text(tokenizer, messages[0]["content"], max_length)
    tools = json.loads(tools_json) if tools_json else None
    text = render(tokenizer, messages, tools)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    rendered = Rendered(text, list(encoding["input_ids"]), [s for s, _ in encoding["offset_mapping"]],
                        [e for _, e in encoding["offset_mapping"]], special)
    ids, labels = rendered.ids, [IGNORE] * len(rendered.ids)
    header = chat_format(tokenizer).assistant_history_prefix  # the content follows its turn's header
    missing_eot, cursor = [], 0
    for i, message in enumerate(messages):
        content = message["content"].strip()
        if message["role"] == "user":  # past the user turn: an answer is never found inside it
            at = rendered.find_content(content, cursor)
            if at >= 0 and trained_turn(message):
                first, last = bisect_right(rendered.ends, at), bisect_left(rendered.starts, at + len(content)) - 1
                labels[first : last + 1] = ids[first : last + 1]
            cursor = at + len(content) if at >= 0 else cursor
            continue
        if message["role"] != "assistant":  # a system prompt may be rendered anywhere (Mistral: in the last turn),
            continue  # and a tool result anywhere or nowhere (Phi-3.5 drops it); the answer's header comes after both
        at = text.find(header, cursor) if header else -1
        cursor = at + len(header) if at >= 0 else cursor
        if message.get("tool_calls") or message.get("reasoning"):
            header_found = at >= 0
            if not header_found:  # a template whose turns have no header (Mistral's): where the prompt ends
                prompt = render(tokenizer, messages[:i], tools, generation_prompt=True)
                if text.startswith(prompt) and len(prompt) >= cursor:
                    cursor, header_found = len(prompt), True
            results = [m["content"].strip() for m in messages[i + 1:] if m["role"] == "tool" and m["content"].strip()]
            found = rendered.turn_tokens(message, cursor, eot_id, header_found, results)
        else:
            found = rendered.assistant_tokens(content, cursor, eot_id)
        if found is None:
            if not trained_turn(message):
                continue  # context only: where the template put it does not matter
            what = "content and tool calls" if message.get("tool_calls") else "content"
            raise TemplateError(
                f"the chat template does not render assistant turn {i}'s {what} as given, so its tokens "
                f"cannot be found; set model.chat_template to a template that renders message {what} verbatim"
            )
        first, last, ends_with_eot, cursor = found
        if not trained_turn(message):
            continue
        labels[first : last + 1] = ids[first : last + 1]
        if not ends_with_eot:
            missing_eot.append(i)
    truncated = len(ids) > max_length
    return Example(ids[:max_length], labels[:max_length], missing_eot, truncated)


@dataclass
class GateReport:
    rows: int
    truncated: int
    truncation_rate: float
    trainable_share: float
    dropped_no_labels: int
    pad_is_eot: bool


def check_pad_masking(tokenizer, examples: list[Example], eot_ids: set[int], collate=None) -> None:
    """Collate real examples of different lengths with the training collator (trl's by default) and
    check every end-of-turn label survives padding."""
    if collate is None:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    batch = collate([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    for row, example in enumerate(examples):
        wanted = sum(1 for t in example.labels if t in eot_ids)
        kept = sum(1 for t in batch["labels"][row].tolist() if t in eot_ids)
        if kept != wanted:
            raise GateError(
                f"padding masks the end-of-turn token: pad_token_id {tokenizer.pad_token_id} is an end-of-turn id "
                f"and the collator drops its labels ({kept} of {wanted} kept); give the tokenizer a distinct pad "
                "token (e.g. <|finetune_right_pad_id|> for Llama 3)"
            )


def mask_markdown(tokenizer, example: Example, row_id: str) -> str:
    """One example with its mask: trained tokens in bold, context in plain text."""
    pieces, current, trained = [], [], None
    for token, label in zip(example.input_ids, example.labels):
        is_trained = label != IGNORE
        if trained is not None and is_trained != trained:
            pieces.append((trained, tokenizer.decode(current)))
            current = []
        current.append(token)
        trained = is_trained
    if current:
        pieces.append((trained, tokenizer.decode(current)))
    body = "".join(f"**⟦{t}⟧**" if on else t for on, t in pieces).replace("\n", "⏎\n")
    share = sum(1 for label in example.labels if label != IGNORE) / max(1, len(example.labels))
    return (
        f"# Rendered training example `{row_id[:12]}`\n\nTrained tokens are **⟦bold⟧** "
        f"({share:.0%} of {len(example.labels)} tokens); the rest is context.\n\n{body}\n"
    )


@dataclass
class _Tokenized:
    """What tokenizing some rows found: the kept rows' ids and examples, and the rows each gate counts."""

    ids: list[str] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)
    no_labels: list[tuple[str, bool]] = field(default_factory=list)
    missing_eot: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    truncated: int = 0

    def extend(self, other: "_Tokenized") -> None:
        for name in ("ids", "examples", "no_labels", "missing_eot", "refused"):
            getattr(self, name).extend(getattr(other, name))
        self.truncated += other.truncated


def _tokenize_rows(tokenizer, rows: list[dict], max_length: int, eot_id: int) -> _Tokenized:
    from jinja2.exceptions import TemplateError as JinjaError

    out = _Tokenized()
    for row in rows:
        where = f"{row['source_file']} row {row['source_row']} (id {row['id'][:12]})"
        try:
            example = tokenize_conversation(tokenizer, row["messages"], row["tools"], max_length, eot_id)
        except (JinjaError, TemplateError, TypeError) as exc:  # the template's raise_exception (roles that do not
            out.refused.append(f"{where}: {exc}")  # alternate), a turn it does not render, or fields it cannot combine
            continue
        trainable = sum(1 for t in example.labels if t != IGNORE)
        if example.truncated:
            out.truncated += 1
        if trainable == 0:
            out.no_labels.append((where, example.truncated))
            continue
        if example.turns_missing_eot and not example.truncated:
            out.missing_eot.append(f"{where}: assistant turns {example.turns_missing_eot}")
        out.ids.append(row["id"])
        out.examples.append(example)
    return out


# Rows per process when tokenizing on several cores: rendering a chat template and tokenizing is ~2 ms a row
# on one core (10,000 rows ~20 s, which a GPU run otherwise waits through before its first step); a forked
# process costs ~0.1 s, so smaller tables stay in this process.
ROWS_PER_PROCESS = 1000
_forked: tuple | None = None  # (tokenizer, rows, max_length, eot_id) for the forked processes to read


def _tokenize_slice(start: int, stop: int) -> _Tokenized:
    tokenizer, rows, max_length, eot_id = _forked
    return _tokenize_rows(tokenizer, rows[start:stop], max_length, eot_id)


def tokenize_table(tokenizer, rows: pa.Table, max_length: int) -> tuple[pa.Table, list[Example], dict]:
    """Tokenize canonical rows (on every core for large tables: forked processes, rows in order); returns the
    tokenized table, the examples and gate counts."""
    global _forked
    eot_id = tokenizer.convert_tokens_to_ids(chat_format(tokenizer).end_of_turn)
    eot_ids = end_of_turn_ids(tokenizer)
    pylist = rows.to_pylist()
    workers = min(os.cpu_count() or 1, len(pylist) // ROWS_PER_PROCESS)
    if workers < 2:
        found = _tokenize_rows(tokenizer, pylist, max_length, eot_id)
    else:
        bounds = [len(pylist) * i // workers for i in range(workers + 1)]
        _forked = (tokenizer, pylist, max_length, eot_id)  # what the forked processes read
        try:
            parts = processes.fork_map(_tokenize_slice, bounds[:-1], bounds[1:], workers=workers)
        finally:
            _forked = None
        found = _Tokenized()
        for part in parts:
            found.extend(part)
    table = pa.table({"id": found.ids, "input_ids": [e.input_ids for e in found.examples],
                      "labels": [e.labels for e in found.examples]}, schema=TOKENIZED_SCHEMA)
    return table, found.examples, {"no_labels": found.no_labels, "missing_eot": found.missing_eot,
                                   "refused": found.refused, "truncated": found.truncated, "eot_ids": eot_ids}


def run_gates(tokenizer, rows: pa.Table, max_length: int, max_truncation_rate: float,
              split: str) -> tuple[pa.Table, list[Example], GateReport]:
    """Tokenize a split and apply every gate; raises GateError naming the rows on a violation."""
    table, examples, found = tokenize_table(tokenizer, rows, max_length)
    if found["refused"]:
        raise GateError(
            f"{split}: the model's chat template refuses {len(found['refused'])} row(s): {'; '.join(found['refused'][:3])}"
            "; remove those rows, or set model.chat_template to a template that renders them"
        )
    untruncated_no_labels = [w for w, was_truncated in found["no_labels"] if not was_truncated]
    if untruncated_no_labels:
        raise GateError(
            f"{split}: {len(untruncated_no_labels)} example(s) have no trainable token (no assistant turn survives "
            f"rendering): {'; '.join(untruncated_no_labels[:5])}; fix or remove those rows"
        )
    if found["missing_eot"]:
        raise GateError(
            f"{split}: {len(found['missing_eot'])} example(s) have an assistant turn whose end-of-turn token is not a "
            f"label, so the model would not learn to stop: {'; '.join(found['missing_eot'][:5])}; use a chat template "
            "that ends assistant turns with an end-of-turn token"
        )
    if examples:
        pair = sorted(examples[:16], key=lambda e: len(e.input_ids))
        check_pad_masking(tokenizer, [pair[0], pair[-1]], found["eot_ids"])
    n = rows.num_rows
    rate = found["truncated"] / n if n else 0.0
    if rate > max_truncation_rate:
        raise GateError(
            f"{split}: {found['truncated']} of {n} rows ({rate:.1%}) are longer than train.max_seq_length={max_length} "
            f"tokens, over train.max_truncation_rate={max_truncation_rate:.0%}; raise train.max_seq_length or the limit"
        )
    tokens = sum(len(e.input_ids) for e in examples)
    trainable = sum(sum(1 for t in e.labels if t != IGNORE) for e in examples)
    report = GateReport(
        rows=n,
        truncated=found["truncated"],
        truncation_rate=round(rate, 6),
        trainable_share=round(trainable / tokens, 6) if tokens else 0.0,
        dropped_no_labels=len(found["no_labels"]),
        pad_is_eot=tokenizer.pad_token_id in found["eot_ids"],
    )
    return table, examples, report


# ---------------------------------------------------------------------------------------------
# The cache of a version's tokenized rows (see the module's docstring)
# ---------------------------------------------------------------------------------------------

# The files of a model directory AutoTokenizer reads: the tokenizer's own (tokenizer.json, tokenizer_config.json,
# versioned tokenizer.<v>.json, sentencepiece and tiktoken models, BPE vocabularies and merges), the chat templates
# beside it, and config.json, whose model type picks the tokenizer class when tokenizer_config.json names none.
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*",
                   "additional_chat_templates/*", "vocab*", "merges*", "*.model", "*.tiktoken", "config.json")
# The modules whose source decides the rows (all imported by this one).
TOKENIZING_CODE = (__name__, "tasks.engines.chat_format", "tasks.engines.tokenizer")
# What renders the template, tokenizes, runs the padding gate and writes the Parquet bytes.
LIBRARIES = ("transformers", "tokenizers", "jinja2", "trl", "pyarrow")


def _library_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cache_key(dataset_version: str, model_path: str, config: RunConfig) -> str | None:
    """The sha256 of everything that decides a version's tokenized rows and gate counts for this model and
    config; None when they cannot be cached."""
    model = Path(model_path)
    # Remote code is a tokenizer class whose behaviour is not in the files hashed here (and may be fetched anew),
    # and a name that is no local directory is whatever the Hub holds for it today: neither can be keyed on bytes
    # read here, so such runs tokenize every time.
    if config.model.trust_remote_code or not model.is_dir():
        return None
    files = sorted({p for pattern in TOKENIZER_FILES for p in model.glob(pattern) if p.is_file()})
    inputs = {
        "dataset_version": dataset_version,
        "tokenizer_files": {p.relative_to(model).as_posix(): sha256_of(p) for p in files},
        "chat_template": template_text(config.model.chat_template) if config.model.chat_template else None,
        "revision": config.model.revision,
        "max_seq_length": config.train.max_seq_length,
        "max_truncation_rate": config.train.max_truncation_rate,
        "code": {name: sha256_of(Path(sys.modules[name].__file__)) for name in TOKENIZING_CODE},
        "libraries": {name: _library_version(name) for name in LIBRARIES},
    }
    return hashlib.sha256(orjson.dumps(inputs, option=orjson.OPT_SORT_KEYS)).hexdigest()


def at_paths(record: Tokenized, path: Callable[[str], Path]) -> Tokenized:
    """The record with each split's `path` where that split's file is."""
    return record.model_copy(update={s: getattr(record, s).model_copy(update={"path": str(path(s))}) for s in SPLITS})


def read_entry(entry: TokenizedEntry) -> tuple[Tokenized, str] | None:
    """A cache entry's record and mask markdown, when the entry is whole: its record parses and each Parquet
    file's footer reads with the rows the record counts. None otherwise: a miss, tokenized again and replaced."""
    try:
        record = Tokenized.read(entry.record)
        for split in SPLITS:
            if pq.read_metadata(entry.path(split)).num_rows != getattr(record, split).kept_rows:
                return None
        return record, entry.mask.read_text(encoding="utf-8")
    except (OSError, ValueError, WorkspaceError, pa.ArrowException):  # missing, truncated or changed by hand
        return None


def store_entry(entry: TokenizedEntry, tables: dict[str, pa.Table], record: Tokenized, mask: str) -> Tokenized:
    """Write a tokenization into the cache whole (staged beside the entry, then renamed into place, replacing a
    damaged one); returns its record with the entry's paths."""
    record = at_paths(record, entry.path)
    with exclusive_lock(entry.root.parent / ".lock"):
        remove_stale_tmp(entry.root.parent)  # what writers that died left
        with staged_dir(entry.root) as tmp:
            staged = TokenizedEntry(tmp)
            for split in SPLITS:
                pq.write_table(tables[split], staged.path(split))
            staged.mask.write_text(mask, encoding="utf-8")
            record.write(staged.record)
    return record


def place_file(source: Path, target: Path) -> None:
    """Make `target` hold `source`'s bytes: a hard link (nothing copied), or a copy where a link cannot be made
    (another file system). Through a temporary name, so a file already at `target` (maybe a link to another
    entry) is replaced, never written through."""
    tmp = tmp_sibling(target)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_table(table: pa.Table, target: Path) -> None:
    """Write Parquet through a temporary name (a file already at `target` may be a link into the cache)."""
    tmp = tmp_sibling(target)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class TokenizedVersion:
    """A dataset version's splits tokenized for one model and config: the record (gate counts; its paths are the
    cache entry's files, empty when there is no entry), the mask markdown of one training example, and where the
    rows are: the cache entry, the tables in memory, or both."""

    record: Tokenized
    mask: str
    entry: TokenizedEntry | None  # None: not cacheable, or the entry could not be written
    tables: dict[str, pa.Table]  # empty when the rows were reused from the entry
    reused: bool

    def table(self, split: str) -> pa.Table:
        return self.tables[split] if split in self.tables else pq.read_table(self.entry.path(split))


def tokenize_version(dataset: DatasetVersion, model_path: str, config: RunConfig,
                     warn: Callable[[str], None]) -> TokenizedVersion:
    """Tokenize a version's train and eval splits and run the gates, or reuse the cached result of an earlier
    run with the same key; raises GateError / TemplateError as the gates do. A cache that cannot be written is
    warned about, never an error: the run has its rows either way."""
    key = cache_key(dataset.name, model_path, config)
    entry = dataset.tokenized_entry(key) if key else None
    if entry is not None and (found := read_entry(entry)) is not None:
        return TokenizedVersion(*found, entry=entry, tables={}, reused=True)
    tokenizer = load_tokenizer(model_path, config)
    tables, splits, mask = {}, {}, ""
    for split in SPLITS:
        table, examples, gates = run_gates(tokenizer, pq.read_table(dataset.path(split)), config.train.max_seq_length,
                                           config.train.max_truncation_rate, split)
        trainable = sum(sum(1 for t in e.labels if t != IGNORE) for e in examples)
        tables[split] = table
        splits[split] = TokenizedSplit(trainable_tokens=trainable, **gates.__dict__, path="")  # where it is written
        if split == "train" and examples:
            mask = mask_markdown(tokenizer, examples[0], table.column("id")[0].as_py())
    record = Tokenized(**splits, eos_ids=sorted(end_of_turn_ids(tokenizer)))
    if entry is not None:
        try:
            record = store_entry(entry, tables, record, mask)
        except OSError as exc:
            warn(f"could not cache the tokenized rows in {entry.root} ({exc}); the next run tokenizes them again")
            entry = None
    return TokenizedVersion(record, mask, entry, tables, reused=False)


@task(cache_policy=NO_CACHE)
def tokenize_dataset(dataset_version: str, model_path: str, config: RunConfig, run_id: str) -> Tokenized:
    """Tokenize the dataset version's train and eval splits into the run directory and run the gates, or link
    the rows of an earlier run with the same tokenizer and settings from the cache."""
    logger = get_run_logger()
    workspace = Workspace.from_env()
    dataset, run = workspace.datasets.find(dataset_version), workspace.runs.dir(run_id)
    rows = tokenize_version(dataset, model_path, config, logger.warning)
    run.tokenized_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        if rows.entry is not None:
            place_file(rows.entry.path(split), run.tokenized(split))
        else:
            write_table(rows.tables[split], run.tokenized(split))
    if rows.reused:
        logger.info("reused the tokenized rows and gate counts of an earlier run with the same tokenizer and "
                    "settings, from %s", rows.entry.root)
    tokenized = at_paths(rows.record, run.tokenized)
    for split in SPLITS:
        s = getattr(tokenized, split)
        logger.info("%s: %s rows, %s trainable tokens (%.0f%% of tokens), %s truncated (%.1f%%)", split,
                    s.kept_rows, s.trainable_tokens, 100 * s.trainable_share, s.truncated, 100 * s.truncation_rate)
    if rows.mask:
        create_markdown_artifact(
            key="training-example-mask",
            markdown=rows.mask,
            description="One training example as the model sees it, with its loss mask",
        )
    return tokenized
