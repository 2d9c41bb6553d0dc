"""Flow `ingest_drop`: raw drop -> quarantine + a new immutable dataset version.

Run it:
    sftflow ingest data/drops/unit-conversions --json
or from Python:
    from flows.ingest import ingest_drop; ingest_drop(paths=["data/drops/arithmetic"])

With no PREFECT_API_URL it runs on Prefect's embedded API (SQLite under $SFTFLOW_HOME/prefect).

A drop's descriptor (its drop.yaml or LLaMA-Factory dataset_info.json, or the file `--map` names) maps
its columns and roles: see tasks/ingest/descriptor.py.
"""

from __future__ import annotations

from prefect import flow

from foundation.artifacts import DropReport
from foundation.errors import DropRejectedError
from foundation.workspace import Workspace
from schemas.config import IngestConfig
from tasks.format import announce_dataset, dataset_updated, write_dataset_version
from tasks.ingest.descriptor import MappedDrop, find_mapped_drop
from tasks.ingest.stage import read_drop
from tasks.report import (
    DropRead,
    find_earlier_ingest,
    ingested_report,
    reject_reason,
    rejected_report,
    require_rows,
    write_drop_report,
)
from tasks.validate import validate_rows


@flow(name="ingest_drop")
def ingest_drop(paths: list[str], drop_id: str | None = None, config: IngestConfig | None = None,
                announce: bool = True, descriptor: str | None = None) -> DropReport:
    """Read, validate and format one drop; returns the drop report (also at drops/<id>/report.json).

    `descriptor` is a descriptor file (`--map`) used instead of the one the drop holds, if any. What the
    descriptor means is part of the drop's fingerprint: the same files mapped another way are a new drop.

    A new dataset version is announced with the event `sftflow.dataset.updated` (which triggers the
    pipeline deployment) unless `announce` is off, as when `sft_pipeline` ingests and trains itself.
    """
    config = config or IngestConfig()
    mapped = find_mapped_drop(paths, drop_id, descriptor)
    drop = mapped.drop
    workspace = Workspace.from_env().ensure()
    # One ingest per drop id at a time: a drop announced twice is ingested once, then is a no-op.
    with workspace.drops.lock(drop.drop_id):
        report = find_earlier_ingest(drop.drop_id, drop.fingerprint) or ingest_new_drop(workspace, mapped, config)
    if announce and (payload := dataset_updated(report)):
        announce_dataset(payload)
    return report


def ingest_new_drop(workspace: Workspace, mapped: MappedDrop, config: IngestConfig) -> DropReport:
    """Read, validate, apply the reject rule, format; the drop report written whole either way."""
    drop = mapped.drop
    with workspace.drops.staging(drop.drop_id) as staging:
        staged = read_drop(drop.files, drop.drop_id, config, staging, mapped.descriptors)
        require_rows(staged.rows_in, drop.files)
        validated = validate_rows(staged.staged_paths, config, staging)
        read = DropRead.of(drop.drop_id, drop.fingerprint, staged.files, staged.rows_in,
                           staged.quarantined + validated.quarantined, validated.accepted_rows, mapped.record)
        quarantine_parts = [*staged.quarantine_paths, validated.quarantine_path]
        if error := reject_reason(read, config.max_reject_rate):
            report = rejected_report(read, config, error, workspace.datasets.current())
            report = write_drop_report(report, quarantine_parts, None, config.quarantine_examples)
            raise DropRejectedError(f"drop {drop.drop_id}: {error} ({workspace.drops.report_path(drop.drop_id)})",
                                    report)
        formatted = write_dataset_version(validated.accepted_path, read, config, staging)
        report = ingested_report(read, config, formatted)
        return write_drop_report(report, quarantine_parts, formatted.duplicates_path, config.quarantine_examples)
