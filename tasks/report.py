"""Report: what a drop and a pipeline run did, as files, Prefect artifacts and plain text.

Every input row ends in exactly one place — accepted into the dataset, dropped as a duplicate, or
quarantined — and `rows_in == accepted + duplicates + quarantined` is checked here for every drop.

The plain-text summaries (`drop_text`, `pipeline_text`) are the terminal's and the dashboard's:
`sftflow ingest / pipeline / demo` print them and `sft_pipeline` publishes the same text as its
`pipeline-summary` artifact, so the two never tell different stories.
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from foundation import staging
from foundation.artifacts import DropRecord, DropReport, DropSummary, FileRead, PipelineSummary, SplitRows
from foundation.errors import DropError
from foundation.stores.datasets import DatasetVersion
from foundation.stores.drops import DropStore
from foundation.workspace import Workspace
from schemas.config import IngestConfig
from schemas.tables import QUARANTINE_SCHEMA


class CountMismatchError(RuntimeError):
    """Rows were lost or double-counted: a bug, never bad input."""


def check_counts(report: DropReport) -> None:
    """rows_in == accepted + duplicates + quarantined (+ held_back: valid rows of a rejected drop)."""
    total = report.accepted + report.duplicates + report.quarantined + report.held_back
    if report.rows_in != total:
        raise CountMismatchError(
            f"drop {report.drop_id}: rows_in {report.rows_in} != accepted {report.accepted} + duplicates "
            f"{report.duplicates} + quarantined {report.quarantined} + held back {report.held_back} ({total})"
        )


# ---------------------------------------------------------------------------------------------
# The outcome of a drop: pure decisions over what was read
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DropRead:
    """A drop as read and validated, before the reject rule: what its report and its record start from."""

    drop_id: str
    fingerprint: str
    files: dict[str, FileRead]
    rows_in: int
    quarantined: int
    valid: int  # rows that passed validation: accepted, duplicates, or held back when the drop is rejected
    ingested_at: str
    descriptor: dict | None = None  # the drop's descriptor as applied (`descriptor.MappedDrop.record`)

    @classmethod
    def of(cls, drop_id: str, fingerprint: str, files: dict[str, dict], rows_in: int, quarantined: int,
           valid: int, descriptor: dict | None = None) -> "DropRead":
        return cls(drop_id, fingerprint, {url: FileRead(**counts) for url, counts in files.items()}, rows_in,
                   quarantined, valid, datetime.now(timezone.utc).isoformat(timespec="seconds"), descriptor)

    @property
    def reject_rate(self) -> float:
        return round(self.quarantined / self.rows_in, 6)

    def record_fields(self) -> dict:
        """The drop's fields of its record in the dataset lineage (DropRecord, less what format counts)."""
        return {k: getattr(self, k) for k in ("drop_id", "fingerprint", "rows_in", "quarantined", "ingested_at")}

    def report_fields(self, config: IngestConfig) -> dict:
        # A drop without a descriptor has no `descriptor` key at all, as before descriptors existed.
        mapped = {"descriptor": self.descriptor} if self.descriptor is not None else {}
        return {**self.record_fields(), "files": self.files, "reject_rate": self.reject_rate,
                "max_reject_rate": config.max_reject_rate, **mapped}


def require_rows(rows_in: int, files: list[str]) -> None:
    """A drop with no row at all is an error, not an empty dataset change."""
    if rows_in == 0:
        raise DropError(f"{', '.join(files)}: no rows found; the drop's files are empty")


def reject_reason(read: DropRead, max_reject_rate: float) -> str | None:
    """The reject rule: a drop with more than `max_reject_rate` of its rows quarantined fails whole."""
    if read.reject_rate <= max_reject_rate:
        return None
    return (f"{read.quarantined} of {read.rows_in} rows ({read.reject_rate:.1%}) failed validation, over the limit "
            f"of {max_reject_rate:.0%}: the drop was not ingested. See the reasons, fix the source and drop it "
            "again, or raise --max-reject-rate")


def rejected_report(read: DropRead, config: IngestConfig, error: str, current: DatasetVersion | None) -> DropReport:
    """A rejected drop: no row accepted, its valid rows held back, the dataset as it was."""
    return DropReport(**read.report_fields(config), status="rejected", accepted=0, duplicates=0, held_back=read.valid,
                      dataset_version=current.name if current else None, dataset_changed=False,
                      dataset_rows=current.manifest.rows if current else SplitRows(train=0, eval=0), error=error)


def ingested_report(read: DropRead, config: IngestConfig, formatted) -> DropReport:
    """An ingested drop, with what format made of its valid rows (a `tasks.format.FormatResult`)."""
    return DropReport(**read.report_fields(config), status="ingested", accepted=formatted.accepted,
                      duplicates=formatted.duplicates, held_back=0, dataset_version=formatted.dataset_version,
                      dataset_changed=formatted.dataset_changed, dataset_rows=formatted.dataset_rows)


def earlier_ingest(report: DropReport | None, recorded: DropRecord | None,
                   fingerprint: str) -> DropReport | DropRecord | None:
    """The earlier ingest of this very drop (its report, or its record in the dataset lineage), or None;
    a reused id with new content is an error.

    A drop found in the lineage but without a report of its ingest was interrupted after its dataset
    version was written: that is not done (its quarantine is not on disk yet), so None, and the re-run
    finishes it (write_dataset_version reports the version the drop already made).
    """
    previous = report if report is not None and report.status == "ingested" else None
    if previous is None:
        if recorded is None or recorded.fingerprint == fingerprint:
            return None
        previous = recorded
    if previous.fingerprint != fingerprint:
        raise DropError(
            f"drop id {previous.drop_id!r} was already ingested with other content (fingerprint "
            f"{previous.fingerprint[:12]}, now {fingerprint[:12]}); drops are immutable: give the new data a new "
            "--drop-id"
        )
    return previous


def noop_report(previous: DropReport | DropRecord, current: DatasetVersion | None) -> DropReport:
    """Ingesting a drop again is a no-op: its earlier report (or lineage record), and the dataset as it is."""
    fields = {"status": "ingested", "held_back": 0, "reasons": {}} | previous.dump()
    fields |= {"dataset_changed": False, "dataset_version": current.name if current else None,
               "dataset_rows": current.manifest.rows if current else SplitRows(train=0, eval=0)}
    return DropReport.parse(fields | {"noop": True}, f"the report of drop {previous.drop_id}")


@task(cache_policy=NO_CACHE)
def find_earlier_ingest(drop_id: str, fingerprint: str) -> DropReport | None:
    """The no-op report when this very drop was ingested before; None when it must be ingested."""
    workspace = Workspace.from_env()
    current = workspace.datasets.current()
    recorded = current.manifest.record_of(drop_id) if current else None
    previous = earlier_ingest(workspace.drops.report(drop_id), recorded, fingerprint)
    return noop_report(previous, current) if previous is not None else None


def merge_quarantine(paths: list[str], target: Path) -> tuple[int, dict[str, int]]:
    """Concatenate quarantine tables into one file; returns (rows, count per reason)."""
    reasons: Counter = Counter()
    rows = 0
    with pq.ParquetWriter(target, QUARANTINE_SCHEMA, compression="zstd") as writer:
        for path in paths:
            if not Path(path).exists():
                continue
            for batch in staging.iter_batches(path):
                writer.write_batch(batch)
                rows += batch.num_rows
                for row_reasons in batch.column("reasons").to_pylist():
                    reasons.update(row_reasons)
    return rows, dict(sorted(reasons.items()))


def quarantine_examples(path: Path, limit: int) -> list[dict]:
    if limit == 0 or not path.exists():
        return []
    table = pq.ParquetFile(path)
    for batch in table.iter_batches(batch_size=limit):
        return batch.to_pylist()
    return []


def _cell(text: str, width: int = 160) -> str:
    text = text if len(text) <= width else text[: width - 1] + "…"
    return text.replace("|", "\\|").replace("\n", " ").replace("`", "'")


def quarantine_markdown(report: DropReport, examples: list[dict]) -> str:
    lines = [
        f"# Drop `{report.drop_id}`: {report.status}",
        "",
        f"{report.rows_in} rows in = {report.accepted} accepted + {report.duplicates} duplicates + "
        f"{report.quarantined} quarantined (reject rate {report.reject_rate:.1%}, limit "
        f"{report.max_reject_rate:.0%}). Dataset version: `{report.dataset_version}`"
        + (f" (`sftflow datasets show {report.dataset_version}`)." if report.dataset_version else "."),
        "",
    ]
    if report.error:
        lines += [f"**{report.error}**", ""]
    if examples:
        lines += ["## Quarantined examples", "", "| file | row | reasons | details | raw |", "|---|---|---|---|---|"]
        for ex in examples:
            lines.append(
                f"| {_cell(Path(ex['source_file']).name)} | {ex['source_row']} | {', '.join(ex['reasons'])} | "
                f"{_cell(ex['details'])} | `{_cell(ex['raw'], 120)}` |"
            )
        lines += ["", f"All quarantined rows: `{report.quarantine_path}` (`sftflow quarantine {report.drop_id}` "
                      "shows them by reason)"]
    else:
        lines.append("No rows were quarantined.")
    return "\n".join(lines)


@task(cache_policy=NO_CACHE)
def write_drop_report(report: DropReport, quarantine_parts: list[str], duplicates_path: str | None,
                      examples: int) -> DropReport:
    """Write `drops/<id>/` whole (quarantine, duplicates, report.json last) and publish artifacts."""
    store = Workspace.from_env().drops
    with store.write(report.drop_id) as tmp:
        quarantined, reasons = merge_quarantine(quarantine_parts, DropStore.quarantine_file(tmp))
        if duplicates_path and Path(duplicates_path).exists():
            shutil.copyfile(duplicates_path, DropStore.duplicates_file(tmp))
        if quarantined != report.quarantined:
            raise CountMismatchError(f"drop {report.drop_id}: {quarantined} quarantine rows on disk, "
                                     f"{report.quarantined} counted")
        report = report.model_copy(update={"reasons": reasons,
                                           "quarantine_path": str(store.quarantine_path(report.drop_id))})
        check_counts(report)
        DropStore.write_report(tmp, report)
    publish_drop_artifacts(report, quarantine_examples(store.quarantine_path(report.drop_id), examples))
    return report


def publish_drop_artifacts(report: DropReport, examples: list[dict]) -> None:
    key = "drop-" + "".join(c if c.isalnum() else "-" for c in report.drop_id.lower())[:90]
    counts = [
        {"what": "rows_in", "count": report.rows_in},
        {"what": "accepted", "count": report.accepted},
        {"what": "duplicates", "count": report.duplicates},
        {"what": "quarantined", "count": report.quarantined},
        *({"what": f"reason: {reason}", "count": n} for reason, n in report.reasons.items()),
    ]
    create_table_artifact(
        key=f"{key}-counts",
        table=counts,
        description=f"Drop {report.drop_id} ({report.status}): counts and quarantine reasons",
    )
    create_markdown_artifact(
        key=f"{key}-quarantine",
        markdown=quarantine_markdown(report, examples),
        description=f"Drop {report.drop_id}: quarantined examples and their reasons",
    )


def drop_text(report: DropReport | DropSummary) -> str:
    """One drop: what came in, what became of each row, and the dataset version it left."""
    reasons = ", ".join(f"{k}={v}" for k, v in (report.reasons or {}).items()) or "none"
    head = "already ingested (no-op)" if report.noop else report.status
    held_back = getattr(report, "held_back", 0) or 0
    lines = [
        f"drop {report.drop_id}: {head}",
        f"  rows in {report.rows_in} = accepted {report.accepted} + duplicates {report.duplicates} + "
        f"quarantined {report.quarantined}" + (f" + held back {held_back}" if held_back else ""),
        f"  reasons: {reasons}",
    ]
    if rows := report.dataset_rows:
        lines.append(f"  dataset {report.dataset_version} (train {rows.train}, eval {rows.eval})")
    if descriptor := getattr(report, "descriptor", None):
        lines.append(f"  mapped by {descriptor['source']} ({descriptor['kind']} descriptor): "
                     f"{len(descriptor['files'])} of {len(report.files or {})} files")
        lines += [f"  note: {note}" for note in descriptor["notes"]]
    for url, read in (getattr(report, "files", None) or {}).items():
        if read.format == "preference":
            lines.append(f"  note: {url} holds preference pairs: each row's chosen conversation is trained, its "
                         "rejected reply is not (sftflow trains supervised)")
    return "\n".join(lines)


def pipeline_text(summary: PipelineSummary) -> str:
    """A pipeline run: its drops, why it skipped (if it did), training, evaluation, GGUF parity, publish."""
    lines = [drop_text(d) for d in summary.drops]
    if summary.reason:
        lines.append(f"\n{summary.reason}")
    if training := summary.training:
        lines.append(f"\ntraining run {training.run_id} ({training.engine} engine): loss "
                     f"{training.loss_first:.3f} -> {training.loss_last:.3f} in {training.global_step} steps")
        lines.append(f"  adapter: {training.adapter_dir}")
    if evaluation := summary.evaluation:
        for model, scores in evaluation.scores.items():
            lines.append(f"  {model:<9} eval loss {scores['eval_loss']:.3f}  rouge-L {scores['rouge_l']:.3f}  "
                         f"chrF {scores['chrf']:.1f}")
        lines.append(f"  decision: {'promote' if evaluation.decision.promote else 'keep'} "
                     f"({evaluation.decision.reason})")
    for kind, p in (summary.gguf.parity if summary.gguf else {}).items():
        lines.append(f"  gguf {kind:<17} KL {p.kl:.1e}  top-1 {p.top1:.3f}  greedy {p.greedy_text()}")
    if published := summary.published:
        lines.append(f"\npublished {published.name} {published.version} "
                     f"({'champion' if published.promoted else 'not promoted'}): {published.path}")
    return "\n".join(lines).lstrip("\n")


def pipeline_commands(summary: PipelineSummary) -> list[str]:
    """The `sftflow` commands that open what a pipeline run wrote (its drops, dataset, run, model)."""
    commands = [f"sftflow quarantine {d.drop_id}" for d in summary.drops if d.quarantined]
    if summary.dataset_version:
        commands.append(f"sftflow datasets show {summary.dataset_version}")
    if summary.training:
        commands.append(f"sftflow runs show {summary.training.run_id}")
    if published := summary.published:
        commands.append(f"sftflow models show {published.name}@{published.version}")
    return commands
