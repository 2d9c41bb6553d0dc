"""Pydantic configs. Every field is described; unknown keys are errors (`extra="forbid"`)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from foundation.errors import ConfigError
from schemas.chat_templates import CHAT_TEMPLATES, is_jinja
from schemas.metrics import PromotableMetric
from schemas.other_tools import unknown_key_hint
from schemas.quants import LORA_THRESHOLDS, NAMES as QUANT_NAMES, QUANTS, QuantName


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class IngestConfig(StrictModel):
    """How a drop is read, validated and split into a dataset version."""

    # A plain str: the names live in the formats table of the ingest package, which checks them
    # (tasks.ingest.formats.check_format); schemas may not import tasks.
    format: str = Field(
        "auto",
        description="Source format of every file in the drop: 'auto' (detect it per file from its records) or a "
        "name from tasks.ingest.formats.FORMATS.",
    )
    eval_ratio: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="Share of rows in the held-out eval split. The split is a pure function of the row id, so it "
        "must stay the same for the life of a workspace's dataset lineage.",
    )
    max_reject_rate: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="Largest share of a drop's rows that may be quarantined; above it the whole drop fails and "
        "no dataset version is written. Duplicates do not count as rejections.",
    )
    max_chars: int = Field(
        32_000, gt=0, description="Longest conversation accepted, in characters over all message contents."
    )
    batch_rows: int = Field(
        50_000, gt=0, description="Rows per Arrow batch while reading and validating; bounds memory use."
    )
    quarantine_examples: int = Field(
        5, ge=0, description="Quarantined rows shown, with their reasons, in the drop's Prefect markdown artifact."
    )


# ---------------------------------------------------------------------------------------------
# The run config: one validated object for a training run, loaded from YAML + key=value overrides
# ---------------------------------------------------------------------------------------------

# The training back ends: each name is a module under tasks/engines/ (auto picks one, see pick_engine).
Engine = Literal["auto", "unsloth", "hf"]


class ModelConfig(StrictModel):
    """The base model."""

    name: str = Field(
        description="A Hugging Face hub id, a local model directory, or 'tiny' for the small Llama model sftflow "
        "builds locally (tests and the demo; no download)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when name is a hub id.")
    trust_remote_code: bool = Field(
        False, description="Allow a model directory's own Python code to run. Off: such models are refused."
    )
    chat_template: str | None = Field(
        None, description="The chat format to train in, replacing the tokenizer's own (e.g. for a base model without "
        f"one): a name ({', '.join(CHAT_TEMPLATES)}) or a Jinja template.",
    )
    load_in_4bit: bool | None = Field(
        None, description="QLoRA: load the base in 4-bit NF4. None = on when CUDA is present (never on CPU)."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Compute dtype; auto = bfloat16 on CUDA, float32 on CPU."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2"] = Field(
        "auto",
        description="Attention kernel of the hf engine. auto = sdpa, except that packed rows (train.packing) are "
        "attended per document from their restarting position_ids (torch's varlen flash kernel on CUDA), never "
        "through a (T, T) mask. The unsloth engine routes packed rows the same way and picks its own kernel "
        "otherwise.",
    )


    @field_validator("chat_template")
    @classmethod
    def _template_name_or_jinja(cls, value: str | None) -> str | None:
        if value is not None and value not in CHAT_TEMPLATES and not is_jinja(value):
            raise ValueError(f"{value!r} is neither a template name ({', '.join(CHAT_TEMPLATES)}) nor Jinja")
        return value


class LoraConfig(StrictModel):
    """The LoRA adapter."""

    r: int = Field(16, gt=0, description="Rank of the LoRA update matrices.")
    alpha: int = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input (Unsloth is fastest at 0).")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt (e.g. [q_proj, v_proj]; Phi-3 fuses qkv_proj and gate_up_proj), or "
        "'all-linear': every linear layer of the model's blocks, whatever the family calls them. A name that matches "
        "no layer of the model is an error that lists them.",
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA); slower, hf engine only.")


class TrainConfig(StrictModel):
    """The supervised fine-tuning run."""

    engine: Engine = Field("auto", description="auto = unsloth when CUDA and unsloth are present, else hf.")
    max_seq_length: int = Field(2048, gt=0, description="Longest training sequence in tokens; longer rows are truncated.")
    epochs: float | None = Field(1.0, gt=0, description="Passes over the train split (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps to run; overrides epochs.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warmup."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optim: str = Field("adamw_torch", description="Optimizer name as in transformers (e.g. adamw_8bit on CUDA).")
    batch_size: int = Field(8, gt=0, description="Rows (or packed sequences) per device per micro-batch.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    num_gpus: int | Literal["auto"] = Field(
        1,
        description="GPUs of this host to train on, data-parallel (DDP through torchrun: one rank per GPU, each with "
        "a whole copy of the model). 'auto' = every visible CUDA GPU (1 on a machine without CUDA). The global batch "
        "per optimizer step is batch_size x gradient_accumulation_steps x num_gpus, so to compare with a 1-GPU run "
        "divide gradient_accumulation_steps (or batch_size) by num_gpus. Checked against the GPUs the worker sees "
        "before the run starts.",
    )
    packing: bool = Field(
        False, description="Pack several rows into each max_seq_length sequence (padding-free, no cross-row attention)."
    )
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward to save memory.")
    offload_checkpoints: bool = Field(
        True, description="unsloth engine, with gradient_checkpointing: keep the checkpointed activations in CPU "
        "memory (Unsloth's offloaded checkpointing) rather than on the GPU. false skips the copies to and from the "
        "host (faster when the GPU has memory to spare); the hf engine keeps them on the GPU either way.")
    dataloader_workers: int = Field(
        0, ge=0, le=16, description="Processes that collate the next batches while the GPU trains (0: the training "
        "process collates, and the GPU waits for it after every logging step).")
    seed: int = Field(42, description="Seed for data order, LoRA init and dropout.")
    logging_steps: int = Field(1, gt=0, description="Steps between progress reports (loss, learning rate).")
    save_steps: int = Field(50, gt=0, description="Steps between checkpoints; a retried run resumes from the last.")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept on disk.")
    eval_steps: int | None = Field(None, gt=0, description="Steps between eval-loss measurements (None: only at the end).")
    max_truncation_rate: float = Field(
        0.05, ge=0, le=1, description="Fail before training when more than this share of rows is truncated."
    )
    report_to: list[str] = Field(
        ["tensorboard"], description="Trackers, as trl's report_to (tensorboard, mlflow, wandb, ...); [] for none."
    )

    @field_validator("num_gpus")
    @classmethod
    def _at_least_one_gpu(cls, value: int | str) -> int | str:
        if value != "auto" and value < 1:
            raise ValueError("must be at least 1, or auto for every visible GPU")
        return value

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "TrainConfig":
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set train.epochs or train.max_steps")
        return self


class EvalConfig(StrictModel):
    """Evaluation of base, candidate and champion on the held-out split, and the promotion gate."""

    sample_size: int = Field(64, gt=0, description="Eval rows (a fixed, seeded sample) answered by greedy generation.")
    seed: int = Field(0, description="Seed of the generation sample: the same rows for every model and run.")
    max_new_tokens: int = Field(128, gt=0, description="Generation limit; answers cut here count as not stopped.")
    batch_size: int = Field(16, gt=0, description="Rows per batch for loss scoring and generation.")
    primary_metric: PromotableMetric = Field(
        "rouge_l", description="The metric the promotion gate compares (eval_loss: lower is better)."
    )
    min_improvement: float = Field(
        0.01, ge=0, description="Margin by which the candidate must beat the base and the champion on the primary metric."
    )


class ExportConfig(StrictModel):
    """GGUF export and its parity check against the merged HF model."""

    quants: list[QuantName] = Field(list(QUANT_NAMES), description="GGUF files to make (f16 is always made).")
    merge_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Dtype the base is reloaded in to merge the adapter (never the 4-bit base)."
    )
    lora_gguf: bool = Field(True, description="Also write the adapter as a GGUF LoRA (convert_lora_to_gguf.py).")
    parity_prompts: int = Field(8, gt=0, description="Eval prompts (fixed sample) the parity check runs on.")
    greedy_tokens: int = Field(16, gt=0, description="Greedy tokens compared per prompt.")
    thresholds: dict[str, dict[str, float]] = Field(
        {**{q.name: q.thresholds for q in QUANTS}, "lora": LORA_THRESHOLDS},
        description="Parity limits per GGUF (max_kl, min_top1, min_greedy); token ids must always match.",
    )


class PublishConfig(StrictModel):
    """Where a published version goes besides the local registry."""

    remote: str | None = Field(
        None, description="An fsspec URL (s3://bucket/models, file:///mnt/share, ...) that receives a copy of every "
        "published version as <remote>/<name>/<version>/, manifest.json last."
    )
    hub_repo: str | None = Field(
        None, description="A Hugging Face Hub repo id to upload each version to, when HF_TOKEN is set (skipped otherwise)."
    )


class RunConfig(StrictModel):
    """Everything a training run needs, validated before anything runs."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Name of the model being trained: registry entry and run-id prefix (letters, digits, . _ -).",
    )
    model: ModelConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        if self.lora.use_dora and self.train.engine == "unsloth":
            raise ValueError("lora.use_dora is not supported by the unsloth engine; set train.engine=hf")
        if self.model.load_in_4bit and self.model.dtype == "float32":
            raise ValueError("model.load_in_4bit computes in 16-bit; set model.dtype to bfloat16, float16 or auto")
        return self


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`a.b=value` pairs; values are parsed as YAML (numbers, booleans, lists), strings otherwise."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise ConfigError(f"override {item!r}: write key=value with a dotted key, e.g. train.learning_rate=1e-4")
        parsed.append((key, yaml.safe_load(raw) if raw.strip() else ""))
    return parsed


def format_validation_error(exc: ValidationError, source: str, model: type[BaseModel] | None = None) -> str:
    """Every error at once, each naming its dotted field; an unknown key of `model` (default RunConfig) gets
    a "did you mean" hint: its place in another section, another tool's name for it, or a close spelling."""
    lines = [f"{source}: {len(exc.errors())} error(s)"]
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            message = unknown_key_hint(model or RunConfig, tuple(str(p) for p in error["loc"]))
        else:
            message = error["msg"]
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Load a YAML run config and apply dotted overrides; ConfigError lists every problem."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run config is a YAML mapping (name:, model:, lora:, train:)")
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(data, key, value)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from exc


def config_hash(config: BaseModel) -> str:
    """Stable hash of a config's values (key order and formatting do not matter)."""
    payload = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
