"""The outcome of a drop, decided by pure functions: the reject rule, each kind of report, a re-ingest."""

from __future__ import annotations

import pytest

from foundation.artifacts import DropRecord, DropReport, SplitRows
from foundation.errors import DropError
from schemas.config import IngestConfig
from tasks.format import FormatResult, dataset_updated
from tasks.report import (
    DropRead,
    check_counts,
    earlier_ingest,
    ingested_report,
    noop_report,
    reject_reason,
    rejected_report,
    require_rows,
)

READ = DropRead.of("d", "f" * 64, {"/x/rows.jsonl": {"format": "openai", "rows": 10, "quarantined_on_read": 1}},
                   rows_in=10, quarantined=3, valid=7)


def test_the_reject_rule_fails_a_drop_over_the_limit_only():
    assert reject_reason(READ, 0.3) is None  # 30% quarantined, at the limit
    reason = reject_reason(READ, 0.2)
    assert reason.startswith("3 of 10 rows (30.0%) failed validation, over the limit of 20%")
    assert "--max-reject-rate" in reason


def test_a_rejected_drop_holds_its_valid_rows_back_and_reconciles():
    report = rejected_report(READ, IngestConfig(max_reject_rate=0.2), "too many", current=None)
    assert (report.status, report.accepted, report.held_back, report.dataset_version) == ("rejected", 0, 7, None)
    assert report.error == "too many" and report.reject_rate == 0.3 and report.max_reject_rate == 0.2
    check_counts(report)


def test_an_ingested_drop_reports_what_format_made_of_its_rows():
    formatted = FormatResult(accepted=5, duplicates=2, duplicates_path="/tmp/d", dataset_version="ds-2",
                             dataset_changed=True, dataset_rows=SplitRows(train=40, eval=5))
    report = ingested_report(READ, IngestConfig(), formatted)
    assert (report.status, report.accepted, report.duplicates, report.held_back) == ("ingested", 5, 2, 0)
    assert report.files["/x/rows.jsonl"].format == "openai" and report.error is None
    check_counts(report)
    assert dataset_updated(report).dataset_version == "ds-2"
    unchanged = report.model_copy(update={"dataset_changed": False})
    assert dataset_updated(unchanged) is None and dataset_updated(report.model_copy(update={"noop": True})) is None


def test_a_drop_without_rows_is_an_error():
    with pytest.raises(DropError, match="a.jsonl: no rows found"):
        require_rows(0, ["a.jsonl"])


def test_an_earlier_ingest_is_a_no_op_and_a_reused_id_with_new_content_is_refused():
    done = ingested_report(READ, IngestConfig(), FormatResult(5, 2, "", "ds-2", True, SplitRows(train=4, eval=1)))
    assert earlier_ingest(done, None, READ.fingerprint) is done
    assert earlier_ingest(None, None, READ.fingerprint) is None  # never ingested
    with pytest.raises(DropError, match="already ingested with other content"):
        earlier_ingest(done, None, "0" * 64)
    # in the lineage but without a report: interrupted after its version was written, so not done
    record = DropRecord(**READ.record_fields(), accepted=5, duplicates=2)
    assert earlier_ingest(None, record, READ.fingerprint) is None
    with pytest.raises(DropError, match="--drop-id"):
        earlier_ingest(None, record, "0" * 64)
    rejected = rejected_report(READ, IngestConfig(max_reject_rate=0.2), "too many", None)
    assert earlier_ingest(rejected, None, READ.fingerprint) is None  # a rejected drop may be dropped again


def test_a_no_op_report_keeps_the_earlier_counts_and_names_the_dataset_as_it_is():
    record = DropRecord(**READ.record_fields(), accepted=5, duplicates=2)
    report = noop_report(record, current=None)
    assert isinstance(report, DropReport) and report.noop and report.status == "ingested"
    assert (report.accepted, report.duplicates, report.quarantined) == (5, 2, 3) and not report.dataset_changed
    assert report.dataset_rows == SplitRows(train=0, eval=0) and report.reasons == {}


def test_the_quarantine_markdown_names_the_commands_beside_the_paths():
    from tasks.report import quarantine_markdown

    report = ingested_report(READ, IngestConfig(), FormatResult(5, 2, "", "ds-2", True, SplitRows(train=4, eval=1)))
    report = report.model_copy(update={"quarantine_path": "/ws/drops/d/quarantine.parquet"})
    example = {"source_file": "/x/rows.jsonl", "source_row": 3, "reasons": ["empty_answer"], "details": "", "raw": "{}"}
    markdown = quarantine_markdown(report, [example])
    assert "`/ws/drops/d/quarantine.parquet` (`sftflow quarantine d` shows them by reason)" in markdown
    assert "(`sftflow datasets show ds-2`)" in markdown


def test_the_pipeline_summary_names_a_command_for_each_thing_it_wrote():
    from foundation.artifacts import DropSummary, PipelineSummary, PublishResult
    from tasks.report import pipeline_commands

    done = ingested_report(READ, IngestConfig(), FormatResult(5, 2, "", "ds-2", True, SplitRows(train=4, eval=1)))
    summary = PipelineSummary(status="published", drops=[DropSummary.of(done)], config="c.yaml", config_hash="h",
                              dataset_version="ds-2")
    assert pipeline_commands(summary) == ["sftflow quarantine d", "sftflow datasets show ds-2"]
    summary.published = PublishResult(name="m", version="v0003", path="/ws/registry/m/v0003", promoted=True,
                                      champion="v0003")
    assert pipeline_commands(summary)[-1] == "sftflow models show m@v0003"
