"""The training process starts before the run's tokenization (its imports and the model's load overlap the
gates) and trains only once the gates passed; a refused run leaves no process behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.train import train_adapter
from foundation.stores.runs import RunDir
from schemas.config import load_run_config
from tests.conftest import ROOT

CONFIG = ROOT / "flows" / "configs" / "tiny_cpu.yaml"

pytestmark = pytest.mark.slow


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError, PermissionError):
            continue
        if text in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


def test_the_training_process_starts_before_the_gates_and_trains_after_them(workspace, arithmetic_dataset):
    config = load_run_config(CONFIG, ["train.max_steps=2", "train.save_steps=2"])
    summary = train_adapter(config=config, run_id="early")
    run = RunDir(workspace.runs_dir / "early")
    end = next(e for e in run.events() if e.event == "end")
    assert summary.global_step == 2
    assert end.startup["waited_for_rows_s"] >= 0  # this process waited for the rows: it was started early
    started = end.startup["first_step_at"] - end.startup["first_step_s"]
    # it was running before the tokenized rows were written, and trained on them after
    assert started < run.tokenized("train").stat().st_mtime < end.startup["first_step_at"]
    assert not processes_naming(str(run.root))


def test_a_run_the_gates_refuse_ends_its_early_process(workspace, arithmetic_dataset):
    from tasks.tokenize import GateError

    config = load_run_config(CONFIG, ["train.max_steps=2", "train.max_seq_length=16"])
    with pytest.raises(GateError, match="longer than train.max_seq_length=16"):
        train_adapter(config=config, run_id="refused")
    run = RunDir(workspace.runs_dir / "refused")
    assert not run.worker_go.exists() and not run.progress.exists()  # never told to train, never trained
    assert not processes_naming(str(run.root))
