"""Hostile or mistaken run configs fail when the config is read, one line per problem naming the key and the fix:
overrides that are not YAML, model names that are URLs or climb out with '..', sizes no GPU holds, counts written
as floats. trust_remote_code is allowed, with a warning wherever the config is validated or a run starts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from foundation.errors import ConfigError
from schemas.config import (
    MAX_BATCH_SIZE, MAX_GRADIENT_ACCUMULATION, MAX_LORA_RANK, MAX_SEQ_LENGTH, ModelConfig, load_run_config,
    parse_overrides,
)
from tests.conftest import ROOT

TINY = ROOT / "flows" / "configs" / "tiny_cpu.yaml"
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def refusal(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as refused:
        load_run_config(TINY, overrides)
    return str(refused.value)


# ---------------------------------------------------------------------------------------------
# Overrides that are not YAML
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override", ["train.learning_rate=[x", "train.optim={% raw %}", "lora.target_modules={a: [}",
                                      "train.report_to=" + "[" * 5000, "train.optim=!!python/object:os.system x"])
def test_an_override_that_is_not_yaml_is_one_line_that_says_to_quote_it(override):
    key = override.partition("=")[0]
    message = refusal([override])
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"override {key}=") and "not valid YAML" in message
    assert f"\"{key}='...'\"" in message  # the fix: quote the value


def test_a_quoted_override_is_the_text_it_quotes():
    assert parse_overrides(["train.optim='[x'", 'train.optim="a: b"']) == [("train.optim", "[x"), ("train.optim", "a: b")]


def test_every_bad_override_is_named_at_once():
    message = refusal(["train.learning_rate=[x", "no_equals_sign", "lora.r={"])
    lines = message.splitlines()
    assert len(lines) == 3 and "train.learning_rate" in lines[0] and "key=value" in lines[1] and "lora.r" in lines[2]


@pytest.mark.parametrize("written", [TEMPLATE, "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}",
                                     "Hello {{ name }} # not a YAML comment"])
def test_a_jinja_chat_template_override_is_taken_as_written(written):
    assert load_run_config(TINY, [f"model.chat_template={written}"]).model.chat_template == written


def test_a_quoted_chat_template_override_is_read_as_yaml_and_names_still_work():
    one_line = TEMPLATE.replace("\n", " ")  # YAML folds the line breaks of a quoted scalar: unquoted keeps them
    quoted = "'" + one_line.replace("'", "''") + "'"
    assert load_run_config(TINY, [f"model.chat_template={quoted}"]).model.chat_template == one_line
    assert load_run_config(TINY, ["model.chat_template=chatml"]).model.chat_template == "chatml"
    assert load_run_config(TINY, ["model.chat_template=null"]).model.chat_template is None


def test_a_config_file_that_is_not_yaml_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nmodel: {name: tiny\ntrain: {}\n")
    with pytest.raises(ConfigError) as refused:
        load_run_config(path)
    assert "\n" not in str(refused.value) and str(refused.value).startswith(f"{path}: not valid YAML (")
    assert "line " in str(refused.value) and "fix it there" in str(refused.value)


# ---------------------------------------------------------------------------------------------
# model.name: a Hub id or a local directory, nothing that climbs out or is fetched from a URL
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,why", [
    ("..", "climbs out of its directory with '..'"),
    ("../../etc", "climbs out of its directory with '..'"),
    ("meta-llama/../../../etc/passwd", "climbs out of its directory with '..'"),
    ("/models/../etc", "climbs out of its directory with '..'"),
    ("org/..", "climbs out of its directory with '..'"),
    ("https://evil.example/model.safetensors", "is a URL, which is not loaded"),
    ("hf://meta-llama/Llama-3.2-1B", "is a URL, which is not loaded"),
    ("", "is empty"),
    (" tiny", "surrounding spaces"),
    ("tiny\x00", "control characters"),
    ("org/na me", "is not a Hub id"),
    ("org/-name", "is not a Hub id"),
    ("org/name.", "is not a Hub id"),
    ("org--x/name", "is not a Hub id"),
    ("org/a..b", "is not a Hub id"),
    (".hidden", "is not a Hub id"),
])
def test_a_model_name_that_is_neither_a_hub_id_nor_a_plain_directory_is_refused(name, why):
    message = refusal([f"model.name={json.dumps(name)}"])
    assert message.count("\n") == 1 and "model.name: " in message and why in message
    assert "org/name" in message or "directory" in message  # the fix


def test_a_hub_url_is_refused_with_its_id():
    message = refusal(["model.name=https://huggingface.co/meta-llama/Llama-3.2-1B-Instruct/tree/main"])
    assert "write meta-llama/Llama-3.2-1B-Instruct" in message


@pytest.mark.parametrize("name", ["tiny", "gpt2", "x", "meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5-7B-Instruct",
                                  "org/tiny", "/models/x", "./x", "~/models/llama", ".", "models/llama/8b", "./a..b"])
def test_hub_ids_and_plain_directories_are_accepted(name):
    assert load_run_config(TINY, [f"model.name={name}"]).model.name == name


def test_a_directory_need_not_exist_when_the_config_is_read(tmp_path):
    # the worker that trains may see directories this machine does not; resolve_model checks at the start of the run
    assert ModelConfig(name=str(tmp_path / "not-yet")).name == str(tmp_path / "not-yet")


# ---------------------------------------------------------------------------------------------
# Sizes: whole numbers, bounded
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override", ["train.max_seq_length=1e23", "train.max_seq_length=1.0e+23",
                                      "train.batch_size=8.0", "lora.r=16.5", "train.gradient_accumulation_steps=true",
                                      "train.max_steps=1e3", "train.seed=4.2"])
def test_a_count_written_as_a_float_is_refused(override):
    key = override.partition("=")[0]
    message = refusal([override])
    assert message.count("\n") == 1 and f"{key}: " in message and "is not a whole number; write digits" in message


@pytest.mark.parametrize("key,bound", [("train.max_seq_length", MAX_SEQ_LENGTH), ("train.batch_size", MAX_BATCH_SIZE),
                                       ("train.gradient_accumulation_steps", MAX_GRADIENT_ACCUMULATION),
                                       ("lora.r", MAX_LORA_RANK)])
def test_sizes_no_gpu_holds_are_refused_with_the_bound(key, bound):
    assert load_run_config(TINY, [f"{key}={bound}"])  # the bound itself is allowed
    for too_big in (bound + 1, 10**23):
        message = refusal([f"{key}={too_big}"])
        assert message.count("\n") == 1 and f"{key}: " in message and str(bound) in message


def test_max_seq_length_bound_is_a_million_tokens():
    assert MAX_SEQ_LENGTH == 1_048_576


def test_a_seed_outside_numpys_range_is_refused():
    assert "train.seed" in refusal(["train.seed=-1"]) and "train.seed" in refusal([f"train.seed={2**32}"])
    assert load_run_config(TINY, [f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1


def test_whole_numbers_written_as_digits_still_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nmodel: {name: tiny}\ntrain: {max_seq_length: '4096', batch_size: 2}\nlora: {r: 8}\n")
    config = load_run_config(path)
    assert (config.train.max_seq_length, config.train.batch_size, config.lora.r) == (4096, 2, 8)


# ---------------------------------------------------------------------------------------------
# trust_remote_code: allowed, never silently
# ---------------------------------------------------------------------------------------------


def test_trust_remote_code_is_a_warning_not_an_error():
    assert load_run_config(TINY).warnings() == []
    (warning,) = load_run_config(TINY, ["model.trust_remote_code=true"]).warnings()
    assert warning.startswith("model.trust_remote_code is true") and "set it to false" in warning


def test_a_run_starts_with_the_trust_remote_code_warning(tmp_path, workspace):
    from tasks.base_model import resolve_model

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "model.safetensors").write_bytes(b"{}")
    said: list[str] = []
    resolve_model(ModelConfig(name=str(model), trust_remote_code=True), workspace, log=said.append)
    assert any(line.startswith("warning: model.trust_remote_code is true") for line in said)
    said.clear()
    resolve_model(ModelConfig(name=str(model)), workspace, log=said.append)
    assert not any("warning" in line for line in said)


# ---------------------------------------------------------------------------------------------
# The CLI: exit 2 and one line per problem, never a traceback; warnings on stderr
# ---------------------------------------------------------------------------------------------


def validate(*overrides: str, json_output: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sftflow", "config", "validate", str(TINY), *overrides]
    return subprocess.run(command + (["--json"] if json_output else []), capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_cli_refuses_hostile_input_in_one_line_per_problem():
    done = validate("train.learning_rate=[x", "model.name=meta-llama/../../../etc/passwd")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: override train.learning_rate=[x: not valid YAML") and done.stderr.count("\n") == 1
    done = validate("train.max_seq_length=1e23", "model.name=https://example.com/m")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 3 and "2 error(s)" in lines[0]
    assert any(line.startswith("  model.name: 'https://example.com/m' is a URL") for line in lines)
    assert any(line.startswith("  train.max_seq_length: '1e23' is not a whole number") for line in lines)


def test_cli_warns_about_trust_remote_code_on_stderr():
    done = validate("model.trust_remote_code=true", json_output=True)
    assert done.returncode == 0 and json.loads(done.stdout)["valid"] is True
    assert done.stderr.startswith("warning: model.trust_remote_code is true") and done.stderr.count("\n") == 1
    assert "warning" not in validate().stderr
