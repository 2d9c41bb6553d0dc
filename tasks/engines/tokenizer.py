"""The model's tokenizer as every engine, the tokenize task and the evaluator load it: the run's chat
template when it sets one, and a pad token."""

from __future__ import annotations

from foundation.errors import SftflowError
from schemas.chat_templates import template_text
from schemas.config import RunConfig


class TemplateError(SftflowError):
    """The chat template is missing, or cannot be used to find assistant spans."""


def load_tokenizer(model_path: str, config: RunConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_path, trust_remote_code=config.model.trust_remote_code, revision=config.model.revision
    )
    if config.model.chat_template:
        tokenizer.chat_template = template_text(config.model.chat_template)
    if not tokenizer.chat_template:
        raise TemplateError(f"{model_path} has no chat template; set model.chat_template in the run config")
    if tokenizer.pad_token_id is None:
        # a distinct pad token when the vocabulary has one (Llama 3 does); eos otherwise, which the gate checks
        vocab = tokenizer.get_vocab()
        tokenizer.pad_token = "<|finetune_right_pad_id|>" if "<|finetune_right_pad_id|>" in vocab else tokenizer.eos_token
    return tokenizer
