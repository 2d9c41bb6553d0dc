"""Drops: what became of every row of each ingested drop.

    drops/
      <drop_id>/report.json          DropReport, written last
      <drop_id>/quarantine.parquet   every rejected row with its reasons and raw text
      <drop_id>/duplicates.parquet   every duplicate row and what it duplicates
      .<drop_id>.lock                held while the drop is ingested (one ingest per drop id at a time)
    staging/<drop_id>-<random>/      the ingest's intermediate tables, removed when it ends
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from foundation.artifacts import DropReport
from foundation.atomic import exclusive_lock, staged_dir

REPORT = "report.json"
QUARANTINE = "quarantine.parquet"
DUPLICATES = "duplicates.parquet"


class DropStore:
    def __init__(self, root: Path, staging_root: Path):
        self.root = root
        self.staging_root = staging_root

    def dir_of(self, drop_id: str) -> Path:
        return self.root / drop_id

    def report_path(self, drop_id: str) -> Path:
        return self.dir_of(drop_id) / REPORT

    def quarantine_path(self, drop_id: str) -> Path:
        return self.dir_of(drop_id) / QUARANTINE

    def report(self, drop_id: str) -> DropReport | None:
        path = self.report_path(drop_id)
        return DropReport.read(path) if path.exists() else None

    @contextlib.contextmanager
    def lock(self, drop_id: str) -> Iterator[None]:
        """One ingest per drop id at a time: a drop announced twice is ingested once, then is a no-op."""
        with exclusive_lock(self.root / f".{drop_id}.lock"):
            yield

    @contextlib.contextmanager
    def staging(self, drop_id: str) -> Iterator[Path]:
        """A scratch directory for one ingest's intermediate tables, removed when the block ends."""
        path = self.staging_root / f"{drop_id}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    @contextlib.contextmanager
    def write(self, drop_id: str) -> Iterator[Path]:
        """A temporary directory that replaces drops/<drop_id>/ whole when the block exits cleanly."""
        with staged_dir(self.dir_of(drop_id)) as tmp:
            yield tmp

    @staticmethod
    def write_report(directory: Path, report: DropReport) -> None:
        report.write(directory / REPORT)

    @staticmethod
    def quarantine_file(directory: Path) -> Path:
        return directory / QUARANTINE

    @staticmethod
    def duplicates_file(directory: Path) -> Path:
        return directory / DUPLICATES
