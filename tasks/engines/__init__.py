"""Training back ends behind one small interface; nothing outside this package knows which one runs.

An engine loads the base model with its LoRA adapter attached and says which SFTConfig options it
needs. The engine is imported lazily, in the training subprocess, and first: Unsloth must be
imported before transformers and trl to patch them.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Protocol

from schemas.config import RunConfig
from foundation.errors import ConfigError



class Engine(Protocol):
    name: str

    def load(self, model_path: str, config: RunConfig) -> tuple[Any, Any]:
        """(PEFT model ready to train, tokenizer)."""

    def sft_options(self, config: RunConfig) -> dict[str, Any]:
        """Extra trl SFTConfig keyword arguments this engine needs."""

    def load_for_inference(self, model_path: str, adapter_dir: str | None, config: RunConfig) -> tuple[Any, Any]:
        """(model in eval mode, with the adapter applied when given; tokenizer)."""

    def packing_problem(self, model: Any) -> str | None:
        """Why this engine cannot keep this model's packed documents apart (and what to do instead), or None."""


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# The oldest Unsloth seen training under torchrun here (each rank pins itself to its GPU): the gpu extra's pin.
UNSLOTH_DATA_PARALLEL_SINCE = "2026.10.9"


def data_parallel_problem(engine: str) -> str | None:
    """Why `engine` cannot train data-parallel (one torchrun rank per GPU) on this install; None when it can.

    The hf engine always can (transformers' Trainer wraps the model in DDP; each rank loads its copy on
    its own GPU through device_map). Unsloth can from the version the gpu extra pins.
    """
    if engine != "unsloth":
        return None
    from importlib import metadata

    from packaging.version import Version

    try:
        installed = metadata.version("unsloth")
    except metadata.PackageNotFoundError:
        return "unsloth is not installed"
    if Version(installed) < Version(UNSLOTH_DATA_PARALLEL_SINCE):
        return (f"unsloth {installed} is older than {UNSLOTH_DATA_PARALLEL_SINCE}, the first version seen training "
                "one rank per GPU under torchrun")
    return None


def pick_engine(requested: str, ranks: int = 1) -> str:
    """Resolve `train.engine`: auto = unsloth when CUDA and unsloth are present (and, for `ranks` > 1
    data-parallel ranks, when unsloth can run them), else hf."""
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "auto":
        if cuda_available() and has_unsloth and (ranks == 1 or data_parallel_problem("unsloth") is None):
            return "unsloth"
        return "hf"
    if requested == "unsloth":
        if not cuda_available():
            raise ConfigError("train.engine=unsloth needs a CUDA GPU; use train.engine=hf (or auto) on this machine")
        if not has_unsloth:
            raise ConfigError("train.engine=unsloth: unsloth is not installed; pip install 'sftflow[gpu]'")
    if ranks > 1 and (problem := data_parallel_problem(requested)):
        raise ConfigError(
            f"train.engine={requested} cannot train on {ranks} GPUs: {problem}. Set train.engine=hf (or auto, which "
            f"falls back to hf), set train.num_gpus=1, or pip install 'unsloth>={UNSLOTH_DATA_PARALLEL_SINCE}'"
        )
    return requested


def load_engine(name: str) -> Engine:
    """The engine named `name` (one of schemas.config.Engine): the module `tasks.engines.<name>`'s ENGINE."""
    return importlib.import_module(f"{__name__}.{name}").ENGINE
