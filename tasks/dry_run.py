"""A training run's dry run: everything `train_adapter` decides and checks before the training process
starts, and what the run would cost, without starting anything.

    sftflow train --config flows/configs/tiny_cpu.yaml --dry-run [--set key=value ...] [--json]

It resolves the base model as `prepare_run` does, tokenizes the dataset version with the model's chat
template and runs the same gates as `tokenize_dataset` (trainable tokens, end-of-turn labels, padding,
truncation), through the same function and so the same cache (`tasks.tokenize.tokenize_version`: it
reuses the rows an earlier run or dry run tokenized, and leaves them for the run that follows), and the
same pre-flight as `train_model` (engine and ranks, the memory floor), in this process. It writes no run
directory and starts no flow run and no training process.

The numbers are the ones the trainer will use: optimizer steps as transformers' Trainer counts them
(`set_initial_training_values`), the sequences trl packs (`pack_dataset`) when `train.packing` is set,
and the labels of the tokenized rows as the training process counts them (`TrainedTokens`). The time
is estimated from the trained tokens/s of the latest finished run of the same base model and engine.
"""

from __future__ import annotations

import math
from typing import Any

from foundation.artifacts import Artifact
from foundation.workspace import Workspace
from schemas.config import RunConfig

IGNORE = -100  # tasks.tokenize.IGNORE (that module imports Prefect; the pure helpers here do not need it)


class Rate(Artifact):
    """A measured training rate: the run it comes from and its trained tokens per second."""

    run_id: str
    tokens_per_s: float


class DryRun(Artifact):
    """What `sftflow train --dry-run` reports."""

    dataset_version: str
    model_path: str
    engine: str
    world_size: int
    train_rows: int  # the rows the trainer gets: the split's rows that kept a trainable token
    eval_rows: int
    sequences: int  # train rows, or the packed sequences they make with train.packing
    packing: bool
    per_device_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int
    steps_per_epoch: int
    epochs: float | None
    max_steps: int | None
    optimizer_steps: int
    trained_tokens_per_epoch: int  # labels that are not -100, as the training process counts them
    total_tokens_per_epoch: int  # every token of the sequences (no padding)
    trained_tokens: int
    total_tokens: int
    tokens_exact: bool  # whole epochs on one rank: the counts are exact; otherwise prorated by steps
    truncated: int
    truncation_rate: float
    trainable_share: float
    memory: dict[str, Any] | None  # tasks.preflight's floor of one step (None: the model has no config.json)
    rate: Rate | None  # from the latest finished run of this base model and engine
    estimated_seconds: float | None


def optimizer_steps(sequences: int, per_device_batch: int, accumulation: int, world_size: int,
                    epochs: float | None, max_steps: int | None) -> tuple[int, int]:
    """(steps per epoch, steps of the run) as transformers' Trainer counts them: each rank's dataloader has
    ceil(sequences / world_size / batch) micro-batches, an epoch ceil(that / accumulation) optimizer steps
    (at least 1), and the run `max_steps` if set, else ceil(epochs x steps per epoch)."""
    per_rank = math.ceil(sequences / world_size)
    batches = math.ceil(per_rank / per_device_batch)
    per_epoch = max(math.ceil(batches / accumulation), 1)
    return per_epoch, max_steps if max_steps else math.ceil((epochs or 1.0) * per_epoch)


def packed_sequences(input_ids: list[list[int]], labels: list[list[int]], max_length: int) -> tuple[int, int]:
    """(sequences, trained tokens) once trl packs the rows as the trainer does (`pack_dataset` with SFTConfig's
    default strategy, bfd, in the rows' order). The padding-free collator that strategy brings masks the first
    token of every packed document (position 0), so its label is not trained."""
    import datasets
    from trl import SFTConfig
    from trl.data_utils import pack_dataset

    datasets.disable_progress_bars()  # as the training process does: stderr is for the dry run's own lines
    rows = datasets.Dataset.from_dict({"input_ids": input_ids, "labels": labels})
    packed = pack_dataset(rows, max_length, SFTConfig.__dataclass_fields__["packing_strategy"].default)
    trained = sum(sum(1 for t in row[1:] if t != IGNORE) for row in labels)
    return packed.num_rows, trained


def latest_rate(workspace: Workspace, model_path: str, engine: str) -> Rate | None:
    """The trained tokens/s of the latest finished run of the same base model with the same engine."""
    for run in workspace.runs.finished_runs():
        try:
            manifest = run.manifest()
        except Exception:  # an unreadable manifest is `sftflow runs list`'s to report, not a reason to refuse
            continue
        if manifest.model_path == model_path and manifest.engine == engine and manifest.tokens_per_s:
            return Rate(run_id=run.run_id, tokens_per_s=manifest.tokens_per_s)
    return None


def dry_run(config: RunConfig, dataset_version: str | None, log=print) -> DryRun:
    """Resolve, tokenize, gate and estimate a training run as `train_adapter` would; start nothing.

    Raises what the run would fail with before its first step: NotFoundError (no dataset), ConfigError
    (model, engine), TemplateError / GateError (masks) or ResourceError (memory)."""
    import torch

    from tasks.base_model import resolve_model
    from tasks.engines import pick_engine
    from tasks.preflight import check_training_fits
    from tasks.tokenize import tokenize_version
    from tasks.train import check_can_train, training_ranks

    workspace = Workspace.from_env().check_layout()
    dataset = workspace.datasets.find(dataset_version)
    t = config.train
    ranks = training_ranks(t)
    engine = pick_engine(t.engine, ranks=ranks)
    model = resolve_model(config.model, workspace, log=log)
    rows = tokenize_version(dataset, model.path, config, warn=log)
    if rows.reused:
        log(f"reusing the tokenized rows in {rows.entry.root}")
    table, gates = rows.table("train"), rows.record.train
    check_can_train(model.path, config, engine, ranks, log=lambda *_: None)  # the gate train_model runs
    memory = check_training_fits(model.path, config, cuda=torch.cuda.is_available(), log=log, engine=engine)

    input_ids, labels = table.column("input_ids").to_pylist(), table.column("labels").to_pylist()
    total_per_epoch = sum(len(row) for row in input_ids)
    if t.packing:
        sequences, trained_per_epoch = packed_sequences(input_ids, labels, t.max_seq_length)
    else:
        sequences, trained_per_epoch = len(input_ids), sum(sum(1 for x in row if x != IGNORE) for row in labels)
    per_epoch, steps = optimizer_steps(sequences, t.batch_size, t.gradient_accumulation_steps, ranks, t.epochs,
                                       t.max_steps)
    passes = steps / per_epoch  # epochs the run covers (a fraction when max_steps or epochs cut one short)
    exact = ranks == 1 and passes.is_integer()  # whole epochs: every row trained the same number of times
    trained, total = round(trained_per_epoch * passes), round(total_per_epoch * passes)
    rate = latest_rate(workspace, model.path, engine)
    return DryRun(
        dataset_version=dataset.name, model_path=model.path, engine=engine, world_size=ranks,
        train_rows=table.num_rows, eval_rows=rows.record.eval.kept_rows, sequences=sequences, packing=t.packing,
        per_device_batch_size=t.batch_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
        global_batch_size=t.batch_size * t.gradient_accumulation_steps * ranks, steps_per_epoch=per_epoch,
        epochs=t.epochs if t.max_steps is None else None, max_steps=t.max_steps, optimizer_steps=steps,
        trained_tokens_per_epoch=trained_per_epoch, total_tokens_per_epoch=total_per_epoch, trained_tokens=trained,
        total_tokens=total, tokens_exact=exact, truncated=gates.truncated, truncation_rate=gates.truncation_rate,
        trainable_share=gates.trainable_share, memory=memory, rate=rate,
        estimated_seconds=round(trained / rate.tokens_per_s, 1) if rate else None,
    )


def dry_run_text(report: DryRun) -> str:
    """The human form of a dry run."""
    gib = 1024**3
    epochs = f"{report.epochs:g} epochs" if report.max_steps is None else f"max_steps {report.max_steps}"
    lines = [
        f"dry run: {report.model_path} ({report.engine} engine, {report.world_size} rank"
        f"{'s' if report.world_size > 1 else ''}), dataset {report.dataset_version}",
        f"  gates passed: {report.train_rows} train rows ({report.truncated} truncated, "
        f"{report.truncation_rate:.1%}), {report.eval_rows} eval rows, {report.trainable_share:.0%} of tokens trained",
        f"  {report.optimizer_steps} optimizer steps ({report.steps_per_epoch} per epoch, {epochs}) of "
        f"{report.global_batch_size} {'packed sequences' if report.packing else 'rows'} "
        f"({report.per_device_batch_size} x {report.gradient_accumulation_steps} accumulation x {report.world_size})",
        f"  tokens: {report.trained_tokens} trained of {report.total_tokens}"
        + ("" if report.tokens_exact else " (prorated: the run covers part of an epoch or several ranks)"),
    ]
    if report.memory:
        lines.append(f"  memory: at least {report.memory['need_bytes'] / gib:.2f} GiB of {report.memory['device']}'s "
                     f"{report.memory['free_bytes'] / gib:.2f} GiB free")
    else:
        lines.append("  memory: not estimated (the model has no config.json)")
    if report.rate:
        lines.append(f"  time: about {report.estimated_seconds:g} s at {report.rate.tokens_per_s:g} trained tokens/s "
                     f"(run {report.rate.run_id})")
    else:
        lines.append("  time: not estimated (no finished run of this model and engine to measure a rate from)")
    lines.append("  nothing was started: train with the same command without --dry-run")
    return "\n".join(lines)
