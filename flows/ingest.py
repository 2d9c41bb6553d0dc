"""Flow `ingest_drop`: raw drop -> quarantine + a new immutable dataset version.

Run it:
    sftflow ingest data/drops/unit-conversions --json
or from Python:
    from flows.ingest import ingest_drop; ingest_drop(paths=["data/drops/arithmetic"])

With no PREFECT_API_URL it runs on Prefect's embedded API (SQLite under $SFTFLOW_HOME/prefect).
"""

from __future__ import annotations

import shutil
import uuid
from datetime import datetime, timezone

from prefect import flow, get_run_logger
from prefect.events import emit_event

from schemas.config import IngestConfig
from foundation.atomic import exclusive_lock, read_json
from foundation.errors import DropError, DropRejectedError
from foundation.workspace import Workspace
from tasks.format import current_version, write_dataset_version
from tasks.ingest.discovery import check_drop_id, default_drop_id, fingerprint_files, list_drop_files
from tasks.ingest.stage import read_drop
from tasks.report import write_drop_report
from tasks.validate import validate_rows


def find_ingested(workspace: Workspace, drop_id: str, fingerprint: str) -> dict | None:
    """The report of an earlier ingest of this very drop, or None; a reused id with new content is an error.

    A drop found in the dataset lineage but without its report was interrupted after its dataset
    version was written: that is not done (its quarantine is not on disk yet), so None, and the
    re-run finishes it (write_dataset_version reports the version the drop already made).
    """
    report_path = workspace.drops_dir / drop_id / "report.json"
    previous = read_json(report_path) if report_path.exists() else None
    if previous is None or previous.get("status") != "ingested":
        version = current_version(workspace)
        lineage = {d["drop_id"]: d for d in version.manifest["drops"]} if version else {}
        recorded = lineage.get(drop_id)
        if recorded is not None and recorded["fingerprint"] != fingerprint:
            previous = recorded
        else:
            return None
    if previous["fingerprint"] != fingerprint:
        raise DropError(
            f"drop id {drop_id!r} was already ingested with other content (fingerprint {previous['fingerprint'][:12]}, "
            f"now {fingerprint[:12]}); drops are immutable: give the new data a new --drop-id"
        )
    return previous


@flow(name="ingest_drop")
def ingest_drop(paths: list[str], drop_id: str | None = None, config: IngestConfig | None = None,
                announce: bool = True) -> dict:
    """Read, validate and format one drop; returns the drop report (also at drops/<id>/report.json).

    A new dataset version is announced with the event `sftflow.dataset.updated` (which triggers the
    pipeline deployment) unless `announce` is off, as when `sft_pipeline` ingests and trains itself.
    """
    logger = get_run_logger()
    config = config or IngestConfig()
    workspace = Workspace.from_env().ensure()
    files = list_drop_files(paths)
    fingerprint = fingerprint_files(files)
    drop_id = check_drop_id(drop_id or default_drop_id(paths, fingerprint))
    # One ingest per drop id at a time: a drop announced twice is ingested once, then is a no-op.
    with exclusive_lock(workspace.drops_dir / f".{drop_id}.lock"):
        report = _ingest(workspace, files, fingerprint, drop_id, config, logger)
    if announce and report["dataset_changed"] and not report.get("noop"):
        emit_event(
            event="sftflow.dataset.updated",
            resource={"prefect.resource.id": f"sftflow.dataset.{report['dataset_version']}"},
            payload={"dataset_version": report["dataset_version"], "drop_id": drop_id, "rows": report["dataset_rows"]},
        )
    return report


def _ingest(workspace: Workspace, files: list[str], fingerprint: str, drop_id: str, config: IngestConfig,
            logger) -> dict:
    previous = find_ingested(workspace, drop_id, fingerprint)
    if previous is not None:
        logger.info("drop %s was ingested before with the same content: nothing to do", drop_id)
        current = current_version(workspace)
        return {
            "status": "ingested",
            "held_back": 0,
            "reasons": {},
            **previous,  # a full drop report, or the drop's record in the dataset manifest
            "noop": True,
            "dataset_changed": False,
            "dataset_version": current.name if current else None,
            "dataset_rows": current.manifest["rows"] if current else {"train": 0, "eval": 0},
        }

    staging = workspace.staging_dir / f"{drop_id}-{uuid.uuid4().hex[:8]}"
    try:
        staged = read_drop(files, drop_id, config, staging)
        if staged.rows_in == 0:
            raise DropError(f"{', '.join(files)}: no rows found; the drop's files are empty")
        validated = validate_rows(staged.staged_paths, config, staging)
        quarantined = staged.quarantined + validated.quarantined
        report = {
            "drop_id": drop_id,
            "fingerprint": fingerprint,
            "files": staged.files,
            "rows_in": staged.rows_in,
            "quarantined": quarantined,
            "reject_rate": round(quarantined / staged.rows_in, 6),
            "max_reject_rate": config.max_reject_rate,
            "ingested_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        quarantine_parts = [*staged.quarantine_paths, validated.quarantine_path]
        drop_dir = workspace.drops_dir / drop_id

        if report["reject_rate"] > config.max_reject_rate:
            current = current_version(workspace)
            report |= {
                "status": "rejected",
                "accepted": 0,
                "duplicates": 0,
                "held_back": validated.accepted_rows,
                "dataset_version": current.name if current else None,
                "dataset_changed": False,
                "dataset_rows": current.manifest["rows"] if current else {"train": 0, "eval": 0},
                "error": f"{quarantined} of {staged.rows_in} rows ({report['reject_rate']:.1%}) failed validation, over "
                f"the limit of {config.max_reject_rate:.0%}: the drop was not ingested. See the reasons, fix the "
                f"source and drop it again, or raise --max-reject-rate",
            }
            report = write_drop_report(report, quarantine_parts, None, drop_dir, config.quarantine_examples)
            raise DropRejectedError(f"drop {drop_id}: {report['error']} ({drop_dir / 'report.json'})", report)

        record = {k: report[k] for k in ("drop_id", "fingerprint", "rows_in", "quarantined", "ingested_at")}
        formatted = write_dataset_version(validated.accepted_path, record, config, workspace, staging)
        report |= {
            "status": "ingested",
            "accepted": formatted.accepted,
            "duplicates": formatted.duplicates,
            "held_back": 0,
            "dataset_version": formatted.dataset_version,
            "dataset_changed": formatted.dataset_changed,
            "dataset_rows": formatted.dataset_rows,
        }
        report = write_drop_report(report, quarantine_parts, formatted.duplicates_path, drop_dir,
                                   config.quarantine_examples)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {**report, "noop": False}
