"""Issue 16: commands to look inside — runs, models (promote / rollback with a log), --version.

Runs and registry versions are real ones: crafted run directories (tests/reliability/test_publish_killed.py)
published by the publish code itself. Datasets and quarantine are in tests/flows/test_inspect_datasets.py
(they run the real ingest). The commands read files only: a subprocess shows they import no Prefect,
torch, transformers or great_expectations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from foundation.artifacts import BeginEvent, LogEvent, WorkerSpec, event_line
from foundation.stores.registry import CHAMPION_LOG, read_champion_log
from tests.conftest import ROOT

NAME = "tiny-sft"
HEAVY = ("prefect", "torch", "transformers", "great_expectations")


def cli(*args: str):
    from sftflow.cli import app

    return CliRunner().invoke(app, list(args))


def ok_json(*args: str) -> dict:
    done = cli(*args, "--json")
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)


def one_line_error(done, *fragments: str) -> str:
    assert done.exit_code == 2, done.output
    assert done.stdout == "" and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, done.stderr
    return done.stderr


@pytest.fixture
def published(workspace):
    """run-a published as v0001, run-b as v0002 (both promoted: v0002 is the champion), and an unfinished run."""
    from tasks.publish import publish_version
    from tests.reliability.test_publish_killed import craft_run

    for seed, run_id in enumerate(("run-a", "run-b"), start=1):
        craft_run(workspace.root, run_id, promote=True, remote=None, seed=seed, templated=False)
        publish_version(workspace.registry, workspace.runs.finished(run_id), None, lambda m: None)
    assert workspace.registry.champion(NAME) == "v0002"
    running = workspace.runs.create("run-c")
    WorkerSpec(run_dir=str(running.root), model_path="/models/tiny", engine="unsloth", config={}).write(
        running.worker_spec)
    running.progress.write_text("\n".join([
        event_line(BeginEvent(max_steps=10, resumed_from_step=0)),
        event_line(LogEvent(step=1, loss=3.5, trained_tokens=100, elapsed_s=2.0)),
        event_line(LogEvent(step=2, loss=3.0, trained_tokens=300, elapsed_s=3.0)),
    ]) + "\n")
    return workspace


def test_runs_list_and_show_report_what_each_run_directory_holds(published):
    runs = {r["run_id"]: r for r in ok_json("runs", "list")["runs"]}
    assert set(runs) == {"run-a", "run-b", "run-c"}
    manifest = published.runs.finished("run-a").manifest()
    a = runs["run-a"]
    assert (a["engine"], a["loss_first"], a["loss_last"], a["tokens_per_s"]) == (
        manifest.engine, manifest.loss_first, manifest.loss_last, manifest.tokens_per_s)
    assert a["dataset_version"] == manifest.dataset_version and a["adapter"] == manifest.adapter_dir
    assert a["exports"]["quants"] == ["f16", "q4_k_m"] and a["exports"]["passed"]
    assert a["eval"]["promote"] is True and a["eval"]["primary_metric"] == "rouge_l"
    assert a["published"] == [f"{NAME}@v0001"] and a["status"] == "published"
    c = runs["run-c"]  # unfinished: from its events
    assert (c["status"], c["engine"], c["loss_first"], c["loss_last"], c["global_step"]) == (
        "unfinished", "unsloth", 3.5, 3.0, 2)
    assert c["tokens_per_s"] == 100.0 and c["eval"] is None and c["exports"] is None

    shown = ok_json("runs", "show", "run-b")
    assert shown == runs["run-b"]
    human = cli("runs", "show", "run-b")
    assert human.exit_code == 0
    assert "  loss        2.000 -> 1.000 (step 10)" in human.stdout
    assert "  gguf        f16, q4_k_m (passed parity)" in human.stdout
    assert f"  published   {NAME}@v0002" in human.stdout
    listed = cli("runs", "list").stdout.splitlines()
    assert len(listed) == 3 and any(line.startswith("run-c  unfinished") for line in listed)

    one_line_error(cli("runs", "show", "run-z"), "no training run 'run-z'", "run-a", "run-b", "run-c",
                   "sftflow runs list")


def test_models_list_and_show(published):
    models = ok_json("models", "list")["models"]
    assert [m["name"] for m in models] == [NAME] and models[0]["champion"] == "v0002"
    assert [(v["version"], v["run_id"], v["champion"]) for v in models[0]["versions"]] == [
        ("v0001", "run-a", False), ("v0002", "run-b", True)]
    shown = ok_json("models", "show", f"{NAME}@v0001")
    assert (shown["version"], shown["run_id"], shown["champion"], shown["champion_now"]) == (
        "v0001", "run-a", False, "v0002")
    assert shown["exports"]["gguf"] == [f"gguf/{NAME}-f16.gguf", f"gguf/{NAME}-q4_k_m.gguf"]
    assert shown["eval"]["promote"] and shown["run"]["engine"] == "hf"
    assert ok_json("models", "show", NAME)["version"] == "v0002"  # the champion
    assert "[champion]" in cli("models", "show", NAME).stdout.splitlines()[0]
    one_line_error(cli("models", "show", "nope"), "no model 'nope'", f"published: {NAME}")
    one_line_error(cli("models", "show", f"{NAME}@v0009"), "no version 'v0009'", "v0001, v0002")


def test_promote_and_rollback_move_the_pointer_and_log_who_when_why(published, monkeypatch):
    monkeypatch.setenv("USER", "alice")
    monkeypatch.setenv("LOGNAME", "alice")
    registry = published.registry
    pointer = registry.model_dir(NAME) / "CHAMPION"

    moved = ok_json("models", "promote", f"{NAME}@v0001", "--reason", "v0002 regressed on support chats")
    assert pointer.read_text() == "v0001\n" and registry.champion(NAME) == "v0001"
    assert moved["changed"] and moved["move"]["from"] == "v0002" and moved["move"]["to"] == "v0001"
    lines = (registry.model_dir(NAME) / CHAMPION_LOG).read_text().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["user"] == "alice" and entry["action"] == "promote" and entry["reason"] == (
        "v0002 regressed on support chats") and (entry["from"], entry["to"]) == ("v0002", "v0001")
    assert entry["at"].endswith("+00:00")

    again = ok_json("models", "promote", f"{NAME}@v0001")  # already the champion: nothing changes
    assert not again["changed"] and len(read_champion_log(registry, NAME)) == 1

    back = ok_json("models", "rollback", NAME, "--reason", "fixed")
    assert registry.champion(NAME) == "v0002" and (back["move"]["from"], back["move"]["to"]) == ("v0001", "v0002")
    # the previous champion before v0002 is v0001 (published as champion before it)
    human = cli("models", "rollback", NAME)
    assert human.exit_code == 0 and human.stdout.strip() == (
        f"{NAME}: champion v0002 -> v0001 (rolled back, logged by alice)")
    assert registry.champion(NAME) == "v0001"
    moves = read_champion_log(registry, NAME)
    assert [(m.action, m.from_version, m.to_version, m.reason) for m in moves] == [
        ("promote", "v0002", "v0001", "v0002 regressed on support chats"), ("rollback", "v0001", "v0002", "fixed"),
        ("rollback", "v0002", "v0001", None)]
    one_line_error(cli("models", "rollback", NAME), f"no earlier champion of {NAME}", "sftflow models promote")
    assert registry.champion(NAME) == "v0001" and len(read_champion_log(registry, NAME)) == 3

    log = ok_json("models", "show", NAME)["champion_log"]
    assert [m["to"] for m in log] == ["v0001", "v0002", "v0001"]


def test_promote_refuses_a_version_that_fails_its_manifest_check(published):
    registry = published.registry
    gguf = registry.version(NAME, "v0001").root / "gguf" / f"{NAME}-q4_k_m.gguf"
    data = bytearray(gguf.read_bytes())
    data[10] ^= 0xFF
    gguf.write_bytes(bytes(data))
    one_line_error(cli("models", "promote", f"{NAME}@v0001"), "sha256 differs from the manifest")
    assert registry.champion(NAME) == "v0002" and read_champion_log(registry, NAME) == []
    one_line_error(cli("models", "promote", NAME), "names no version", f"{NAME}@v0001")
    one_line_error(cli("models", "promote", f"{NAME}@v7"), "no version 'v7'", "v0001, v0002")
    one_line_error(cli("models", "rollback", "other"), "no model 'other'", NAME)


def test_version_prints_the_package_version():
    from importlib import metadata

    done = cli("--version")
    assert done.exit_code == 0 and done.stdout.strip() == metadata.version("sftflow")


@pytest.mark.parametrize("args", [["runs", "list"], ["runs", "show", "run-a"], ["models", "list"],
                                  ["models", "show", NAME], ["models", "promote", f"{NAME}@v0001"],
                                  ["models", "rollback", NAME], ["datasets", "list"], ["--version"]])
def test_the_commands_import_no_prefect_torch_transformers_or_gx(published, args):
    env = {**os.environ, "SFTFLOW_HOME": str(published.root), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "sftflow", *args, *(["--json"] if args[0] !=
                          "--version" else [])], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    assert not imported & set(HEAVY), imported & set(HEAVY)
    if args[0] != "--version":
        json.loads(done.stdout)


def test_a_run_with_a_corrupt_events_file_is_listed_as_unreadable(published):
    broken = published.runs.create("run-d")
    broken.progress.write_text("{not an event\n")
    runs = {r["run_id"]: r for r in ok_json("runs", "list")["runs"]}
    assert runs["run-d"]["status"] == "unreadable" and str(broken.progress) in runs["run-d"]["error"]
    assert runs["run-a"]["status"] == "published"
    assert "run-d  unreadable" in cli("runs", "list").stdout
    one_line_error(cli("runs", "show", "run-d"), str(broken.progress))


def test_a_torn_last_event_line_of_a_live_run_is_left_out(published):
    running = published.runs.dir("run-c")
    with open(running.progress, "a") as fh:
        fh.write('{"event": "log", "step": 3, "lo')  # the trainer is writing this line now
    assert ok_json("runs", "show", "run-c")["global_step"] == 2


def test_safe_text_escapes_what_could_move_the_cursor_or_hide_text():
    from sftflow.inspect_commands import json_line, safe_text

    hostile = "ok\x1b[2K\r\x9b31m\u202eevil\u200b\u2028next\\"
    assert safe_text(hostile) == "ok\\x1b[2K\\r\\x9b31m\\u202eevil\\u200b\\u2028next\\\\"
    assert safe_text("é" * 300, 200) == "é" * 200 + "…"  # printable text stays as it is, cut at the bound
    line = json_line({"raw": hostile})
    assert json.loads(line) == {"raw": hostile} and "\u202e" not in line and "\x9b" not in line


def test_a_torn_champion_log_line_is_skipped(published):
    registry = published.registry
    ok_json("models", "promote", f"{NAME}@v0001")
    with open(registry.model_dir(NAME) / CHAMPION_LOG, "a") as fh:
        fh.write('{"at": "2026-')  # a crash mid-append
    assert [m.to_version for m in read_champion_log(registry, NAME)] == ["v0001"]
    assert ok_json("models", "rollback", NAME)["champion"] == "v0002"
    assert [(m.action, m.to_version) for m in read_champion_log(registry, NAME)] == [
        ("promote", "v0001"), ("rollback", "v0002")]  # the next line was not glued to the torn one
