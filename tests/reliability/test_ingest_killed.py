"""Issue 6, item 3: ingest killed (kill -9) halfway through writing a dataset version.

The workspace holds one dataset version (the arithmetic sample drop). A second drop, with bad rows,
rows repeated within it and rows already in the dataset, is ingested by the real `ingest_drop` flow
in a fresh process that is SIGKILLed just before its k-th mutation under datasets/ or drops/, for
every k of an uninterrupted ingest (the Parquet writers' batches included). After each kill the
previous version must still be current and readable (or the new one, whole); re-running the drop
must give exactly what the uninterrupted run gave: the same version, counts, quarantine and duplicates.
"""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from tests.conftest import SAMPLE_DROPS
from tests.reliability.conftest import run_crash_loop

pytestmark = pytest.mark.slow

COMPARED = ("status", "rows_in", "accepted", "duplicates", "quarantined", "dataset_version", "dataset_changed",
            "dataset_rows", "reasons")


def second_drop(root):
    """unit-conversions (2 bad rows, 2 repeats) plus 5 rows the arithmetic drop already brought, as JSONL."""
    drop = root / "second"
    drop.mkdir()
    shutil.copyfile(SAMPLE_DROPS / "unit-conversions" / "rows.json", drop / "rows.json")
    with open(SAMPLE_DROPS / "arithmetic" / "rows.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("prompt") and r.get("completion")][:5]
    (drop / "overlap.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n"
                                                for r in rows))
    return drop


def test_ingest_killed_at_every_step_keeps_the_previous_version_and_reruns_to_the_same_one(
        tmp_path, monkeypatch, prefect_api_url):
    from flows.ingest import ingest_drop

    pristine = tmp_path / "pristine"
    monkeypatch.setenv("SFTFLOW_HOME", str(pristine))
    first = ingest_drop(paths=[str(SAMPLE_DROPS / "arithmetic")], drop_id="sample-arithmetic")
    drop = second_drop(tmp_path)

    results = run_crash_loop({
        "action": "ingest", "args": {"paths": [str(drop)], "drop_id": "second"}, "pristine": str(pristine),
        "work": str(tmp_path / "work"), "watch": ["datasets", "drops"], "observe": "tests.reliability.observe:datasets",
    }, tmp_path, prefect_api_url)

    done = results["uninterrupted"]
    assert "error" not in done, done.get("traceback")
    reference, seen_done = done["result"], done["observed"]
    old, new = first.dataset_version, reference["dataset_version"]
    assert reference["dataset_changed"] and new != old
    assert reference["duplicates"] >= 7 and reference["quarantined"] >= 2  # 2 repeats + 5 from the dataset
    kills = results["kills"]
    assert len(kills) == results["survived_at"] - 1 == len(done["trace"]) >= 15, done["trace"]
    # the real, orchestrated flow gives the same report and the same files
    real = results["orchestrated"]
    assert "error" not in real, real.get("traceback")
    assert {k: real["result"][k] for k in COMPARED} == {k: reference[k] for k in COMPARED}
    assert real["observed"]["versions"][new] == seen_done["versions"][new]
    assert real["observed"]["drops"] == seen_done["drops"]
    parquet_kills = [k for k in kills if done["trace"][k["k"] - 1].startswith("parquet.write")]
    assert len(parquet_kills) >= 6  # kills inside the Parquet files of the version and of the quarantine

    for kill in kills:
        seen = kill["after_kill"]
        where = f"killed before mutation {kill['k']}: {done['trace'][kill['k'] - 1]}"
        # the previous version stays current and readable, or the new one is current, whole
        assert seen["current"] in (old, new), where
        current = seen["versions"][seen["current"]]
        assert current["manifest"] and current["files_ok"] and current["rows_match"], (where, current)
        if seen["current"] == old:
            assert current["drops"] == ["sample-arithmetic"], where
        # every visible version is whole: a reader never finds a version without its manifest
        for name, state in seen["versions"].items():
            assert state["manifest"] and state["files_ok"], (where, name, state)
        # the first drop's report is untouched; the second drop's is absent or whole
        assert seen["drops"]["sample-arithmetic"] == seen_done["drops"]["sample-arithmetic"], where
        second = seen["drops"].get("second")
        assert second is None or second == seen_done["drops"]["second"], (where, second)

        # re-running the drop produces what an uninterrupted run produced
        recovery = kill["recovery"]
        assert "error" not in recovery, (where, recovery.get("traceback"))
        assert {k: recovery["result"][k] for k in COMPARED} == {k: reference[k] for k in COMPARED}, where
        after = kill["after_recovery"]
        assert after["current"] == new, where
        assert after["versions"][new] == seen_done["versions"][new], where
        assert after["drops"] == seen_done["drops"], where
        assert after["tmp"] == [], where

    report = seen_done["drops"]["second"]
    assert report["quarantine_rows"] == reference["quarantined"] and report["duplicate_rows"] == reference["duplicates"]
    print(f"\ningest killed: {len(kills)} kill points survived ({len(parquet_kills)} inside Parquet writes), "
          f"{results['seconds']} s; rows reconciled per run: {reference['rows_in']}")
