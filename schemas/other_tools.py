"""Other fine-tuning tools' names for run-config settings, and the hint an unknown key gets.

A run config is strict (`extra="forbid"`), so a key carried over from an Axolotl, LLaMA-Factory,
transformers/TRL or Unsloth config is an error; `unknown_key_hint` turns it into the fix:

    train.sequence_len: unknown field; did you mean train.max_seq_length? (Axolotl's sequence_len)

The hint is looked up in this order: a field of that name in another section of ours (`lr_scheduler`
put under `model`), `OTHER_TOOLS_NAMES` wherever the key was put, then a close spelling among the
section's own fields (difflib), then among every field of the config.

`sftflow config import` (sftflow.config_import) translates whole configs; it keeps its own tables,
because it converts values too, and a test checks the two agree on where each name goes.
"""

from __future__ import annotations

import difflib
from typing import NamedTuple

from pydantic import BaseModel


class OtherName(NamedTuple):
    """Where another tool's key goes in sftflow: `ours` (a dotted run-config key, or an `sftflow ingest`
    option), None when sftflow has no such setting; `origin` says whose name it is; `note` how the value
    translates, or (with ours None) why there is no equivalent."""

    ours: str | None
    origin: str
    note: str = ""


_EVAL_RATIO = "the --eval-ratio option of `sftflow ingest`"
_DATA = "data comes in through `sftflow ingest`; `sftflow config import` writes drop descriptors from it"

OTHER_TOOLS_NAMES: dict[str, OtherName] = {
    # the base model
    "base_model": OtherName("model.name", "Axolotl's base_model"),
    "model_name_or_path": OtherName("model.name", "LLaMA-Factory's and transformers' model_name_or_path"),
    "model_name": OtherName("model.name", "Unsloth's model_name"),
    "model_id": OtherName("model.name", "a common name for the model"),
    "model_revision": OtherName("model.revision", "LLaMA-Factory's model_revision"),
    "revision_of_model": OtherName("model.revision", "Axolotl's revision_of_model"),
    "quantization_bit": OtherName("model.load_in_4bit", "LLaMA-Factory's quantization_bit",
                                  "4 -> true; sftflow quantizes to 4-bit only"),
    "adapter": OtherName("model.load_in_4bit", "Axolotl's adapter", "qlora -> true, lora -> false"),
    "load_in_8bit": OtherName(None, "Axolotl's load_in_8bit",
                              "sftflow loads the base in 4-bit (model.load_in_4bit) or 16-bit only"),
    "template": OtherName("model.chat_template", "LLaMA-Factory's template",
                          "a name of schemas/chat_templates.py or a Jinja template"),
    "chat_template_jinja": OtherName("model.chat_template", "Axolotl's chat_template_jinja",
                                     "the Jinja text itself goes in model.chat_template"),
    "torch_dtype": OtherName("model.dtype", "transformers' torch_dtype"),
    "bf16": OtherName("model.dtype", "the bf16 of Axolotl, LLaMA-Factory and transformers", "true -> bfloat16"),
    "fp16": OtherName("model.dtype", "the fp16 of Axolotl, LLaMA-Factory and transformers", "true -> float16"),
    "flash_attention": OtherName("model.attn_implementation", "Axolotl's flash_attention",
                                 "true -> flash_attention_2"),
    "flash_attn": OtherName("model.attn_implementation", "LLaMA-Factory's flash_attn", "fa2 -> flash_attention_2"),
    # the adapter
    "lora_r": OtherName("lora.r", "Axolotl's lora_r"),
    "lora_rank": OtherName("lora.r", "LLaMA-Factory's lora_rank"),
    "rank": OtherName("lora.r", "a common name for the LoRA rank"),
    "lora_alpha": OtherName("lora.alpha", "the lora_alpha of Axolotl, LLaMA-Factory and peft"),
    "lora_dropout": OtherName("lora.dropout", "the lora_dropout of Axolotl, LLaMA-Factory and peft"),
    "lora_target_modules": OtherName("lora.target_modules", "Axolotl's lora_target_modules"),
    "lora_target": OtherName("lora.target_modules", "LLaMA-Factory's lora_target",
                             "all -> all-linear, a comma list -> a list"),
    "lora_target_linear": OtherName("lora.target_modules", "Axolotl's lora_target_linear", "true -> all-linear"),
    "peft_use_rslora": OtherName("lora.use_rslora", "Axolotl's peft_use_rslora"),
    "peft_use_dora": OtherName("lora.use_dora", "Axolotl's peft_use_dora"),
    "finetuning_type": OtherName(None, "LLaMA-Factory's finetuning_type", "sftflow trains LoRA adapters only"),
    # the run
    "sequence_len": OtherName("train.max_seq_length", "Axolotl's sequence_len"),
    "cutoff_len": OtherName("train.max_seq_length", "LLaMA-Factory's cutoff_len"),
    "max_seq_len": OtherName("train.max_seq_length", "torchtune's max_seq_len"),
    "max_length": OtherName("train.max_seq_length", "TRL's max_length"),
    "sample_packing": OtherName("train.packing", "Axolotl's sample_packing"),
    "neat_packing": OtherName("train.packing", "LLaMA-Factory's neat_packing",
                              "sftflow's packing never attends across rows"),
    "micro_batch_size": OtherName("train.batch_size", "Axolotl's micro_batch_size"),
    "per_device_train_batch_size": OtherName("train.batch_size",
                                             "the per_device_train_batch_size of transformers and LLaMA-Factory"),
    "per_device_eval_batch_size": OtherName("eval.batch_size",
                                            "the per_device_eval_batch_size of transformers and LLaMA-Factory",
                                            "it sizes `sftflow evaluate`'s batches; the eval loss during training "
                                            "runs in train.batch_size batches"),
    "eval_batch_size": OtherName("eval.batch_size", "Axolotl's eval_batch_size",
                                 "it sizes `sftflow evaluate`'s batches; the eval loss during training runs in "
                                 "train.batch_size batches"),
    "num_epochs": OtherName("train.epochs", "Axolotl's num_epochs"),
    "num_train_epochs": OtherName("train.epochs", "the num_train_epochs of transformers and LLaMA-Factory"),
    "lr": OtherName("train.learning_rate", "a common short name"),
    "lr_scheduler_type": OtherName("train.lr_scheduler", "the lr_scheduler_type of transformers and LLaMA-Factory"),
    "warmup_ratio": OtherName("train.warmup_steps", "the warmup_ratio of transformers, Axolotl and LLaMA-Factory",
                              "sftflow counts warmup in steps: ratio x the run's optimizer steps"),
    "optimizer": OtherName("train.optim", "Axolotl's optimizer"),
    "dataloader_num_workers": OtherName("train.dataloader_workers", "transformers' dataloader_num_workers"),
    "disable_gradient_checkpointing": OtherName("train.gradient_checkpointing",
                                                "LLaMA-Factory's disable_gradient_checkpointing", "true -> false"),
    "use_unsloth": OtherName("train.engine", "LLaMA-Factory's use_unsloth", "true -> unsloth"),
    "wandb_project": OtherName("train.report_to", "Axolotl's wandb_project",
                               "[wandb], with the project in WANDB_PROJECT"),
    "output_dir": OtherName(None, "the output_dir of Axolotl, LLaMA-Factory and transformers",
                            "sftflow writes each run under $SFTFLOW_HOME/runs/<run id>"),
    "train_on_inputs": OtherName(None, "Axolotl's train_on_inputs",
                                 "sftflow computes the loss on the assistant turns only"),
    "train_on_prompt": OtherName(None, "LLaMA-Factory's train_on_prompt",
                                 "sftflow computes the loss on the assistant turns only"),
    # the data
    "val_set_size": OtherName(_EVAL_RATIO, "Axolotl's val_set_size", "the split is made when data is ingested"),
    "val_size": OtherName(_EVAL_RATIO, "LLaMA-Factory's val_size", "the split is made when data is ingested"),
    "eval_ratio": OtherName(_EVAL_RATIO, "sftflow's ingest setting", "the split is made when data is ingested"),
    "datasets": OtherName(None, "Axolotl's datasets", _DATA),
    "dataset": OtherName(None, "LLaMA-Factory's dataset", _DATA),
    "dataset_dir": OtherName(None, "LLaMA-Factory's dataset_dir", _DATA),
    "ingest": OtherName(None, "a section of its own", "ingest settings are options of `sftflow ingest` "
                                                      "(--format, --eval-ratio, --max-reject-rate, --max-chars)"),
}


def _fields_by_name(root: type[BaseModel]) -> dict[str, list[str]]:
    """Each field name of the config and its sections -> the dotted keys it is found at."""
    where: dict[str, list[str]] = {}
    for name, info in root.model_fields.items():
        where.setdefault(name, []).append(name)
        section = info.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            for field in section.model_fields:
                where.setdefault(field, []).append(f"{name}.{field}")
    return where


def _section_fields(root: type[BaseModel], section: tuple[str, ...]) -> list[str]:
    model: type[BaseModel] = root
    for part in section:
        info = model.model_fields.get(part)
        if info is None or not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)):
            return []
        model = info.annotation
    return list(model.model_fields)


def _one_of(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " or " + keys[-1]


def unknown_key_hint(root: type[BaseModel], loc: tuple[str, ...]) -> str:
    """The message for an unknown key at `loc` (its section's path, then the key) of a `root` config."""
    section, key = tuple(loc[:-1]), str(loc[-1])
    here = ".".join(section)
    elsewhere = [k for k in _fields_by_name(root).get(key, []) if k.rpartition(".")[0] != here]
    if elsewhere:
        return f"unknown field here; did you mean {_one_of(elsewhere)}?"
    other = OTHER_TOOLS_NAMES.get(key)
    if other is not None:
        if other.ours is None:
            return f"unknown field; sftflow has no equivalent ({other.origin}): {other.note}"
        note = f"; {other.note}" if other.note else ""
        return f"unknown field; did you mean {other.ours}? ({other.origin}{note})"
    close = difflib.get_close_matches(key, _section_fields(root, section), n=2, cutoff=0.7)
    if close:
        return f"unknown field; did you mean {_one_of([f'{here}.{c}' if here else c for c in close])}?"
    every = [k for keys in _fields_by_name(root).values() for k in keys]
    close = difflib.get_close_matches(key, [k.rpartition(".")[2] for k in every], n=1, cutoff=0.75)
    if close:
        return f"unknown field; did you mean {_one_of(_fields_by_name(root)[close[0]])}?"
    return "unknown field (check the spelling)"
