"""Pre-flight: refuse a training run or an export that cannot fit, before it starts.

The estimates come from the model's `config.json` (vocabulary, hidden size, layers, MLP width,
attention heads) and the run config. They are deliberately a floor, not a ceiling: each part counts
what the step must hold at its peak at the least (weights, LoRA weights with their gradients and
Adam states, checkpointed activations, the logits of one micro-batch), so a refusal means the run
could not fit; a run that passes can still run out of memory through fragmentation or a kernel's
workspace. Available memory is the device's free memory (`torch.cuda.mem_get_info` on CUDA) or the
machine's available RAM (psutil); disk is `shutil.disk_usage` of the directory the files go to.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from schemas.config import RunConfig
from schemas.quants import BY_NAME as QUANTS
from foundation.errors import SftflowError

GIB = 1024**3
RUNTIME_BYTES = GIB // 2  # CUDA context / the Python and torch runtime of the worker
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class ResourceError(SftflowError):
    """The step would not fit in the memory or disk available; the message gives the numbers and the fix."""


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        text = config.get("text_config") or config  # multimodal configs nest the language model's
        hidden = int(text["hidden_size"])
        heads = int(text.get("num_attention_heads") or 1)
        return cls(
            vocab=int(text["vocab_size"]),
            hidden=hidden,
            layers=int(text["num_hidden_layers"]),
            intermediate=int(text.get("intermediate_size") or 4 * hidden),
            heads=heads,
            kv_heads=int(text.get("num_key_value_heads") or heads),
            tied=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        )

    @property
    def kv_width(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear module of one decoder layer (Llama naming)."""
        h, i, kv = self.hidden, self.intermediate, self.kv_width
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.module_shapes().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params + self.layers * 2 * self.hidden + self.hidden

    def lora_params(self, r: int, targets: list[str] | str) -> int:
        shapes = self.module_shapes()
        names = list(shapes) if targets == "all-linear" else [t for t in targets if t in shapes]
        return self.layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in names)


def read_shape(model_path: str) -> ModelShape | None:
    """The shape from a local model directory's config.json (or the hub cache's copy); None if unknown."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model_path, "config.json")
        except Exception:  # not a valid repo id either: nothing to estimate from
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        return ModelShape.from_config(json.loads(path.read_text()))
    except (KeyError, TypeError, ValueError):
        return None


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


# ---------------------------------------------------------------------------------------------
# Training memory
# ---------------------------------------------------------------------------------------------


LOSS_CHUNK_TOKENS = 1024  # on CUDA both engines score tokens in chunks (Unsloth's fused and trl's chunked loss)


def training_memory(shape: ModelShape, config: RunConfig, cuda: bool, engine: str = "hf") -> dict[str, int]:
    """Bytes each part of one training step holds at least, by part."""
    dtype = config.model.dtype if config.model.dtype != "auto" else ("bfloat16" if cuda else "float32")
    act = BYTES[dtype]
    four_bit = cuda if config.model.load_in_4bit is None else config.model.load_in_4bit
    if four_bit:  # NF4 linear weights (+ double-quantised scales); embeddings and head stay 16-bit
        weights = int(shape.linear_params * 0.53) + shape.embedding_params * 2
    else:
        weights = shape.params * act
    lora = shape.lora_params(config.lora.r, config.lora.target_modules) * 16  # fp32 weight, grad, Adam m and v
    tokens = config.train.batch_size * config.train.max_seq_length
    per_layer = 18 * shape.hidden + 4 * shape.intermediate  # a layer's saved tensors per token (flash/SDPA attention)
    if config.train.gradient_checkpointing:  # layer inputs kept, one layer recomputed at a time
        offloaded = cuda and engine == "unsloth" and config.train.offload_checkpoints  # inputs kept in host memory
        kept = 0 if offloaded else tokens * shape.layers * shape.hidden * act
        activations = kept + tokens * per_layer * act
    else:
        activations = tokens * shape.layers * per_layer * act
    # fp32 logits: of the whole micro-batch on the CPU, of one chunk of tokens on CUDA
    logits = (min(tokens, LOSS_CHUNK_TOKENS) if cuda else tokens) * shape.vocab * 4
    return {"weights": weights, "lora_and_optimizer": lora, "activations": activations, "logits": logits,
            "runtime": RUNTIME_BYTES}


def available_memory(cuda: bool) -> tuple[int, str]:
    """Free bytes of the device training runs on, and its name."""
    if cuda:
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free), f"GPU {torch.cuda.get_device_name()}"
    import psutil

    return int(psutil.virtual_memory().available), "CPU RAM"


def check_training_fits(model_path: str, config: RunConfig, cuda: bool, log=print, engine: str = "hf") -> dict | None:
    """Raise ResourceError when one training step cannot fit; returns the estimate (None if unknown)."""
    shape = read_shape(model_path)
    if shape is None:
        log(f"pre-flight: no config.json for {model_path}; memory not estimated")
        return None
    parts = training_memory(shape, config, cuda, engine)
    need = sum(parts.values())
    free, device = available_memory(cuda)
    estimate = {"need_bytes": need, "free_bytes": free, "device": device, "parts": parts}
    if need > free:
        t = config.train
        detail = ", ".join(f"{k.replace('_', ' ')} {_gib(v)}" for k, v in parts.items())
        raise ResourceError(
            f"training {model_path} needs at least {_gib(need)} ({detail}) for train.batch_size {t.batch_size} x "
            f"train.max_seq_length {t.max_seq_length} = {t.batch_size * t.max_seq_length} tokens per micro-batch, but "
            f"the {device} has {_gib(free)} free. Lower train.batch_size (and raise "
            f"train.gradient_accumulation_steps to keep the effective batch) or train.max_seq_length"
            + ("" if t.gradient_checkpointing else ", or set train.gradient_checkpointing=true")
            + ("" if not cuda or config.model.load_in_4bit is not False else ", or set model.load_in_4bit=true")
        )
    log(f"pre-flight: training needs at least {_gib(need)}, {device} has {_gib(free)} free")
    return estimate


# ---------------------------------------------------------------------------------------------
# Export disk and memory
# ---------------------------------------------------------------------------------------------


def export_disk(shape: ModelShape, config: RunConfig, quants: list[str], lora_r: int) -> dict[str, int]:
    """Bytes the export writes, by file: merged model, GGUF files, the control GGUF, the LoRA GGUF."""
    merged = shape.params * BYTES[config.export.merge_dtype]
    parts = {"merged model": merged}
    for quant in quants:
        parts[f"gguf {quant}"] = int(shape.params * QUANTS[quant].bits_per_weight / 8)
    parts["control base f16 (temporary)"] = int(shape.params * 2)
    if config.export.lora_gguf:
        parts["gguf lora"] = shape.lora_params(lora_r, config.lora.target_modules) * 2
    return parts


def free_disk(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def export_memory(shape: ModelShape, config: RunConfig) -> int:
    """Bytes the export holds at its peak: the base in export.merge_dtype while merging, then the merged model in
    fp32 (the parity reference)."""
    return shape.params * (BYTES[config.export.merge_dtype] + 4) + RUNTIME_BYTES


def evaluation_memory(shape: ModelShape, config: RunConfig) -> int:
    """Bytes an evaluation holds at most: one model in 16-bit, the fp32 logits of a loss batch of full-length rows
    (three copies: logits, their float upcast, cross-entropy's), the KV cache of a generation batch."""
    tokens = config.train.max_seq_length
    logits = config.eval.batch_size * tokens * shape.vocab * 4 * 3
    kv_cache = (config.eval.generation_batch_size * (tokens + config.eval.max_new_tokens) * shape.layers
                * shape.kv_width * 2 * 2)
    return shape.params * 2 + logits + kv_cache + RUNTIME_BYTES


def export_fits_beside_evaluation(model_path: str, config: RunConfig) -> tuple[bool, str]:
    """Whether the export can run while the evaluation runs: on a CUDA GPU whose free memory holds both at
    their peaks (on the CPU both are CPU work, so there is nothing to gain). (answer, why)."""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU: the evaluation and the export share the CPU"
    shape = read_shape(model_path)
    if shape is None:
        return False, f"no config.json for {model_path}: memory not estimated"
    need = evaluation_memory(shape, config) + export_memory(shape, config)
    free, device = available_memory(True)
    return need <= free, f"both need about {_gib(need)}, the {device} has {_gib(free)} free"


def check_export_fits(run_dir: Path, model_path: str, config: RunConfig, quants: list[str], log=print) -> dict | None:
    """Raise ResourceError when the export's files cannot fit on the run's disk, or its models in memory."""
    shape = read_shape(model_path)
    if shape is None:
        log(f"pre-flight: no config.json for {model_path}; export size not estimated")
        return None
    parts = export_disk(shape, config, quants, config.lora.r)
    need, free = sum(parts.values()), free_disk(run_dir)
    if need > free:
        detail = ", ".join(f"{k} {_gib(v)}" for k, v in parts.items())
        raise ResourceError(
            f"exporting {run_dir.name} writes about {_gib(need)} ({detail}) under {run_dir}, but its disk has "
            f"{_gib(free)} free. Free {_gib(need - free)} or more there, export fewer files (--quant "
            f"{quants[-1] if len(quants) > 1 else 'f16'} makes only f16 and that one; export.lora_gguf=false skips "
            "the LoRA GGUF), or move SFTFLOW_HOME to a larger disk"
        )
    memory = export_memory(shape, config)
    available, device = available_memory(False)
    if memory > available:
        raise ResourceError(
            f"exporting {run_dir.name} holds about {_gib(memory)} in memory (the base in export.merge_dtype "
            f"{config.export.merge_dtype} while merging, then the merged model in float32 for the parity check), but "
            f"the {device} has {_gib(available)} available. Use a machine with more RAM, or set "
            "export.merge_dtype=bfloat16 if it is float32"
        )
    log(f"pre-flight: export writes about {_gib(need)}, {_gib(free)} free; needs {_gib(memory)} RAM, "
        f"{_gib(available)} available")
    return {"disk_bytes": need, "free_disk_bytes": free, "memory_bytes": memory, "available_bytes": available,
            "parts": parts}
