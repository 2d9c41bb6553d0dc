"""Issue 6, item 1: the process running the training flow is killed with SIGKILL mid-run.

`sftflow pipeline` trains in its own process here (no train deployment on the API it reports to).
It is killed after the first checkpoint: its training subprocess must die with it (no orphan keeps
writing into the run directory), no adapter may appear as final, and running the same command again
must resume the same run from its last checkpoint and finish with the configured number of steps.
(The subprocess alone killed is tests/flows/test_train.py; the flow run killed on a worker of the
gpu pool, restarted by the pipeline, is tests/integration/test_stack.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, SAMPLE_DROPS, pid_alive

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SFTFLOW = str(Path(sys.executable).parent / "sftflow")
STEPS = 40
QUICK = [f"train.max_steps={STEPS}", "train.save_steps=10", "train.logging_steps=2", "eval.sample_size=8",
         "export.quants=[f16]", "export.parity_prompts=4"]


def test_a_killed_pipeline_process_is_resumed_by_the_next_run(tmp_path, model_cache, prefect_api_url):
    home = tmp_path / "home"
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "SFTFLOW_HOME": str(home),
           "SFTFLOW_CACHE": str(model_cache.parent.parent), "SFTFLOW_PROGRESS": "0"}
    args = [SFTFLOW, "pipeline", str(SAMPLE_DROPS / "arithmetic"), "--config", str(ROOT / "flows/configs/tiny_cpu.yaml"),
            *sum((["--set", o] for o in QUICK), []), "--json"]
    first = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while not list(home.glob("runs/*/checkpoints/checkpoint-10/trainer_state.json")):
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.2)
        [run_dir] = list(home.glob("runs/*"))
        trainer = int((run_dir / "worker.pid").read_text())
        assert pid_alive(trainer)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        deadline = time.monotonic() + 10
        while pid_alive(trainer):  # the training subprocess dies with the process that ran it
            assert time.monotonic() < deadline, f"trainer {trainer} outlived the killed flow process"
            time.sleep(0.1)
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
    killed_at = max(e["step"] for e in map(json.loads, (run_dir / "progress.jsonl").read_text().splitlines())
                    if e["event"] in ("log", "checkpoint"))
    assert killed_at < STEPS, "the kill came after the training had finished"
    assert not (run_dir / "adapter").exists() and not (run_dir / "manifest.json").exists()

    again = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    result = json.loads(again.stdout)
    assert result["status"] == "published"
    assert result["training"]["run_id"] == run_dir.name and list(home.glob("runs/*")) == [run_dir]
    events = [json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines()]
    begins = [e for e in events if e["event"] == "begin"]
    assert [b["resumed_from_step"] for b in begins][0] == 0 and begins[-1]["resumed_from_step"] >= 10, begins
    assert result["training"]["global_step"] == STEPS
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(run_dir / "adapter")).r == 32
    print(json.dumps({"training_killed": {"killed_after_step": killed_at,
                                          "resumed_from_step": begins[-1]["resumed_from_step"],
                                          "global_step": result["training"]["global_step"]}}))
