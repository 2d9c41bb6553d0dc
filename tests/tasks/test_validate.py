"""The data contract: each expectation quarantines the rows it should, and the suite loads strictly."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from schemas.tables import STAGED_SCHEMA
from foundation.errors import ConfigError
from tasks.ingest.formats import normalize_record
from tasks.validate import SUITE_PATH, default_validator, load_suite, row_features, split_rows


def split_batch(rows, validator, max_chars: int):
    """Validate one table of staged rows and split it (accepted, quarantined), as validate_rows does."""
    return split_rows(rows, validator.failing_rows(row_features(rows), max_chars), validator.contract)


def staged(conversations: list[list[tuple[str, str]]]) -> pa.Table:
    rows = []
    for i, turns in enumerate(conversations, 1):
        messages = [{"role": r, "content": c} for r, c in turns]
        rows.append(
            {
                "id": normalize_record({"messages": messages or [{"role": "user", "content": "x"}]}, "openai").id,
                "messages": messages,
                "tools": None,
                "source_drop": "d",
                "source_file": "f.jsonl",
                "source_row": i,
                "source_format": "openai",
                "raw": json.dumps({"messages": messages}),
            }
        )
    return pa.Table.from_pylist(rows, schema=STAGED_SCHEMA)


GOOD = [("system", "s"), ("user", "q"), ("assistant", "a")]


@pytest.mark.parametrize(
    "turns, reasons",
    [
        (GOOD, []),
        ([], ["no_messages", "no_user_turn", "no_assistant_turn", "last_turn_not_assistant"]),
        ([("user", "q"), ("narrator", "x"), ("assistant", "a")], ["unknown_role"]),
        ([("assistant", "a")], ["no_user_turn"]),
        ([("user", "q")], ["no_assistant_turn", "last_turn_not_assistant"]),
        ([("user", "q"), ("assistant", "a"), ("user", "more?")], ["last_turn_not_assistant"]),
        ([("user", "q"), ("assistant", "a"), ("tool", "{}")], ["last_turn_not_assistant"]),
        ([("user", "q"), ("assistant", " \n\t")], ["empty_content"]),
        ([("user", "q"), ("system", "late"), ("assistant", "a")], ["system_not_first"]),
        ([("user", "q" * 500), ("assistant", "a")], ["too_long"]),
    ],
)
def test_each_rule_quarantines_with_its_reason(turns, reasons):
    accepted, quarantined = split_batch(staged([GOOD, turns]), default_validator(), max_chars=400)
    if not reasons:
        assert accepted.num_rows == 2 and quarantined.num_rows == 0
        return
    assert accepted.num_rows == 1
    (row,) = quarantined.to_pylist()
    assert sorted(row["reasons"]) == sorted(reasons)
    assert row["source_row"] == 2 and row["raw"] == json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})
    assert all(f"{r}:" in row["details"] for r in reasons)


def test_features_are_per_row():
    features = row_features(staged([GOOD, [("user", "q"), ("assistant", "")]]))
    assert features["n_messages"].tolist() == [3, 2]
    assert features["n_empty"].tolist() == [0, 1]
    assert features["last_role"].tolist() == ["assistant", "assistant"]
    assert features["total_chars"].tolist() == [3, 1]


def write_suite(tmp_path, expectations):
    path = tmp_path / "suite.json"
    path.write_text(json.dumps({"name": "t", "version": 1, "expectations": expectations}))
    return path


def test_shipped_suite_loads_every_expectation():
    contract = load_suite()
    shipped = json.loads(SUITE_PATH.read_text())["expectations"]
    assert len(contract.suite.expectations) == len(shipped)
    assert contract.reasons == tuple(e["meta"]["reason"] for e in shipped)


@pytest.mark.parametrize(
    "expectation, message",
    [
        ({"type": "expect_column_values_to_be_nonsense", "kwargs": {"column": "n_user"}, "meta": {"reason": "x"}},
         "unknown expectation type"),
        ({"type": "expect_column_values_to_be_between", "kwargs": {"column": "n_user", "min_value": 1}, "meta": {}},
         "meta.reason"),
        ({"type": "expect_column_values_to_be_between", "kwargs": {"column": "nope", "min_value": 1},
          "meta": {"reason": "x"}}, "not a row feature"),
        ({"type": "expect_column_values_to_be_between", "kwargs": {"column": "n_user", "min_value": "many"},
          "meta": {"reason": "x"}}, "invalid arguments"),
    ],
)
def test_suite_loading_is_strict(tmp_path, expectation, message):
    with pytest.raises(ConfigError, match=message):
        load_suite(write_suite(tmp_path, [expectation]))


def test_empty_or_corrupt_suite_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="non-empty 'expectations'"):
        load_suite(write_suite(tmp_path, []))
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="cannot read"):
        load_suite(tmp_path / "bad.json")
