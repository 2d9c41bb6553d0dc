"""`sftflow export --ollama NAME`: `ollama create NAME -f Modelfile` when ollama is on PATH (here a fake that
records its arguments), else the exact command to run; a bad name is refused before anything starts."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from foundation.errors import ConfigError
from tasks.export.ollama import OllamaError, check_model_name, create_command, create_model

FAKE_OLLAMA = """#!/bin/sh
printf '%s\\n' "$PWD" "$@" > "{record}"
exit {status}
"""


@pytest.fixture
def export_dir(tmp_path) -> Path:
    run = tmp_path / "runs" / "my run"  # a space: the printed command must quote the directory
    (run / "gguf").mkdir(parents=True)
    (run / "gguf" / "tiny-sft-q4_k_m.gguf").write_bytes(b"GGUF")
    (run / "Modelfile").write_text("FROM ./gguf/tiny-sft-q4_k_m.gguf\n")
    return run


def fake_ollama(bin_dir: Path, status: int = 0) -> Path:
    bin_dir.mkdir(exist_ok=True)
    record = bin_dir / "argv.txt"
    script = bin_dir / "ollama"
    script.write_text(FAKE_OLLAMA.format(record=record, status=status))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return record


def test_with_ollama_on_path_it_creates_the_model_from_the_modelfile_directory(export_dir, tmp_path, monkeypatch):
    record = fake_ollama(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    result = create_model("tiny-sft:q4", export_dir / "Modelfile")
    assert result["created"] is True and result["name"] == "tiny-sft:q4"
    cwd, *argv = record.read_text().splitlines()
    assert argv == ["create", "tiny-sft:q4", "-f", str(export_dir / "Modelfile")]
    assert Path(cwd) == export_dir  # where FROM ./gguf/... resolves


def test_without_ollama_it_reports_the_exact_command(export_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = create_model("tiny-sft", export_dir / "Modelfile")
    assert result["created"] is False and result["reason"] == "ollama is not on PATH"
    assert result["command"] == f"cd '{export_dir}' && ollama create tiny-sft -f Modelfile"


def test_a_failing_ollama_is_one_error_with_the_command_to_retry(export_dir, tmp_path, monkeypatch):
    fake_ollama(tmp_path / "bin", status=1)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(OllamaError, match="ollama create tiny-sft failed .*exit status 1.*Then run: cd "):
        create_model("tiny-sft", export_dir / "Modelfile")


@pytest.mark.parametrize("name", ["tiny", "tiny-sft:q4_k_m", "me/tiny.v2", "registry.local/me/tiny:latest"])
def test_ollama_model_names(name):
    check_model_name(name)


@pytest.mark.parametrize("name", ["", "-x", "a b", "x;rm -rf /", "a:b:c", "../x"])
def test_bad_names_are_refused(name):
    with pytest.raises(ConfigError, match="not an Ollama model name"):
        check_model_name(name)


@pytest.fixture
def exported(export_dir, monkeypatch, workspace):
    """`sftflow export` with the export flow replaced by the report a passed export writes (the real export
    needs llama.cpp's converter: tests/flows/test_families_pipeline.py runs it)."""
    import contextlib

    import flows.export
    import sftflow.cli
    from foundation.artifacts import ExportReport

    report = ExportReport(passed=True, parity={}, timings={}, run_id="r1", gguf_dir=str(export_dir / "gguf"),
                          modelfile=str(export_dir / "Modelfile"))
    monkeypatch.setattr(sftflow.cli, "_check_finished_run", lambda run: None)
    monkeypatch.setattr(sftflow.cli, "_flow_session", contextlib.nullcontext)
    monkeypatch.setattr(flows.export, "export_model", lambda run_id, quants: report)
    return export_dir


def test_export_ollama_with_ollama_on_path(exported, tmp_path, monkeypatch):
    from sftflow.cli import app

    record = fake_ollama(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    result = CliRunner().invoke(app, ["export", "--run", "r1", "--ollama", "tiny-sft", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["ollama"]["created"] is True and out["modelfile"] == str(exported / "Modelfile")
    assert record.read_text().splitlines()[1:] == ["create", "tiny-sft", "-f", str(exported / "Modelfile")]


def test_export_ollama_without_ollama_prints_the_command(exported, tmp_path, monkeypatch):
    from sftflow.cli import app

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = CliRunner().invoke(app, ["export", "--run", "r1", "--ollama", "tiny-sft"])
    assert result.exit_code == 0, result.output
    assert "ollama: ollama is not on PATH; create the model with:" in result.stdout
    assert f"cd '{exported}' && ollama create tiny-sft -f Modelfile" in result.stdout


def test_export_refuses_a_bad_ollama_name_before_exporting(exported):
    from sftflow.cli import app

    result = CliRunner().invoke(app, ["export", "--run", "r1", "--ollama", "a b"])
    assert result.exit_code == 2 and result.stderr.startswith("error: --ollama 'a b': not an Ollama model name")
