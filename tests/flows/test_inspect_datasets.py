"""Issue 16: `sftflow datasets` (list, show, diff) and `sftflow quarantine` on drops the real ingest wrote.

The ingest runs through Prefect (this directory's harness); the commands themselves read files only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.ingest import ingest_drop
from schemas.config import IngestConfig
from tests.conftest import ROOT, SAMPLE_DROPS

HOSTILE = "\x1b[2J\x1b[H\x1b]0;pwned\x07fake prompt$ \u202eevil\r"


def cli(*args: str):
    from sftflow.cli import app

    return CliRunner().invoke(app, list(args))


def ok_json(*args: str) -> dict:
    done = cli(*args, "--json")
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)


def one_line_error(done, *fragments: str) -> None:
    assert done.exit_code == 2 and done.stdout == "" and done.stderr.count("\n") == 1, done.output
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, done.stderr


@pytest.fixture
def two_versions(workspace, tmp_path):
    """arithmetic (version A), then unit-conversions and a drop with a hostile raw line (version B)."""
    first = ingest_drop(paths=[str(SAMPLE_DROPS / "arithmetic")], drop_id="sample-arithmetic", announce=False)
    second = ingest_drop(paths=[str(SAMPLE_DROPS / "unit-conversions")], drop_id="sample-units", announce=False)
    hostile = tmp_path / "hostile" / "rows.jsonl"
    hostile.parent.mkdir()
    good = "".join(json.dumps({"prompt": f"What is {i} times 3?", "completion": str(3 * i)}) + "\n" for i in range(30))
    hostile.write_text(good + '{"prompt": "' + HOSTILE + '", "completion": "x"\n' + "A" * 5000 + "\n")
    third = ingest_drop(paths=[str(hostile.parent)], drop_id="hostile", announce=False,
                        config=IngestConfig(max_reject_rate=0.5))
    assert third.status == "ingested" and third.quarantined == 2
    return first, second, third


def test_datasets_list_is_what_sftflow_datasets_printed(workspace, two_versions):
    default, listed = ok_json("datasets"), ok_json("datasets", "list")
    assert default == listed and listed["current"] == two_versions[2].dataset_version
    assert len(listed["versions"]) == 3 and set(listed["versions"][0]) == {
        "version", "created_at", "rows", "parent", "drops"}  # the golden test's keys
    human = cli("datasets")
    assert human.exit_code == 0 and human.stdout == cli("datasets", "list").stdout
    assert human.stdout.splitlines()[0].startswith(f"* {two_versions[2].dataset_version}  ")


def test_datasets_show_and_diff_reconcile_with_the_files(workspace, two_versions):
    first, second, _ = two_versions
    shown = ok_json("datasets", "show", second.dataset_version)
    version = workspace.datasets.find(second.dataset_version)
    assert shown["rows"] == {s: pq.read_metadata(version.path(s)).num_rows for s in ("train", "eval")}
    assert shown["parent"] == first.dataset_version and not shown["current"]
    assert [d["drop_id"] for d in shown["drops"]] == ["sample-arithmetic", "sample-units"]
    assert shown["drops"][1]["accepted"] == second.accepted
    assert "  parent      " + first.dataset_version in cli("datasets", "show", second.dataset_version).stdout

    diff = ok_json("datasets", "diff", first.dataset_version, second.dataset_version)
    drops = {d["drop_id"]: d for d in diff["drops"]}
    assert drops["sample-units"]["added"] == second.accepted and drops["sample-units"]["removed"] == 0
    assert drops["sample-arithmetic"]["added"] == drops["sample-arithmetic"]["removed"] == 0
    assert drops["sample-arithmetic"]["kept"] == first.accepted
    assert (diff["added"], diff["removed"], diff["rows_b"] - diff["rows_a"]) == (second.accepted, 0, second.accepted)
    back = ok_json("datasets", "diff", second.dataset_version, first.dataset_version)
    assert (back["added"], back["removed"]) == (0, second.accepted)
    human = cli("datasets", "diff", first.dataset_version, second.dataset_version).stdout.splitlines()
    assert human[0].startswith(f"{first.dataset_version} -> {second.dataset_version}: +{second.accepted} -0 rows")

    one_line_error(cli("datasets", "show", "ds-nope"), "no dataset version 'ds-nope'", first.dataset_version,
                   "sftflow datasets list")
    one_line_error(cli("datasets", "diff", first.dataset_version, "../x"), "no dataset version '../x'")


def test_quarantine_counts_reconcile_and_rows_are_limited(workspace, two_versions):
    first = two_versions[0]
    report = ok_json("quarantine", "sample-arithmetic", "--limit", "1")
    table = pq.read_table(first.quarantine_path)
    assert report["rows"] == table.num_rows == first.quarantined == report["quarantined"]
    assert {r["reason"]: r["count"] for r in report["reasons"]} == first.reasons
    for item in report["reasons"]:
        assert len(item["rows"]) == 1
        row = item["rows"][0]
        match = [r for r in table.to_pylist() if r["source_row"] == row["source_row"]][0]
        assert item["reason"] in match["reasons"] and row["details"] == match["details"]
    none = ok_json("quarantine", "sample-arithmetic", "--limit", "0")
    assert all(r["rows"] == [] for r in none["reasons"])
    one_line_error(cli("quarantine", "nope"), "no ingested drop 'nope'", "hostile, sample-arithmetic, sample-units")


def test_a_hostile_raw_line_is_printed_escaped_and_truncated(workspace, two_versions):
    done = cli("quarantine", "hostile", "--limit", "5")
    assert done.exit_code == 0
    out = done.stdout
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out and "\r" not in out
    assert "\\x1b[2J\\x1b[H\\x1b]0;pwned\\x07fake prompt$ \\u202eevil\\r" in out
    assert "A" * 200 + "…" in out and "A" * 201 not in out
    as_json = cli("quarantine", "hostile", "--json").stdout
    assert "\x1b" not in as_json and "\u202e" not in as_json and as_json.count("\n") == 1  # escaped in the JSON text
    rows = [row for item in json.loads(as_json)["reasons"] for row in item["rows"]]
    long = [r for r in rows if r["raw"].startswith("A")][0]
    assert long["raw"] == "A" * 200 and long["raw_truncated"] and long["raw_chars"] == 5000
    assert any(HOSTILE in r["raw"] for r in rows)  # --json: the raw field as it was, truncated


def test_the_dataset_commands_import_no_prefect_torch_transformers_or_gx(workspace, two_versions):
    first, second, _ = two_versions
    env = {**os.environ, "SFTFLOW_HOME": str(workspace.root), "PYTHONPATH": str(ROOT)}
    for args in (["datasets"], ["datasets", "show", first.dataset_version],
                 ["datasets", "diff", first.dataset_version, second.dataset_version], ["quarantine", "hostile"]):
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "sftflow", *args, "--json"],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines()
                    if line.startswith("import time:")}
        assert not imported & {"prefect", "torch", "transformers", "great_expectations"}, args
        json.loads(done.stdout)


def test_quarantine_of_a_rejected_drop(workspace):
    from foundation.errors import DropRejectedError

    with pytest.raises(DropRejectedError):
        ingest_drop(paths=[str(SAMPLE_DROPS / "json-extraction")], drop_id="rejected", announce=False,
                    config=IngestConfig(max_reject_rate=0.01))
    report = json.loads((workspace.drops_dir / "rejected" / "report.json").read_text())
    shown = ok_json("quarantine", "rejected")
    assert shown["status"] == "rejected" and shown["rows"] == report["quarantined"] == 4
    assert {r["reason"]: r["count"] for r in shown["reasons"]} == report["reasons"]
    assert cli("quarantine", "rejected").stdout.startswith("drop rejected (rejected): 4 of 104 rows quarantined")
