"""One override syntax on every command that takes a run config: `--set key=value` (repeatable), with the
positional `key=value` form kept as an alias where the command had it (train, config validate)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sftflow.cli import app
from tests.conftest import ROOT

CONFIG = str(ROOT / "flows" / "configs" / "tiny_cpu.yaml")


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def resolved(monkeypatch, workspace):
    """The configs the commands resolved: load_run_config is wrapped to keep its result, then stop the command
    (a ConfigError, exit 2) before it looks for a dataset or starts Prefect."""
    import schemas.config
    from foundation.errors import ConfigError

    configs = []
    real = schemas.config.load_run_config

    def recording(path, overrides=()):
        configs.append(real(path, overrides).model_dump(mode="json"))
        raise ConfigError("recorded")

    monkeypatch.setattr(schemas.config, "load_run_config", recording)
    return configs


def test_config_validate_resolves_both_forms_alike():
    positional = invoke("config", "validate", CONFIG, "train.max_steps=7", "lora.r=8", "--json")
    options = invoke("config", "validate", CONFIG, "--set", "train.max_steps=7", "--set", "lora.r=8", "--json")
    mixed = invoke("config", "validate", CONFIG, "train.max_steps=7", "--set", "lora.r=8", "--json")
    assert positional.exit_code == options.exit_code == mixed.exit_code == 0, positional.output
    configs = [json.loads(r.stdout)["config"] for r in (positional, options, mixed)]
    assert configs[0] == configs[1] == configs[2]
    assert configs[0]["train"]["max_steps"] == 7 and configs[0]["lora"]["r"] == 8


def test_set_comes_after_the_positional_form():
    result = invoke("config", "validate", CONFIG, "train.max_steps=7", "--set", "train.max_steps=9", "--json")
    assert json.loads(result.stdout)["config"]["train"]["max_steps"] == 9


@pytest.mark.parametrize("command", [["train", "--config", CONFIG], ["pipeline", "--config", CONFIG]],
                         ids=["train", "pipeline"])
def test_train_and_pipeline_resolve_set_as_config_validate_does(resolved, command):
    invoke("config", "validate", CONFIG, "train.max_steps=7", "lora.r=8")  # the positional form, recorded first
    result = invoke(*command, "--set", "train.max_steps=7", "--set", "lora.r=8")
    assert result.exit_code == 2 and "recorded" in result.stderr
    assert len(resolved) == 2 and resolved[1] == resolved[0] and resolved[1]["lora"]["r"] == 8


def test_train_resolves_both_forms_alike(resolved):
    invoke("train", "--config", CONFIG, "train.max_steps=7", "lora.r=8")
    invoke("train", "--config", CONFIG, "--set", "train.max_steps=7", "--set", "lora.r=8")
    assert len(resolved) == 2 and resolved[0] == resolved[1] and resolved[0]["train"]["max_steps"] == 7


@pytest.mark.parametrize("args", [
    ["config", "validate", CONFIG, "train.max_step=5"],
    ["config", "validate", CONFIG, "--set", "train.max_step=5"],
    ["train", "--config", CONFIG, "train.max_step=5"],
    ["train", "--config", CONFIG, "--set", "train.max_step=5"],
    ["pipeline", "--config", CONFIG, "--set", "train.max_step=5"],
], ids=lambda a: " ".join(x for x in a if x != CONFIG))
def test_a_misspelt_key_gets_the_did_you_mean_line(workspace, args):
    result = invoke(*args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "did you mean train.max_steps?" in result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
