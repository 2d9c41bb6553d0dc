"""Validate: the data contract (a great-expectations suite kept as data in `schemas/expectations/`).

Each canonical row is reduced to a feature row (counts of roles, empty messages, length, last
role); the GX suite runs on those features with row-level results, and every row any expectation
rejects is quarantined with the `meta.reason` of each expectation it failed. The suite is loaded
strictly: an unknown expectation type, a missing reason or a column the features lack is an error.
"""

from __future__ import annotations

import functools
from bisect import bisect_left
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from schemas.config import IngestConfig
from schemas.tables import CANONICAL_SCHEMA, QUARANTINE_SCHEMA, ROLES, STAGED_SCHEMA
from foundation import staging
from foundation.errors import ConfigError

SUITE_PATH = Path(__file__).resolve().parent.parent / "schemas" / "expectations" / "canonical_rows.json"

FEATURE_COLUMNS = (
    "n_messages",
    "n_user",
    "n_assistant",
    "n_unknown_role",
    "n_empty",
    "n_system_not_first",
    "n_text_in_chat",
    "total_chars",
    "last_role",
)


def row_features(rows: pa.Table) -> pd.DataFrame:
    """One feature row per conversation, computed column-wise (no Python loop over rows)."""
    n = rows.num_rows
    messages = rows.column("messages").combine_chunks()
    flat = pc.list_flatten(messages)
    parents = pc.list_parent_indices(messages).to_numpy(zero_copy_only=False)
    roles = flat.field("role")
    contents = flat.field("content")
    offsets = messages.offsets.to_numpy()
    starts = offsets[:-1] - offsets[0]
    lengths = np.diff(offsets)
    position = np.arange(len(flat)) - np.repeat(starts, lengths)

    def per_row(mask: Any) -> np.ndarray:
        return np.bincount(parents, weights=np.asarray(mask, dtype=np.float64), minlength=n).astype(np.int64)

    is_system = pc.equal(roles, "system").to_numpy(zero_copy_only=False)
    is_text = pc.equal(roles, "text").to_numpy(zero_copy_only=False)  # a plain-text row: its own prompt and answer
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(contents)), 0).to_numpy(zero_copy_only=False)
    if flat.type.get_field_index("tool_calls") >= 0:  # an assistant turn that only calls tools is not empty
        blank &= ~flat.field("tool_calls").is_valid().to_numpy(zero_copy_only=False)
    # last role as a categorical: a million Python strings would cost ~60 MB per million rows
    last_index = np.where(lengths > 0, offsets[1:] - offsets[0] - 1, 0)
    role_codes = pc.index_in(roles, value_set=pa.array(ROLES)).fill_null(len(ROLES)).to_numpy(zero_copy_only=False)
    last_code = np.where(lengths > 0, role_codes[last_index] if len(flat) else len(ROLES), len(ROLES) + 1)
    last_role = pd.Categorical.from_codes(last_code, categories=[*ROLES, "unknown", "none"])
    return pd.DataFrame(
        {
            "n_messages": lengths.astype(np.int64),
            "n_user": per_row(pc.equal(roles, "user").to_numpy(zero_copy_only=False) | is_text),
            "n_assistant": per_row(pc.equal(roles, "assistant").to_numpy(zero_copy_only=False) | is_text),
            "n_unknown_role": per_row(pc.invert(pc.is_in(roles, pa.array(ROLES))).to_numpy(zero_copy_only=False)),
            "n_empty": per_row(blank),
            "n_system_not_first": per_row(is_system & (position > 0)),
            "n_text_in_chat": per_row(is_text & (np.repeat(lengths, lengths) > 1)),
            "total_chars": per_row(pc.utf8_length(contents).to_numpy(zero_copy_only=False)),
            "last_role": last_role,
        }
    )


def _camel(expectation_type: str) -> str:
    return "".join(part.capitalize() for part in expectation_type.split("_"))


@dataclass(frozen=True)
class ContractSuite:
    """A loaded GX suite plus what each expectation means for a row."""

    name: str
    version: int
    suite: Any  # great_expectations.ExpectationSuite
    reasons: tuple[str, ...]  # per expectation, in suite order
    fixes: tuple[str, ...]


def _gx():
    """great_expectations (~2 s to import), imported where a suite is loaded or run, not with this module:
    a command that re-ingests a known drop or refuses one never validates."""
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="great_expectations")
    import great_expectations

    return great_expectations


def load_suite(path: Path = SUITE_PATH) -> ContractSuite:
    """Load a suite file strictly: fail naming the expectation that did not load."""
    gx = _gx()
    try:
        spec = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the expectation suite: {exc}") from exc
    if not isinstance(spec, dict) or not isinstance(spec.get("expectations"), list) or not spec["expectations"]:
        raise ConfigError(f"{path}: an expectation suite is an object with a non-empty 'expectations' list")
    expectations, reasons, fixes = [], [], []
    for i, item in enumerate(spec["expectations"]):
        where = f"{path}: expectations[{i}]"
        etype = item.get("type") if isinstance(item, dict) else None
        cls = getattr(gx.expectations, _camel(etype), None) if isinstance(etype, str) else None
        if cls is None:
            raise ConfigError(f"{where}: unknown expectation type {etype!r}; use a great_expectations core expectation")
        meta = item.get("meta") or {}
        if not re.fullmatch(r"[a-z][a-z0-9_]*", str(meta.get("reason", ""))):
            raise ConfigError(f"{where}: meta.reason must be a snake_case reason code (it labels quarantined rows)")
        kwargs = dict(item.get("kwargs") or {})
        if kwargs.get("column") not in FEATURE_COLUMNS:
            raise ConfigError(f"{where}: column {kwargs.get('column')!r} is not a row feature; use one of {FEATURE_COLUMNS}")
        try:
            expectations.append(cls(**kwargs, meta=meta))
        except Exception as exc:  # pydantic validation errors of GX expectation models
            raise ConfigError(f"{where}: invalid arguments for {etype}: {exc}") from exc
        reasons.append(meta["reason"])
        fixes.append(str(meta.get("fix", "")))
    suite = gx.ExpectationSuite(name=f"{spec.get('name', path.stem)}.v{spec.get('version', 0)}", expectations=expectations)
    if len(suite.expectations) != len(spec["expectations"]):
        raise ConfigError(f"{path}: {len(spec['expectations'])} expectations in the file, {len(suite.expectations)} loaded")
    return ContractSuite(spec.get("name", path.stem), int(spec.get("version", 0)), suite, tuple(reasons), tuple(fixes))


class ContractValidator:
    """Runs a loaded suite on feature frames through an ephemeral GX context (no files written)."""

    def __init__(self, contract: ContractSuite):
        from great_expectations.data_context.types.base import ProgressBarsConfig

        gx = _gx()
        self.contract = contract
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        asset = context.data_sources.add_pandas("sftflow_rows").add_dataframe_asset("features")
        batch = asset.add_batch_definition_whole_dataframe("batch")
        suite = context.suites.add(contract.suite)
        self.definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{contract.name}-rows", data=batch, suite=suite)
        )

    def failing_rows(self, features: pd.DataFrame, max_chars: int) -> dict[int, list[str]]:
        """Row position -> reason codes of every expectation the row fails."""
        result = self.definition.run(
            batch_parameters={"dataframe": features},
            expectation_parameters={"max_chars": max_chars},
            result_format={"result_format": "COMPLETE", "return_unexpected_index_query": False},
        )
        failing: dict[int, list[str]] = {}
        for res in result.results:
            if res.exception_info.get("raised_exception"):
                raise ConfigError(
                    f"expectation {res.expectation_config.type} on {res.expectation_config.kwargs.get('column')} "
                    f"could not run: {res.exception_info.get('exception_message')}"
                )
            reason = res.expectation_config.meta["reason"]
            for index in res.result.get("unexpected_index_list") or []:
                failing.setdefault(int(index), []).append(reason)
        return failing


@functools.cache
def default_validator() -> ContractValidator:
    return ContractValidator(load_suite())


def split_rows(rows: pa.Table, failing: dict[int, list[str]], contract: ContractSuite) -> tuple[pa.Table, pa.Table]:
    """Staged rows + failing positions -> (accepted canonical rows, quarantined rows with reasons and raw)."""
    bad = np.zeros(rows.num_rows, dtype=bool)
    bad[list(failing)] = True
    accepted = rows.filter(pa.array(~bad)).select(CANONICAL_SCHEMA.names).cast(CANONICAL_SCHEMA)
    rejected = rows.filter(pa.array(bad))
    fixes = dict(zip(contract.reasons, contract.fixes))
    reasons = [failing[i] for i in sorted(failing)]
    quarantined = pa.table(
        {
            "source_drop": rejected.column("source_drop"),
            "source_file": rejected.column("source_file"),
            "source_row": rejected.column("source_row"),
            "source_format": rejected.column("source_format"),
            "reasons": pa.array(reasons, pa.list_(pa.string())),
            "details": pa.array(["; ".join(f"{r}: {fixes[r]}" for r in rs) for rs in reasons], pa.string()),
            "raw": rejected.column("raw"),
        },
        schema=QUARANTINE_SCHEMA,
    )
    return accepted, quarantined


# A GX validation run costs ~0.25 s whatever its size, but its working memory grows with its rows
# (~350 bytes a row): validate the features of several batches per run, up to this many rows.
GX_RUN_ROWS = 200_000


@dataclass
class ValidatedDrop:
    accepted_rows: int
    quarantined: int
    accepted_path: str
    quarantine_path: str


@task(cache_policy=NO_CACHE)
def validate_rows(staged_paths: list[str], config: IngestConfig, staging_dir: Path) -> ValidatedDrop:
    """Run the contract over the staged rows; write accepted rows and quarantine (two streaming passes)."""
    logger = get_run_logger()
    validator = default_validator()
    failing: dict[int, list[str]] = {}
    frames: list[pd.DataFrame] = []
    validated = 0

    def validate_pending() -> None:
        nonlocal validated
        if not frames:
            return
        chunk = pd.concat(frames, ignore_index=True)
        frames.clear()
        failing.update({validated + i: r for i, r in validator.failing_rows(chunk, config.max_chars).items()})
        validated += len(chunk)

    for batch in staging.iter_batches(*staged_paths):
        frames.append(row_features(pa.Table.from_batches([batch])))
        if sum(len(f) for f in frames) >= GX_RUN_ROWS:
            validate_pending()
    validate_pending()
    failing_at = sorted(failing)

    out = ValidatedDrop(0, 0, str(staging_dir / "validated.arrow"), str(staging_dir / "quarantine_validate.arrow"))
    offset = 0
    with (
        staging.open_writer(out.accepted_path, CANONICAL_SCHEMA) as accepted_writer,
        staging.open_writer(out.quarantine_path, QUARANTINE_SCHEMA) as quarantine_writer,
    ):
        for batch in staging.iter_batches(*staged_paths):
            in_batch = {i - offset: failing[i] for i in failing_at[bisect_left(failing_at, offset):
                                                                bisect_left(failing_at, offset + batch.num_rows)]}
            accepted, quarantined = split_rows(pa.Table.from_batches([batch]), in_batch, validator.contract)
            offset += batch.num_rows
            accepted_writer.write_table(accepted)
            quarantine_writer.write_table(quarantined)
            out.accepted_rows += accepted.num_rows
            out.quarantined += quarantined.num_rows
    logger.info("contract %s v%s: %s rows accepted, %s quarantined", validator.contract.name,
                validator.contract.version, out.accepted_rows, out.quarantined)
    return out
