"""Which modules a LoRA adapter trains: `lora.target_modules` checked against the model's own layers.

Families name their projections differently (Llama's q_proj ... down_proj, Phi-3's fused qkv_proj and
gate_up_proj), so `all-linear` (the default) is resolved to the model's linear layers, and a listed
name that matches no layer is an error that lists the model's layers, never an adapter that silently
trains less than was asked for.
"""

from __future__ import annotations

from foundation.errors import ConfigError


def linear_layer_names(model) -> list[str]:
    """The names of the model's linear layers inside its blocks (the output head excluded), sorted."""
    head = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if "Linear" in type(module).__name__ and module is not head and "." in name}
    return sorted(names)


def lora_targets(model, target_modules: list[str] | str) -> list[str]:
    """The module names to adapt: every linear layer for `all-linear`, else the listed names, each checked."""
    layers = linear_layer_names(model)
    if target_modules == "all-linear":
        return layers
    missing = [name for name in target_modules if name not in layers]
    if missing:
        raise ConfigError(
            f"lora.target_modules {', '.join(missing)} match no layer of {type(model).__name__} (its linear layers: "
            f"{', '.join(layers)}); set lora.target_modules to names from that list, or to all-linear"
        )
    return list(target_modules)
