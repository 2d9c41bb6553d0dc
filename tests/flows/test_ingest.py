"""The `ingest_drop` flow through Prefect: counts reconcile, versions chain, nothing is lost."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.ingest import ingest_drop
from schemas.config import IngestConfig
from foundation.errors import DatasetError, DropError, DropRejectedError
from tasks.format import eval_mask
from tests.conftest import ROOT, SAMPLE_DROPS, shared_dataset


def reconciles(report: dict) -> bool:
    counts = report if isinstance(report, dict) else report.model_dump()  # the CLI's JSON, or a DropReport
    return counts["rows_in"] == counts["accepted"] + counts["duplicates"] + counts["quarantined"] + counts["held_back"]


def dataset_table(workspace, split: str) -> pa.Table:
    return pq.read_table(workspace.datasets.current().path(split))


def write_jsonl(path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def qa(i: int) -> dict:
    return {"prompt": f"What is {i} + {i}?", "completion": str(2 * i)}


EXPECTED_SAMPLES = {
    # drop: (rows_in, accepted, duplicates, quarantined), from data/drops/README.md
    "arithmetic": (103, 100, 1, 2),
    "json-extraction": (104, 100, 0, 4),
    "support-chats": (62, 60, 0, 2),
    # indexes 33 and 88 (no instruction, the question in the input) are accepted since issue 14
    "unit-conversions": (116, 112, 2, 2),
}


def test_sample_drops_ingest_reconcile_and_chain(workspace):
    reports = []
    for name, expected in EXPECTED_SAMPLES.items():
        report = ingest_drop(paths=[str(SAMPLE_DROPS / name)], drop_id=f"sample-{name}")
        assert (report.rows_in, report.accepted, report.duplicates, report.quarantined) == expected
        assert reconciles(report) and report.status == "ingested" and report.dataset_changed
        on_disk = json.loads((workspace.drops_dir / f"sample-{name}" / "report.json").read_text())
        assert on_disk["rows_in"] == report.rows_in and on_disk["reasons"] == report.reasons
        quarantine = pq.read_table(report.quarantine_path)
        assert quarantine.num_rows == report.quarantined
        assert all(r["reasons"] and r["details"] for r in quarantine.to_pylist())
        reports.append(report)

    # each version's parent is the previous one, and the last holds every accepted row once
    manifests = [json.loads((workspace.datasets_dir / r.dataset_version / "manifest.json").read_text()) for r in reports]
    assert [m["parent"] for m in manifests] == [None] + [r.dataset_version for r in reports[:-1]]
    assert [d["drop_id"] for d in manifests[-1]["drops"]] == [f"sample-{n}" for n in EXPECTED_SAMPLES]
    train, evaluation = dataset_table(workspace, "train"), dataset_table(workspace, "eval")
    all_ids = train.column("id").to_pylist() + evaluation.column("id").to_pylist()
    assert len(all_ids) == len(set(all_ids)) == sum(r.accepted for r in reports)
    assert eval_mask(evaluation.column("id"), 0.1).all() and not eval_mask(train.column("id"), 0.1).any()
    assert manifests[-1]["rows"] == {"train": train.num_rows, "eval": evaluation.num_rows}


def test_reingesting_the_same_drop_is_a_no_op(workspace):
    path = write_jsonl(workspace.root / "in" / "d1" / "rows.jsonl", [qa(i) for i in range(30)])
    first = ingest_drop(paths=[path])
    before = sorted(p.name for p in workspace.datasets_dir.iterdir())
    second = ingest_drop(paths=[path])
    assert second.noop and second.drop_id == first.drop_id
    assert second.dataset_version == first.dataset_version and not second.dataset_changed
    assert sorted(p.name for p in workspace.datasets_dir.iterdir()) == before


def test_same_drop_id_with_new_content_is_refused(workspace):
    ingest_drop(paths=[write_jsonl(workspace.root / "a" / "rows.jsonl", [qa(1), qa(2)])], drop_id="weekly")
    changed = write_jsonl(workspace.root / "b" / "rows.jsonl", [qa(3), qa(4)])
    with pytest.raises(DropError, match="already ingested with other content.*new --drop-id"):
        ingest_drop(paths=[changed], drop_id="weekly")


def test_overlapping_drop_counts_dataset_duplicates_and_keeps_splits(workspace):
    first = ingest_drop(paths=[write_jsonl(workspace.root / "a" / "rows.jsonl", [qa(i) for i in range(200)])])
    eval_before = set(dataset_table(workspace, "eval").column("id").to_pylist())
    second = ingest_drop(paths=[write_jsonl(workspace.root / "b" / "rows.jsonl", [qa(i) for i in range(150, 300)])])
    assert (second.accepted, second.duplicates) == (100, 50)
    assert second.dataset_rows.train + second.dataset_rows.eval == 300
    duplicates = pq.read_table(workspace.drops_dir / second.drop_id / "duplicates.parquet").to_pylist()
    assert {d["duplicate_of"] for d in duplicates} == {f"dataset:{first.dataset_version}"}
    # no leakage across retrains: every eval row stays in eval
    assert eval_before <= set(dataset_table(workspace, "eval").column("id").to_pylist())


def test_drop_of_only_known_rows_writes_no_version(workspace):
    rows = [qa(i) for i in range(20)]
    first = ingest_drop(paths=[write_jsonl(workspace.root / "a" / "rows.jsonl", rows)], drop_id="monday")
    again = ingest_drop(paths=[write_jsonl(workspace.root / "b" / "rows.jsonl", rows)], drop_id="tuesday")
    assert again.status == "ingested" and not again.dataset_changed
    assert (again.accepted, again.duplicates) == (0, 20)
    assert again.dataset_version == first.dataset_version


def test_reject_rate_over_the_limit_fails_the_whole_drop(workspace):
    good = [qa(i) for i in range(6)]
    bad = [{"prompt": "no answer"} for _ in range(4)]
    path = write_jsonl(workspace.root / "a" / "rows.jsonl", good + bad)
    with pytest.raises(DropRejectedError, match=r"4 of 10 rows \(40.0%\).*over the limit of 20%") as info:
        ingest_drop(paths=[path], drop_id="too-bad")
    report = info.value.report
    assert report.status == "rejected" and report.held_back == 6 and reconciles(report)
    assert report.reasons == {"missing_field:completion": 4}
    assert workspace.datasets.current() is None  # no dataset version
    assert json.loads((workspace.drops_dir / "too-bad" / "report.json").read_text())["status"] == "rejected"
    # the same drop passes with a looser limit
    passed = ingest_drop(paths=[path], drop_id="too-bad", config=IngestConfig(max_reject_rate=0.5))
    assert passed.status == "ingested" and passed.accepted == 6


def test_changing_eval_ratio_on_an_existing_lineage_is_refused(workspace):
    ingest_drop(paths=[write_jsonl(workspace.root / "a" / "rows.jsonl", [qa(1), qa(2)])])
    with pytest.raises(DatasetError, match="eval_ratio 0.3 differs.*keep --eval-ratio 0.1"):
        ingest_drop(paths=[write_jsonl(workspace.root / "b" / "rows.jsonl", [qa(3)])],
                    config=IngestConfig(eval_ratio=0.3))


def test_bad_input_corpus_is_quarantined_not_crashed(workspace):
    drop = workspace.root / "corpus"
    drop.mkdir()
    lines = [
        json.dumps(qa(1)),
        '{"prompt": "cut off',
        json.dumps({"prompt": 5, "completion": "x"}),
        json.dumps({"completion": "no prompt"}),
        json.dumps({"prompt": "ten megabytes", "completion": "y" * 10_000_000}),
        json.dumps(["not", "an", "object"]),
    ]
    (drop / "a.jsonl").write_text("\n".join(lines) + "\n")
    (drop / "b.jsonl").write_bytes(b'{"prompt": "caf\xe9", "completion": "latin-1"}\n' + json.dumps(qa(2)).encode() + b"\n")
    (drop / "c.csv").write_text("prompt,completion\nq,a\nonly-one-field\n")
    (drop / "empty.jsonl").write_text("")
    with gzip.open(drop / "d.json.gz", "wt") as fh:
        json.dump([qa(3), {"prompt": "", "completion": "blank prompt"}], fh)
    report = ingest_drop(paths=[str(drop)], config=IngestConfig(max_reject_rate=1.0))
    assert reconciles(report) and report.rows_in == 12
    assert report.accepted == 4
    assert report.reasons == {
        "empty_content": 1,
        "invalid_utf8": 1,
        "malformed_csv": 1,
        "malformed_json": 1,
        "missing_field:prompt": 1,
        "not_an_object": 1,
        "too_long": 1,
        "wrong_type:prompt": 1,
    }
    quarantine = {(r["source_file"].rsplit("/", 1)[1], r["source_row"]): r for r in
                  pq.read_table(report.quarantine_path).to_pylist()}
    assert quarantine[("a.jsonl", 2)]["raw"] == '{"prompt": "cut off'
    assert len(quarantine[("a.jsonl", 5)]["raw"]) > 10_000_000  # the whole raw row is kept
    assert quarantine[("b.jsonl", 1)]["reasons"] == ["invalid_utf8"]
    assert quarantine[("c.csv", 3)]["reasons"] == ["malformed_csv"]


def test_a_drop_with_no_rows_fails_clearly(workspace):
    (workspace.root / "e").mkdir()
    (workspace.root / "e" / "rows.jsonl").write_text("\n\n")
    with pytest.raises(DropError, match="no rows found"):
        ingest_drop(paths=[str(workspace.root / "e")])


def test_unsafe_drop_id_is_refused_before_anything_is_written(workspace):
    path = write_jsonl(workspace.root / "a" / "rows.jsonl", [qa(1)])
    with pytest.raises(DropError, match="not allowed"):
        ingest_drop(paths=[path], drop_id="../../escape")
    assert not list(workspace.drops_dir.iterdir()) and not (workspace.root.parent / "escape").exists()


def test_shared_alpaca_and_glaive_files_ingest_with_zero_quarantined(workspace):
    alpaca = ingest_drop(paths=[str(shared_dataset("alpaca_en_demo.json"))], drop_id="alpaca-demo")
    glaive = ingest_drop(paths=[str(shared_dataset("glaive_toolcall_en_demo.json"))], drop_id="glaive-demo")
    assert (alpaca.rows_in, alpaca.quarantined) == (999, 0) and reconciles(alpaca)
    assert (glaive.rows_in, glaive.quarantined) == (300, 0) and reconciles(glaive)
    assert alpaca.files[str(shared_dataset("alpaca_en_demo.json"))].format == "alpaca"
    rows = dataset_table(workspace, "train").to_pylist() + dataset_table(workspace, "eval").to_pylist()
    tool_rows = [r for r in rows if r["source_drop"] == "glaive-demo"]
    assert tool_rows and all(r["tools"] is None or json.loads(r["tools"]) is not None for r in tool_rows)
    assert any(m["role"] == "tool" for r in tool_rows for m in r["messages"])


def test_artifacts_are_published_to_prefect(workspace):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    ingest_drop(paths=[str(SAMPLE_DROPS / "json-extraction")], drop_id="sample-json-extraction")

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="drop-sample-json-extraction"))
            )

    found = {a.key: a for a in asyncio.run(artifacts())}
    table = found["drop-sample-json-extraction-counts"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert table.type == "table" and {"what": "quarantined", "count": 4} in rows
    markdown = found["drop-sample-json-extraction-quarantine"].data
    assert "malformed_json" in markdown and "unknown_role" in markdown


@pytest.mark.slow
def test_cli_prints_one_json_object_on_stdout(workspace, tmp_path):
    env = {**os.environ, "SFTFLOW_HOME": str(workspace.root)}
    env.pop("PREFECT_API_URL", None)  # the CLI's default: Prefect's embedded API
    env["PREFECT_HOME"] = str(tmp_path / "cli-prefect")
    cmd = [sys.executable, "-m", "sftflow", "ingest", str(SAMPLE_DROPS / "arithmetic"), "--drop-id", "cli", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # exactly one JSON document, logs went to stderr
    assert set(report) >= {"drop_id", "rows_in", "accepted", "duplicates", "quarantined", "reasons",
                           "dataset_version", "dataset_rows"}
    assert report["drop_id"] == "cli" and reconciles(report)

    bad = subprocess.run([*cmd[:4], "/nonexistent/drop", "--json"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "no such file or directory" in bad.stderr and bad.stdout == ""
