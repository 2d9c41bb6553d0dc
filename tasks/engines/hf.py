"""The hf engine: transformers + peft (+ bitsandbytes 4-bit on CUDA). Runs on CPU for tests and the
demo, and is the baseline the GPU benchmark compares against."""

from __future__ import annotations

import os
from typing import Any

from schemas.config import RunConfig
from foundation.errors import ConfigError
from tasks.engines.lora import lora_targets


def torch_dtype(config: RunConfig, cuda: bool):
    import torch

    if config.model.dtype == "auto":
        return torch.bfloat16 if cuda else torch.float32
    return getattr(torch, config.model.dtype)


def lora_config(config: RunConfig, target_modules: list[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=target_modules,
        use_rslora=config.lora.use_rslora,
        use_dora=config.lora.use_dora,
        task_type="CAUSAL_LM",
    )


def attn_implementation(config: RunConfig, training: bool) -> str:
    """The `attn_implementation` to load with: auto trains packed rows through sftflow's varlen path."""
    chosen = config.model.attn_implementation
    if chosen != "auto":
        return chosen
    if training and config.train.packing:
        from tasks.engines import packed_attention

        return packed_attention.register()
    return "sdpa"


class HFEngine:
    name = "hf"

    def _base(self, model_path: str, config: RunConfig, training: bool = False):
        import torch
        from transformers import AutoModelForCausalLM

        cuda = torch.cuda.is_available()
        four_bit = cuda if config.model.load_in_4bit is None else config.model.load_in_4bit
        if four_bit and not cuda:
            raise ConfigError("model.load_in_4bit needs CUDA (bitsandbytes); set model.load_in_4bit=false on CPU")
        dtype = torch_dtype(config, cuda)
        kwargs: dict[str, Any] = {}
        if four_bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
        if cuda:
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype=dtype,
            attn_implementation=attn_implementation(config, training),
            trust_remote_code=config.model.trust_remote_code,
            revision=config.model.revision,
            use_safetensors=True,
            **kwargs,
        )
        return model, four_bit

    def load(self, model_path: str, config: RunConfig) -> tuple[Any, Any]:
        from peft import get_peft_model, prepare_model_for_kbit_training

        from tasks.engines.tokenizer import load_tokenizer

        model, four_bit = self._base(model_path, config, training=True)
        if four_bit:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=config.train.gradient_checkpointing
            )
        model = get_peft_model(model, lora_config(config, lora_targets(model, config.lora.target_modules)))
        return model, load_tokenizer(model_path, config)

    def load_for_inference(self, model_path: str, adapter_dir: str | None, config: RunConfig) -> tuple[Any, Any]:
        from peft import PeftModel

        from tasks.engines.tokenizer import load_tokenizer

        model, _ = self._base(model_path, config)
        if adapter_dir:
            model = PeftModel.from_pretrained(model, adapter_dir)
        model.eval()
        return model, load_tokenizer(model_path, config)

    def sft_options(self, config: RunConfig) -> dict[str, Any]:
        import torch

        cuda = torch.cuda.is_available()
        dtype = torch_dtype(config, cuda)
        return {
            "bf16": cuda and dtype == torch.bfloat16,
            "fp16": cuda and dtype == torch.float16,
            "use_cpu": not cuda,
            "gradient_checkpointing": config.train.gradient_checkpointing,
            "gradient_checkpointing_kwargs": {"use_reentrant": False},
        }

    def packing_problem(self, model: Any) -> str | None:
        return None  # sftflow's packed attention honours soft-capping and sliding windows; transformers' kernels too


ENGINE = HFEngine()
