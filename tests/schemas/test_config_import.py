"""`sftflow config import` and the "did you mean" hints of unknown run-config keys.

The fixtures are small configs of the two tools' usual shape (an Axolotl QLoRA run with a ShareGPT-style
chat_template dataset and an alpaca one; a LLaMA-Factory QLoRA SFT run with a dataset_dir and its
dataset_info.json), written here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from foundation.errors import ConfigError
from schemas.config import RunConfig, load_run_config
from schemas.other_tools import OTHER_TOOLS_NAMES
from sftflow.config_import import AXOLOTL_RENAMES, LLAMAFACTORY_RENAMES, import_config, report_text
from tasks.ingest.descriptor import read_descriptor
from tests.conftest import ROOT

AXOLOTL_QLORA = """\
base_model: NousResearch/Meta-Llama-3.1-8B-Instruct
model_type: AutoModelForCausalLM
tokenizer_type: AutoTokenizer
load_in_8bit: false
load_in_4bit: true
strict: false
chat_template: llama3
datasets:
  - path: data/chats
    type: chat_template
    field_messages: conversation
    message_property_mappings:
      role: from
      content: value
    roles:
      user: [human]
      assistant: [gpt, bot]
    roles_to_train: [assistant]
    train_on_eos: turn
    split: train
  - path: data/alpaca.jsonl
    type: alpaca
    ds_type: json
  - path: data/qa.jsonl
    type:
      field_system: sys
      field_instruction: question
      field_output: answer
      format: "[INST] {instruction} [/INST]"
  - path: someorg/segments
    type: input_output
dataset_prepared_path: last_run_prepared
val_set_size: 0.05
output_dir: ./outputs/qlora-out
adapter: qlora
lora_model_dir:
sequence_len: 4096
sample_packing: true
pad_to_sequence_len: true
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
wandb_project:
gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 3
optimizer: adamw_bnb_8bit
lr_scheduler: cosine
learning_rate: 2e-4
train_on_inputs: false
bf16: auto
gradient_checkpointing: true
logging_steps: 1
flash_attention: true
warmup_ratio: 0.1
evals_per_epoch: 4
weight_decay: 0.0
special_tokens:
  pad_token: "<|end_of_text|>"
"""

LLAMAFACTORY_QLORA = """\
### model
model_name_or_path: Qwen/Qwen2.5-7B-Instruct
quantization_bit: 4
quantization_method: bitsandbytes

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 16
lora_target: all

### dataset
dataset: support_chats,faq,not_described
dataset_dir: data
template: qwen
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/qwen2.5-7b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true

### train
per_device_train_batch_size: 2
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""

DATASET_INFO = {
    "support_chats": {
        "file_name": "support.json",
        "formatting": "sharegpt",
        "columns": {"messages": "dialog", "system": "sys", "tools": "tool_defs"},
        "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "customer", "assistant_tag": "agent"},
    },
    "faq": {"file_name": "faq.jsonl",
            "columns": {"prompt": "question", "query": "context", "response": "answer", "images": "pics"}},
}


@pytest.fixture
def axolotl_yaml(tmp_path):
    (tmp_path / "data" / "chats").mkdir(parents=True)
    (tmp_path / "data" / "chats" / "part-0.jsonl").write_text("")
    (tmp_path / "data" / "alpaca.jsonl").write_text("")
    (tmp_path / "data" / "qa.jsonl").write_text("")
    path = tmp_path / "llama31_qlora.yml"
    path.write_text(AXOLOTL_QLORA)
    return path


@pytest.fixture
def llamafactory_yaml(tmp_path):
    data = tmp_path / "lf" / "data"
    data.mkdir(parents=True)
    (data / "dataset_info.json").write_text(json.dumps(DATASET_INFO))
    (data / "support.json").write_text("[]")
    (data / "faq.jsonl").write_text("")
    path = tmp_path / "lf" / "qwen_qlora_sft.yaml"
    path.write_text(LLAMAFACTORY_QLORA)
    return path


def _descriptor(result, name):
    """A written drop.yaml, after the reader of `sftflow ingest --map` has accepted it."""
    path = result.descriptor_paths[name]
    entry, = read_descriptor(str(path)).entries
    assert entry.files == ("*",)  # the ingest command names the data itself
    return yaml.safe_load(path.read_text())


def _unmapped(result):
    return {u.source: u.why for u in result.imported.unmapped}


def test_axolotl_qlora_becomes_a_run_config_that_loads(axolotl_yaml, tmp_path):
    result = import_config("axolotl", axolotl_yaml, tmp_path / "out")
    config = load_run_config(result.config_path)
    assert result.config_path == tmp_path / "out" / "llama31_qlora.yaml"
    assert config.name == "llama31_qlora"
    assert config.model.name == "NousResearch/Meta-Llama-3.1-8B-Instruct"
    assert config.model.load_in_4bit is True and config.model.chat_template == "llama3"
    assert config.model.attn_implementation == "flash_attention_2" and config.model.dtype == "auto"
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (32, 16, 0.05)
    assert config.lora.target_modules == "all-linear"
    t = config.train
    assert (t.max_seq_length, t.packing, t.batch_size, t.gradient_accumulation_steps) == (4096, True, 2, 4)
    assert (t.epochs, t.learning_rate, t.lr_scheduler, t.optim) == (3.0, 2e-4, "cosine", "adamw_bnb_8bit")
    assert t.warmup_steps == 0  # warmup_ratio is not guessed into steps
    mapped = {(m.source, m.target): m.value for m in result.imported.mapped}
    assert mapped[("sequence_len", "train.max_seq_length")] == 4096
    assert mapped[("val_set_size", "ingest --eval-ratio")] == 0.05
    # the header says how to run it and what was not carried over
    lines = result.config_path.read_text().splitlines()
    assert lines[1].strip() == f"#   sftflow train --config {result.config_path}"
    assert any(line.startswith("#   warmup_ratio:") for line in lines)


@pytest.mark.parametrize("tool, key", [("axolotl", "peft_use_dora"), ("llamafactory", "use_dora")])
def test_a_dora_run_imports_without_the_lora_gguf_llama_cpp_cannot_hold(tool, key, axolotl_yaml, llamafactory_yaml,
                                                                          tmp_path):
    source = axolotl_yaml if tool == "axolotl" else llamafactory_yaml
    source.write_text(source.read_text() + f"{key}: true\n")
    result = import_config(tool, source, tmp_path / "out")
    config = load_run_config(result.config_path)
    assert config.lora.use_dora and config.export.lora_gguf is False
    mapped = {(m.source, m.target): m for m in result.imported.mapped}
    assert "DoRA" in mapped[(key, "export.lora_gguf")].note


def test_axolotl_datasets_become_drop_descriptors(axolotl_yaml, tmp_path):
    result = import_config("axolotl", axolotl_yaml, tmp_path / "out")
    assert sorted(result.descriptor_paths) == ["alpaca", "chats", "qa"]
    assert result.descriptor_paths["chats"] == tmp_path / "out" / "drops" / "chats" / "drop.yaml"
    assert _descriptor(result, "chats") == {
        "format": "openai",
        "columns": {"messages": "conversation"},
        "message_keys": {"role": "from", "content": "value"},
        "roles": {"human": "user", "gpt": "assistant", "bot": "assistant"},
    }
    assert _descriptor(result, "alpaca") == {"format": "alpaca"}
    assert _descriptor(result, "qa") == {"format": "alpaca",
                                         "columns": {"system": "sys", "instruction": "question", "output": "answer"}}
    commands = {d.name: result.ingest_command(d) for d in result.imported.drops}
    assert commands["chats"] == (f"sftflow ingest {tmp_path / 'data' / 'chats'} --map "
                                 f"{result.descriptor_paths['chats']} --eval-ratio 0.05")
    text = report_text(result)
    assert commands["alpaca"] in text and result.train_command() in text
    assert result.train_command() == f"sftflow train --config {result.config_path}"


def test_axolotl_keys_without_equivalent_are_listed_with_why(axolotl_yaml, tmp_path):
    unmapped = _unmapped(import_config("axolotl", axolotl_yaml, tmp_path / "out"))
    assert "steps" in unmapped["warmup_ratio"]
    assert "$SFTFLOW_HOME/runs" in unmapped["output_dir"]
    assert "input_output" in unmapped["datasets[3].type"]
    assert "prompt string" in unmapped["datasets[2].type.format"]
    assert "every row" in unmapped["datasets[0].split"]
    assert set(unmapped) >= {"model_type", "tokenizer_type", "special_tokens", "evals_per_epoch",
                             "dataset_prepared_path", "pad_to_sequence_len"}
    # keys left empty in the source carry nothing and are not listed
    assert "lora_model_dir" not in unmapped and "wandb_project" not in unmapped


def test_a_chat_dataset_with_a_system_column_is_read_as_sharegpt(tmp_path):
    ax = tmp_path / "ax.yaml"  # the openai format reads no system column; sharegpt's reads it beside the turns
    ax.write_text("base_model: m/x\nadapter: qlora\ndatasets:\n  - {path: chats.jsonl, type: chat_template, "
                  "field_system: sys}\n")
    (tmp_path / "chats.jsonl").write_text("")
    result = import_config("axolotl", ax, tmp_path / "out")
    assert _descriptor(result, "chats") == {"format": "sharegpt",
                                            "columns": {"conversations": "messages", "system": "sys"}}


def test_hub_datasets_are_ingested_from_the_local_hub_cache(tmp_path):
    ax = tmp_path / "ax.yaml"
    ax.write_text("base_model: m/x\nadapter: qlora\ndatasets:\n  - {path: someorg/chats, type: chat_template, "
                  "data_files: [train.jsonl], revision: v2}\n")
    drop, = import_config("axolotl", ax, tmp_path / "ax").imported.drops
    assert drop.data == ["hf://datasets/someorg/chats@v2/train.jsonl"]
    assert "hf download --repo-type dataset someorg/chats --revision v2" in drop.note
    info = tmp_path / "data"
    info.mkdir()
    (info / "dataset_info.json").write_text(json.dumps({"hub": {"hf_hub_url": "someorg/faq"}}))
    lf = tmp_path / "lf.yaml"
    lf.write_text("model_name_or_path: m/x\ndataset: hub\n")
    drop, = import_config("llamafactory", lf, tmp_path / "lf").imported.drops
    assert drop.data == ["hf://datasets/someorg/faq"] and "never downloads" in drop.note


def test_llamafactory_qlora_sft_with_its_dataset_info(llamafactory_yaml, tmp_path):
    result = import_config("llamafactory", llamafactory_yaml, tmp_path / "out")
    config = load_run_config(result.config_path)
    assert config.model.name == "Qwen/Qwen2.5-7B-Instruct" and config.model.load_in_4bit is True
    assert config.model.chat_template == "qwen2.5" and config.model.dtype == "bfloat16"
    assert (config.lora.r, config.lora.alpha, config.lora.target_modules) == (16, 32, "all-linear")
    t = config.train
    assert (t.max_seq_length, t.batch_size, t.gradient_accumulation_steps, t.epochs) == (2048, 2, 8, 3.0)
    assert (t.learning_rate, t.lr_scheduler, t.logging_steps, t.save_steps, t.eval_steps) == (1e-4, "cosine", 10, 500, 500)
    assert config.eval.batch_size == RunConfig(name="x", model={"name": "x"}).eval.batch_size  # not LLaMA-Factory's 1

    data = llamafactory_yaml.parent / "data"
    assert _descriptor(result, "support_chats") == {
        "format": "sharegpt",
        "columns": {"conversations": "dialog", "system": "sys", "tools": "tool_defs"},
        "message_keys": {"role": "speaker", "content": "text"},
        "roles": {"customer": "user", "agent": "assistant"},
    }
    assert _descriptor(result, "faq") == {  # images carried so that ingest quarantines the rows with pictures
        "format": "alpaca",
        "columns": {"instruction": "question", "input": "context", "output": "answer", "images": "pics"},
    }
    drops = {d.name: d for d in result.imported.drops}
    assert drops["support_chats"].data == [str(data / "support.json")]
    assert result.ingest_command(drops["faq"]).endswith("--eval-ratio 0.1")

    unmapped = _unmapped(result)
    assert "not in" in unmapped["dataset: not_described"]
    assert "quarantines" in unmapped["dataset_info.json:faq.columns.images"]
    assert set(unmapped) >= {"warmup_ratio", "output_dir", "max_samples", "plot_loss", "eval_strategy",
                             "per_device_eval_batch_size"}


def test_llamafactory_without_dataset_info_lists_each_dataset(llamafactory_yaml, tmp_path):
    (llamafactory_yaml.parent / "data" / "dataset_info.json").unlink()
    result = import_config("llamafactory", llamafactory_yaml, tmp_path / "out")
    unmapped = _unmapped(result)
    for name in ("support_chats", "faq", "not_described"):
        assert "dataset_info.json" in unmapped[f"dataset: {name}"]
    assert result.imported.drops == [] and load_run_config(result.config_path).model.name


def test_lora_without_quantization_is_a_16_bit_base(tmp_path):
    lf = tmp_path / "lf.yaml"
    lf.write_text("model_name_or_path: m/x\nfinetuning_type: lora\nlora_target: q_proj,v_proj\ntemplate: vicuna\n")
    result = import_config("llamafactory", lf, tmp_path / "lf")
    config = load_run_config(result.config_path)
    assert config.model.load_in_4bit is False  # sftflow's default would quantize on CUDA
    assert config.lora.target_modules == ["q_proj", "v_proj"] and (config.lora.r, config.lora.alpha) == (8, 16)
    assert config.model.chat_template is None and "vicuna" in _unmapped(result)["template"]
    ax = tmp_path / "ax.yaml"
    ax.write_text("base_model: m/x\nadapter: lora\nlora_target_modules: [q_proj, v_proj]\n")
    config = load_run_config(import_config("axolotl", ax, tmp_path / "ax").config_path)
    assert config.model.load_in_4bit is False and config.lora.target_modules == ["q_proj", "v_proj"]


def test_a_value_our_config_refuses_moves_to_the_report(tmp_path):
    ax = tmp_path / "ax.yaml"
    ax.write_text("base_model: m/x\nadapter: qlora\nlora_dropout: 1.0\nlr_scheduler: one_cycle\nsave_steps: 0.25\n")
    result = import_config("axolotl", ax, tmp_path / "out")
    unmapped = _unmapped(result)
    assert "lora.dropout" in unmapped["lora_dropout"]
    assert "linear, cosine" in unmapped["lr_scheduler"] and "fraction" in unmapped["save_steps"]
    assert load_run_config(result.config_path).lora.dropout == 0.0


def test_no_base_model_is_an_error_naming_it(tmp_path):
    ax = tmp_path / "ax.yaml"
    ax.write_text("adapter: qlora\nlora_r: 8\n")
    with pytest.raises(ConfigError, match=r"ax.yaml: base_model: missing; name the base model"):
        import_config("axolotl", ax, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_unless_forced(axolotl_yaml, tmp_path):
    out = tmp_path / "out"
    first = import_config("axolotl", axolotl_yaml, out)
    first.config_path.write_text("# mine\n")
    with pytest.raises(ConfigError) as info:
        import_config("axolotl", axolotl_yaml, out)
    message = str(info.value)
    assert str(first.config_path) in message and "--force" in message and "--out" in message
    assert first.config_path.read_text() == "# mine\n"
    import_config("axolotl", axolotl_yaml, out, force=True)
    assert load_run_config(first.config_path).name == "llama31_qlora"


def test_importer_renames_agree_with_the_did_you_mean_table():
    for renames in (AXOLOTL_RENAMES, LLAMAFACTORY_RENAMES):
        for key, (target, _) in renames.items():
            if key in OTHER_TOOLS_NAMES:
                assert OTHER_TOOLS_NAMES[key].ours == target, key
            else:
                assert target.rpartition(".")[2] == key or key in ("dataloader_num_workers",), key


# ---------------------------------------------------------------------------------------------
# Did you mean
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("yaml_text, expected", [
    ("train: {sequence_len: 4096}",
     "train.sequence_len: unknown field; did you mean train.max_seq_length? (Axolotl's sequence_len)"),
    ("cutoff_len: 2048", "cutoff_len: unknown field; did you mean train.max_seq_length? (LLaMA-Factory's cutoff_len)"),
    ("lora: {lora_r: 8}", "lora.lora_r: unknown field; did you mean lora.r? (Axolotl's lora_r)"),
    ("lora: {lora_rank: 8}", "lora.lora_rank: unknown field; did you mean lora.r? (LLaMA-Factory's lora_rank)"),
    ("train: {per_device_train_batch_size: 2}",
     "train.per_device_train_batch_size: unknown field; did you mean train.batch_size?"),
    ("train: {micro_batch_size: 2}", "train.micro_batch_size: unknown field; did you mean train.batch_size?"),
    ("num_train_epochs: 3", "num_train_epochs: unknown field; did you mean train.epochs?"),
    ("train: {lr: 0.001}", "train.lr: unknown field; did you mean train.learning_rate?"),
    ("train: {lr_scheduler_type: cosine}", "train.lr_scheduler_type: unknown field; did you mean train.lr_scheduler?"),
    ("base_model: x", "base_model: unknown field; did you mean model.name? (Axolotl's base_model)"),
    ("model: {name: x, quantization_bit: 4}", "model.quantization_bit: unknown field; did you mean model.load_in_4bit?"),
    ("lora: {lora_target: all}", "lora.lora_target: unknown field; did you mean lora.target_modules?"),
    ("template: llama3", "template: unknown field; did you mean model.chat_template?"),
    ("val_set_size: 0.05", "val_set_size: unknown field; did you mean the --eval-ratio option of `sftflow ingest`?"),
    ("train: {warmup_ratio: 0.1}", "train.warmup_ratio: unknown field; did you mean train.warmup_steps?"),
    ("optimizer: adamw_8bit", "optimizer: unknown field; did you mean train.optim? (Axolotl's optimizer)"),
    ("output_dir: out", "output_dir: unknown field; sftflow has no equivalent"),
    # our own key in the wrong section
    ("learning_rate: 0.001", "learning_rate: unknown field here; did you mean train.learning_rate?"),
    ("load_in_4bit: true", "load_in_4bit: unknown field here; did you mean model.load_in_4bit?"),
    ("model: {name: x, max_seq_length: 512}",
     "model.max_seq_length: unknown field here; did you mean train.max_seq_length?"),
    # typos
    ("train: {epoch: 2}", "train.epoch: unknown field; did you mean train.epochs?"),
    ("train: {learnig_rate: 0.001}", "train.learnig_rate: unknown field; did you mean train.learning_rate?"),
    ("gradient_acumulation_steps: 4",
     "gradient_acumulation_steps: unknown field; did you mean train.gradient_accumulation_steps?"),
    ("model: {name: x, colour: red}", "model.colour: unknown field (check the spelling)"),
])
def test_unknown_keys_get_a_did_you_mean(tmp_path, yaml_text, expected):
    path = tmp_path / "c.yaml"
    data = yaml.safe_load(yaml_text)
    data.setdefault("name", "x")
    data.setdefault("model", {"name": "x"})
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    assert f"  {expected}" in str(info.value)


def _sftflow(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sftflow", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=60)


def test_config_validate_prints_one_line_per_problem_and_exits_2(tmp_path):
    path = tmp_path / "axolotl_style.yaml"
    path.write_text("name: x\nbase_model: m/x\nmodel: {name: m/x}\nsequence_len: 4096\ntrain: {lora_r: 8}\n")
    proc = _sftflow("config", "validate", str(path))
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    first, *problems = proc.stderr.splitlines()
    assert first == f"error: {path}: 3 error(s)"
    assert sorted(problems) == [
        "  base_model: unknown field; did you mean model.name? (Axolotl's base_model)",
        "  sequence_len: unknown field; did you mean train.max_seq_length? (Axolotl's sequence_len)",
        "  train.lora_r: unknown field; did you mean lora.r? (Axolotl's lora_r)",
    ]


def test_config_import_cli_emits_json_and_starts_no_prefect(llamafactory_yaml, tmp_path):
    out = tmp_path / "imported"
    home = tmp_path / "home"
    script = ("import runpy, sys\n"
              f"sys.argv = ['sftflow', 'config', 'import', 'llamafactory', {str(llamafactory_yaml)!r}, '--out', "
              f"{str(out)!r}, '--json']\n"
              "try:\n    runpy.run_module('sftflow', run_name='__main__')\n"
              "except SystemExit as exc:\n    code = exc.code\n"
              "print('prefect imported:', 'prefect' in sys.modules, file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "SFTFLOW_HOME": str(home)})
    assert "prefect imported: False" in proc.stderr, proc.stderr
    report = json.loads(proc.stdout)
    assert report["config"] == str(out / "qwen_qlora_sft.yaml")
    assert {"from": "cutoff_len", "to": "train.max_seq_length", "value": 2048, "note": ""} in report["mapped"]
    assert any(u["key"] == "warmup_ratio" for u in report["not_mapped"])
    assert [d["name"] for d in report["drops"]] == ["support_chats", "faq"]
    assert report["drops"][1]["ingest_command"].startswith("sftflow ingest ")
    assert report["train_command"] == f"sftflow train --config {out / 'qwen_qlora_sft.yaml'}"
    assert not home.exists()  # no workspace, no stack

    again = _sftflow("config", "import", "llamafactory", str(llamafactory_yaml), "--out", str(out))
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip() == (f"error: {out / 'qwen_qlora_sft.yaml'}: exists (and 2 more); pass --force to "
                                    "overwrite, or choose another --out")
