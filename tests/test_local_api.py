"""The workspace's local Prefect API (sftflow/local_api.py): started by the first flow-running command,
reused by the next, stopped by itself when idle, by `sftflow down`, never started twice at once.

conftest.py turns it off for the session (SFTFLOW_LOCAL_API_IDLE_S=0); each test here turns it on and stops
what it started at teardown.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from sftflow import local_api
from tests.conftest import ROOT, SAMPLE_DROPS, pid_alive


@pytest.fixture
def local_workspace(workspace, monkeypatch):
    monkeypatch.setenv("SFTFLOW_LOCAL_API_IDLE_S", "300")
    monkeypatch.setenv("PREFECT_HOME", str(workspace.prefect_home))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    yield workspace
    local_api.stop(workspace)


def cli(*args: str, importtime: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SFTFLOW_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "sftflow", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def flow_runs(api_url: str) -> list[tuple[str, str]]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        return [(flows[r.flow_id], r.state_name) for r in client.read_flow_runs()]


def test_second_ingest_reuses_the_first_commands_server_and_down_stops_it(local_workspace):
    first = cli("ingest", str(SAMPLE_DROPS / "arithmetic"), "--json")
    assert first.returncode == 0, first.stderr[-2000:]
    state = local_api.read_state(local_workspace)
    assert state and pid_alive(state.pid) and local_api.answers(state)

    second = cli("ingest", str(SAMPLE_DROPS / "unit-conversions"), "--json", importtime=True)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Starting temporary server" not in second.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in second.stderr.splitlines() if line.startswith("import time:")}
    assert not {m for m in imported if m.startswith("prefect.server")}, "a command talking to a URL loads no server code"
    assert local_api.read_state(local_workspace) == state  # the same server (pid, port, id)
    assert sorted(flow_runs(state.api_url)) == [("ingest_drop", "Completed")] * 2

    status = json.loads(cli("status", "--json").stdout)
    assert status["local_api"]["pid"] == state.pid and status["local_api"]["dashboard_url"] == state.dashboard_url
    assert {r["flow"] for r in status["latest_flow_runs"]} == {"ingest_drop"}

    down = json.loads(cli("down", "--json").stdout)
    assert down["stopped"] == ["local-api"]
    assert not pid_alive(state.pid) and not local_workspace.local_api_state.exists()


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_it_stops_itself_after_the_idle_time(local_workspace, monkeypatch):
    monkeypatch.setenv("SFTFLOW_LOCAL_API_IDLE_S", "3")
    assert local_api.api_url_for_command(local_workspace)
    state = local_api.read_state(local_workspace)
    assert local_api.answers(state)
    assert wait_until(lambda: not pid_alive(state.pid), timeout=60), "still running after 3 s idle (+57 s)"
    assert not local_workspace.local_api_state.exists()
    assert "no request for 3 s: stopping" in local_workspace.local_api_log.read_text()


def test_a_stale_state_file_is_replaced(local_workspace):
    with socket.socket() as stranger:  # the recorded port now belongs to a process that is not our server
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        stale = local_api.LocalApiState(local_api_id="old", pid=os.getpid(), port=stranger.getsockname()[1],
                                        idle_seconds=300, log="x", started_at=0)
        stale.write(local_workspace.local_api_state)
        url = local_api.api_url_for_command(local_workspace)
    state = local_api.read_state(local_workspace)
    assert url == state.api_url and state.local_api_id != "old" and state.pid != os.getpid()
    assert local_api.answers(state)  # and this process, not ours to stop, was left alone: the test still runs


def test_two_commands_at_once_start_one_server(local_workspace):
    code = ("from foundation.workspace import Workspace; from sftflow.local_api import api_url_for_command; "
            "print(api_url_for_command(Workspace.from_env()))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    urls = {p.communicate(timeout=300)[0].strip() for p in procs}
    state = local_api.read_state(local_workspace)
    assert urls == {state.api_url}
    assert local_workspace.local_api_log.read_text().count("local Prefect API pid") == 1


def test_a_server_that_cannot_start_falls_back_to_the_temporary_one(local_workspace, monkeypatch, capsys):
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "sqlite+aiosqlite:////nonexistent-dir/prefect.db")
    assert local_api.api_url_for_command(local_workspace) is None
    note = capsys.readouterr().err
    assert note.startswith("note: the local Prefect API did not start (it exited with status") and note.count("\n") == 1
    assert not local_workspace.local_api_state.exists()


def test_turned_off_it_starts_nothing(local_workspace, monkeypatch):
    monkeypatch.setenv("SFTFLOW_LOCAL_API_IDLE_S", "0")
    assert local_api.api_url_for_command(local_workspace) is None
    assert not local_workspace.local_api_state.exists()
