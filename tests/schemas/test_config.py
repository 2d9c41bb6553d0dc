"""The run config: every shipped YAML loads; overrides apply; errors name every field at once."""

from __future__ import annotations

import pytest

from schemas.config import RunConfig, config_hash, load_run_config, parse_overrides
from foundation.errors import ConfigError
from tests.conftest import ROOT

SHIPPED = sorted((ROOT / "flows" / "configs").glob("*.yaml"))


def test_the_three_shipped_configs_exist():
    assert {p.name for p in SHIPPED} >= {"tiny_cpu.yaml", "llama3_2_1b_qlora.yaml", "llama3_1_8b_qlora.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_says_how_to_run_it(path):
    config = load_run_config(path)
    assert isinstance(config, RunConfig)
    assert "sftflow train --config" in path.read_text().splitlines()[1]


def test_overrides_are_typed_and_dotted():
    config = load_run_config(SHIPPED[0], ["train.learning_rate=1e-4", "lora.target_modules=[q_proj,v_proj]",
                                          "train.packing=true", "model.name=/models/x"])
    assert config.train.learning_rate == 1e-4 and config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.train.packing is True and config.model.name == "/models/x"
    assert config_hash(config) != config_hash(load_run_config(SHIPPED[0]))


def test_every_error_is_reported_with_its_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: 'bad name!'\nmodel: {name: tiny, colour: red}\ntrain: {learning_rate: 0, engine: tpu}\n")
    with pytest.raises(ConfigError) as info:
        load_run_config(path, ["lora.dropout=1.5"])
    message = str(info.value)
    assert "5 error(s)" in message
    for field in ("name:", "model.colour: unknown field", "train.learning_rate", "train.engine", "lora.dropout"):
        assert field in message


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="use_dora is not supported by the unsloth engine"):
        load_run_config(SHIPPED[0], ["lora.use_dora=true", "train.engine=unsloth"])
    with pytest.raises(ConfigError, match="LoRA GGUF cannot hold a DoRA adapter; set export.lora_gguf=false"):
        load_run_config(SHIPPED[0], ["lora.use_dora=true", "train.engine=hf"])
    assert load_run_config(SHIPPED[0], ["lora.use_dora=true", "train.engine=hf", "export.lora_gguf=false"]).lora.use_dora
    with pytest.raises(ConfigError, match="set train.epochs or train.max_steps"):
        load_run_config(SHIPPED[0], ["train.epochs=null"])


def test_report_to_names_transformers_trackers():
    assert load_run_config(SHIPPED[0], ["train.report_to=[mlflow,wandb]"]).train.report_to == ["mlflow", "wandb"]
    assert load_run_config(SHIPPED[0], ["train.report_to=[]"]).train.report_to == []
    with pytest.raises(ConfigError, match=r"train.report_to: .*unknown tracker 'tensorbord'; one of tensorboard, mlflow"):
        load_run_config(SHIPPED[0], ["train.report_to=[tensorbord]"])


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1", "train.lr"])
def test_malformed_overrides(bad):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides([bad])


def test_unreadable_config(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_run_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="YAML mapping"):
        load_run_config(tmp_path / "list.yaml")


def test_num_gpus_is_a_count_or_auto():
    assert load_run_config(SHIPPED[0]).train.num_gpus == 1
    assert load_run_config(SHIPPED[0], ["train.num_gpus=auto"]).train.num_gpus == "auto"
    assert load_run_config(SHIPPED[0], ["train.num_gpus=4"]).train.num_gpus == 4
    for bad in ("0", "all", "1.5"):
        with pytest.raises(ConfigError, match="train.num_gpus"):
            load_run_config(SHIPPED[0], [f"train.num_gpus={bad}"])
