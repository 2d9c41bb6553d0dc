"""Pydantic configs. Every field is described; unknown keys are errors (`extra="forbid"`)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator,
)
from pydantic_core import PydanticCustomError

from foundation.credentials import redact_url, remember_url
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


def _refusal(reason: str) -> PydanticCustomError:
    # the reason goes in as context: a value quoted in it may hold braces, which a message template would format
    return PydanticCustomError("value_error", "{reason}", {"reason": reason})


def _whole_number(value: Any) -> Any:
    # pydantic's lax int takes 2048.0 and 1.0e23 (and True); a count written that way is a slip, say so
    if isinstance(value, (bool, float)) or (isinstance(value, str) and not re.fullmatch(r"\s*[+-]?\d+\s*", value)):
        raise _refusal(f"{value!r} is not a whole number; write digits, e.g. 2048, without a decimal point or exponent")
    return value


WholeNumber = Annotated[int, BeforeValidator(_whole_number)]

# Upper bounds of the sizes: far above any real run, low enough that a slip (an extra zero, 1e23) fails when the
# config is read rather than hours later as an out-of-memory error.
MAX_SEQ_LENGTH = 1_048_576  # tokens: beyond the context window of any model
MAX_BATCH_SIZE = 65_536  # rows per device per micro-batch
MAX_GRADIENT_ACCUMULATION = 65_536
MAX_LORA_RANK = 65_536  # above the width of any model's layers, where a higher rank adds nothing

# model.name is told apart by its shape; which of a directory or a Hub repository it names is decided when the
# run starts, on the worker (tasks.base_model.resolve_model). The Hub's own repo id rules: letters, digits, - _ .,
# starting and ending with a letter, digit or _, no '--' or '..', at most 96 characters a part.
_HUB_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"(?:{_HUB_PART}/)?{_HUB_PART}")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://(?P<host>[^/]*)/?(?P<path>.*)")
_LOCAL_PREFIXES = ("/", "./", "~", "\\")  # plainly a path; anything else with at most one '/' is a Hub id


def check_model_name(name: str) -> str:
    """`name` if it is 'tiny', a Hub id (org/name) or a local directory path that does not climb out with '..';
    otherwise a refusal that says what to write instead. The directory need not exist here: the config may be
    checked on another machine than the worker that trains."""
    fix = "use a Hub id (org/name) or point model.name at the model's directory by its absolute path"
    if not name.strip() or name != name.strip() or any(ord(c) < 32 for c in name):
        raise _refusal(f"{name!r} is empty or has surrounding spaces or control characters; {fix}")
    url = _URL.fullmatch(name)
    if url:
        hub = "/".join(url["path"].split("/")[:2])  # huggingface.co/org/name/tree/main -> org/name
        hint = (f"write {hub}" if url["host"].endswith("huggingface.co") and _HUB_ID.fullmatch(hub)
                else "download it and point model.name at its directory, or use a Hub id (org/name)")
        raise _refusal(f"{name!r} is a URL, which is not loaded; {hint}")
    if ".." in re.split(r"[/\\]", name):
        raise _refusal(f"{name!r} climbs out of its directory with '..'; {fix}")
    if name.startswith(_LOCAL_PREFIXES) or name == "." or name.count("/") > 1:
        return name
    parts = name.split("/")
    if not _HUB_ID.fullmatch(name) or any("--" in p or ".." in p for p in parts):
        raise _refusal(
            f"{name!r} is not a Hub id (org/name: letters, digits, - _ . and no '--' or '..'); fix the id, or write a "
            f"local directory as ./{name} or an absolute path"
        )
    return name


class ModelConfig(StrictModel):
    """The base model."""

    name: str = Field(
        description="A Hugging Face hub id (org/name), a local model directory (an absolute path, or relative as "
        "./dir; no '..' and no URLs), or 'tiny' for the small Llama model sftflow builds locally (tests and the "
        "demo; no download)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when name is a hub id.")
    trust_remote_code: bool = Field(
        False, description="Allow a model directory's own Python code to run (warned about when the config is "
        "validated and when a run starts). Off: such models are refused."
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

    @field_validator("name")
    @classmethod
    def _hub_id_or_directory(cls, value: str) -> str:
        return check_model_name(value)

    @field_validator("chat_template")
    @classmethod
    def _template_name_or_jinja(cls, value: str | None) -> str | None:
        if value is not None and value not in CHAT_TEMPLATES and not is_jinja(value):
            raise ValueError(f"{value!r} is neither a template name ({', '.join(CHAT_TEMPLATES)}) nor Jinja")
        return value

    def warnings(self) -> list[str]:
        """Settings that are allowed but deserve a word each time they are used."""
        if self.trust_remote_code:
            return ["model.trust_remote_code is true: the Python code shipped in the model's repository or directory "
                    "will run with your permissions; review it first, or set it to false"]
        return []


class LoraConfig(StrictModel):
    """The LoRA adapter."""

    r: WholeNumber = Field(
        16, gt=0, le=MAX_LORA_RANK, description=f"Rank of the LoRA update matrices (at most {MAX_LORA_RANK})."
    )
    alpha: WholeNumber = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input (Unsloth is fastest at 0).")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt (e.g. [q_proj, v_proj]; Phi-3 fuses qkv_proj and gate_up_proj), or "
        "'all-linear': every linear layer of the model's blocks, whatever the family calls them. A name that matches "
        "no layer of the model is an error that lists them.",
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA); slower, hf engine only.")


# transformers' report_to integrations (Trainer callbacks)
TRACKER_NAMES = ("tensorboard", "mlflow", "wandb", "trackio", "comet_ml", "neptune", "clearml", "azure_ml", "dagshub",
                 "dvclive", "flyte", "codecarbon", "swanlab", "kubeflow")


class TrainConfig(StrictModel):
    """The supervised fine-tuning run."""

    engine: Engine = Field("auto", description="auto = unsloth when CUDA and unsloth are present, else hf.")
    max_seq_length: WholeNumber = Field(
        2048, gt=0, le=MAX_SEQ_LENGTH,
        description=f"Longest training sequence in tokens (at most {MAX_SEQ_LENGTH}); longer rows are truncated.",
    )
    epochs: float | None = Field(1.0, gt=0, description="Passes over the train split (ignored when max_steps is set).")
    max_steps: WholeNumber | None = Field(None, gt=0, description="Optimizer steps to run; overrides epochs.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warmup."
    )
    warmup_steps: WholeNumber = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optim: str = Field("adamw_torch", description="Optimizer name as in transformers (e.g. adamw_8bit on CUDA).")
    batch_size: WholeNumber = Field(
        8, gt=0, le=MAX_BATCH_SIZE,
        description=f"Rows (or packed sequences) per device per micro-batch (at most {MAX_BATCH_SIZE}).",
    )
    gradient_accumulation_steps: WholeNumber = Field(
        1, gt=0, le=MAX_GRADIENT_ACCUMULATION,
        description=f"Micro-batches per optimizer step (at most {MAX_GRADIENT_ACCUMULATION}).",
    )
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
    dataloader_workers: WholeNumber = Field(
        0, ge=0, le=16, description="Processes that collate the next batches while the GPU trains (0: the training "
        "process collates, and the GPU waits for it after every logging step).")
    seed: WholeNumber = Field(
        42, ge=0, le=2**32 - 1, description="Seed for data order, LoRA init and dropout (0 to 2**32 - 1, numpy's range)."
    )
    logging_steps: WholeNumber = Field(1, gt=0, description="Steps between progress reports (loss, learning rate).")
    save_steps: WholeNumber = Field(50, gt=0, description="Steps between checkpoints; a retried run resumes from the last.")
    save_total_limit: WholeNumber = Field(2, gt=0, description="Checkpoints kept on disk.")
    eval_steps: WholeNumber | None = Field(None, gt=0, description="Steps between eval-loss measurements (None: only at the end).")
    max_truncation_rate: float = Field(
        0.05, ge=0, le=1, description="Fail before training when more than this share of rows is truncated."
    )
    report_to: list[str] = Field(
        ["tensorboard"], description="Trackers, as trl's report_to (tensorboard, mlflow, wandb, ...); [] for none. "
        "The evaluation logs its metrics into the same tracker run; mlflow and wandb must be installed (pip install).",
    )

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, value: list[str]) -> list[str]:
        if unknown := [name for name in value if name not in TRACKER_NAMES]:
            raise ValueError(f"unknown tracker {', '.join(map(repr, unknown))}; one of {', '.join(TRACKER_NAMES)} "
                             "([] for none)")
        return value

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

    sample_size: int = Field(
        256, gt=0, description="Eval rows (a fixed, seeded sample) answered by greedy generation: enough for ROUGE-L "
        "and chrF differences of a few points to mean something (batched generation makes it cheap on a GPU).")
    seed: int = Field(0, description="Seed of the generation sample: the same rows for every model and run.")
    max_new_tokens: int = Field(128, gt=0, description="Generation limit; answers cut here count as not stopped.")
    batch_size: int = Field(16, gt=0, description="Rows per batch for loss scoring (whole rows, logits of every token).")
    generation_batch_size: int = Field(
        256, gt=0, description="Prompts generated together (left-padded, similar lengths together); memory is the "
        "KV cache of batch x (prompt + max_new_tokens) tokens; halved while the GPU runs out of memory.")
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
        "bfloat16", description="Dtype the base is reloaded in to merge the adapter (never the 4-bit base), and of the "
        "merged HF model. float16 makes the f16 GGUF's conversion a copy (1B on an H200: 7.6 s against 14.8) and the "
        "LoRA GGUF's parity tighter, but the merged model then computes in float16, where some families overflow."
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
        None, repr=False,
        description="An fsspec URL (s3://bucket/models, file:///mnt/share, ...) that receives a copy of every "
        "published version as <remote>/<name>/<version>/, manifest.json last. Credentials in it "
        "(https://user:token@host/...) are used when publishing from the process that loaded this config and are "
        "written nowhere: every dump of the config shows https://***@host/...; better, give them to the filesystem "
        "the way it reads them (FSSPEC_<PROTOCOL>_<KWARG> variables, ~/.aws/credentials, ...)."
    )
    hub_repo: str | None = Field(
        None, description="A Hugging Face Hub repo id to upload each version to, when HF_TOKEN is set (skipped otherwise)."
    )

    @field_validator("remote")
    @classmethod
    def _remember_credentials(cls, remote: str | None) -> str | None:
        if remote:
            remember_url(remote)  # the real URL stays in this process's memory, for the publish
        return remote

    @field_serializer("remote")
    def _redact_credentials(self, remote: str | None) -> str | None:
        return redact_url(remote) if remote else remote


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
        if self.lora.use_dora and self.export.lora_gguf:
            raise ValueError("lora.use_dora: llama.cpp's LoRA GGUF cannot hold a DoRA adapter; set export.lora_gguf=false "
                             "(the merged GGUF files carry it)")
        if self.model.load_in_4bit and self.model.dtype == "float32":
            raise ValueError("model.load_in_4bit computes in 16-bit; set model.dtype to bfloat16, float16 or auto")
        return self

    def warnings(self) -> list[str]:
        """One line per accepted but risky setting; `config validate` and the start of a run print them."""
        return self.model.warnings()


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


# Keys whose value may be a Jinja template. Jinja's {{ }} and {% %} are YAML flow syntax (a parse error, or a
# mapping), and a template is never meant as YAML, so an unquoted value with them is taken as written. A value
# that starts with a quote is read as YAML, so a quoted template (as the YAML error advice says) works too.
TEMPLATE_KEYS = frozenset({"model.chat_template"})


def _yaml_problem(exc: Exception) -> str:
    """A YAML error on one line: what and where (PyYAML's own message spans several lines, with a caret)."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(exc, 'problem', None) or str(exc).splitlines()[0]}{where}"


def _shown(text: str, limit: int = 60) -> str:
    text = text.encode("unicode_escape").decode()  # newlines and control characters stay on the line
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_override_value(key: str, raw: str) -> Any:
    """The value of `key=raw`: YAML (numbers, booleans, null, lists), a template of TEMPLATE_KEYS as written."""
    if not raw.strip():
        return ""
    if key in TEMPLATE_KEYS and is_jinja(raw) and raw.lstrip()[0] not in "'\"":
        return raw
    try:
        return yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError) as exc:
        raise ConfigError(
            f"override {key}={_shown(raw)}: not valid YAML ({_yaml_problem(exc)}); to pass it as text, quote it "
            f"as a YAML string (\"{key}='...'\" on the command line, doubling any ' inside), or fix its syntax"
        ) from None


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`a.b=value` pairs, values parsed by parse_override_value; ConfigError names every bad override, a line each."""
    parsed, problems = [], []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            problems.append(
                f"override {_shown(item)!r}: write key=value with a dotted key, e.g. train.learning_rate=1e-4")
            continue
        try:
            parsed.append((key, parse_override_value(key, raw)))
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))
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
    except (yaml.YAMLError, RecursionError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(exc)}); fix it there") from None
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
