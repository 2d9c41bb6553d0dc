"""Issue 6, item 5: the Prefect server stops and comes back while a pipeline run trains.

A real server (its own process, SQLite) on a free loopback port; `sftflow pipeline` runs against it
in another process. While the adapter trains, the server is killed, kept down, and restarted on the
same port and database. The run must either complete or fail with a message; re-running the same
command then completes (or says there is nothing left to do), and the registry never holds two
versions of the same dataset and config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, SAMPLE_DROPS, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SFTFLOW = str(Path(sys.executable).parent / "sftflow")
PREFECT = str(Path(sys.executable).parent / "prefect")
QUICK = ["train.max_steps=40", "train.save_steps=10", "eval.primary_metric=eval_loss", "eval.sample_size=8",
         "export.quants=[f16]", "export.parity_prompts=4"]


class Server:
    def __init__(self, home: Path, port: int):
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
            "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        self.port, self.log, self.proc = port, home / "server.log", None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                                         env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2):
                    return
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()[-3000:]
                time.sleep(0.5)
        pytest.fail(f"the server did not start: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def pipeline(env: dict) -> subprocess.Popen:
    args = [SFTFLOW, "pipeline", str(SAMPLE_DROPS / "arithmetic"), "--config",
            str(ROOT / "flows/configs/tiny_cpu.yaml"), *sum((["--set", o] for o in QUICK), []), "--json"]
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def server(tmp_path):
    (tmp_path / "prefect").mkdir()
    server = Server(tmp_path / "prefect", free_port())
    server.start()
    yield server
    server.kill()


def test_a_server_restart_during_training_never_duplicates_a_registry_version(tmp_path, model_cache, server):
    home = tmp_path / "home"
    env = server.env | {"PREFECT_API_URL": server.api_url, "SFTFLOW_HOME": str(home),
                        "SFTFLOW_CACHE": str(model_cache.parent.parent), "SFTFLOW_PROGRESS": "0"}
    first = pipeline(env)
    try:
        deadline = time.monotonic() + 900
        while not list(home.glob("runs/*/progress.jsonl")):  # training has started
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.5)
        server.kill()
        time.sleep(15)  # the API is gone for a while
        server.start()
        out, err = first.communicate(timeout=1200)
    finally:
        if first.poll() is None:
            first.kill()
    outcomes = {"first_rc": first.returncode}
    if first.returncode == 0:
        assert json.loads(out)["status"] == "published"
    else:  # failed cleanly: a message, no traceback for the user to read
        assert "error:" in err and "Traceback" not in err.split("error:")[-1], err[-3000:]

    again = subprocess.run(pipeline(env).args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    outcomes["second"] = json.loads(again.stdout)["status"]
    assert outcomes["second"] in ("published", "skipped")
    if first.returncode == 0:
        assert outcomes["second"] == "skipped"

    versions = sorted(p.parent.name for p in (home / "registry" / "tiny-sft").glob("v*/manifest.json"))
    assert versions == ["v0001"], (versions, outcomes)
    assert (home / "registry" / "tiny-sft" / "CHAMPION").read_text().strip() == "v0001"
    from tests.conftest import verify_version

    assert verify_version(home / "registry" / "tiny-sft" / "v0001") == []
    print(json.dumps({"server_restart": outcomes}))
