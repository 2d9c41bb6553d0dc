"""The table of export quants is what the config, the CLI, the pre-flight and serve all read."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from schemas.config import ExportConfig
from schemas.quants import NAMES, QUANTS, in_export_order, smallest


def test_every_quant_of_the_table_is_a_valid_export_with_default_thresholds():
    config = ExportConfig()
    assert config.quants == list(NAMES) and set(config.thresholds) == {*NAMES, "lora"}
    assert ExportConfig(quants=list(NAMES[1:])).quants == list(NAMES[1:])
    with pytest.raises(ValidationError, match="quants"):
        ExportConfig(quants=["q2_k"])


def test_f16_is_always_made_first_and_the_smallest_is_served():
    assert in_export_order(["q4_k_m"]) == ["f16", "q4_k_m"]
    assert in_export_order(NAMES[::-1]) == list(NAMES)
    assert smallest(NAMES) == min(QUANTS, key=lambda q: q.bits_per_weight).name == "q4_k_m"
    assert smallest(["f16", "q8_0"]) == "q8_0"


def test_the_pre_flight_sizes_every_quant_from_the_table():
    from schemas.config import RunConfig
    from tasks.preflight import ModelShape, export_disk

    shape = ModelShape(vocab=1000, hidden=256, layers=2, intermediate=512, heads=4, kv_heads=4, tied=False)
    config = RunConfig.model_validate({"name": "m", "model": {"name": "tiny"}})
    parts = export_disk(shape, config, list(NAMES), 8)
    for quant in QUANTS:
        assert parts[f"gguf {quant.name}"] == int(shape.params * quant.bits_per_weight / 8)
