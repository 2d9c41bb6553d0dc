"""The GGUF export quants: one table that the export config, `sftflow export --quant`, the pre-flight
size estimate, the export itself, the model card and `sftflow chat / serve` all read. Adding a quant
is one row here and its test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Quant:
    name: str
    llama_ftype: int | None  # llama.cpp's LLAMA_FTYPE_MOSTLY_* to quantise f16 to; None: the converter writes it
    bits_per_weight: float  # for the size estimate (q8_0 stores 32 weights in 34 bytes; q4_k_m ~4.85 bits)
    thresholds: dict[str, float] = field(default_factory=dict)  # parity limits: max_kl, min_top1, min_greedy


QUANTS: tuple[Quant, ...] = (  # f16 first: every other quant is made from it
    Quant("f16", None, 16.0, {"max_kl": 1e-3, "min_greedy": 0.9}),
    Quant("q8_0", 7, 8.5, {"max_kl": 1e-2}),
    Quant("q4_k_m", 15, 4.85, {"min_top1": 0.85}),
)
# The adapter as a GGUF LoRA, applied to the base's f16 GGUF at load time.
LORA_THRESHOLDS = {"max_kl": 1e-3, "min_greedy": 0.9}

BY_NAME = {quant.name: quant for quant in QUANTS}
NAMES = tuple(BY_NAME)
QuantName = Literal[NAMES]  # type: ignore[valid-type]


def in_export_order(names: list[str] | set[str]) -> list[str]:
    """f16 (always made) and the given quants, in table order."""
    return [q.name for q in QUANTS if q.name in set(names) | {"f16"}]


def smallest(names: list[str] | set[str]) -> str:
    """The quant of fewest bits per weight among `names`: what chat and serve load, and the card shows."""
    return min((BY_NAME[n] for n in names if n in BY_NAME), key=lambda q: q.bits_per_weight).name
