"""The task: a drop's files -> staged canonical rows + quarantined rows (Arrow staging tables, in bounded batches).

`read_drop` stages each file into its own two tables, files in parallel: the normalised rows (with
their raw text) and the rows that could not be normalised, with their reasons.
"""

from __future__ import annotations

import gc
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from foundation import processes, staging
from schemas.config import IngestConfig
from schemas.tables import QUARANTINE_SCHEMA, STAGED_SCHEMA
from tasks.ingest.descriptor import Descriptor, file_format, record_mapper
from tasks.ingest.formats import (
    UNKNOWN_FORMAT_DETAIL,
    CanonicalRow,
    Rejection,
    check_format,
    detect_format,
    normalize_record,
)
from tasks.ingest.readers import RawRecord, iter_file_records

DETECT_SAMPLE = 1000  # records read to detect a file's format when it is `auto`
DETECT_SAMPLE_CHARS = 16 * 2**20  # or fewer: as many as hold this much raw text (1,000 records of 1 MiB: 1 GB)


@dataclass
class StagedDrop:
    """What `read_drop` wrote: references and counts, no payloads."""

    drop_id: str
    files: dict[str, dict] = field(default_factory=dict)  # url -> {format, rows, quarantined_on_read}
    rows_in: int = 0
    staged_rows: int = 0
    quarantined: int = 0
    staged_paths: list[str] = field(default_factory=list)
    quarantine_paths: list[str] = field(default_factory=list)


# The most raw text (characters) a staging batch holds; its rows' messages take about as much again. Every later
# step reads the staged rows a batch at a time, so this bounds them too: `batch_rows` rows of 1 MiB each (a
# 50,000-line .jsonl.gz of 50 MB holds 50 GB of them, each under the 16 MiB a record may have) would be 100 GB.
BATCH_RAW_CHARS = 64 * 2**20


class _BatchWriter:
    """Buffers rows (tuples in schema order, the raw text last) and writes them as staging record batches of
    `batch_rows` rows or `BATCH_RAW_CHARS` of raw text, whichever comes first."""

    def __init__(self, path: Path, schema: pa.Schema, batch_rows: int):
        self.schema, self.batch_rows = schema, batch_rows
        self.rows: list[tuple] = []
        self.raw_chars = 0
        self.writer = staging.open_writer(path, schema)

    def add(self, row: tuple) -> None:
        self.rows.append(row)
        self.raw_chars += len(row[-1])
        if len(self.rows) >= self.batch_rows or self.raw_chars >= BATCH_RAW_CHARS:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            columns = [pa.array(col, type=f.type) for col, f in zip(zip(*self.rows), self.schema)]
            self.writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=self.schema))
            self.rows, self.raw_chars = [], 0

    def close(self) -> None:
        self.flush()
        self.writer.close()


def stage_records(
    url: str,
    records: Iterable[RawRecord],
    fmt: str | None,
    drop_id: str,
    staged: _BatchWriter,
    quarantine: _BatchWriter,
) -> Counter:
    """Normalise each record of one file into `staged`, or quarantine it; returns counts by outcome."""
    counts: Counter = Counter()
    for rec in records:
        counts["rows_in"] += 1
        if rec.reasons:
            result: CanonicalRow | Rejection = Rejection(rec.reasons, rec.details)
        elif fmt is None:
            result = Rejection(("unknown_format",), UNKNOWN_FORMAT_DETAIL)
        else:
            result = normalize_record(rec.value, fmt)
        if isinstance(result, Rejection):
            counts["quarantined"] += 1
            # QUARANTINE_SCHEMA order
            quarantine.add((drop_id, url, rec.source_row, fmt, list(result.reasons), result.details, rec.raw))
        else:
            counts["staged"] += 1
            # STAGED_SCHEMA order
            staged.add((result.id, result.messages, result.tools, drop_id, url, rec.source_row, fmt, rec.raw))
    return counts


def _mapped_records(records: Iterator[RawRecord], descriptor: Descriptor) -> Iterator[RawRecord]:
    """The records with the descriptor's field names, turn keys and roles; the raw text stays the source's."""
    apply = record_mapper(descriptor)
    for rec in records:
        yield rec if rec.reasons else rec._replace(value=apply(rec.value))


def _records_with_format(url: str, fmt_option: str, batch_rows: int,
                         descriptor: Descriptor | None = None) -> tuple[str | None, Iterator[RawRecord]]:
    """The file's format (the option, or the one detected from its first records) and all its records,
    mapped by the file's descriptor (if it has one) before detection."""
    records = iter_file_records(url, batch_rows)
    if descriptor is not None:
        records = _mapped_records(records, descriptor)
    if fmt_option != "auto":
        return fmt_option, records
    head: list[RawRecord] = []
    head_chars = 0
    for rec in records:  # held until the format is known: bounded in records and in raw text
        head.append(rec)
        head_chars += len(rec.raw)
        if len(head) >= DETECT_SAMPLE or head_chars >= DETECT_SAMPLE_CHARS:
            break
    fmt = detect_format(r.value for r in head if not r.reasons)

    def chained() -> Iterator[RawRecord]:
        yield from head
        yield from records

    return fmt, chained()


def stage_file(index: int, url: str, drop_id: str, config: IngestConfig, staging_dir: Path,
               descriptor: Descriptor | None = None) -> dict:
    """Read one file (mapped by its descriptor, if any) into its own staging tables; returns its counts and
    their paths."""
    staged_path, quarantine_path = staging_dir / f"normalized-{index:05d}.arrow", staging_dir / f"quarantine-{index:05d}.arrow"
    staged = _BatchWriter(staged_path, STAGED_SCHEMA, config.batch_rows)
    quarantine = _BatchWriter(quarantine_path, QUARANTINE_SCHEMA, config.batch_rows)
    # The loop allocates millions of short-lived, acyclic objects; default GC thresholds make the
    # collector rescan the batch buffers over and over (~20% of the time). Batches bound memory.
    gc_threshold = gc.get_threshold()
    gc.set_threshold(200_000, 50, 100)
    try:
        fmt, records = _records_with_format(url, file_format(config.format, descriptor), config.batch_rows,
                                            descriptor)
        counts = stage_records(url, records, fmt, drop_id, staged, quarantine)
    finally:
        gc.set_threshold(*gc_threshold)
        staged.close()
        quarantine.close()
    return {"url": url, "format": fmt, "counts": counts, "staged_path": str(staged_path),
            "quarantine_path": str(quarantine_path)}


def _parallel_map(fn, *args_lists) -> list:
    """Run fn over files on every core (forked processes: they only read files and write their own staging
    tables)."""
    return processes.fork_map(fn, *args_lists, workers=min(len(args_lists[0]), os.cpu_count() or 1))


@task(cache_policy=NO_CACHE)
def read_drop(files: list[str], drop_id: str, config: IngestConfig, staging_dir: Path,
              descriptors: dict[str, Descriptor] | None = None) -> StagedDrop:
    """Read every file of the drop (files in parallel), normalise records, stage rows and quarantine.
    `descriptors` maps a file to the descriptor entry its records are mapped by (`descriptor.find_mapped_drop`).

    Raises ConfigError, before reading anything, when `config.format` is neither `auto` nor a format
    of `formats.FORMATS`, or contradicts a descriptor's format."""
    check_format(config.format)
    per_file = [(descriptors or {}).get(url) for url in files]
    for descriptor in per_file:
        file_format(config.format, descriptor)
    logger = get_run_logger()
    staging_dir.mkdir(parents=True, exist_ok=True)
    n = len(files)
    outcomes = _parallel_map(stage_file, range(n), files, [drop_id] * n, [config] * n, [staging_dir] * n, per_file)
    result = StagedDrop(drop_id=drop_id)
    for outcome in outcomes:
        counts = outcome["counts"]
        result.files[outcome["url"]] = {"format": outcome["format"], "rows": counts["rows_in"],
                                        "quarantined_on_read": counts["quarantined"]}
        result.rows_in += counts["rows_in"]
        result.staged_rows += counts["staged"]
        result.quarantined += counts["quarantined"]
        result.staged_paths.append(outcome["staged_path"])
        result.quarantine_paths.append(outcome["quarantine_path"])
        logger.info("%s: %s rows, format %s, %s unreadable", outcome["url"], counts["rows_in"], outcome["format"],
                    counts["quarantined"])
    return result
