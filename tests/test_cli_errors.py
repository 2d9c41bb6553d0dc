"""Issue 15, item 7: broken invocations get one line naming the fix, exit status 2, and no traceback.

Each runs through the real CLI in a subprocess. Drop arguments are checked before the workspace and
Prefect start, so no Prefect server is started for them either; a truncated stack/state.json is
read as "no stack" with one warning line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SAMPLE_DROPS


@pytest.fixture
def cli(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "SFTFLOW_HOME": str(home), "PYTHONPATH": str(ROOT), "SFTFLOW_PROGRESS": "0",
           "PREFECT_HOME": str(tmp_path / "prefect"), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "sftflow", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)

    run.home = home
    return run


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "notes.txt").write_text("not data\n")
    (tmp_path / "no-data").mkdir()
    (tmp_path / "no-data" / "README.md").write_text("nothing to ingest\n")
    return tmp_path


ARRANGEMENTS = [
    # (arguments, what the one line must say); {tmp} is the test's directory
    (["ingest", "{tmp}/missing"], "no such file or directory"),
    (["ingest", "http://example.com/rows.jsonl"], "download it first"),
    (["ingest", "https://example.com/rows.jsonl"], "download it first"),
    (["ingest", "{tmp}/notes.txt"], "unsupported file type"),
    (["ingest", str(SAMPLE_DROPS / "arithmetic"), "--drop-id", "../escape"], "--drop-id"),
    (["ingest", "hf://datasets/someone/absent"], "not (completely) in the Hugging Face cache"),
    (["drop", "{tmp}/missing"], "no such file or directory"),
    (["drop", "https://example.com/rows.jsonl"], "download it first"),
    (["drop", "{tmp}/notes.txt"], "unsupported file type"),
    (["drop", "{tmp}/no-data"], "no data files"),
    (["drop", str(SAMPLE_DROPS / "arithmetic"), "--drop-id", "a..b"], "--drop-id"),
    (["drop", "hf://datasets/someone/absent"], "sftflow ingest hf://datasets"),
    (["pipeline", "{tmp}/missing"], "no such file or directory"),
    (["pipeline", "http://example.com/rows.jsonl"], "download it first"),
    (["pipeline", "{tmp}/notes.txt"], "unsupported file type"),
]


@pytest.mark.parametrize(("args", "says"), ARRANGEMENTS, ids=[" ".join(a[:2]) for a, _ in ARRANGEMENTS])
def test_a_broken_invocation_gets_one_line_and_status_2(cli, bad_files, args, says):
    done = cli(*[a.format(tmp=bad_files) for a in args])
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], done.stderr
    assert done.stdout == ""
    assert not (cli.home / "landing").exists() or not any((cli.home / "landing").iterdir())


@pytest.mark.parametrize("content", ['{"stack_id": "ab', "", "[]", '{"stack_id": 1}'])
def test_an_unreadable_stack_state_is_no_stack_with_one_warning(cli, content):
    state = cli.home / "stack" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text(content)
    for args in (["status", "--json"], ["down", "--json"], ["drop", str(SAMPLE_DROPS / "arithmetic"), "--json"]):
        done = cli(*args)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1 and str(state) in warnings[0] and f"rm {state}" in warnings[0], done.stderr
        json.loads(done.stdout)
    assert json.loads(cli("status", "--json").stdout)["running"] is False
