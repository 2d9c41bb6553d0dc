"""Artifacts: one model per file, written atomically, read back equal; what another version wrote is refused."""

from __future__ import annotations

import json

import pytest

from foundation.artifacts import (
    DropReport,
    EndEvent,
    ExportReport,
    LogEvent,
    Parity,
    SplitRows,
    event_line,
    parse_event,
)
from foundation.errors import WorkspaceError


def report(**changes) -> DropReport:
    fields = dict(drop_id="d", fingerprint="f" * 64, status="ingested", rows_in=3, accepted=2, duplicates=1,
                  quarantined=0, ingested_at="2026-12-01T00:00:00+00:00", dataset_version="ds-1",
                  dataset_changed=True, dataset_rows=SplitRows(train=2, eval=0))
    return DropReport(**fields | changes)


def test_a_written_artifact_reads_back_equal_and_keeps_only_the_keys_it_was_given(tmp_path):
    path = tmp_path / "report.json"
    report(noop=True).write(path)
    on_disk = json.loads(path.read_text())
    assert "noop" not in on_disk  # a message field, never on disk
    assert "error" not in on_disk and "files" not in on_disk  # a variant's absent keys stay absent, not null
    assert DropReport.read(path) == report()
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_file_another_version_wrote_is_refused_naming_the_file_and_the_field(tmp_path):
    path = tmp_path / "report.json"
    report().write(path)
    changed = json.loads(path.read_text()) | {"rows_in": "many", "from_the_future": 1}
    path.write_text(json.dumps(changed))
    with pytest.raises(WorkspaceError) as refused:
        DropReport.read(path)
    message = str(refused.value)
    assert str(path) in message and "rows_in" in message and "SFTFLOW_HOME" in message
    assert "\n" not in message


def test_a_variant_without_its_optional_keys_round_trips(tmp_path):
    failed = ExportReport(passed=False, parity={"f16": Parity(token_ids_equal=1.0, kl=0.5, top1=0.5, greedy_match=0.1)},
                          failures=["f16: KL 5.00e-01 > 1e-03"], timings={"parity_s": 1.0})
    failed.write(tmp_path / "export.json")
    assert set(json.loads((tmp_path / "export.json").read_text())) == {"passed", "parity", "failures", "timings"}
    assert ExportReport.read(tmp_path / "export.json") == failed


def test_both_ends_of_the_worker_events_use_one_model():
    end = EndEvent(global_step=4, train_runtime=1.5, trained_tokens=100, non_pad_tokens=120, train_loss=2.0,
                   peak_mem_gib=0.5, peak_mem_gib_per_rank=[0.5], adapter_dir="/a", world_size=1)
    line = event_line(end)
    assert json.loads(line)["event"] == "end" and parse_event(line) == end
    assert parse_event(event_line(LogEvent(step=1, loss=3.0, trained_tokens=10, elapsed_s=0.1))).step == 1
    with pytest.raises(ValueError, match="not a training event"):
        parse_event('{"event": "log", "step": "one"}')
    with pytest.raises(ValueError):
        parse_event("Some library printed this")
