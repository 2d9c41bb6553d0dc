"""Issue 16: `--help` and a command that fails on its arguments stay light.

They must not import Prefect, torch, transformers or great-expectations: those cost seconds, and an
argument error must answer at once with its one line (exit status 2, no traceback; a bad config lists
each of its errors on an indented line below it). Each case runs the
real CLI in a subprocess under `python -X importtime`, whose report on stderr names every module the
process imported. How fast they are is measured by bench/cli.py, not here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SAMPLE_DROPS

HEAVY = ("prefect", "torch", "transformers", "great_expectations")
COMMANDS = ["ingest", "train", "evaluate", "export", "publish", "chat", "serve", "datasets", "demo", "pipeline",
            "drop", "watch", "up", "status", "down", "config validate", "config import", "models verify"]


@pytest.fixture
def cli(tmp_path):
    env = {**os.environ, "SFTFLOW_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT), "SFTFLOW_PROGRESS": "0",
           "PREFECT_HOME": str(tmp_path / "prefect"), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)

    def run(*args: str, from_bash: bool = False) -> tuple[subprocess.CompletedProcess, set[str], list[str]]:
        """The finished process, the top-level packages it imported, and its stderr without the import report.
        from_bash: started by a bash that waits for it (as from a terminal), not straight from this process."""
        command = [sys.executable, "-X", "importtime", "-m", "sftflow", *args]
        if from_bash:  # `; exit` keeps bash from exec-ing the command: bash stays its parent
            command = ["bash", "-c", '"$@"; exit $?', "bash", *command]
        proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        report = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
        imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in report[1:]}  # [0] is the header
        rest = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
        return proc, imported, rest

    return run


def test_the_import_report_is_read(cli):
    """The parser sees what the CLI does import, so an empty intersection below means something."""
    proc, imported, _ = cli("--help")
    assert proc.returncode == 0
    assert {"typer", "sftflow"} <= imported


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_imports_nothing_heavy(cli, command):
    proc, imported, rest = cli(*command.split(), "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout
    assert imported.isdisjoint(HEAVY), sorted(imported & set(HEAVY))
    assert not rest


FAILING = [
    # (arguments, what the one line must say); {tmp} is the test's directory
    (["train", "--config", "missing.yaml"], "cannot read the config"),
    (["train", "--config", "{tmp}/bad.yaml"], "nonsense"),
    (["train", "--config", str(ROOT / "flows/configs/tiny_cpu.yaml"), "--dataset", "nope"], "no dataset version 'nope'"),
    (["train", "--config", str(ROOT / "flows/configs/tiny_cpu.yaml")], "ingest a drop first"),
    (["pipeline", "--config", "missing.yaml"], "cannot read the config"),
    (["pipeline", "--set", "nonsense=1"], "nonsense: unknown field"),
    (["evaluate", "--run", "nope"], "no finished training run 'nope'"),
    (["export", "--run", "nope"], "no finished training run 'nope'"),
    (["export", "--run", "nope", "--quant", "q9"], "--quant q9: choose from"),
    (["publish", "--run", "nope"], "no finished training run 'nope'"),
    (["publish", "--run", "../escape"], "no finished training run '../escape'"),
    (["chat", "--model", "nope@v9"], "no model 'nope'"),
    (["serve", "--model", "nope@v9"], "no model 'nope'"),
    (["serve", "--host", "0.0.0.0"], "serving there needs an API key"),
    (["export", "--run", "nope", "--ollama", "a b"], "not an Ollama model name"),
    (["train", "--config", str(ROOT / "flows/configs/tiny_cpu.yaml"), "--set", "train.max_step=5"],
     "did you mean train.max_steps?"),
    (["train", "--config", str(ROOT / "flows/configs/tiny_cpu.yaml"), "--dry-run"], "ingest a drop first"),
    (["models", "verify", "nope@v9"], "no model 'nope'"),
    (["ingest", "missing/path"], "no such file or directory"),
    (["ingest", str(SAMPLE_DROPS / "arithmetic"), "--format", "csv"], "--format csv: choose from"),
    (["config", "validate", "{tmp}/bad.yaml"], "nonsense"),
]


@pytest.mark.parametrize(("args", "says"), FAILING, ids=[" ".join(a) for a, _ in FAILING])
def test_argument_errors_answer_before_anything_heavy(cli, tmp_path, args, says):
    (tmp_path / "bad.yaml").write_text("name: x\nnonsense: 1\n")
    proc, imported, rest = cli(*(a.format(tmp=tmp_path) for a in args))
    assert proc.returncode == 2, proc.stderr
    assert imported.isdisjoint(HEAVY), sorted(imported & set(HEAVY))
    # one line; a config's errors are all listed at once, each on an indented line of its own below it
    assert rest and rest[0].startswith("error: ") and all(line.startswith("  ") for line in rest[1:]), rest
    assert says in "\n".join(rest)
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_shell_completion_is_typers_and_as_light_as_help(cli):
    """`sftflow --show-completion`, typed in bash, prints the script that calls back with _SFTFLOW_COMPLETE, and
    a completion request through that protocol answers without importing anything heavy. (Typer finds the
    shell among the command's parent processes: run straight from pytest, whose parents need not include a
    shell, it finds none.)"""
    proc, imported, _ = cli("--show-completion", from_bash=True)
    assert proc.returncode == 0, proc.stderr
    assert "_SFTFLOW_COMPLETE=complete_bash" in proc.stdout and "complete -o default -F _sftflow_completion sftflow" in proc.stdout
    assert imported.isdisjoint(HEAVY)


@pytest.mark.parametrize(("words", "expected"), [("sftflow ru", {"runs"}), ("sftflow train --dry", {"--dry-run"}),
                                                 ("sftflow serve --n-", {"--n-ctx", "--n-gpu-layers"})])
def test_completion_protocol_completes_commands_and_options(tmp_path, words, expected):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "_SFTFLOW_COMPLETE": "complete_bash", "COMP_WORDS": words,
           "COMP_CWORD": str(len(words.split()) - 1)}
    proc = subprocess.run([sys.executable, "-m", "sftflow"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert set(proc.stdout.split()) == expected


def test_help_lists_the_ingest_formats_of_the_readers():
    """The CLI spells the format names out (tasks.ingest.formats imports pydantic); they must agree."""
    from sftflow.cli import FORMAT_NAMES
    from tasks.ingest.formats import FORMAT_NAMES as READERS

    assert FORMAT_NAMES == READERS
