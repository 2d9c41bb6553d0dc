"""Tokenize: canonical rows -> (input_ids, labels) with the model's chat template, and the gates.

Labels cover every assistant turn, including its end-of-turn token, and nothing else (system,
user and tool turns are context). They are found by rendering the conversation up to each turn:
the tokens an assistant turn adds after the generation prompt are its span. This works for any
chat template whose renderings of a conversation's prefixes are prefixes of its full rendering;
a template for which that is not so is reported, never silently mis-masked.

The gates run here, on the CPU, before any GPU minute is spent:
- every example has at least one trainable token;
- every assistant turn's end-of-turn token is a label (or the row was truncated, which is counted);
- padding does not mask the end-of-turn token (checked through the real collator);
- the truncation rate is at most `train.max_truncation_rate`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from foundation.artifacts import Tokenized, TokenizedSplit
from foundation.errors import SftflowError
from foundation.workspace import Workspace
from schemas.config import RunConfig
from tasks.engines.tokenizer import TemplateError, load_tokenizer

IGNORE = -100
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>")

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


def end_of_turn_ids(tokenizer) -> set[int]:
    """Token ids that end an assistant turn: eos and the usual end-of-turn markers in the vocabulary."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    return ids


def _render(tokenizer, messages: list[dict], tools, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    return list(out["input_ids"] if isinstance(out, dict) else out)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    turns_missing_eot: list[int] = field(default_factory=list)  # assistant turn indexes
    truncated: bool = False


def tokenize_conversation(tokenizer, messages: list[dict], tools_json: str | None, max_length: int,
                          eot_ids: set[int]) -> Example:
    """input_ids and labels for one conversation; labels are -100 outside assistant turns."""
    tools = json.loads(tools_json) if tools_json else None
    full = _render(tokenizer, messages, tools, add_generation_prompt=False)
    labels = [IGNORE] * len(full)
    missing_eot = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], tools, add_generation_prompt=True)) if i else 0
        end_ids = _render(tokenizer, messages[: i + 1], tools, add_generation_prompt=False)
        end = len(end_ids)
        if full[:end] != end_ids or end <= start:
            raise TemplateError(
                "the chat template renders a conversation's prefix differently from the conversation itself, so "
                "assistant spans cannot be found; set model.chat_template to a template without that behaviour"
            )
        labels[start:end] = full[start:end]
        # the span may end with whitespace after the end-of-turn token (e.g. ChatML's "\n")
        if not any(t in eot_ids for t in full[max(start, end - 3) : end]):
            missing_eot.append(i)
    truncated = len(full) > max_length
    return Example(full[:max_length], labels[:max_length], missing_eot, truncated)


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


def tokenize_table(tokenizer, rows: pa.Table, max_length: int) -> tuple[pa.Table, list[Example], dict]:
    """Tokenize canonical rows; returns the tokenized table, the examples and gate counts."""
    eot_ids = end_of_turn_ids(tokenizer)
    ids, input_ids, labels, examples = [], [], [], []
    no_labels, missing_eot, truncated = [], [], 0
    for row in rows.to_pylist():
        example = tokenize_conversation(tokenizer, row["messages"], row["tools"], max_length, eot_ids)
        trainable = sum(1 for t in example.labels if t != IGNORE)
        where = f"{row['source_file']} row {row['source_row']} (id {row['id'][:12]})"
        if example.truncated:
            truncated += 1
        if trainable == 0:
            no_labels.append((where, example.truncated))
            continue
        if example.turns_missing_eot and not example.truncated:
            missing_eot.append(f"{where}: assistant turns {example.turns_missing_eot}")
        ids.append(row["id"])
        input_ids.append(example.input_ids)
        labels.append(example.labels)
        examples.append(example)
    table = pa.table({"id": ids, "input_ids": input_ids, "labels": labels}, schema=TOKENIZED_SCHEMA)
    return table, examples, {"no_labels": no_labels, "missing_eot": missing_eot, "truncated": truncated,
                             "eot_ids": eot_ids}


def run_gates(tokenizer, rows: pa.Table, max_length: int, max_truncation_rate: float,
              split: str) -> tuple[pa.Table, list[Example], GateReport]:
    """Tokenize a split and apply every gate; raises GateError naming the rows on a violation."""
    table, examples, found = tokenize_table(tokenizer, rows, max_length)
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


@task(cache_policy=NO_CACHE)
def tokenize_dataset(dataset_version: str, model_path: str, config: RunConfig, run_id: str) -> Tokenized:
    """Tokenize the dataset version's train and eval splits into the run directory; run the gates."""
    logger = get_run_logger()
    workspace = Workspace.from_env()
    dataset, run = workspace.datasets.find(dataset_version), workspace.runs.dir(run_id)
    tokenizer = load_tokenizer(model_path, config)
    run.tokenized_dir.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split in ("train", "eval"):
        table, examples, gates = run_gates(
            tokenizer, pq.read_table(dataset.path(split)), config.train.max_seq_length,
            config.train.max_truncation_rate, split
        )
        pq.write_table(table, run.tokenized(split))
        trainable = sum(sum(1 for t in e.labels if t != IGNORE) for e in examples)
        splits[split] = TokenizedSplit(trainable_tokens=trainable, **gates.__dict__, path=str(run.tokenized(split)))
        logger.info("%s: %s rows, %s trainable tokens (%.0f%% of tokens), %s truncated (%.1f%%)", split,
                    table.num_rows, trainable, 100 * gates.trainable_share, gates.truncated, 100 * gates.truncation_rate)
        if split == "train" and examples:
            create_markdown_artifact(
                key="training-example-mask",
                markdown=mask_markdown(tokenizer, examples[0], table.column("id")[0].as_py()),
                description="One training example as the model sees it, with its loss mask",
            )
    return Tokenized(**splits, eos_ids=sorted(end_of_turn_ids(tokenizer)))
