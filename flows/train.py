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

import yaml
from prefect import flow, get_run_logger

from schemas.config import RunConfig, config_hash
from sftflow.workspace import Workspace
from tasks.base_model import resolve_model
from tasks.engines import pick_engine
from tasks.format import find_version
from tasks.tokenize import tokenize_dataset
from tasks.train import record_run, train_model


def new_run_id(config: RunConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")[:-3]
    return f"{config.name}-{stamp}-{config_hash(config)[:6]}"


@flow(name="train_adapter")
def train_adapter(config: RunConfig, dataset_version: str | None = None, run_id: str | None = None) -> dict:
    """Tokenize with gates, train (resumable), record the run; returns the run summary."""
    logger = get_run_logger()
    workspace = Workspace.from_env().ensure()
    dataset = find_version(workspace, dataset_version)
    run_id = run_id or new_run_id(config)
    run_dir = workspace.runs / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    engine = pick_engine(config.train.engine)
    model_path = resolve_model(config.model, workspace, log=logger.info)
    logger.info("run %s: %s on dataset %s with the %s engine", run_id, model_path, dataset.name, engine)

    tokenized = tokenize_dataset(str(dataset.root), model_path, config, run_dir)
    end = train_model(run_dir, model_path, config, engine)
    manifest = record_run(run_dir, config, str(dataset.root), model_path, engine, tokenized, end)
    return {
        "run_id": run_id,
        "run_dir": str(run_dir),
        "adapter_dir": manifest["adapter_dir"],
        "engine": engine,
        "global_step": manifest["global_step"],
        "loss_first": manifest["loss_first"],
        "loss_last": manifest["loss_last"],
        "trained_tokens": manifest["trained_tokens"],
        "tokens_per_s": manifest["tokens_per_s"],
        "peak_mem_gib": manifest["peak_mem_gib"],
        "dataset_version": dataset.name,
        "config_hash": manifest["config_hash"],
        "truncation_rate": tokenized["train"]["truncation_rate"],
        "trainable_share": tokenized["train"]["trainable_share"],
    }
