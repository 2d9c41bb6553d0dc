"""`sftflow config import axolotl|llamafactory FILE`: another tool's training config -> a sftflow run
config, one drop descriptor per dataset it names, and a report of what was mapped (their key -> our key
= value) and what has no equivalent (each key, with why).

    translate_axolotl(config, base_dir, name)                    a parsed config in, an `Imported` out
    translate_llamafactory(config, dataset_info, info_path, name)
    import_config(tool, file, out, force)    reads, translates, checks, writes (never over existing files
                                             unless forced) and returns what it wrote (`ImportResult`)

A value is carried over only when it means the same thing here: `warmup_ratio` needs the run's step
count, which depends on the data, so it is reported, not guessed. A value our config refuses
(say `lora_dropout: 1.0`) moves to the report with the reason, so the written config always loads.

Drop descriptors follow the contract of tasks/ingest/descriptor.py (`sftflow ingest DATA --map drop.yaml`):
`columns` maps OUR field -> the data's column, `message_keys` our turn key -> the data's, `roles` the
data's role name -> ours. No Prefect or torch here: the command runs without the stack.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import ValidationError

from foundation.atomic import write_bytes_atomic
from foundation.errors import ConfigError
from schemas.chat_templates import CHAT_TEMPLATES, is_jinja
from schemas.config import RunConfig, TrainConfig, load_run_config
from schemas.other_tools import OTHER_TOOLS_NAMES
from tasks.ingest.descriptor import ROLES, TURN_KEYS, parse_descriptor

TOOLS = {"axolotl": "Axolotl", "llamafactory": "LLaMA-Factory"}
_TOOL_ALIASES = {"llama-factory": "llamafactory", "llama_factory": "llamafactory"}

_SCHEDULERS = TrainConfig.model_fields["lr_scheduler"].annotation.__args__  # linear, cosine, ...

# Their chat template name -> ours (schemas/chat_templates.py), where the two render the same format.
AXOLOTL_TEMPLATES = {"llama3": "llama3", "chatml": "chatml", "qwen_25": "qwen2.5", "gemma": "gemma",
                     "gemma3": "gemma", "phi_3": "phi3", "mistral_v1": "mistral"}
LLAMAFACTORY_TEMPLATES = {"llama3": "llama3", "chatml": "chatml", "qwen": "qwen2.5", "gemma": "gemma",
                          "gemma3": "gemma", "phi": "phi3", "mistral": "mistral"}
_TEMPLATE_NOTES = {"mistral": "sftflow's mistral template writes '[INST] user [/INST]answer</s>', as "
                              "Mistral-7B-Instruct-v0.1 does; LLaMA-Factory's spaces it '[INST] user[/INST] answer</s>'"}


# ---------------------------------------------------------------------------------------------
# What an import produced
# ---------------------------------------------------------------------------------------------

@dataclass
class Mapped:
    source: str  # their key
    target: str | None  # our dotted key, an ingest option or a descriptor; None: what sftflow does anyway
    value: Any
    note: str = ""


@dataclass
class Unmapped:
    source: str
    why: str


@dataclass
class Drop:
    name: str  # drops/<name>/drop.yaml
    descriptor: dict
    data: list[str]  # the paths to ingest with it
    note: str = ""  # e.g. where the data is not local


@dataclass
class Imported:
    tool: str
    name: str  # of the run config, and its file name
    config: dict  # the run config as written
    drops: list[Drop] = field(default_factory=list)
    mapped: list[Mapped] = field(default_factory=list)
    unmapped: list[Unmapped] = field(default_factory=list)
    eval_ratio: float | None = None  # for `sftflow ingest --eval-ratio`
    system: str | None = None  # a default system prompt for every drop

    def set(self, source: str, target: str, value: Any, note: str = "") -> None:
        node = self.config
        *sections, key = target.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = value
        self.mapped.append(Mapped(source, target, value, note))

    def same(self, source: str, value: Any, note: str) -> None:
        self.mapped.append(Mapped(source, None, value, note))

    def skip(self, source: str, why: str) -> None:
        self.unmapped.append(Unmapped(source, why))


@dataclass
class ImportResult:
    """What `import_config` wrote, and the commands to run next."""

    imported: Imported
    source: Path
    out: Path
    config_path: Path
    descriptor_paths: dict[str, Path]

    def ingest_command(self, drop: Drop) -> str:
        ratio = f" --eval-ratio {self.imported.eval_ratio:g}" if self.imported.eval_ratio is not None else ""
        data = " ".join(shlex.quote(d) for d in drop.data)
        return f"sftflow ingest {data} --map {shlex.quote(str(self.descriptor_paths[drop.name]))}{ratio}"

    def train_command(self) -> str:
        return f"sftflow train --config {shlex.quote(str(self.config_path))}"

    def dump(self) -> dict:
        imp = self.imported
        return {
            "tool": imp.tool,
            "source": str(self.source),
            "out": str(self.out),
            "config": str(self.config_path),
            "name": imp.name,
            "mapped": [{"from": m.source, "to": m.target, "value": m.value, "note": m.note} for m in imp.mapped],
            "not_mapped": [{"key": u.source, "why": u.why} for u in imp.unmapped],
            "drops": [{"name": d.name, "descriptor": str(self.descriptor_paths[d.name]), "data": d.data,
                       "note": d.note, "ingest_command": self.ingest_command(d)} for d in imp.drops],
            "train_command": self.train_command(),
        }


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------

def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("not a whole number")
    try:
        number = float(value)
    except ValueError:
        raise ValueError("not a whole number") from None
    if not number.is_integer():
        raise ValueError("not a whole number")
    return int(number)


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("not a number")
    try:
        return float(value)  # YAML reads 2e-4 (no dot) as a string
    except (TypeError, ValueError):
        raise ValueError("not a number") from None


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("not true or false")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError("not a string")
    return str(value)


def _steps(value: Any) -> int:
    if isinstance(value, float) and 0 < value < 1:
        raise ValueError("a fraction of the run; sftflow takes a step count")
    return _int(value)


def _name(text: str, fallback: str = "imported") -> str:
    """`text` as a run or drop name: letters, digits, . _ - only, starting with a letter or digit."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:64]
    return name or fallback


# Their key -> (our key, converter), for keys that only change name. Values are converted, not guessed.
Renames = dict[str, tuple[str, Callable[[Any], Any]]]

_TRAINING_ARGUMENTS: Renames = {  # transformers' names, which both tools take as they are
    "gradient_accumulation_steps": ("train.gradient_accumulation_steps", _int),
    "max_steps": ("train.max_steps", _int),
    "learning_rate": ("train.learning_rate", _float),
    "warmup_steps": ("train.warmup_steps", _int),
    "weight_decay": ("train.weight_decay", _float),
    "max_grad_norm": ("train.max_grad_norm", _float),
    "seed": ("train.seed", _int),
    "logging_steps": ("train.logging_steps", _steps),
    "save_steps": ("train.save_steps", _steps),
    "eval_steps": ("train.eval_steps", _steps),
    "save_total_limit": ("train.save_total_limit", _int),
    "dataloader_num_workers": ("train.dataloader_workers", _int),
    "trust_remote_code": ("model.trust_remote_code", _bool),
}

AXOLOTL_RENAMES: Renames = {
    **_TRAINING_ARGUMENTS,
    "base_model": ("model.name", _str),
    "revision_of_model": ("model.revision", _str),
    "lora_r": ("lora.r", _int),
    "lora_alpha": ("lora.alpha", _int),
    "lora_dropout": ("lora.dropout", _float),
    "peft_use_rslora": ("lora.use_rslora", _bool),
    "peft_use_dora": ("lora.use_dora", _bool),
    "sequence_len": ("train.max_seq_length", _int),
    "sample_packing": ("train.packing", _bool),
    "micro_batch_size": ("train.batch_size", _int),
    "num_epochs": ("train.epochs", _float),
    "optimizer": ("train.optim", _str),
}

LLAMAFACTORY_RENAMES: Renames = {
    **_TRAINING_ARGUMENTS,
    "model_name_or_path": ("model.name", _str),
    "model_revision": ("model.revision", _str),
    "lora_rank": ("lora.r", _int),
    "lora_alpha": ("lora.alpha", _int),
    "lora_dropout": ("lora.dropout", _float),
    "use_rslora": ("lora.use_rslora", _bool),
    "use_dora": ("lora.use_dora", _bool),
    "cutoff_len": ("train.max_seq_length", _int),
    "packing": ("train.packing", _bool),
    "neat_packing": ("train.packing", _bool),
    "per_device_train_batch_size": ("train.batch_size", _int),
    "num_train_epochs": ("train.epochs", _float),
    "optim": ("train.optim", _str),
}

_RENAME_NOTES = {
    "packing": "sftflow's packing never attends across rows (LLaMA-Factory's neat_packing)",
}

# Why a key has no equivalent, beyond those of schemas.other_tools.
_LOADER = "sftflow loads the model and tokenizer with the Auto classes from model.name"
_ONE_HOST = "sftflow trains on one host, data-parallel over train.num_gpus GPUs"
_EVAL_BATCH = ("the eval loss during training runs in train.batch_size batches; eval.batch_size sizes those of "
               "`sftflow evaluate`")
_TOKENIZES = "sftflow tokenizes the dataset version itself for each run"
_NO_EQUIVALENT = {
    "base_model_config": _LOADER, "tokenizer_config": _LOADER, "model_type": _LOADER, "tokenizer_type": _LOADER,
    "tokenizer_use_fast": _LOADER, "tokenizer_legacy": _LOADER, "is_llama_derived_model": _LOADER,
    "strict": "sftflow's run config is always strict",
    "special_tokens": "sftflow trains with the tokenizer as it is; add tokens to the model first",
    "tokens": "sftflow trains with the tokenizer as it is; add tokens to the model first",
    "resize_vocab": "sftflow trains with the tokenizer as it is; add tokens to the model first",
    "deepspeed": _ONE_HOST, "fsdp": _ONE_HOST, "fsdp_config": _ONE_HOST, "ddp_timeout": _ONE_HOST,
    "local_rank": _ONE_HOST, "world_size": _ONE_HOST,
    "resume_from_checkpoint": "a retried sftflow run resumes from its last checkpoint by itself",
    "auto_resume_from_checkpoints": "a retried sftflow run resumes from its last checkpoint by itself",
    "dataset_prepared_path": _TOKENIZES, "overwrite_cache": _TOKENIZES, "tokenized_path": _TOKENIZES,
    "preprocessing_num_workers": _TOKENIZES, "dataset_processes": _TOKENIZES,
    "overwrite_output_dir": "each sftflow run has a directory of its own",
    "logging_dir": "each sftflow run has a directory of its own; TensorBoard logs go there",
    "plot_loss": "the loss is in the run's TensorBoard logs and summary",
    "max_samples": "sftflow trains on the whole dataset version; ingest fewer rows to train on fewer",
    "eval_dataset": "sftflow holds its eval split out of the same drops (--eval-ratio of `sftflow ingest`)",
    "test_datasets": "sftflow holds its eval split out of the same drops (--eval-ratio of `sftflow ingest`)",
    "eval_strategy": "sftflow evaluates every train.eval_steps steps, or at the end",
    "evals_per_epoch": "sftflow evaluates every train.eval_steps steps, or at the end",
    "saves_per_epoch": "sftflow checkpoints every train.save_steps steps",
    "early_stopping_patience": "sftflow runs the configured steps; the promotion gate judges the result",
    "hub_model_id": "`sftflow publish` uploads to publish.hub_repo",
    "push_to_hub": "`sftflow publish` uploads to publish.hub_repo",
    "pure_bf16": "sftflow computes in model.dtype (auto, bfloat16, float16, float32)",
    "xformers_attention": "sftflow's attention kernels: model.attn_implementation (auto, sdpa, eager, "
                          "flex_attention, flash_attention_2)",
    "lora_modules_to_save": "sftflow trains and saves only the LoRA matrices",
    "additional_target": "sftflow trains and saves only the LoRA matrices",
    "lora_model_dir": "sftflow starts a new adapter for each run",
    "adapter_name_or_path": "sftflow starts a new adapter for each run",
    "do_eval": "sftflow evaluates every run (`sftflow evaluate`)",
    "do_predict": "sftflow evaluates every run (`sftflow evaluate`)",
    "group_by_length": "sftflow batches rows itself; train.packing fills each sequence instead",
    "pad_to_sequence_len": "sftflow batches rows itself; train.packing fills each sequence instead",
    "mix_strategy": "every ingested drop joins the one dataset version",
    "interleave_probs": "every ingested drop joins the one dataset version",
    "streaming": "sftflow ingests data before training",
    "per_device_eval_batch_size": _EVAL_BATCH, "eval_batch_size": _EVAL_BATCH,
    "eval_max_new_tokens": "eval.max_new_tokens limits the answers `sftflow evaluate` generates (default 128)",
    "enable_thinking": "sftflow renders each row's reasoning (reasoning_content) as the model's chat template does",
}
_NO_EQUIVALENT_DEFAULT = "no equivalent in sftflow's run config"


def _why_not(key: str) -> str:
    if key in _NO_EQUIVALENT:
        return _NO_EQUIVALENT[key]
    other = OTHER_TOOLS_NAMES.get(key)
    if other is not None and other.ours is None:
        return other.note
    if key.startswith(("wandb_", "mlflow_", "comet_")):
        return "trackers are train.report_to (tensorboard, mlflow, wandb, ...), configured by their environment variables"
    if key.startswith("unsloth_"):
        return "train.engine: unsloth runs Unsloth's own kernels"
    return _NO_EQUIVALENT_DEFAULT


def _rename(imp: Imported, key: str, value: Any, renames: Renames) -> None:
    target, convert = renames[key]
    try:
        converted = convert(value)
    except ValueError as exc:
        imp.skip(key, f"{value!r} is {exc}")
        return
    if key == "max_steps" and converted <= 0:  # transformers' -1: train by epochs
        imp.same(key, value, "train by epochs (train.max_steps unset)")
        return
    imp.set(key, target, converted, _RENAME_NOTES.get(key, ""))


def _chat_template(imp: Imported, key: str, value: Any, names: dict[str, str], tool: str) -> None:
    if value in names:
        ours = names[value]
        imp.set(key, "model.chat_template", ours, _TEMPLATE_NOTES.get(ours, "") if tool == "llamafactory" else "")
    elif value == "tokenizer_default":
        imp.same(key, value, "model.chat_template unset: the tokenizer's own template")
    elif isinstance(value, str) and is_jinja(value):
        imp.set(key, "model.chat_template", value)
    else:
        imp.skip(key, f"no template named {value!r} here: name one of {', '.join(CHAT_TEMPLATES)} as "
                      "model.chat_template, paste its Jinja there, or leave it unset for the tokenizer's own")


def _lr_scheduler(imp: Imported, key: str, value: Any) -> None:
    if value in _SCHEDULERS:
        imp.set(key, "train.lr_scheduler", value)
    else:
        imp.skip(key, f"sftflow's schedules are {', '.join(_SCHEDULERS)}")


def _eval_ratio(imp: Imported, key: str, value: Any) -> None:
    try:
        ratio = _float(value)
    except ValueError:
        ratio = -1.0
    if 0 < ratio < 1:
        imp.eval_ratio = ratio
        imp.mapped.append(Mapped(key, "ingest --eval-ratio", ratio, "the split is made when data is ingested; "
                                 "keep one ratio for the life of a workspace's datasets"))
    elif ratio == 0:
        imp.skip(key, "sftflow always holds out an eval split (sftflow ingest --eval-ratio, default 0.1)")
    else:
        imp.skip(key, f"{value!r} is not a share between 0 and 1; pass one to sftflow ingest --eval-ratio")


def _dtype(imp: Imported, config: dict) -> None:
    bf16, fp16 = config.get("bf16"), config.get("fp16")
    if bf16 in (True, "full"):
        imp.set("bf16", "model.dtype", "bfloat16")
    elif bf16 == "auto":
        imp.set("bf16", "model.dtype", "auto")
    elif bf16 not in (None, False):
        imp.skip("bf16", f"{bf16!r}: write model.dtype (auto, bfloat16, float16, float32)")
    if fp16 is True and bf16 not in (True, "full"):
        imp.set("fp16", "model.dtype", "float16")


def _target_modules(value: Any) -> list[str] | str:
    """LLaMA-Factory's lora_target (`all`, a comma list) or Axolotl's list of module names."""
    if isinstance(value, str):
        if value.strip() in ("all", "all-linear"):
            return "all-linear"
        if re.search(r"[\\^$*+?()\[\]{}|]", value):
            raise ValueError("a pattern; sftflow takes module names (e.g. [q_proj, v_proj]) or all-linear")
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError("not a list of module names")
    return [v.strip() for v in value]


def _report_to(value: Any) -> list[str]:
    names = value if isinstance(value, list) else [value]
    if names in (["none"], []):
        return []
    if "all" in names:
        raise ValueError("'all': name the trackers (tensorboard, mlflow, wandb, ...)")
    return [str(n) for n in names]


# ---------------------------------------------------------------------------------------------
# Datasets -> drop descriptors
# ---------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def _hub(repo_id: str, revision: str | None = None, inside: str = "") -> tuple[str, str]:
    url = f"hf://datasets/{repo_id}{'@' + revision if revision else ''}{'/' + inside if inside else ''}"
    return url, (f"{url} is read from the local Hugging Face cache (sftflow never downloads): first "
                 f"`hf download --repo-type dataset {repo_id}{' --revision ' + revision if revision else ''}`")


def _locate(path: str, base_dir: Path, revision: str | None = None) -> tuple[str, str]:
    """A data path as the source config names it -> (the path to ingest, a note when it is not local). A
    relative path is looked for beside the config, then in the working directory; else a Hub dataset id."""
    given = Path(path).expanduser()
    for candidate in [given] if given.is_absolute() else [base_dir / given, Path.cwd() / given]:
        if candidate.exists():
            return str(candidate.resolve()), ""
    parts = path.split("/")
    if not given.is_absolute() and len(parts) >= 2 and _HUB_ID.fullmatch("/".join(parts[:2])):
        return _hub("/".join(parts[:2]), revision, "/".join(parts[2:]))
    return path, f"{path} does not exist here: pass the data's path to `sftflow ingest`"


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}-{n}"
    taken.add(candidate)
    return candidate


# Axolotl's instruction prompt strategies -> (format, columns) of the rows they read.
_AXOLOTL_INSTRUCT = {
    "alpaca": ("alpaca", {}),
    "alpaca_chat": ("alpaca", {"output": "response"}),
    "gpteacher": ("alpaca", {"output": "response"}),
    "alpaca_w_system.load_open_orca": ("alpaca", {"system": "system_prompt", "instruction": "question",
                                                  "output": "response"}),
    "oasst": ("alpaca", {"instruction": "INSTRUCTION", "output": "RESPONSE"}),
    "metharme": ("prompt_completion", {"prompt": "prompt", "completion": "generation"}),
}
# Axolotl's turn keys -> ours (message_property_mappings spells them as ours already).
_AXOLOTL_TURN_KEYS = {"message_field_role": "role", "message_field_content": "content",
                      "message_field_training": "train", "field_thinking": "reasoning_content"}
_AXOLOTL_READ = {"path", "type", "data_files", "field_messages", "message_property_mappings", "roles", "field_system",
                 "field_tools", "field", "ds_type", "chat_template", "roles_to_train", "train_on_eos", "revision",
                 "field_human", "field_model", *_AXOLOTL_TURN_KEYS}
_AXOLOTL_DATASET_WHY = {
    "split": "sftflow ingests every row of the files it is given",
    "shards": "sftflow ingests every row of the files it is given",
    "name": "a Hub dataset's subset: ingest the files of that subset",
    "drop_system_message": "sftflow keeps the system prompt each row has",
    "message_field_training_detail": "sftflow trains on whole turns (or a turn's train/weight key)",
    "conversation": "sftflow renders rows with the model's chat template",
}


def _axolotl_chat(imp: Imported, where: str, entry: dict, sharegpt: bool) -> dict:
    """A chat_template (or the older sharegpt) dataset: lists of turns, read as OpenAI's once renamed; as
    ShareGPT's when a column holds the system prompt (the openai format reads none)."""
    column = entry.get("field_messages") or ("conversations" if sharegpt else "messages")
    if entry.get("field_system"):
        descriptor: dict = {"format": "sharegpt", "columns": {"conversations": column}}
    else:
        descriptor = {"format": "openai", **({"columns": {"messages": column}} if column != "messages" else {})}
    keys = {}
    for ours, theirs in (entry.get("message_property_mappings") or {}).items():
        if ours in TURN_KEYS:
            keys[ours] = theirs
        else:
            imp.skip(f"{where}.message_property_mappings.{ours}", f"sftflow's turn keys are {', '.join(TURN_KEYS)}")
    for key, ours in _AXOLOTL_TURN_KEYS.items():
        if entry.get(key):
            keys.setdefault(ours, entry[key])
    if keys:
        descriptor["message_keys"] = keys
    roles = {}
    for ours, names in (entry.get("roles") or {}).items():  # Axolotl: ours -> theirs; a descriptor: theirs -> ours
        if ours in ROLES:
            roles.update({str(name): ours for name in (names if isinstance(names, list) else [names])})
        else:
            imp.skip(f"{where}.roles.{ours}", f"sftflow's roles are {', '.join(ROLES)}")
    for key, ours in (("field_human", "user"), ("field_model", "assistant")):  # the older sharegpt's role names
        if entry.get(key):
            roles[str(entry[key])] = ours
    if roles:
        descriptor["roles"] = roles
    for key, value, why in (("roles_to_train", ["assistant"], "sftflow computes the loss on the assistant turns"),
                            ("train_on_eos", "turn", "sftflow trains each assistant turn's end-of-turn token")):
        if entry.get(key) is not None:
            if entry[key] == value:
                imp.same(f"{where}.{key}", value, why)
            else:
                imp.skip(f"{where}.{key}", f"{why} ({key}: {value})")
    return descriptor


def _axolotl_dataset(imp: Imported, index: int, entry: Any, base_dir: Path, taken: set[str]) -> None:
    where = f"datasets[{index}]"
    if not isinstance(entry, dict) or not entry.get("path"):
        imp.skip(where, "a dataset needs a path")
        return
    kind = entry.get("type")
    strategy = kind.split(":")[0] if isinstance(kind, str) else None
    if isinstance(kind, dict):  # a user-defined instruction format
        columns = {ours: kind[f"field_{ours}"] for ours in ("system", "instruction", "input", "output")
                   if kind.get(f"field_{ours}")}
        descriptor = {"format": "alpaca", **({"columns": columns} if columns else {})}
        if kind.get("system_prompt"):
            descriptor["system"] = kind["system_prompt"]
        for key in ("system_format", "format", "no_input_format"):
            if kind.get(key):
                imp.skip(f"{where}.type.{key}", "a prompt string: sftflow renders rows with the model's chat template")
    elif strategy in ("chat_template", "sharegpt"):
        descriptor = _axolotl_chat(imp, where, entry, strategy == "sharegpt")
    elif strategy in _AXOLOTL_INSTRUCT:
        fmt, columns = _AXOLOTL_INSTRUCT[strategy]
        descriptor = {"format": fmt, **({"columns": dict(columns)} if columns else {})}
        if kind != strategy:
            imp.skip(f"{where}.type", f"{kind.split(':', 1)[1]!r}: sftflow renders rows with the model's chat template")
    elif kind == "completion":
        descriptor = {"format": "text", "columns": {"text": entry.get("field") or "text"}}
    else:
        imp.skip(f"{where}.type", "pre-tokenized rows: sftflow tokenizes rows itself with the model's chat template"
                 if not kind else f"Axolotl's {kind!r} prompt strategy has no sftflow format: convert the data to "
                 "messages, conversations or instruction/output rows, or write its drop.yaml by hand")
        return
    for ours, key in (("system", "field_system"), ("tools", "field_tools")):
        if entry.get(key):
            descriptor.setdefault("columns", {})[ours] = entry[key]
    if imp.system and "system" not in descriptor:
        descriptor["system"] = imp.system
    if entry.get("chat_template"):
        if any(m.source in ("chat_template", "chat_template_jinja") for m in imp.mapped):
            imp.skip(f"{where}.chat_template", "sftflow trains every dataset in the one model.chat_template")
        else:
            _chat_template(imp, f"{where}.chat_template", entry["chat_template"], AXOLOTL_TEMPLATES, "axolotl")

    path = str(entry["path"])
    data_files = entry.get("data_files") or []
    files = [f"{path.rstrip('/')}/{f}" for f in (data_files if isinstance(data_files, list) else [data_files])]
    located = [_locate(f, base_dir, entry.get("revision")) for f in files or [path]]
    name = _unique(_name(Path(path.rstrip("/")).stem, f"dataset-{index}"), taken)
    notes = list(dict.fromkeys(n for _, n in located if n))
    imp.drops.append(Drop(name, descriptor, [p for p, _ in located], "; ".join(notes)))
    imp.mapped.append(Mapped(where, f"drops/{name}/drop.yaml", path, f"format {descriptor['format']}"))
    if entry.get("ds_type"):
        imp.same(f"{where}.ds_type", entry["ds_type"], "sftflow's ingest reads JSON, JSONL, CSV and Parquet files "
                                                       "by their extension")
    for key, value in entry.items():
        if key not in _AXOLOTL_READ and value not in (None, ""):
            imp.skip(f"{where}.{key}", _AXOLOTL_DATASET_WHY.get(key, _NO_EQUIVALENT_DEFAULT))


# LLaMA-Factory's dataset_info.json columns -> ours. images/videos/audios are carried so that ingest quarantines
# the rows that have media by name, rather than training on their text alone.
_LF_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
               "messages": "conversations", "system": "system", "tools": "tools", "chosen": "chosen",
               "rejected": "rejected", "images": "images", "videos": "videos", "audios": "audios"}
_LF_TURN_TAGS = {"role_tag": "role", "content_tag": "content"}
_LF_ROLE_TAGS = {"user_tag": "user", "assistant_tag": "assistant", "observation_tag": "tool",
                 "function_tag": "function_call", "system_tag": "system"}
_LF_REMOTE = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


def _llamafactory_dataset(imp: Imported, name: str, entry: dict, info_path: Path, taken: set[str]) -> None:
    where = f"{info_path.name}:{name}"
    formatting = entry.get("formatting") or "alpaca"
    columns = entry.get("columns") or {}
    if formatting not in ("alpaca", "sharegpt"):
        imp.skip(f"dataset: {name}", f"formatting {formatting!r}: LLaMA-Factory's are alpaca and sharegpt")
        return
    if "kto_tag" in columns:
        imp.skip(f"dataset: {name}", "KTO data (answers labelled good or bad): sftflow would train on the bad "
                                     "answers too; keep the rows labelled true, drop kto_tag, and import again")
        return
    descriptor: dict = {"format": "preference" if entry.get("ranking") else formatting}
    for theirs, column in columns.items():
        if theirs in _LF_COLUMNS:
            descriptor.setdefault("columns", {})[_LF_COLUMNS[theirs]] = column
            if theirs in ("images", "videos", "audios"):
                imp.skip(f"{where}.columns.{theirs}", "sftflow trains on text only: ingest quarantines the rows "
                                                      f"that have {theirs}")
        else:
            imp.skip(f"{where}.columns.{theirs}", _NO_EQUIVALENT_DEFAULT)
    tags = entry.get("tags") or {}
    if keys := {_LF_TURN_TAGS[t]: v for t, v in tags.items() if t in _LF_TURN_TAGS}:
        descriptor["message_keys"] = keys
    if roles := {str(v): _LF_ROLE_TAGS[t] for t, v in tags.items() if t in _LF_ROLE_TAGS}:
        descriptor["roles"] = roles
    if imp.system:
        descriptor["system"] = imp.system
    remote = next((key for key in _LF_REMOTE if entry.get(key)), None)
    if remote == "hf_hub_url":
        data, note = _hub(str(entry[remote]), entry.get("revision"))
    elif remote:
        data, note = str(entry[remote]), f"{entry[remote]} is LLaMA-Factory's {remote}: download it and ingest the copy"
    elif entry.get("file_name"):
        data, note = _locate(str(info_path.parent / entry["file_name"]), info_path.parent)
    else:
        imp.skip(f"dataset: {name}", f"{where} names no file_name")
        return
    drop_name = _unique(_name(name), taken)
    imp.drops.append(Drop(drop_name, descriptor, [data], note))
    imp.mapped.append(Mapped(f"dataset: {name}", f"drops/{drop_name}/drop.yaml", data,
                             f"format {descriptor['format']}, from {info_path}"))
    for key in ("subset", "split", "folder", "num_samples"):
        if entry.get(key) not in (None, "") and not (key == "split" and entry[key] == "train"):
            imp.skip(f"{where}.{key}", "sftflow ingests every row of the files it is given")

# ---------------------------------------------------------------------------------------------
# The translators
# ---------------------------------------------------------------------------------------------

def _skip_or_rename(imp: Imported, config: dict, renames: Renames, handled: set[str]) -> None:
    for key, value in config.items():
        if key in handled or value is None or value == "":
            continue
        if key in renames:
            _rename(imp, key, value, renames)
        else:
            imp.skip(key, _why_not(key))


def translate_axolotl(config: dict, base_dir: Path, name: str) -> Imported:
    """An Axolotl config (parsed YAML) -> a run config, descriptors and the report. `base_dir` is where
    relative dataset paths are looked for first (the YAML's directory), then the working directory."""
    imp = Imported("axolotl", name, {"name": name})
    imp.mapped.append(Mapped("(file name)", "name", name))
    handled = {"adapter", "load_in_4bit", "load_in_8bit", "lora_target_modules", "lora_target_linear",
               "chat_template", "chat_template_jinja", "lr_scheduler", "warmup_ratio", "val_set_size", "bf16",
               "fp16", "flash_attention", "sdp_attention", "eager_attention", "flex_attention",
               "gradient_checkpointing", "datasets", "default_system_message", "wandb_project", "train_on_inputs"}

    adapter = config.get("adapter")
    if adapter == "qlora":
        imp.set("adapter", "model.load_in_4bit", True)
    elif adapter == "lora" and config.get("load_in_8bit"):
        imp.same("adapter", adapter, "a LoRA adapter; model.load_in_4bit left to its default (4-bit on CUDA)")
    elif adapter == "lora":
        four = config.get("load_in_4bit") is True
        imp.set("adapter", "model.load_in_4bit", four, "" if four else "LoRA on a 16-bit base")
    elif adapter in (None, ""):
        imp.skip("adapter", "unset, Axolotl fine-tunes every weight; sftflow trains a LoRA adapter")
    else:
        imp.skip("adapter", f"{adapter!r}: sftflow trains LoRA adapters (lora, qlora) only")
    if config.get("load_in_4bit") is True and adapter != "lora":
        imp.set("load_in_4bit", "model.load_in_4bit", True)
    if config.get("load_in_8bit"):
        imp.skip("load_in_8bit", OTHER_TOOLS_NAMES["load_in_8bit"].note)

    if config.get("lora_target_linear") is True:
        imp.set("lora_target_linear", "lora.target_modules", "all-linear")
        if config.get("lora_target_modules"):
            imp.same("lora_target_modules", config["lora_target_modules"], "included in all-linear")
    elif config.get("lora_target_modules"):
        try:
            imp.set("lora_target_modules", "lora.target_modules", _target_modules(config["lora_target_modules"]))
        except ValueError as exc:
            imp.skip("lora_target_modules", str(exc))

    jinja = config.get("chat_template_jinja")
    if jinja:
        imp.set("chat_template_jinja", "model.chat_template", jinja)
    if config.get("chat_template") not in (None, "", "jinja") or (config.get("chat_template") == "jinja" and not jinja):
        _chat_template(imp, "chat_template", config["chat_template"], AXOLOTL_TEMPLATES, "axolotl")

    if config.get("lr_scheduler"):
        _lr_scheduler(imp, "lr_scheduler", config["lr_scheduler"])
    if config.get("warmup_ratio") is not None:
        imp.skip("warmup_ratio", OTHER_TOOLS_NAMES["warmup_ratio"].note + "; set train.warmup_steps once the "
                 "dataset's size is known")
    if config.get("val_set_size") is not None:
        _eval_ratio(imp, "val_set_size", config["val_set_size"])
    _dtype(imp, config)
    for key, implementation in (("flash_attention", "flash_attention_2"), ("sdp_attention", "sdpa"),
                                ("eager_attention", "eager"), ("flex_attention", "flex_attention")):
        if config.get(key) is True:
            imp.set(key, "model.attn_implementation", implementation)
    checkpointing = config.get("gradient_checkpointing")
    if isinstance(checkpointing, bool):
        imp.set("gradient_checkpointing", "train.gradient_checkpointing", checkpointing)
    elif checkpointing == "offload":
        imp.set("gradient_checkpointing", "train.gradient_checkpointing", True)
        imp.set("gradient_checkpointing", "train.offload_checkpoints", True,
                "the unsloth engine offloads; hf keeps them on the GPU")
    elif checkpointing is not None:
        imp.skip("gradient_checkpointing",
                 f"{checkpointing!r}: sftflow takes true or false (and train.offload_checkpoints)")
    if config.get("train_on_inputs") is True:
        imp.skip("train_on_inputs", OTHER_TOOLS_NAMES["train_on_inputs"].note)
    elif config.get("train_on_inputs") is False:
        imp.same("train_on_inputs", False, "sftflow computes the loss on the assistant turns only")
    if config.get("wandb_project"):
        imp.set("wandb_project", "train.report_to", ["wandb"], f"set WANDB_PROJECT={config['wandb_project']}")
    if config.get("default_system_message"):
        imp.system = str(config["default_system_message"])
        imp.mapped.append(Mapped("default_system_message", "drop.yaml system", imp.system,
                                 "the system prompt of rows without one"))

    taken: set[str] = set()
    datasets = config.get("datasets") or []
    for index, entry in enumerate(datasets if isinstance(datasets, list) else [datasets]):
        _axolotl_dataset(imp, index, entry, base_dir, taken)
    _skip_or_rename(imp, config, AXOLOTL_RENAMES, handled)
    return imp


def translate_llamafactory(config: dict, dataset_info: dict | None, info_path: Path, name: str) -> Imported:
    """A LLaMA-Factory training config (parsed YAML) -> a run config, descriptors and the report.
    `dataset_info` is the parsed dataset_info.json at `info_path` (None when there is none)."""
    imp = Imported("llamafactory", name, {"name": name})
    imp.mapped.append(Mapped("(file name)", "name", name))
    handled = {"stage", "do_train", "finetuning_type", "quantization_bit", "quantization_method",
               "quantization_type", "lora_target", "template", "lr_scheduler_type", "warmup_ratio", "val_size",
               "bf16", "fp16", "flash_attn", "disable_gradient_checkpointing", "use_unsloth", "report_to",
               "dataset", "dataset_dir", "default_system"}

    stage, finetuning = config.get("stage", "sft"), config.get("finetuning_type", "lora")
    if stage != "sft":
        imp.skip("stage", f"{stage!r}: sftflow runs supervised fine-tuning (stage sft) only")
    elif "stage" in config:
        imp.same("stage", stage, "sftflow runs supervised fine-tuning")
    if config.get("do_train") is True:
        imp.same("do_train", True, "sftflow trains")
    elif "do_train" in config:
        imp.skip("do_train", "sftflow's run config is for training")
    if finetuning != "lora":
        imp.skip("finetuning_type", f"{finetuning!r}: sftflow trains LoRA adapters only")
    elif "finetuning_type" in config:
        imp.same("finetuning_type", finetuning, "sftflow trains a LoRA adapter")

    bits = config.get("quantization_bit")
    if bits in (None, ""):
        imp.set("quantization_bit (unset)", "model.load_in_4bit", False, "LoRA on a 16-bit base, as LLaMA-Factory does")
    elif bits == 4:
        imp.set("quantization_bit", "model.load_in_4bit", True)
        method = config.get("quantization_method", "bitsandbytes")
        if method in ("bitsandbytes", "bnb"):
            imp.same("quantization_method", method, "sftflow quantizes with bitsandbytes (NF4)")
        else:
            imp.skip("quantization_method", f"{method!r}: sftflow quantizes with bitsandbytes (NF4) only")
        qtype = config.get("quantization_type")
        if qtype not in (None, "nf4"):
            imp.skip("quantization_type", f"{qtype!r}: sftflow's 4-bit is NF4")
    else:
        imp.skip("quantization_bit", f"{bits!r}: sftflow loads the base in 4-bit (QLoRA) or 16-bit only; "
                                     "model.load_in_4bit left to its default (4-bit on CUDA)")

    if finetuning == "lora":
        if "lora_rank" not in config:
            imp.set("lora_rank (unset)", "lora.r", 8, "LLaMA-Factory's default")
        if "lora_alpha" not in config:
            rank = config.get("lora_rank", 8)
            try:
                imp.set("lora_alpha (unset)", "lora.alpha", 2 * _int(rank), "LLaMA-Factory's default: 2 x lora_rank")
            except ValueError:
                pass
    if config.get("lora_target") is not None:
        try:
            imp.set("lora_target", "lora.target_modules", _target_modules(config["lora_target"]))
        except ValueError as exc:
            imp.skip("lora_target", str(exc))
    if config.get("template"):
        _chat_template(imp, "template", config["template"], LLAMAFACTORY_TEMPLATES, "llamafactory")
    if config.get("lr_scheduler_type"):
        _lr_scheduler(imp, "lr_scheduler_type", config["lr_scheduler_type"])
    if config.get("warmup_ratio") is not None:
        imp.skip("warmup_ratio", OTHER_TOOLS_NAMES["warmup_ratio"].note + "; set train.warmup_steps once the "
                 "dataset's size is known")
    if config.get("val_size") is not None:
        _eval_ratio(imp, "val_size", config["val_size"])
    _dtype(imp, config)
    attention = {"auto": "auto", "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2"}
    if config.get("flash_attn") is not None:
        if config["flash_attn"] in attention:
            imp.set("flash_attn", "model.attn_implementation", attention[config["flash_attn"]])
        else:
            imp.skip("flash_attn", f"{config['flash_attn']!r}: model.attn_implementation takes auto, sdpa, eager, "
                                   "flex_attention or flash_attention_2")
    if config.get("disable_gradient_checkpointing") is True:
        imp.set("disable_gradient_checkpointing", "train.gradient_checkpointing", False)
    if config.get("use_unsloth") is True:
        imp.set("use_unsloth", "train.engine", "unsloth")
    if config.get("report_to") is not None:
        try:
            imp.set("report_to", "train.report_to", _report_to(config["report_to"]))
        except ValueError as exc:
            imp.skip("report_to", str(exc))
    if config.get("default_system"):
        imp.system = str(config["default_system"])
        imp.mapped.append(Mapped("default_system", "drop.yaml system", imp.system,
                                 "the system prompt of rows without one"))

    names = config.get("dataset") or []
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n) for n in names]
    taken: set[str] = set()
    for dataset in filter(None, names):
        entry = (dataset_info or {}).get(dataset)
        if dataset_info is None:
            imp.skip(f"dataset: {dataset}",
                     f"no {info_path} to describe it (set dataset_dir, or write its drop.yaml by hand)")
        elif not isinstance(entry, dict):
            imp.skip(f"dataset: {dataset}", f"not in {info_path}")
        else:
            _llamafactory_dataset(imp, dataset, entry, info_path, taken)
    _skip_or_rename(imp, config, LLAMAFACTORY_RENAMES, handled)
    return imp


# ---------------------------------------------------------------------------------------------
# Reading, validating, writing
# ---------------------------------------------------------------------------------------------

def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{path}: not valid YAML ({at}{getattr(exc, 'problem', None) or exc}); fix the syntax") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a training config is a YAML mapping of keys to values")
    return data


def _dataset_info(config: dict, source: Path) -> tuple[dict | None, Path]:
    """LLaMA-Factory's dataset_info.json: under dataset_dir (default `data`), relative to the YAML's directory
    first, then to the working directory, as LLaMA-Factory runs from its checkout."""
    dataset_dir = Path(str(config.get("dataset_dir") or "data")).expanduser()
    candidates = [dataset_dir] if dataset_dir.is_absolute() else [source.parent / dataset_dir, Path.cwd() / dataset_dir]
    for directory in candidates:
        path = directory / "dataset_info.json"
        if path.is_file():
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{path}: not readable JSON: {exc}") from exc
            if not isinstance(info, dict):
                raise ConfigError(f"{path}: dataset_info.json is an object of dataset name -> description")
            return info, path
    return None, candidates[0] / "dataset_info.json"


def _validated(imp: Imported, source: Path) -> None:
    """Move each value our config refuses to the report with the reason, until the config validates."""
    for _ in range(50):
        try:
            RunConfig.model_validate(imp.config)
            return
        except ValidationError as exc:
            errors = exc.errors()
        moved = False
        for error in errors:
            target = ".".join(str(p) for p in error["loc"])
            for mapping in [m for m in imp.mapped if m.target == target]:
                imp.mapped.remove(mapping)
                imp.skip(mapping.source, f"{mapping.value!r} is not valid for {target}: {error['msg']}")
                *sections, key = target.split(".")
                node = imp.config
                for section in sections:
                    node = node[section]
                node.pop(key, None)
                moved = True
        if not moved:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(config)'}: {e['msg']}" for e in errors)
            raise ConfigError(f"{source}: cannot make a valid run config from it: {problems}")


def _in_source_order(imp: Imported, keys: list[str]) -> None:
    """The report in the order the source config has its keys (derived entries after their key)."""
    def position(source: str) -> int:
        base = re.split(r"[\[.:( ]", source, maxsplit=1)[0]
        return keys.index(base) if base in keys else (-1 if source == "(file name)" else len(keys))

    imp.mapped.sort(key=lambda m: position(m.source))
    imp.unmapped.sort(key=lambda u: position(u.source))


def _in_schema_order(config: dict) -> dict:
    """Sections and keys in RunConfig's order, as the shipped configs have them."""
    ordered = {}
    for section, info in RunConfig.model_fields.items():
        if section not in config:
            continue
        value = config[section]
        if isinstance(value, dict):
            fields = list(info.annotation.model_fields)
            value = {k: value[k] for k in sorted(value, key=lambda k: fields.index(k) if k in fields else len(fields))}
        ordered[section] = value
    return ordered


def _config_yaml(imp: Imported, source: Path, config_path: Path) -> bytes:
    header = [f"# Imported from the {TOOLS[imp.tool]} config {source} by `sftflow config import {imp.tool}`.",
              f"#   sftflow train --config {config_path}",
              "# Ingest its data first: the `sftflow ingest ... --map drops/<name>/drop.yaml` commands the import printed."]
    if imp.unmapped:
        header.append("# Not carried over:")
        header += [f"#   {u.source}: {u.why}" for u in imp.unmapped]
    body = yaml.safe_dump(_in_schema_order(imp.config), sort_keys=False, allow_unicode=True, width=120)
    return ("\n".join(header) + "\n" + body).encode()


def import_config(tool: str, file: Path, out: Path | None = None, force: bool = False) -> ImportResult:
    """Translate `file` (an Axolotl or LLaMA-Factory YAML), then write `out/<name>.yaml` and one
    `out/drops/<dataset>/drop.yaml` per dataset; nothing is written when a target exists, unless `force`."""
    tool = _TOOL_ALIASES.get(tool.lower(), tool.lower())
    if tool not in TOOLS:
        raise ConfigError(f"config import {tool}: choose axolotl or llamafactory")
    file = Path(file)
    config = _read_yaml(file)
    name = _name(file.stem, "imported")
    if tool == "axolotl":
        imp = translate_axolotl(config, file.parent, name)
    else:
        info, info_path = _dataset_info(config, file)
        imp = translate_llamafactory(config, info, info_path, name)
    if "name" not in imp.config.get("model", {}):
        key = "base_model" if tool == "axolotl" else "model_name_or_path"
        raise ConfigError(f"{file}: {key}: missing; name the base model (a Hub id or a local directory)")
    dora = next((m.source for m in imp.mapped if m.target == "lora.use_dora" and m.value), None)
    if dora:  # neither tool writes a GGUF LoRA; llama.cpp's cannot hold DoRA (the merged GGUF files carry it)
        imp.set(dora, "export.lora_gguf", False, "llama.cpp's LoRA GGUF cannot hold a DoRA adapter")
    _validated(imp, file)
    _in_source_order(imp, list(config))

    out = Path(out) if out is not None else Path(f"{name}-sftflow")
    config_path = out / f"{name}.yaml"
    descriptor_paths = {d.name: out / "drops" / d.name / "drop.yaml" for d in imp.drops}
    for drop in imp.drops:  # checked by the reader `sftflow ingest --map` uses, before anything is written
        try:
            parse_descriptor(drop.descriptor, str(descriptor_paths[drop.name]))
        except ConfigError as exc:
            raise ConfigError(f"{file}: its dataset {drop.name} makes no valid drop descriptor: {exc}") from exc
    existing = [p for p in (config_path, *descriptor_paths.values()) if p.exists()]
    if existing and not force:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise ConfigError(f"{existing[0]}: exists{more}; pass --force to overwrite, or choose another --out")
    for drop in imp.drops:
        write_bytes_atomic(descriptor_paths[drop.name],
                           yaml.safe_dump(drop.descriptor, sort_keys=False, allow_unicode=True).encode())
    write_bytes_atomic(config_path, _config_yaml(imp, file, config_path))  # last: the import is whole once it exists
    load_run_config(config_path)  # what was written loads as written
    return ImportResult(imp, file, out, config_path, descriptor_paths)


def report_text(result: ImportResult) -> str:
    imp = result.imported
    lines = [f"imported {result.source} ({TOOLS[imp.tool]}) -> {result.config_path}", "mapped:"]
    for m in imp.mapped:
        value = m.value if isinstance(m.value, str) else json.dumps(m.value)
        value = value if len(value) <= 80 else value[:77] + "..."
        lines.append(f"  {m.source} -> {m.target or '(what sftflow does)'} = {value}"
                     + (f"   ({m.note})" if m.note else ""))
    if imp.unmapped:
        lines.append("no equivalent:")
        lines += [f"  {u.source}: {u.why}" for u in imp.unmapped]
    lines.append("next:")
    for drop in imp.drops:
        lines.append(f"  {result.ingest_command(drop)}")
        if drop.note:
            lines.append(f"    ({drop.note})")
    lines.append(f"  {result.train_command()}")
    return "\n".join(lines)
