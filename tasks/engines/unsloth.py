"""The unsloth engine: FastLanguageModel 4-bit + get_peft_model, trained by trl's SFTTrainer. CUDA only.

`import unsloth` comes first, before transformers/trl/peft, so that it can patch them.
"""

from __future__ import annotations

import unsloth  # noqa: F401  (must precede transformers, trl and peft)

from typing import Any

from schemas.config import RunConfig
from tasks.engines.lora import lora_targets


class UnslothEngine:
    name = "unsloth"

    def load(self, model_path: str, config: RunConfig) -> tuple[Any, Any]:
        from unsloth import FastLanguageModel

        from tasks.engines.hf import torch_dtype
        from tasks.engines.tokenizer import load_tokenizer

        model, _ = FastLanguageModel.from_pretrained(
            model_name=model_path,
            max_seq_length=config.train.max_seq_length,
            load_in_4bit=True if config.model.load_in_4bit is None else config.model.load_in_4bit,
            dtype=None if config.model.dtype == "auto" else torch_dtype(config, cuda=True),
            trust_remote_code=config.model.trust_remote_code,
            revision=config.model.revision,
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=lora_targets(model, config.lora.target_modules),
            use_rslora=config.lora.use_rslora,
            use_gradient_checkpointing=(("unsloth" if config.train.offload_checkpoints else True)
                                        if config.train.gradient_checkpointing else False),
            random_state=config.train.seed,
        )
        if config.train.packing:
            from tasks.engines.packed_attention import route_unsloth_packed_rows

            route_unsloth_packed_rows()
        # The rows were tokenized by the parent with the plain tokenizer; keep it for saving too.
        return model, load_tokenizer(model_path, config)

    def load_for_inference(self, model_path: str, adapter_dir: str | None, config: RunConfig) -> tuple[Any, Any]:
        from unsloth import FastLanguageModel

        from tasks.engines.tokenizer import load_tokenizer

        model, _ = FastLanguageModel.from_pretrained(
            model_name=adapter_dir or model_path,  # an adapter directory names its base model
            max_seq_length=config.train.max_seq_length,
            load_in_4bit=True if config.model.load_in_4bit is None else config.model.load_in_4bit,
            trust_remote_code=config.model.trust_remote_code,
        )
        FastLanguageModel.for_inference(model)  # Unsloth's faster generation path
        return model, load_tokenizer(model_path, config)

    def packing_problem(self, model: Any) -> str | None:
        """Gemma 2's soft-capped attention: without flash-attn >= 2.6.3, Unsloth runs it over the whole
        packed row under one causal mask, so packed documents attend to each other (1% off the loss of
        the same rows alone on the Gemma-2-2B shape, bench/RESULTS.md)."""
        from unsloth.models import _utils

        from tasks.engines.packed_attention import unsloth_packing_problem

        return unsloth_packing_problem(model.config, getattr(_utils, "HAS_FLASH_ATTENTION_SOFTCAPPING", False))

    def sft_options(self, config: RunConfig) -> dict[str, Any]:
        import torch

        bf16 = torch.cuda.is_bf16_supported()
        return {"bf16": bf16, "fp16": not bf16, "gradient_checkpointing": False}


ENGINE = UnslothEngine()
