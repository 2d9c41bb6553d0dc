"""Experiment trackers (`train.report_to`): tensorboard, mlflow, wandb.

The training process hands `train.report_to` to transformers' Trainer, whose callbacks log the
training loss. This module gives each tracker the run's identity so that the evaluation, which runs
later in another process, logs its metrics into the same tracker run:

- tensorboard: the run's `tensorboard/` directory (the Trainer's logdir) gets the eval scalars too;
- mlflow: the tracker run is created before training and its id kept in the run directory
  (`trackers.json`); the Trainer resumes it (MLFLOW_RUN_ID) and so does the evaluation;
- wandb: the same, with the run id wandb resumes (WANDB_RUN_ID, WANDB_RESUME=allow).

mlflow and wandb are not dependencies of sftflow: a config naming one that is not installed fails
before training with the `pip install` that fixes it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import uuid

from foundation.errors import ConfigError
from foundation.stores.runs import RunDir

# tracker name (as transformers' report_to) -> the module it imports, the package that installs it
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
            "wandb": ("wandb", "wandb")}


def check_trackers_installed(report_to: list[str]) -> None:
    """Refuse, before training, a tracker whose package this environment lacks (one line, with the fix)."""
    missing = [TRACKERS[name][1] for name in report_to
               if name in TRACKERS and importlib.util.find_spec(TRACKERS[name][0]) is None]
    if missing:
        raise ConfigError(f"train.report_to={report_to}: {', '.join(missing)} is not installed; "
                          f"pip install {' '.join(missing)} (or drop it from train.report_to)")


def tracker_ids(run: RunDir) -> dict[str, str]:
    return json.loads(run.trackers.read_text()) if run.trackers.exists() else {}


def start_tracker_runs(run: RunDir, report_to: list[str]) -> dict[str, str]:
    """The environment that makes the Trainer's tracker callbacks log into this run's tracker runs,
    created on the first attempt and kept in trackers.json (a resumed training logs into the same)."""
    ids = tracker_ids(run)
    if "mlflow" in report_to and "mlflow" not in ids:
        import mlflow

        if experiment := os.environ.get("MLFLOW_EXPERIMENT_NAME"):
            mlflow.set_experiment(experiment)
        with mlflow.start_run(run_name=run.run_id) as started:
            ids["mlflow"] = started.info.run_id
    if "wandb" in report_to and "wandb" not in ids:
        ids["wandb"] = uuid.uuid4().hex[:16]  # wandb creates the run under this id when the Trainer starts
    if ids:
        tmp = run.trackers.with_suffix(".tmp")
        tmp.write_text(json.dumps(ids))
        tmp.replace(run.trackers)
    env = {}
    if "mlflow" in ids:
        env["MLFLOW_RUN_ID"] = ids["mlflow"]
    if "wandb" in ids:
        env |= {"WANDB_RUN_ID": ids["wandb"], "WANDB_RESUME": "allow"}
    return env


def eval_scalars(scores: dict[str, dict]) -> dict[str, float]:
    """Every model's metrics as tracker scalars: `eval/<model>/<metric>` (metrics without a value left out)."""
    return {f"eval/{model}/{metric}": float(value)
            for model, metrics in scores.items() for metric, value in metrics.items() if value is not None}


def log_eval_metrics(run: RunDir, report_to: list[str], scores: dict[str, dict], step: int) -> list[str]:
    """Log the evaluation's metrics into the trackers the run trained with, at its last step; the trackers
    written to."""
    scalars = eval_scalars(scores)
    ids = tracker_ids(run)
    written = []
    if "tensorboard" in report_to:
        from tensorboardX import SummaryWriter

        with SummaryWriter(str(run.tensorboard), filename_suffix=".eval") as writer:
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, step)
        written.append("tensorboard")
    if "mlflow" in report_to and "mlflow" in ids:
        import mlflow

        with mlflow.start_run(run_id=ids["mlflow"]):
            mlflow.log_metrics(scalars, step=step)
        written.append("mlflow")
    if "wandb" in report_to and "wandb" in ids:
        import wandb

        tracked = wandb.init(id=ids["wandb"], resume="allow", project=os.environ.get("WANDB_PROJECT", "huggingface"))
        tracked.log(scalars | {"train/global_step": step})
        tracked.finish()
        written.append("wandb")
    return written
