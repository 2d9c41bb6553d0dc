"""LoRA targets fit the family: all-linear finds each family's own layer names; a name that matches no layer
is an error listing the model's layers, never an adapter that silently trains less."""

from __future__ import annotations

import pytest

from foundation.errors import ConfigError
from tasks.engines.lora import lora_targets


def tiny(config_class: str, model_class: str):
    import transformers

    config = getattr(transformers, config_class)(vocab_size=64, pad_token_id=0, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    return getattr(transformers, model_class)(config)


def test_all_linear_resolves_to_each_familys_own_layers():
    assert lora_targets(tiny("LlamaConfig", "LlamaForCausalLM"), "all-linear") == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert lora_targets(tiny("Phi3Config", "Phi3ForCausalLM"), "all-linear") == [
        "down_proj", "gate_up_proj", "o_proj", "qkv_proj"]  # fused projections, and never the output head


def test_a_target_that_matches_no_layer_is_refused_with_the_models_layers():
    phi3 = tiny("Phi3Config", "Phi3ForCausalLM")
    assert lora_targets(phi3, ["qkv_proj", "o_proj"]) == ["qkv_proj", "o_proj"]
    with pytest.raises(ConfigError, match=r"lora.target_modules q_proj, v_proj match no layer of Phi3ForCausalLM "
                                          r"\(its linear layers: down_proj, gate_up_proj, o_proj, qkv_proj\)"):
        lora_targets(phi3, ["q_proj", "o_proj", "v_proj"])


def test_the_hf_engine_trains_every_layer_all_linear_names(tiny_model):
    from peft import get_peft_model

    from schemas.config import RunConfig
    from tasks.engines.hf import HFEngine, lora_config

    config = RunConfig.model_validate({"name": "t", "model": {"name": str(tiny_model)}})
    assert config.lora.target_modules == "all-linear"
    base, _ = HFEngine()._base(str(tiny_model), config)
    model = get_peft_model(base, lora_config(config, lora_targets(base, "all-linear")))
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if "lora_A" in name}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
