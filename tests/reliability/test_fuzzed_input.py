"""Issue 6, item 6: fuzzed input. Hypothesis-generated files for every reader never raise; every row is
accepted or quarantined with a reason; counts reconcile.

Each generated file goes through the ingest task's own per-file step (`stage_file`: read, detect the
format, normalise, stage or quarantine), and the staged rows of a few hundred cases go through the
real GX contract in one validation run (a GX run costs ~0.25 s whatever its size; the rules are per
row, so batching cases does not change any row's outcome). A smaller set of generated drops, several
files each, goes through the real `ingest_drop` flow end to end.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.config import IngestConfig
from schemas.tables import CANONICAL_SCHEMA
from foundation.errors import DropError, DropRejectedError
from tests.reliability.fuzz_files import (DropFile, csv_files, gzipped_files, json_files, jsonl_files, mismatched_files,
                                          parquet_files)

FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)
CONFIG = IngestConfig(batch_rows=64)
TALLY: Counter = Counter()  # figures for docs/reliability.md, printed at the end of the module


def read_staging(path: str) -> pa.Table:
    with pa.OSFile(path) as source:
        return pa.ipc.open_file(source).read_all()


class StagedCases:
    """Stages generated files one by one and validates their staged rows in batches."""

    def __init__(self, root: Path):
        self.root, self.pending, self.cases = root, [], 0
        self.counts: Counter = Counter()  # rows_in == accepted + quarantined, over every case

    def stage(self, drop_file: DropFile) -> None:
        from tasks.ingest.stage import stage_file

        self.cases += 1
        case_dir = self.root / f"case-{self.cases:05d}"
        case_dir.mkdir()
        path = case_dir / drop_file.name
        path.write_bytes(drop_file.data)
        outcome = stage_file(0, str(path), "fuzz", CONFIG, case_dir)  # must not raise, whatever the bytes
        counts = outcome["counts"]
        staged, quarantined = read_staging(outcome["staged_path"]), read_staging(outcome["quarantine_path"])
        where = f"{drop_file.kind} file {drop_file.data[:300]!r}"
        assert counts["rows_in"] == counts["staged"] + counts["quarantined"], where
        assert (staged.num_rows, quarantined.num_rows) == (counts["staged"], counts["quarantined"]), where
        if drop_file.expected_rows is not None:
            assert counts["rows_in"] == drop_file.expected_rows, where  # no row lost, none invented
        for row in quarantined.select(["source_file", "source_row", "reasons", "details", "raw"]).to_pylist():
            assert row["source_file"] == str(path) and row["source_row"] >= 0, (where, row)
            assert row["reasons"] and all(r and r == r.strip() for r in row["reasons"]), (where, row)
            assert row["details"].strip(), (where, row)  # what is wrong and how to fix it
            TALLY.update(f"reason:{r}" for r in row["reasons"])
        for row_id in staged.column("id").to_pylist():
            assert len(row_id) == 64 and int(row_id, 16) >= 0, where
        TALLY["cases"] += 1
        TALLY["rows_in"] += counts["rows_in"]
        TALLY["quarantined_on_read"] += counts["quarantined"]
        self.counts.update(rows_in=counts["rows_in"], quarantined=counts["quarantined"])
        self.pending.append((where, staged))
        if sum(t.num_rows for _, t in self.pending) >= 2000:
            self.validate()
        shutil.rmtree(case_dir)

    def validate(self) -> None:
        """Run the GX contract over the pending staged rows: each is accepted or quarantined with a reason."""
        from tasks.validate import default_validator
        from tests.tasks.test_validate import split_batch

        tables = [t for _, t in self.pending if t.num_rows]
        self.pending = []
        if not tables:
            return
        rows = pa.concat_tables(tables)
        accepted, quarantined = split_batch(rows, default_validator(), CONFIG.max_chars)
        assert accepted.num_rows + quarantined.num_rows == rows.num_rows
        assert accepted.schema.equals(CANONICAL_SCHEMA, check_metadata=False)
        for reasons in quarantined.column("reasons").to_pylist():
            assert reasons
            TALLY.update(f"reason:{r}" for r in reasons)
        self.counts.update(accepted=accepted.num_rows, quarantined=quarantined.num_rows)
        TALLY["accepted"] += accepted.num_rows
        TALLY["quarantined_by_contract"] += quarantined.num_rows


def fuzz_reader(strategy, examples: int) -> int:
    with tempfile.TemporaryDirectory(prefix="sftflow-fuzz-") as tmp:
        cases = StagedCases(Path(tmp))

        @settings(FUZZ, max_examples=examples)
        @given(strategy)
        def case(drop_file: DropFile) -> None:
            cases.stage(drop_file)

        case()
        cases.validate()
        assert cases.counts["rows_in"] == cases.counts["accepted"] + cases.counts["quarantined"]
        return cases.cases


@pytest.mark.slow
@pytest.mark.parametrize("strategy, examples", [
    pytest.param(jsonl_files(), 450, id="jsonl"),
    pytest.param(json_files(), 450, id="json"),
    pytest.param(csv_files(), 350, id="csv"),
    pytest.param(parquet_files(), 300, id="parquet"),
    pytest.param(gzipped_files(), 250, id="gz"),
    pytest.param(mismatched_files(), 250, id="random-bytes-and-mixed-formats"),
])
def test_every_generated_file_is_read_without_an_unhandled_error_and_reconciles(strategy, examples):
    tried = fuzz_reader(strategy, examples)
    # hypothesis stops early only when it has exhausted the strategy, which these cannot be
    assert tried >= examples * 0.9


@pytest.mark.slow
def test_generated_drops_through_the_ingest_flow_reconcile(tmp_path, monkeypatch, prefect_api_url):
    """Drops of 1-3 generated files, mixed formats, through `ingest_drop` into one workspace."""
    from flows.ingest import ingest_drop

    monkeypatch.setenv("SFTFLOW_HOME", str(tmp_path / "home"))
    drops = st.lists(st.one_of(jsonl_files(), json_files(), csv_files(), parquet_files(), gzipped_files()),
                     min_size=1, max_size=3)
    seen: Counter = Counter()

    @settings(FUZZ, max_examples=12)
    @given(drops)
    def case(files: list[DropFile]) -> None:
        seen["drops"] += 1
        drop = tmp_path / "drops" / f"drop-{seen['drops']:03d}"
        drop.mkdir(parents=True)
        for i, f in enumerate(files):
            (drop / f"{i}-{f.name}").write_bytes(f.data)
        try:
            report = ingest_drop(paths=[str(drop)], drop_id=drop.name)
        except DropRejectedError as exc:  # too many bad rows: a clear, whole-drop failure with its report
            report = exc.report
            assert report.status == "rejected" and "--max-reject-rate" in report.error
            seen["rejected"] += 1
        except DropError as exc:  # nothing readable at all
            assert "no rows found" in str(exc) and str(drop) in str(exc)
            seen["empty"] += 1
            return
        assert report.rows_in == report.accepted + report.duplicates + report.quarantined + report.held_back
        known = [f.expected_rows for f in files]
        if None not in known:
            assert report.rows_in == sum(known)
        table = pq.read_table(Path(report.quarantine_path))
        assert table.num_rows == report.quarantined
        assert all(table.column("reasons").to_pylist())
        assert sum(report.reasons.values()) >= report.quarantined
        seen["rows_in"] += report.rows_in
        TALLY["flow_drops"] += 1
        TALLY["flow_rows_in"] += report.rows_in

    case()
    assert seen["drops"] >= 10


def test_zz_print_fuzz_figures():
    """Prints the figures of this module's fuzzing (run with -s); docs/reliability.md quotes them."""
    if TALLY["cases"]:
        reasons = {k.removeprefix("reason:"): v for k, v in TALLY.most_common() if k.startswith("reason:")}
        print(f"\nfuzz: {TALLY['cases']} files, {TALLY['rows_in']} rows in: {TALLY['accepted']} accepted, "
              f"{TALLY['quarantined_on_read']} quarantined on read, {TALLY['quarantined_by_contract']} by the contract; "
              f"{TALLY['flow_drops']} drops ({TALLY['flow_rows_in']} rows) through the flow; reasons {reasons}")
