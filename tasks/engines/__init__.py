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
from sftflow.errors import ConfigError

ENGINES = {"hf": "tasks.engines.hf", "unsloth": "tasks.engines.unsloth"}


class Engine(Protocol):
    name: str

    def load(self, model_path: str, config: RunConfig) -> tuple[Any, Any]:
        """(PEFT model ready to train, tokenizer)."""

    def sft_options(self, config: RunConfig) -> dict[str, Any]:
        """Extra trl SFTConfig keyword arguments this engine needs."""

    def load_for_inference(self, model_path: str, adapter_dir: str | None, config: RunConfig) -> tuple[Any, Any]:
        """(model in eval mode, with the adapter applied when given; tokenizer)."""


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pick_engine(requested: str) -> str:
    """Resolve `train.engine`: auto = unsloth when CUDA and unsloth are present, else hf."""
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "auto":
        return "unsloth" if cuda_available() and has_unsloth else "hf"
    if requested == "unsloth":
        if not cuda_available():
            raise ConfigError("train.engine=unsloth needs a CUDA GPU; use train.engine=hf (or auto) on this machine")
        if not has_unsloth:
            raise ConfigError("train.engine=unsloth: unsloth is not installed; pip install 'sftflow[gpu]'")
    return requested


def load_engine(name: str) -> Engine:
    return importlib.import_module(ENGINES[name]).ENGINE
