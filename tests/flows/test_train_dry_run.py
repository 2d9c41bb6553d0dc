"""`sftflow train --dry-run`: the gates and the numbers of a training run, with nothing started.

Its figures must be the ones training then reports: a real (short) run of the same config trains exactly
the optimizer steps and the tokens the dry run predicted, and the next dry run estimates its time from that
run's rate. A failing gate exits 2 with its one line, and neither case leaves a run directory or a flow run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from flows.train import train_adapter
from schemas.config import load_run_config
from tests.conftest import ROOT

CONFIG = ROOT / "flows" / "configs" / "tiny_cpu.yaml"

pytestmark = pytest.mark.slow


@pytest.fixture
def dataset(workspace, two_drop_dataset):
    return workspace.datasets.find(two_drop_dataset)


@pytest.fixture
def dry_run(workspace, tmp_path):
    """Run `sftflow train --dry-run` in a process of its own, with no Prefect API to report to: a flow run would
    create Prefect's database under its PREFECT_HOME."""
    prefect_home = tmp_path / "dry-run-prefect"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SFTFLOW_PROGRESS": "0", "PREFECT_HOME": str(prefect_home)}
    env.pop("PREFECT_API_URL", None)

    def run(*args: str) -> subprocess.CompletedProcess:
        runs_before = sorted(workspace.runs_dir.glob("*"))
        proc = subprocess.run([sys.executable, "-m", "sftflow", "train", "--config", str(CONFIG), "--dry-run", *args],
                              env=env, capture_output=True, text=True, timeout=300)
        assert sorted(workspace.runs_dir.glob("*")) == runs_before, "a dry run created a run directory"
        assert not list(prefect_home.rglob("*.db")), "a dry run started a Prefect flow run"
        return proc

    return run


def trained_labels(run_dir) -> tuple[int, int]:
    """(rows, labels that are not -100) of the train split as the run's training process read it."""
    table = pq.read_table(run_dir / "tokenized" / "train.parquet")
    return table.num_rows, sum(sum(1 for t in row if t != -100) for row in table.column("labels").to_pylist())


def test_the_dry_run_predicts_the_steps_and_tokens_training_then_uses(workspace, dataset, dry_run):
    proc = dry_run("--set", "train.epochs=2", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["dataset_version"] == dataset.name and plan["engine"] == "hf" and plan["world_size"] == 1

    rows = dataset.manifest.rows.train
    assert plan["train_rows"] == plan["sequences"] == rows and plan["global_batch_size"] == 16
    assert plan["steps_per_epoch"] == math.ceil(rows / 16) and plan["optimizer_steps"] == math.ceil(rows / 16) * 2
    assert plan["trained_tokens"] == 2 * plan["trained_tokens_per_epoch"] and plan["tokens_exact"]
    assert plan["total_tokens"] > plan["trained_tokens"] > 0
    assert plan["memory"]["need_bytes"] > 0 and plan["memory"]["need_bytes"] == sum(plan["memory"]["parts"].values())
    assert plan["rate"] is None and plan["estimated_seconds"] is None  # no run of this model yet

    # the real run of the same config: the rows and labels it trained on, its steps and tokens are the predicted ones
    summary = train_adapter(config=load_run_config(CONFIG, ["train.epochs=2"]))
    assert trained_labels(workspace.runs_dir / summary.run_id) == (rows, plan["trained_tokens_per_epoch"])
    assert summary.global_step == plan["optimizer_steps"]
    assert summary.trained_tokens == plan["trained_tokens"]

    again = dry_run("--set", "train.max_steps=3", "--json")
    assert again.returncode == 0, again.stderr
    estimate = json.loads(again.stdout)
    assert estimate["optimizer_steps"] == 3 and not estimate["tokens_exact"]
    assert estimate["rate"] == {"run_id": summary.run_id, "tokens_per_s": summary.tokens_per_s}
    assert estimate["estimated_seconds"] == pytest.approx(estimate["trained_tokens"] / summary.tokens_per_s, abs=0.1)


def test_with_packing_it_predicts_the_packed_sequences_steps_and_tokens(workspace, dataset, dry_run):
    overrides = ["train.packing=true", "train.batch_size=2", "train.epochs=1"]
    proc = dry_run(*(a for o in overrides for a in ("--set", o)), "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["packing"] and 1 < plan["sequences"] < plan["train_rows"]
    assert plan["optimizer_steps"] == math.ceil(plan["sequences"] / 2)

    summary = train_adapter(config=load_run_config(CONFIG, overrides))
    assert summary.global_step == plan["optimizer_steps"]
    assert summary.trained_tokens == plan["trained_tokens"]


def test_the_human_report_says_nothing_was_started(dataset, dry_run):
    proc = dry_run()
    assert proc.returncode == 0, proc.stderr
    assert "optimizer steps" in proc.stdout and "nothing was started" in proc.stdout


NO_EOT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.mark.parametrize(("override", "says"), [
    # a template whose turns end in no token the model could learn to stop on
    (f"model.chat_template={NO_EOT_TEMPLATE}", "holds no special token the model could learn to stop on"),
    # sequences so short that truncation leaves most rows without their answer
    ("train.max_seq_length=8", "are longer than train.max_seq_length=8 tokens, over train.max_truncation_rate"),
], ids=["no-end-of-turn", "truncated-away"])
def test_a_failing_gate_exits_2_with_its_one_line(dataset, dry_run, override, says):
    proc = dry_run("--set", override, "--json")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert says in lines[0], lines[0]
