"""Flow `train_adapter`: a dataset version + a RunConfig -> a LoRA adapter in a run directory.

Run it:
    sftflow train --config flows/configs/tiny_cpu.yaml [--set key=value ...] [--dataset VERSION] --json
    sftflow train --config flows/configs/tiny_cpu.yaml --dry-run   # its gates and cost, without this flow (tasks.dry_run)
or from Python:
    from flows.train import train_adapter; train_adapter(config=load_run_config(path))

The run directory `$SFTFLOW_HOME/runs/<run_id>/` holds config.yaml, tokenized/ (the rows as trained),
checkpoints/, adapter/ (PEFT format with the tokenizer and chat template), progress.jsonl,
worker.log, tensorboard/, loss.png and manifest.json (the reproducibility record).
"""

from __future__ import annotations

from prefect import flow

from foundation.artifacts import RunSummary
from schemas.config import RunConfig
from tasks.tokenize import tokenize_dataset
from tasks.train import (
    claim_before_preparing,
    discard_early_worker,
    new_run_id,
    prepare_run,
    record_run,
    start_worker_early,
    summarise_run,
    train_model,
)


@flow(name="train_adapter")
def train_adapter(config: RunConfig, dataset_version: str | None = None, run_id: str | None = None) -> RunSummary:
    """Tokenize with gates, train (resumable), record the run; returns the run summary."""
    run_id = run_id or new_run_id(config)
    # the training process imports its libraries (or a warm worker that did is claimed, before the run is
    # prepared when it can be) and loads the model while the rows are tokenized and gated; it trains once
    # train_model says the gates passed, and ends here if they refuse the run
    claim_before_preparing(run_id, config)
    try:
        run = prepare_run(config, dataset_version, run_id)
        start_worker_early(run.run_id, run.model_path, run.engine, config)
        tokenized = tokenize_dataset(run.dataset_version, run.model_path, config, run.run_id)
        end = train_model(run.run_id, run.model_path, config, run.engine)
    finally:
        discard_early_worker(run_id)
    record_run(run, config, tokenized, end)
    return summarise_run(run.run_id)
