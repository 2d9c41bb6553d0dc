"""Format: deduplicate against the drop and the current dataset, split by id, write a dataset version.

A dataset version is an immutable directory (`foundation.stores.datasets`) whose name is a hash of
its content (the sorted row ids, the split ratio and the schema version). A row's split is a pure
function of its id, so a row in eval never moves to train in a later version. The directory is
written under a temporary name and renamed into place, and then the `CURRENT` pointer is replaced
atomically; the whole step runs under the datasets lock so that concurrent drops form a clean chain
of versions. A new version is announced with the event `sftflow.dataset.updated`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from foundation import staging
from foundation.artifacts import DatasetManifest, DatasetUpdatedPayload, DropRecord, DropReport, FileDigest, SplitRows
from foundation.atomic import sha256_of
from foundation.errors import DatasetError
from foundation.stores.datasets import SPLITS, DatasetStore, DatasetVersion
from foundation.workspace import Workspace
from schemas.config import IngestConfig
from schemas.tables import CANONICAL_SCHEMA, CANONICAL_SCHEMA_VERSION, DUPLICATE_SCHEMA, upgrade_canonical
from tasks.report import DropRead

# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------


def eval_mask(ids: pa.Array | pa.ChunkedArray, eval_ratio: float) -> np.ndarray:
    """True where a row belongs to eval: the first 52 bits of its id, as a fraction, below the ratio."""
    prefixes = pc.utf8_slice_codeunits(ids, 0, 13).to_pylist()
    fractions = np.fromiter((int(p, 16) for p in prefixes), dtype=np.float64, count=len(prefixes)) / float(16**13)
    return fractions < eval_ratio


def id_view(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A zero-copy numpy view (dtype S64) of an Arrow array of 64-character hex ids.

    Sorting and searching fixed-width bytes needs no hash table and no Python strings, which keeps
    a million-row drop's dedup within a few dozen MB."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    ids = ids.cast(pa.string())
    if len(ids) == 0:
        return np.empty(0, dtype="S64")
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int32, count=len(ids) + 1, offset=4 * ids.offset)
    if ids.null_count or not (np.diff(offsets) == 64).all():
        raise ValueError("row ids must be 64-character sha256 hex digests")
    return np.frombuffer(ids.buffers()[2], dtype="S64", count=len(ids), offset=int(offsets[0]))


def sorted_ids(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.sort(id_view(ids))


def new_row_mask(drop_ids: pa.Array, dataset_ids: pa.Array | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Classify a drop's ids: (is new, repeats an earlier row of the same drop).

    A row is new when its id is neither in the dataset nor earlier in the drop; a row that is
    neither new nor a within-drop repeat duplicates a dataset row."""
    ids = id_view(drop_ids)
    known = dataset_ids if isinstance(dataset_ids, np.ndarray) else sorted_ids(dataset_ids)
    if len(known):
        at = np.minimum(np.searchsorted(known, ids), len(known) - 1)
        in_dataset = known[at] == ids
    else:
        in_dataset = np.zeros(len(ids), dtype=bool)
    is_first = np.zeros(len(ids), dtype=bool)
    is_first[np.unique(ids, return_index=True)[1]] = True
    return is_first & ~in_dataset, ~is_first & ~in_dataset


def hash_sorted_ids(ordered: np.ndarray, eval_ratio: float) -> str:
    """Hash of a dataset's content: schema version, split ratio and its ids in sorted order."""
    digest = hashlib.sha256(f"{CANONICAL_SCHEMA_VERSION}\n{eval_ratio!r}\n".encode())
    digest.update(np.ascontiguousarray(ordered).view(np.uint8))
    return digest.hexdigest()


def check_eval_ratio(parent: DatasetManifest | None, eval_ratio: float) -> None:
    """The split ratio is fixed for the life of a lineage: changing it would move rows between splits."""
    if parent is not None and parent.eval_ratio != eval_ratio:
        raise DatasetError(
            f"eval_ratio {eval_ratio} differs from {parent.eval_ratio} of the current dataset "
            f"{parent.version}: changing it would move rows between train and eval; keep "
            f"--eval-ratio {parent.eval_ratio} or start a new workspace (SFTFLOW_HOME)"
        )


def dataset_updated(report: DropReport) -> DatasetUpdatedPayload | None:
    """The announcement a drop's ingest makes: only a new dataset version, never a no-op's."""
    if not report.dataset_changed or report.noop:
        return None
    return DatasetUpdatedPayload(dataset_version=report.dataset_version, drop_id=report.drop_id,
                                 rows=report.dataset_rows)


# ---------------------------------------------------------------------------------------------
# Writing a version
# ---------------------------------------------------------------------------------------------


@dataclass
class FormatResult:
    accepted: int
    duplicates: int
    duplicates_path: str
    dataset_version: str | None
    dataset_changed: bool
    dataset_rows: SplitRows


def _copy_rows(tmp: Path, parent: DatasetVersion | None, validated_path: str, keep: np.ndarray,
               config: IngestConfig) -> SplitRows:
    """The parent's rows, then the drop's new rows, each into its split; the counts per split."""
    writers = {s: pq.ParquetWriter(DatasetStore.split_path(tmp, s), CANONICAL_SCHEMA, compression="zstd")
               for s in SPLITS}
    rows = dict.fromkeys(SPLITS, 0)
    try:
        if parent is not None:
            for split in SPLITS:
                for batch in pq.ParquetFile(parent.path(split)).iter_batches(batch_size=config.batch_rows):
                    writers[split].write_batch(upgrade_canonical(batch))  # a version written before canonical-row/2
                    rows[split] += batch.num_rows
        offset = 0
        for batch in staging.iter_batches(validated_path):
            table = pa.Table.from_batches([batch]).filter(pa.array(keep[offset : offset + batch.num_rows]))
            offset += batch.num_rows
            is_eval = pa.array(eval_mask(table.column("id"), config.eval_ratio))
            for split, mask in (("eval", is_eval), ("train", pc.invert(is_eval))):
                part = table.filter(mask)
                writers[split].write_table(part)
                rows[split] += part.num_rows
    finally:
        for writer in writers.values():
            writer.close()
    return SplitRows(**rows)


def _write_version(store: DatasetStore, target: DatasetVersion, parent: DatasetVersion | None, validated_path: str,
                   keep: np.ndarray, config: IngestConfig, manifest: dict) -> None:
    with store.write_version(target) as tmp:
        rows = _copy_rows(tmp, parent, validated_path, keep, config)
        files = {}
        for split in SPLITS:
            path = DatasetStore.split_path(tmp, split)
            files[path.name] = FileDigest(sha256=sha256_of(path), bytes=path.stat().st_size)
        DatasetStore.write_manifest(tmp, DatasetManifest(**manifest, rows=rows, files=files))


def _write_duplicates(validated_path: str, keep: np.ndarray, repeat_in_drop: np.ndarray, drop_id: str,
                      parent: DatasetVersion | None, target: Path) -> int:
    """Write every row that is not new, with what it duplicates; batch by batch. Returns the count."""
    count, offset = 0, 0
    columns = ["id", "source_drop", "source_file", "source_row"]
    with pq.ParquetWriter(target, DUPLICATE_SCHEMA, compression="zstd") as writer:
        for batch in staging.iter_batches(validated_path):
            window = slice(offset, offset + batch.num_rows)
            offset += batch.num_rows
            is_dup = ~keep[window]
            if not is_dup.any():
                continue
            rows = pa.Table.from_batches([batch.select(columns)]).filter(pa.array(is_dup))
            origin = np.where(repeat_in_drop[window][is_dup], f"drop:{drop_id}", f"dataset:{parent.name if parent else ''}")
            writer.write_table(rows.append_column("duplicate_of", pa.array(origin, pa.string())).cast(DUPLICATE_SCHEMA))
            count += rows.num_rows
    return count


def _finish_interrupted(added: DatasetVersion, read: DropRead, accepted: int, duplicates: int,
                       duplicates_path: Path) -> FormatResult:
    """An ingest of this drop died after its version was written (CURRENT already moved), before its drop
    report: the dedup redone against that version's parent reproduces the duplicates exactly, and that
    version is reported; nothing new is written."""
    recorded = added.manifest.record_of(read.drop_id)
    if (recorded.fingerprint, recorded.accepted, recorded.duplicates) != (read.fingerprint, accepted, duplicates):
        raise DatasetError(
            f"drop {read.drop_id} is recorded in dataset {added.name} with {recorded.accepted} accepted and "
            f"{recorded.duplicates} duplicate rows, but re-reading it gives {accepted} and {duplicates}; "
            "the drop's files or the validation rules changed since: give the new data a new --drop-id"
        )
    get_run_logger().info("drop %s is already in dataset %s: finishing its interrupted ingest", read.drop_id,
                          added.name)
    return FormatResult(accepted, duplicates, str(duplicates_path), added.name, True, added.manifest.rows)


def _new_version(store: DatasetStore, parent: DatasetVersion | None, read: DropRead, validated_path: str,
                 keep: np.ndarray, dataset_ids: np.ndarray, drop_ids: pa.Array, duplicates: int,
                 config: IngestConfig) -> DatasetVersion:
    """The version of the parent's rows plus the drop's new ones (written unless it exists), made current."""
    all_ids = np.concatenate([dataset_ids, id_view(drop_ids)[keep]])
    all_ids.sort()
    digest = hash_sorted_ids(all_ids, config.eval_ratio)
    del all_ids
    target = store.target(digest)
    if not store.exists(target):
        record = DropRecord(**read.record_fields(), accepted=int(keep.sum()), duplicates=duplicates)
        lineage = parent.manifest.drops if parent else []
        manifest = {"version": target.name, "content_hash": digest, "schema_version": CANONICAL_SCHEMA_VERSION,
                    "parent": parent.name if parent else None,
                    "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "eval_ratio": config.eval_ratio, "drops": [*lineage, record]}
        _write_version(store, target, parent, validated_path, keep, config, manifest)
    store.set_current(target)
    return target


@task(cache_policy=NO_CACHE)
def write_dataset_version(validated_path: str, read: DropRead, config: IngestConfig, staging_dir: Path) -> FormatResult:
    """Dedup the drop's valid rows and, if any are new, write and point CURRENT at a new version.

    The drop's record (`read`) is added to the version's manifest, which is what makes re-ingesting the
    same drop a no-op.
    """
    logger = get_run_logger()
    store = Workspace.from_env().datasets
    with store.lock():
        parent = store.current()
        check_eval_ratio(parent.manifest if parent else None, config.eval_ratio)
        added = store.version_that_added(read.drop_id) if parent else None
        base = store.parent_of(added) if added is not None else parent
        dataset_ids = sorted_ids(base.ids()) if base else np.empty(0, dtype="S64")
        drop_ids = staging.read_columns(validated_path, ["id"]).column("id").combine_chunks()
        keep, repeat_in_drop = new_row_mask(drop_ids, dataset_ids)
        duplicates_path = staging_dir / "duplicates.parquet"
        duplicates = _write_duplicates(validated_path, keep, repeat_in_drop, read.drop_id, base, duplicates_path)
        accepted = int(keep.sum())
        if added is not None:
            return _finish_interrupted(added, read, accepted, duplicates, duplicates_path)
        if accepted == 0:
            logger.info("no new rows: dataset %s unchanged", parent.name if parent else None)
            rows = parent.manifest.rows if parent else SplitRows(train=0, eval=0)
            return FormatResult(0, duplicates, str(duplicates_path), parent.name if parent else None, False, rows)
        target = _new_version(store, parent, read, validated_path, keep, dataset_ids, drop_ids, duplicates, config)
        rows = target.manifest.rows
        logger.info("dataset %s: +%s rows (train %s, eval %s)", target.name, accepted, rows.train, rows.eval)
        return FormatResult(accepted, duplicates, str(duplicates_path), target.name, True, rows)


@task(cache_policy=NO_CACHE)
def announce_dataset(payload: DatasetUpdatedPayload) -> None:
    """Send `sftflow.dataset.updated`, which triggers the pipeline deployment."""
    from prefect.events import emit_event

    emit_event(event="sftflow.dataset.updated",
               resource={"prefect.resource.id": f"sftflow.dataset.{payload.dataset_version}"},
               payload=payload.dump())
