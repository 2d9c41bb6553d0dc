"""Training runs: one directory per run, and every file each stage writes into it.

    runs/<run_id>/
      config.yaml                  the resolved run config
      tokenized/{train,eval}.parquet   the rows exactly as trained (input_ids, labels)
      worker_spec.json, worker.pid, worker.log, progress.jsonl   the training process: its input, pid, log, events
      worker.go                                                    the rows are tokenized: a process started early trains
      checkpoints/checkpoint-<step>/   trainer checkpoints (a retried run resumes from the last)
      adapter/                     the LoRA adapter (PEFT format) with tokenizer and chat template
      tensorboard/, loss.png       the loss curve (TensorBoard events: training and eval scalars)
      trackers.json                the mlflow / wandb run ids the training and the evaluation log into
      manifest.json                RunManifest, written last: the run is finished when it exists
      evaluator_spec.json, evaluator.log, eval_scores.json, eval.json   evaluation
      merged/, gguf/, Modelfile, export.log, export.json                 export

A pipeline's run id is `<name>-<dataset version>-<config hash>`, with `-r2`, `-r3`, ... for further
attempts that `force` starts; `sftflow train` names a run by its start time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from foundation.artifacts import EvalReport, ExportReport, RunManifest, WorkerEvent, parse_event
from foundation.errors import NotFoundError


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def run_id(self) -> str:
        return self.root.name

    config_yaml = property(lambda self: self.root / "config.yaml")
    tokenized_dir = property(lambda self: self.root / "tokenized")
    worker_spec = property(lambda self: self.root / "worker_spec.json")
    worker_pid = property(lambda self: self.root / "worker.pid")
    worker_go = property(lambda self: self.root / "worker.go")
    worker_log = property(lambda self: self.root / "worker.log")
    progress = property(lambda self: self.root / "progress.jsonl")
    checkpoints = property(lambda self: self.root / "checkpoints")
    adapter = property(lambda self: self.root / "adapter")
    adapter_tmp = property(lambda self: self.root / ".tmp-adapter")
    tensorboard = property(lambda self: self.root / "tensorboard")
    trackers = property(lambda self: self.root / "trackers.json")  # tracker run ids (mlflow, wandb)
    loss_png = property(lambda self: self.root / "loss.png")
    manifest_path = property(lambda self: self.root / "manifest.json")
    evaluator_spec = property(lambda self: self.root / "evaluator_spec.json")
    evaluator_log = property(lambda self: self.root / "evaluator.log")
    eval_scores = property(lambda self: self.root / "eval_scores.json")
    eval_path = property(lambda self: self.root / "eval.json")
    merged_dir = property(lambda self: self.root / "merged")
    gguf_dir = property(lambda self: self.root / "gguf")
    modelfile = property(lambda self: self.root / "Modelfile")
    export_log = property(lambda self: self.root / "export.log")
    export_path = property(lambda self: self.root / "export.json")
    control_gguf = property(lambda self: self.root / "base-f16.gguf.tmp")  # removed after the parity check

    def tokenized(self, split: str) -> Path:
        return self.tokenized_dir / f"{split}.parquet"

    @property
    def finished(self) -> bool:
        return self.manifest_path.exists()

    def manifest(self) -> RunManifest:
        return RunManifest.read(self.manifest_path)

    def events(self) -> list[WorkerEvent]:
        """The training process's events so far (a resumed run's repeat its steps)."""
        if not self.progress.exists():
            return []
        lines = self.progress.read_text().splitlines()
        return [parse_event(line, str(self.progress)) for line in lines if line.strip()]

    def eval_report(self) -> EvalReport | None:
        return EvalReport.read(self.eval_path) if self.eval_path.exists() else None

    def export_report(self) -> ExportReport | None:
        return ExportReport.read(self.export_path) if self.export_path.exists() else None


class RunStore:
    def __init__(self, root: Path):
        self.root = root

    def dir(self, run_id: str) -> RunDir:
        return RunDir(self.root / run_id)

    def create(self, run_id: str) -> RunDir:
        run = self.dir(run_id)
        run.root.mkdir(parents=True, exist_ok=True)
        return run

    def finished(self, run_id: str) -> RunDir:
        """A finished run by id; a clear error for any other name."""
        run = self.dir(run_id)
        if "/" in run_id or run_id.startswith(".") or not run.finished:
            raise NotFoundError(f"no finished training run {run_id!r} in {self.root}; list them with: ls {self.root}")
        return run

    def finished_runs(self) -> list[RunDir]:
        """Every finished run, the latest finished first (by its manifest's time)."""
        if not self.root.is_dir():
            return []
        found = [RunDir(p) for p in self.root.iterdir() if not p.name.startswith(".") and (p / "manifest.json").is_file()]
        return sorted(found, key=lambda r: (r.manifest_path.stat().st_mtime, r.run_id), reverse=True)

    def attempt(self, base: str, force: bool) -> str:
        """The run id of the latest attempt named `base` (`base`, `base-r2`, ...); with `force`, a new
        attempt when the latest has finished. An attempt that has not finished is always resumed."""
        pattern = re.compile(re.escape(base) + r"(?:-r(\d+))?")
        attempts = sorted((int(m.group(1) or 1), path.name) for path in self.root.glob(f"{base}*")
                          if (m := pattern.fullmatch(path.name)))
        if not attempts:
            return base
        number, latest = attempts[-1]
        if force and self.dir(latest).finished:
            return f"{base}-r{number + 1}"
        return latest
