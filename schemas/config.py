"""Pydantic configs. Every field is described; unknown keys are errors (`extra="forbid"`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SourceFormat = Literal["auto", "alpaca", "sharegpt", "openai", "prompt_completion"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class IngestConfig(StrictModel):
    """How a drop is read, validated and split into a dataset version."""

    format: SourceFormat = Field(
        "auto", description="Source format of every file in the drop; 'auto' detects it per file from its records."
    )
    eval_ratio: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="Share of rows in the held-out eval split. The split is a pure function of the row id, so it "
        "must stay the same for the life of a workspace's dataset lineage.",
    )
    max_reject_rate: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="Largest share of a drop's rows that may be quarantined; above it the whole drop fails and "
        "no dataset version is written. Duplicates do not count as rejections.",
    )
    max_chars: int = Field(
        32_000, gt=0, description="Longest conversation accepted, in characters over all message contents."
    )
    batch_rows: int = Field(
        50_000, gt=0, description="Rows per Arrow batch while reading and validating; bounds memory use."
    )
    quarantine_examples: int = Field(
        5, ge=0, description="Quarantined rows shown, with their reasons, in the drop's Prefect markdown artifact."
    )
