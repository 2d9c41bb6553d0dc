"""Issue 15, items 5 and 6: the landing zone under faults.

- one bad entry never stops the watcher: it is refused with a recorded reason and the pass goes on;
- a server outage never stops it either: drops wait, are tried again after a growing pause, and are
  announced once (and only once) when the server is back;
- `sftflow drop` whose announcement fails says that the drop landed and who announces it (exit 3);
- `sftflow drop` is all or nothing: processes racing for one drop id leave exactly one intact drop, the
  others get one line naming the id; a refused drop leaves nothing in the landing zone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from foundation.errors import DropError
from tasks.landing import land_drop, next_pause, scan_landing, watch_landing
from tests.conftest import ROOT, SAMPLE_DROPS, free_port


class Recorder:
    def __init__(self):
        self.sent = []

    def __call__(self, drop):
        self.sent.append(drop)


def quiet(_message: str) -> None:
    pass


class EventsServer:
    """A stand-in for the Prefect API's POST /api/events: records every event it is sent."""

    def __init__(self, port: int):
        self.events: list[dict] = []
        events = self.events

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the http.server API)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.rstrip("/") == "/api/events":
                    events.extend(json.loads(body))
                    self.send_response(204)
                else:
                    self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):  # noqa: N802 (e.g. the client's CSRF token: an old server has none)
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "EventsServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def sftflow_env(workspace, api_url: str | None = None) -> dict:
    env = {**os.environ, "SFTFLOW_HOME": str(workspace.root), "PYTHONPATH": str(ROOT), "SFTFLOW_PROGRESS": "0"}
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# ---------------------------------------------------------------------------------------------
# Bad entries
# ---------------------------------------------------------------------------------------------


def hostile_entries(landing: Path, tmp_path: Path) -> list[str]:
    """Entries the watcher must refuse without stopping; returns their names as it reports them."""
    names = []
    for name in ["a" * 240, "b" * 255, "é" * 120, "😀" * 60, "no data"]:  # too long / not drop ids
        shutil.copytree(SAMPLE_DROPS / "arithmetic", landing / name)
        names.append(name)
    not_utf8 = os.fsencode(landing) + b"/bad\xff"
    os.mkdir(not_utf8)
    with open(not_utf8 + b"/rows.csv", "wb") as fh:
        fh.write((SAMPLE_DROPS / "arithmetic" / "rows.csv").read_bytes())
    names.append("bad\\xff")
    os.mkfifo(landing / "a-fifo")
    (landing / "a-file.jsonl").write_text("{}\n")
    (landing / "empty").mkdir()
    (landing / "empty" / "_SUCCESS").touch()
    (landing / "with-socket").mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(landing / "with-socket" / "s.sock"))
    (landing / "link-out").symlink_to(tmp_path, target_is_directory=True)
    return names + ["a-fifo", "a-file.jsonl", "empty", "with-socket", "link-out"]


def test_one_bad_entry_never_stops_the_watcher(workspace, tmp_path, monkeypatch):
    landing = workspace.landing_dir
    refused = hostile_entries(landing, tmp_path)
    for drop_id in ("good-1", "good-2", "breaks-describe"):
        land_drop(workspace, SAMPLE_DROPS / "arithmetic", drop_id)
    import tasks.landing

    real_describe = tasks.landing.describe

    def describe(path):  # an unexpected failure on one entry (a bug, an I/O error)
        if path.name == "breaks-describe":
            raise RuntimeError("boom")
        return real_describe(path)

    monkeypatch.setattr(tasks.landing, "describe", describe)
    send = Recorder()
    first = scan_landing(workspace, 0, send=send, log=quiet)
    assert sorted(d.drop_id for d in send.sent) == ["good-1", "good-2"]
    reasons = {r["name"]: r["reason"] for r in first["refused"]}
    assert sorted(reasons) == sorted([*refused, "breaks-describe"])
    assert "could not be examined (RuntimeError: boom)" in reasons["breaks-describe"]
    assert "not a regular file" in reasons["with-socket"] and "not followed" in reasons["link-out"]
    # every refusal is on disk, and reported once
    assert len(list((landing / ".refused").iterdir())) == len(reasons)
    second = scan_landing(workspace, 0, send=send, log=quiet)
    assert second == {"announced": [], "waiting": [], "refused": [], "pending": []} and len(send.sent) == 2


def test_a_refusal_that_cannot_be_recorded_does_not_stop_the_watcher(workspace, monkeypatch):
    shutil.copytree(SAMPLE_DROPS / "arithmetic", workspace.landing_dir / "x y")
    land_drop(workspace, SAMPLE_DROPS / "arithmetic", "fine")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(workspace.landing.__class__, "record_refused", full_disk)
    logged = []
    result = scan_landing(workspace, 0, send=Recorder(), log=logged.append)
    assert [r["name"] for r in result["refused"]] == ["x y"] and [r["drop_id"] for r in result["announced"]] == ["fine"]
    assert any("could not record the refusal of x y" in m for m in logged)


# ---------------------------------------------------------------------------------------------
# Server outages
# ---------------------------------------------------------------------------------------------


def test_during_an_outage_drops_wait_and_are_announced_once_when_the_server_is_back(workspace):
    for drop_id in ("out-1", "out-2", "out-3"):
        land_drop(workspace, SAMPLE_DROPS / "arithmetic", drop_id)
    attempts, sent, pauses = [], Recorder(), []

    def flaky(drop):
        attempts.append(drop.drop_id)
        if len(pauses) < 4:  # down for the first four passes
            raise ConnectionRefusedError(111, "Connection refused")
        sent(drop)

    def sleep(seconds):
        pauses.append(seconds)
        if len(pauses) == 7:
            raise KeyboardInterrupt  # stop the endless watcher

    with pytest.raises(KeyboardInterrupt):
        watch_landing(workspace, interval=1, quiet_seconds=0, send=flaky, log=quiet, sleep=sleep)
    assert pauses == [2, 4, 8, 16, 1, 1, 1]  # backing off while down, the interval once it is back
    assert attempts[:4] == ["out-1"] * 4  # one try per pass while down, not one per drop
    assert sorted(d.drop_id for d in sent.sent) == ["out-1", "out-2", "out-3"]  # each exactly once
    assert all(workspace.landing.emitted(d) for d in ("out-1", "out-2", "out-3"))
    assert next_pause(5, 10) == 60 and next_pause(120, 3) == 120


def test_the_watcher_process_rides_out_an_outage_and_announces_each_drop_once(workspace, tmp_path):
    port = free_port()
    env = sftflow_env(workspace, f"http://127.0.0.1:{port}/api")
    land_drop(workspace, SAMPLE_DROPS / "arithmetic", "before-outage")
    log_path = tmp_path / "watcher.log"
    with open(log_path, "wb") as log:
        watcher = subprocess.Popen([sys.executable, "-m", "sftflow", "watch", "--interval", "0.2",
                                    "--quiet-seconds", "0"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: log_path.read_text().count("trying again in") >= 3, 120, "three failed passes")
        land_drop(workspace, SAMPLE_DROPS / "json-extraction", "during-outage")
        (workspace.landing_dir / "not a drop").mkdir()  # and a bad entry on the way
        assert watcher.poll() is None, log_path.read_text()
        with EventsServer(port) as server:
            wait_for(lambda: len(server.events) >= 2, 120, "the two announcements")
            time.sleep(1.5)  # a few more passes: nothing is sent again
            assert watcher.poll() is None
            watcher.send_signal(signal.SIGTERM)
            watcher.wait(timeout=60)
            # a new watcher finds both recorded as announced
            again = subprocess.run([sys.executable, "-m", "sftflow", "watch", "--once", "--json"], cwd=ROOT, env=env,
                                   capture_output=True, text=True, timeout=300)
            assert again.returncode == 0, again.stderr
            events = list(server.events)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert sorted(e["payload"]["drop_id"] for e in events) == ["before-outage", "during-outage"]
    for drop_id in ("before-outage", "during-outage"):
        record = workspace.landing.emitted(drop_id)
        assert record is not None and record.event_id in {e["id"] for e in events}
    assert json.loads(again.stdout)["announced"] == []
    text = log_path.read_text()
    assert "Traceback" not in text and "refused not a drop" in text
    pauses = [float(line.rsplit("in ", 1)[1].split()[0]) for line in text.splitlines() if "trying again in" in line]
    assert pauses[:3] == [0.4, 0.8, 1.6]


def test_a_drop_whose_announcement_fails_has_landed_and_says_who_announces_it(workspace):
    env = sftflow_env(workspace, f"http://127.0.0.1:{free_port()}/api")
    done = subprocess.run([sys.executable, "-m", "sftflow", "drop", str(SAMPLE_DROPS / "arithmetic"), "--drop-id",
                           "unannounced", "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "drop unannounced landed in" in done.stderr and "was not announced" in done.stderr
    assert "sftflow watch --once" in done.stderr
    result = json.loads(done.stdout)
    assert result["announced"] is False and result["drop_id"] == "unannounced" and "did not take" in result["error"]
    assert (workspace.landing_dir / "unannounced" / "_SUCCESS").exists()
    assert workspace.landing.emitted("unannounced") is None
    send = Recorder()
    scan_landing(workspace, 0, send=send, log=quiet)  # the watcher, once the server is back
    assert [d.drop_id for d in send.sent] == ["unannounced"]


def test_watch_once_during_an_outage_exits_3_with_one_line(workspace):
    land_drop(workspace, SAMPLE_DROPS / "arithmetic", "waiting-for-server")
    env = sftflow_env(workspace, f"http://127.0.0.1:{free_port()}/api")
    done = subprocess.run([sys.executable, "-m", "sftflow", "watch", "--once", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr
    assert json.loads(done.stdout)["pending"] == ["waiting-for-server"]
    assert done.stderr.strip().splitlines()[-1].startswith("error: 1 drop(s) not announced")


def test_a_server_that_never_answers_costs_one_bounded_attempt(workspace, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import tasks.landing
    from tasks.landing import DeliveryError, describe, send_landed_event

    monkeypatch.setattr(tasks.landing, "SEND_TIMEOUT_SECONDS", 1.0)
    drop = describe(land_drop(workspace, SAMPLE_DROPS / "arithmetic", "silent").path)
    with socket.socket() as silent:  # takes connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/api"
        started = time.monotonic()
        with temporary_settings({PREFECT_API_URL: url}), pytest.raises(DeliveryError, match="did not take the event"):
            send_landed_event(drop)
        assert time.monotonic() - started < 10


def test_a_real_prefect_server_takes_the_event_once_however_often_it_is_sent(workspace, prefect_api_url):
    from prefect.client.orchestration import get_client

    from tasks.landing import describe, send_landed_event

    drop = describe(land_drop(workspace, SAMPLE_DROPS / "arithmetic", "real-server").path)
    send_landed_event(drop)
    send_landed_event(drop)  # a watcher killed before it recorded the first: the same event id again

    def stored() -> list[dict]:
        with get_client(sync_client=True) as client:
            response = client.request("POST", "/events/filter", json={
                "filter": {"id": {"id": [str(drop.event_id)]}, "occurred": {"since": "2000-01-01T00:00:00Z"}}})
        return response.json()["events"]

    wait_for(lambda: stored(), 60, "the event in the server's store")
    events = stored()
    assert len(events) == 1 and events[0]["event"] == "sftflow.drop.landed"
    assert events[0]["payload"]["drop_id"] == "real-server"


# ---------------------------------------------------------------------------------------------
# `sftflow drop`: all or nothing
# ---------------------------------------------------------------------------------------------

RACER = """
import sys, time
from foundation.errors import DropError
from foundation.workspace import Workspace
from tasks.landing import land_drop
source, drop_id, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
workspace = Workspace.from_env().ensure()
time.sleep(max(0.0, start - time.time()))
try:
    landed = land_drop(workspace, source, drop_id)
except DropError as exc:
    print("refused", exc)
    sys.exit(2)
print("landed", landed.fingerprint)
"""


def big_drop(path: Path, tag: str) -> Path:
    """A drop large enough (a few MB) that copies of it overlap in time."""
    path.mkdir(parents=True)
    row = json.dumps({"instruction": f"{tag} " + "x" * 200, "output": "y"}) + "\n"
    (path / "rows.jsonl").write_text(row * 20000)
    return path


def race(workspace, sources: list[Path], drop_id: str) -> list[subprocess.CompletedProcess]:
    env = sftflow_env(workspace)
    start = time.time() + 6  # every racer imported and waiting by then
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(s), drop_id, str(start)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in sources]
    results = []
    for racer in racers:
        out, err = racer.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(racer.args, racer.returncode, out, err))
    return results


def test_drops_racing_for_one_id_leave_one_intact_drop_and_one_line_errors(workspace, tmp_path):
    sources = [big_drop(tmp_path / f"src-{i}", f"content-{i}") for i in range(4)]
    lost_a_race = 0
    for round_ in range(3):
        drop_id = f"contested-{round_}"
        results = race(workspace, sources, drop_id)
        assert all("Traceback" not in r.stderr for r in results), [r.stderr for r in results]
        winners = [i for i, r in enumerate(results) if r.returncode == 0]
        assert len(winners) == 1, [(r.returncode, r.stdout, r.stderr) for r in results]
        for r in results:
            if r.returncode != 0:
                assert r.returncode == 2 and r.stdout.startswith("refused") and len(r.stdout.splitlines()) == 1
                assert f"drop id {drop_id!r}" in r.stdout and "--drop-id" in r.stdout
                lost_a_race += "while this one copied" in r.stdout
        landed = workspace.landing_dir / drop_id
        assert (landed / "rows.jsonl").read_bytes() == (sources[winners[0]] / "rows.jsonl").read_bytes()
        assert sorted(p.name for p in landed.iterdir()) == ["_SUCCESS", "rows.jsonl"]
    assert not [p for p in workspace.landing_dir.iterdir() if p.name.startswith(".tmp-")]
    assert lost_a_race, "no round raced the final rename; the copies did not overlap"


def test_drops_of_the_same_content_racing_for_one_id_all_get_that_drop(workspace, tmp_path):
    source = big_drop(tmp_path / "src", "same")
    for round_ in range(2):
        results = race(workspace, [source] * 4, f"same-{round_}")
        assert [r.returncode for r in results] == [0] * 4, [r.stderr for r in results]
        assert len({r.stdout for r in results}) == 1  # one fingerprint: the drop that landed
        assert (workspace.landing_dir / f"same-{round_}" / "rows.jsonl").read_bytes() == \
            (source / "rows.jsonl").read_bytes()
    assert not [p for p in workspace.landing_dir.iterdir() if p.name.startswith(".tmp-")]


def test_the_cli_loser_of_a_race_gets_one_line_naming_the_id(workspace, tmp_path):
    sources = [big_drop(tmp_path / f"cli-{i}", f"cli-{i}") for i in range(3)]
    env = sftflow_env(workspace)
    racers = [subprocess.Popen([sys.executable, "-m", "sftflow", "drop", str(s), "--drop-id", "cli-race"], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in sources]
    results = [(r.wait(timeout=300), r.stdout.read(), r.stderr.read()) for r in racers]
    assert sorted(code for code, _, _ in results) == [0, 2, 2], results
    for code, _out, err in results:
        assert "Traceback" not in err
        if code == 2:
            assert len(err.strip().splitlines()) == 1 and "'cli-race'" in err and err.startswith("error: ")


def test_a_refused_drop_leaves_nothing_behind(workspace, tmp_path):
    no_data = tmp_path / "no-data"
    no_data.mkdir()
    (no_data / "notes.txt").write_text("not a data file")
    with pytest.raises(DropError, match="no data files"):
        land_drop(workspace, no_data)
    unsupported = tmp_path / "table.xlsx"
    unsupported.write_bytes(b"PK")
    with pytest.raises(DropError, match="unsupported file type"):
        land_drop(workspace, unsupported)
    assert list(workspace.landing_dir.iterdir()) == []
    # the id is free: the drop lands once it holds data
    (no_data / "rows.jsonl").write_text('{"instruction": "x", "output": "y"}\n')
    assert land_drop(workspace, no_data).drop_id == "no-data"


def test_a_landed_drop_is_durable_before_land_drop_returns(workspace, monkeypatch):
    target = workspace.landing_dir / "durable"
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), target.exists()))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    land_drop(workspace, SAMPLE_DROPS / "arithmetic", "durable")
    files = [path for path, _ in synced if path.endswith(("rows.csv", "_SUCCESS"))]
    assert len(files) == 2  # the copy's files, before the rename
    landing_syncs = [in_place for path, in_place in synced if path == str(workspace.landing_dir)]
    assert landing_syncs and landing_syncs[-1] is True  # the landing directory, after the rename


def test_a_leftover_in_the_way_of_a_drop_id_is_named(workspace, tmp_path):
    (workspace.landing_dir / "stuck").mkdir()
    (workspace.landing_dir / "stuck" / "_SUCCESS").touch()  # what an older sftflow left of a refused drop
    with pytest.raises(DropError, match="stuck.*is in the way of drop id 'stuck'.*remove it, or choose another"):
        land_drop(workspace, SAMPLE_DROPS / "arithmetic", "stuck")
