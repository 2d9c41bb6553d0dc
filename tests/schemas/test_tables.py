"""Arrow schemas and configs: the contracts between tasks."""

from __future__ import annotations

import pyarrow as pa
import pytest
import yaml
from pydantic import ValidationError

from schemas.config import IngestConfig
from schemas.tables import CANONICAL_SCHEMA, DUPLICATE_SCHEMA, QUARANTINE_SCHEMA, STAGED_SCHEMA
from tests.conftest import ROOT


@pytest.mark.parametrize("schema", [CANONICAL_SCHEMA, STAGED_SCHEMA, QUARANTINE_SCHEMA, DUPLICATE_SCHEMA])
def test_every_table_schema_is_versioned(schema):
    name, _, version = schema.metadata[b"schema_version"].decode().partition("/")
    assert name.endswith("-row") and version.isdigit()


def test_staged_rows_are_canonical_rows_plus_raw():
    assert STAGED_SCHEMA.names == CANONICAL_SCHEMA.names + ["raw"]
    assert STAGED_SCHEMA.metadata[b"schema_version"] == b"staged-row/2"  # its messages are canonical-row/2's
    assert CANONICAL_SCHEMA.metadata[b"schema_version"] == b"canonical-row/2"
    assert CANONICAL_SCHEMA.field("messages").type == pa.list_(pa.struct([
        pa.field("role", pa.string(), False), pa.field("content", pa.string(), False),
        pa.field("weight", pa.float32()), pa.field("tool_calls", pa.string()), pa.field("reasoning", pa.string())]))


def test_ingest_config_forbids_unknown_keys_and_checks_ranges():
    with pytest.raises(ValidationError, match="extra_forbidden"):
        IngestConfig(eval_ration=0.2)
    with pytest.raises(ValidationError, match="eval_ratio"):
        IngestConfig(eval_ratio=1.5)
    assert all(field.description for field in IngestConfig.model_fields.values())


def test_prefect_yaml_entrypoints_are_flows():
    import importlib

    from prefect import Flow

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert spec["deployments"]
    for deployment in spec["deployments"]:
        module, name = deployment["entrypoint"].removesuffix(".py").replace("/", ".").split(":")
        assert isinstance(getattr(importlib.import_module(module.replace(".py", "")), name), Flow)
        assert deployment["enforce_parameter_schema"] is True
