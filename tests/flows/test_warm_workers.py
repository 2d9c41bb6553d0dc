"""Warm workers (foundation.warm, tasks.processes.standby): a process that imported the engine ahead is handed
the next training or evaluation, with the job's environment, working directory, stdout and stderr, and
reports its exit status; it dies with its claimant, serves only an identical environment, one job, and
leaves when told or when idle."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.train import train_adapter
from foundation import processes, warm
from foundation.stores.runs import RunDir
from schemas.config import load_run_config
from tests.conftest import ROOT, pid_alive

CONFIG = ROOT / "flows" / "configs" / "tiny_cpu.yaml"

pytestmark = pytest.mark.slow

JOB = """
import os, sys, time
print("marker", os.environ.get("PREFECT_WARM_TEST"), flush=True)
print("cwd", os.getcwd(), flush=True)
print("to the log", file=sys.stderr, flush=True)
if sys.argv[1] == "sleep":
    time.sleep(120)
sys.exit(int(sys.argv[2]))
"""


@pytest.fixture
def warm_on(workspace, monkeypatch):
    monkeypatch.setenv("SFTFLOW_WARM_WORKER_IDLE_S", "300")
    yield workspace
    warm.stop_all(workspace.root)


def wait_for_worker(root: Path, exclude: set[int] = frozenset(), timeout: float = 180) -> dict:
    """The workspace's warm worker once it has imported its engine (it answers only then), other than `exclude`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [w for w in warm.workers(root) if w["pid"] not in exclude]
        if found:
            return found[0]
        time.sleep(0.2)
    pytest.fail(f"no warm worker answered within {timeout:.0f} s")


def wait_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not pid_alive(pid)


@pytest.fixture
def job_env(tmp_path):
    """An environment whose PYTHONPATH has the test job module `warmjob` in it."""
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "warmjob.py").write_text(JOB)
    return processes.child_env(pythonpath=[ROOT, tmp_path / "jobs"])


def test_a_job_runs_in_the_warm_worker_with_its_environment_fds_and_exit_status(warm_on, job_env, tmp_path):
    root = warm_on.root
    warm.ensure(root, "hf", job_env, warm_on.warm_log, cuda=lambda: False)  # the setting decides, not the GPU
    worker = wait_for_worker(root)
    assert worker["engine"] == "hf" and worker["idle_left_s"] > 0
    log = tmp_path / "job.log"
    proc = warm.claim(root, "hf", "warmjob", ["run", "7"], log, {**job_env, "PREFECT_WARM_TEST": "handed"},
                      pipe_stdout=True, cwd=tmp_path)
    assert proc is not None and proc.pid == worker["pid"]
    assert proc.stdout.read().splitlines() == ["marker handed", f"cwd {tmp_path}"]
    assert proc.wait(timeout=30) == 7
    assert "to the log" in log.read_text()
    assert wait_gone(worker["pid"])  # one job per worker
    assert warm.claim(root, "hf", "warmjob", ["run", "0"], log, job_env) is None  # none left to claim


def test_only_an_identical_environment_claims_and_stop_ends_the_worker(warm_on, job_env, tmp_path):
    root = warm_on.root
    warm.ensure(root, "hf", job_env, warm_on.warm_log, cuda=lambda: False)
    warm.ensure(root, "hf", job_env, warm_on.warm_log, cuda=lambda: False)  # a second for the same address: none
    worker = wait_for_worker(root)
    time.sleep(1.0)
    assert len(warm.workers(root)) == 1
    log = tmp_path / "job.log"
    assert warm.claim(root, "hf", "warmjob", ["run", "0"], log, {**job_env, "HF_HOME": str(tmp_path)}) is None
    assert warm.claim(root, "unsloth", "warmjob", ["run", "0"], log, job_env) is None
    assert warm.stop_all(root.parent / "another-workspace") == 0 and pid_alive(worker["pid"])
    assert warm.stop_all(root) == 1
    assert wait_gone(worker["pid"])


def test_status_shows_the_waiting_worker_and_down_stops_it(warm_on, job_env):
    from sftflow import stack

    warm.ensure(warm_on.root, "hf", job_env, warm_on.warm_log, cuda=lambda: False)
    worker = wait_for_worker(warm_on.root)
    shown = stack.status(warm_on)
    assert [w["pid"] for w in shown["warm_workers"]] == [worker["pid"]]
    assert "warm worker (the hf engine imported" in shown["message"]
    assert stack.down(warm_on)["stopped"] == ["warm-worker"]
    assert wait_gone(worker["pid"])
    assert "warm_workers" not in stack.status(warm_on)


def test_another_users_worker_gets_no_job_and_another_users_claim_no_answer(warm_on, job_env, tmp_path, monkeypatch):
    import os
    import socket
    import threading

    from tasks.processes import standby

    root = warm_on.root
    warm.ensure(root, "hf", job_env, warm_on.warm_log, cuda=lambda: False)
    worker = wait_for_worker(root)
    real_uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real_uid + 1)  # this process now looks like someone else to itself
    # the claimant side: the worker at the name runs as "another user": no job is handed to it
    assert warm.claim(root, "hf", "warmjob", ["run", "0"], tmp_path / "job.log", job_env) is None
    assert warm.workers(root) == []
    monkeypatch.undo()
    assert pid_alive(worker["pid"]) and [w["pid"] for w in warm.workers(root)] == [worker["pid"]]
    # the worker side (serve() in a thread): a connection it finds from another user gets no answer, and a
    # stop from it is not obeyed
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind("\0sftflow-warm-test-" + os.urandom(4).hex())
    listener.listen(8)
    judged = []
    monkeypatch.setattr(standby, "same_user", lambda conn: judged.append(warm.same_user(conn)) or False)
    served = threading.Thread(target=standby.serve, args=(listener, "hf", str(root), 3.0), daemon=True)
    served.start()
    assert warm.ask(listener.getsockname(), {"stop": str(root)}) is None
    assert judged == [True]  # it was our own process, judged foreign here: refused all the same
    assert served.is_alive()  # the stop was not obeyed
    served.join(10)
    assert not served.is_alive()  # it left at its idle time, not at the stop
    listener.close()


def test_the_job_ends_when_its_claimant_dies(warm_on, job_env, tmp_path):
    root = warm_on.root
    warm.ensure(root, "hf", job_env, warm_on.warm_log, cuda=lambda: False)
    worker = wait_for_worker(root)
    claimant = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom foundation import warm\n"
         f"p = warm.claim(Path({str(root)!r}), 'hf', 'warmjob', ['sleep', '0'], Path({str(tmp_path / 'job.log')!r}), "
         f"{job_env!r})\nprint(p.pid, flush=True)\ntime.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env=job_env, cwd=ROOT)
    assert int(claimant.stdout.readline()) == worker["pid"]
    claimant.kill()
    claimant.wait()
    assert wait_gone(worker["pid"], timeout=15)


def test_an_unclaimed_worker_leaves_after_its_idle_time(workspace, job_env, monkeypatch):
    monkeypatch.setenv("SFTFLOW_WARM_WORKER_IDLE_S", "2")
    warm.ensure(workspace.root, "hf", job_env, workspace.warm_log, cuda=lambda: True)
    ours = warm.address(workspace.root, "hf", job_env)
    deadline = time.monotonic() + 60
    while ours not in warm.listening() and time.monotonic() < deadline:  # it takes its name before its imports
        time.sleep(0.05)
    assert ours in warm.listening(), "the warm worker never listened"
    deadline = time.monotonic() + 200
    while ours in warm.listening() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ours not in warm.listening()
    assert "ready after" in workspace.warm_log.read_text()


def test_off_by_default_without_a_gpu(workspace, job_env, monkeypatch):
    monkeypatch.delenv("SFTFLOW_WARM_WORKER_IDLE_S")
    warm.ensure(workspace.root, "hf", job_env, workspace.warm_log, cuda=lambda: False)
    assert warm.address(workspace.root, "hf", job_env) not in warm.listening()
    assert not workspace.warm_log.exists()


def test_the_next_training_and_its_evaluation_run_in_warm_workers_and_train_alike(warm_on, arithmetic_dataset,
                                                                                   tiny_model):
    from flows.evaluate import evaluate_adapter

    root = warm_on.root
    config = load_run_config(CONFIG, ["train.max_steps=3", "train.save_steps=3", "eval.sample_size=4",
                                      f"model.name={tiny_model}"])  # a local directory: claimed before preparing
    train_adapter(config=config, run_id="cold")
    cold = next(e for e in RunDir(root / "runs" / "cold").events() if e.event == "end")
    assert cold.startup["warm"] is False
    first = wait_for_worker(root)  # started with the cold run, for the next one

    train_adapter(config=config, run_id="warm")
    run = RunDir(root / "runs" / "warm")
    end = next(e for e in run.events() if e.event == "end")
    assert end.startup["warm"] is True and int(run.worker_pid.read_text()) == first["pid"]
    assert end.startup["imports_s"] < cold.startup["imports_s"]  # its clock starts at the claim
    # claimed before prepare_run wrote the run's config (the model loads while the run is prepared)
    assert end.startup["first_step_at"] - end.startup["first_step_s"] < run.config_yaml.stat().st_mtime
    # the same config and seed train alike in a fresh process and a warm one
    losses = lambda r: [e.loss for e in r.events() if e.event == "log"]  # noqa: E731
    assert losses(run) == pytest.approx(losses(RunDir(root / "runs" / "cold")), rel=1e-5)
    assert wait_gone(first["pid"])

    second = wait_for_worker(root, exclude={first["pid"]})  # started with the warm run
    report = evaluate_adapter(run_id="warm")
    assert set(report.scores) >= {"base", "candidate"}
    assert wait_gone(second["pid"])  # it ran the evaluation
    assert "Traceback" not in run.evaluator_log.read_text()
