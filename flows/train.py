"""Flow `train_adapter`: a dataset version + a RunConfig -> a LoRA adapter in a run directory.

Run it:
    sftflow train --config flows/configs/tiny_cpu.yaml [key=value ...] [--dataset VERSION] --json
or from Python:
    from flows.train import train_adapter; train_adapter(config=load_run_config(path))

The run directory `$SFTFLOW_HOME/runs/<run_id>/` holds config.yaml, tokenized/ (the rows as trained),
checkpoints/, adapter/ (PEFT format with the tokenizer and chat template), progress.jsonl,
worker.log, tensorboard/, loss.png and manifest.json (the reproducibility record).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import yaml
from prefect import flow, get_run_logger

from schemas.config import RunConfig, config_hash
from foundation.workspace import Workspace
from foundation.atomic import read_json
from tasks.base_model import resolve_model
from tasks.engines import pick_engine
from tasks.format import find_version
from tasks.tokenize import tokenize_dataset
from tasks.train import BATCH_KEYS, record_run, train_model, training_ranks


def new_run_id(config: RunConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")[:-3]
    return f"{config.name}-{stamp}-{config_hash(config)[:6]}"


def run_summary(run_dir: Path) -> dict:
    """What a finished run reports (from its manifest), wherever it trained."""
    manifest = read_json(run_dir / "manifest.json")
    tokenized = manifest["tokenized"]["train"]
    keys = ("adapter_dir", "engine", "global_step", "loss_first", "loss_last", "trained_tokens", "tokens_per_s",
            "peak_mem_gib", "dataset_version", "config_hash")
    return {"run_id": run_dir.name, "run_dir": str(run_dir)} | {k: manifest[k] for k in keys} | {
        "truncation_rate": tokenized["truncation_rate"], "trainable_share": tokenized["trainable_share"]} | {
        k: manifest.get(k) for k in BATCH_KEYS}  # world size, per-device batch, accumulation, global batch


@flow(name="train_adapter")
def train_adapter(config: RunConfig, dataset_version: str | None = None, run_id: str | None = None) -> dict:
    """Tokenize with gates, train (resumable), record the run; returns the run summary."""
    logger = get_run_logger()
    workspace = Workspace.from_env().ensure()
    dataset = find_version(workspace, dataset_version)
    run_id = run_id or new_run_id(config)
    run_dir = workspace.runs_dir / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    engine = pick_engine(config.train.engine, ranks=training_ranks(config.train))
    model_path = resolve_model(config.model, workspace, log=logger.info)
    logger.info("run %s: %s on dataset %s with the %s engine", run_id, model_path, dataset.name, engine)

    tokenized = tokenize_dataset(str(dataset.root), model_path, config, run_dir)
    end = train_model(run_dir, model_path, config, engine)
    record_run(run_dir, config, str(dataset.root), model_path, engine, tokenized, end)
    return run_summary(run_dir)
