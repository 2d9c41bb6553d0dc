"""Format: deduplicate against the drop and the current dataset, split by id, write a dataset version.

A dataset version is an immutable directory `datasets/<version>/{train,eval}.parquet, manifest.json`
whose name is a hash of its content (the sorted row ids, the split ratio and the schema version).
A row's split is a pure function of its id, so a row in eval never moves to train in a later
version. The directory is written under a temporary name and renamed into place, and then the
`CURRENT` pointer is replaced atomically; the whole step runs under a lock so that concurrent drops
form a clean chain of versions.
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

from schemas.config import IngestConfig
from schemas.tables import CANONICAL_SCHEMA, CANONICAL_SCHEMA_VERSION, DUPLICATE_SCHEMA, SPLITS
from foundation import staging
from foundation.atomic import exclusive_lock, read_json, remove_stale_tmp, staged_dir, write_bytes_atomic
from foundation.errors import DatasetError
from foundation.workspace import Workspace

VERSION_PREFIX = "ds-"


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------


def eval_mask(ids: pa.Array | pa.ChunkedArray, eval_ratio: float) -> np.ndarray:
    """True where a row belongs to eval: the first 52 bits of its id, as a fraction, below the ratio."""
    prefixes = pc.utf8_slice_codeunits(ids, 0, 13).to_pylist()
    fractions = np.fromiter((int(p, 16) for p in prefixes), dtype=np.float64, count=len(prefixes)) / float(16**13)
    return fractions < eval_ratio


def split_of(row_id: str, eval_ratio: float) -> str:
    return "eval" if eval_mask(pa.array([row_id]), eval_ratio)[0] else "train"


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


def content_hash(ids: pa.Array, eval_ratio: float) -> str:
    return hash_sorted_ids(sorted_ids(ids), eval_ratio)


# ---------------------------------------------------------------------------------------------
# Reading the lineage
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetVersion:
    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def manifest(self) -> dict:
        return read_json(self.root / "manifest.json")

    def path(self, split: str) -> Path:
        return self.root / f"{split}.parquet"

    def ids(self) -> pa.Array:
        arrays = [pq.read_table(self.path(s), columns=["id"]).column("id").combine_chunks() for s in SPLITS]
        return pa.concat_arrays([a.cast(pa.string()) for a in arrays])


def current_version(workspace: Workspace) -> DatasetVersion | None:
    pointer = workspace.datasets_dir / "CURRENT"
    if not pointer.exists():
        return None
    version = DatasetVersion(workspace.datasets_dir / pointer.read_text().strip())
    if not (version.root / "manifest.json").exists():
        raise DatasetError(f"{pointer} names {version.name}, which has no manifest.json; restore it or remove {pointer}")
    return version


def version_that_added(workspace: Workspace, drop_id: str) -> DatasetVersion | None:
    """The version whose write recorded `drop_id` (its parent does not list the drop), or None."""
    version = current_version(workspace)
    while version is not None:
        manifest = version.manifest
        if not any(d["drop_id"] == drop_id for d in manifest["drops"]):
            return None
        parent = DatasetVersion(workspace.datasets_dir / manifest["parent"]) if manifest["parent"] else None
        if parent is None or not any(d["drop_id"] == drop_id for d in parent.manifest["drops"]):
            return version
        version = parent
    return None


def find_version(workspace: Workspace, name: str | None) -> DatasetVersion:
    """A named version, or the current one; a clear error when there is none."""
    if name is None:
        version = current_version(workspace)
        if version is None:
            raise DatasetError(f"no dataset in {workspace.datasets_dir}; ingest a drop first: sftflow ingest PATH")
        return version
    version = DatasetVersion(workspace.datasets_dir / name)
    if not name.startswith(VERSION_PREFIX) or "/" in name or not (version.root / "manifest.json").exists():
        raise DatasetError(f"no dataset version {name!r} in {workspace.datasets_dir}; list them with: sftflow datasets")
    return version


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------


@dataclass
class FormatResult:
    accepted: int
    duplicates: int
    duplicates_path: str
    dataset_version: str
    dataset_changed: bool
    dataset_rows: dict[str, int]


def _write_version(
    target: Path,
    parent: DatasetVersion | None,
    validated_path: str,
    keep: np.ndarray,
    config: IngestConfig,
    manifest: dict,
) -> None:
    with staged_dir(target) as tmp:
        writers = {s: pq.ParquetWriter(tmp / f"{s}.parquet", CANONICAL_SCHEMA, compression="zstd") for s in SPLITS}
        rows = dict.fromkeys(SPLITS, 0)
        try:
            if parent is not None:
                for split in SPLITS:
                    for batch in pq.ParquetFile(parent.path(split)).iter_batches(batch_size=config.batch_rows):
                        writers[split].write_batch(batch)
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
        manifest["rows"] = rows
        manifest["files"] = {
            f"{s}.parquet": {
                "sha256": hashlib.sha256((tmp / f"{s}.parquet").read_bytes()).hexdigest(),
                "bytes": (tmp / f"{s}.parquet").stat().st_size,
            }
            for s in SPLITS
        }
        write_bytes_atomic(tmp / "manifest.json", _json(manifest))


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


def _json(obj: object) -> bytes:
    import orjson

    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


@task(cache_policy=NO_CACHE)
def write_dataset_version(
    validated_path: str,
    drop_record: dict,
    config: IngestConfig,
    workspace: Workspace,
    staging_dir: Path,
) -> FormatResult:
    """Dedup the drop's valid rows and, if any are new, write and point CURRENT at a new version.

    `drop_record` ({drop_id, fingerprint, rows_in, quarantined, ...}) is added to the version's
    manifest, which is what makes re-ingesting the same drop a no-op.
    """
    logger = get_run_logger()
    datasets = workspace.datasets_dir
    datasets.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(datasets / ".lock"):
        remove_stale_tmp(datasets)
        parent = current_version(workspace)
        parent_manifest = parent.manifest if parent else None
        if parent_manifest and parent_manifest["eval_ratio"] != config.eval_ratio:
            raise DatasetError(
                f"eval_ratio {config.eval_ratio} differs from {parent_manifest['eval_ratio']} of the current dataset "
                f"{parent.name}: changing it would move rows between train and eval; keep "
                f"--eval-ratio {parent_manifest['eval_ratio']} or start a new workspace (SFTFLOW_HOME)"
            )
        drop_id = drop_record["drop_id"]
        added = version_that_added(workspace, drop_id) if parent else None
        if added is not None:
            # An ingest of this drop died after its version was written (CURRENT already moved), before
            # its drop report: redo the dedup against that version's parent, which reproduces the
            # duplicates exactly, and report that version; nothing new is written.
            base = DatasetVersion(datasets / added.manifest["parent"]) if added.manifest["parent"] else None
            dataset_ids = sorted_ids(base.ids()) if base else np.empty(0, dtype="S64")
        else:
            base = parent
            dataset_ids = sorted_ids(parent.ids()) if parent else np.empty(0, dtype="S64")
        drop_ids = staging.read_columns(validated_path, ["id"]).column("id").combine_chunks()
        keep, repeat_in_drop = new_row_mask(drop_ids, dataset_ids)

        duplicates_path = staging_dir / "duplicates.parquet"
        duplicates = _write_duplicates(validated_path, keep, repeat_in_drop, drop_id, base, duplicates_path)

        accepted = int(keep.sum())
        if added is not None:
            recorded = next(d for d in added.manifest["drops"] if d["drop_id"] == drop_id)
            if (recorded["fingerprint"], recorded["accepted"], recorded["duplicates"]) != (
                    drop_record["fingerprint"], accepted, duplicates):
                raise DatasetError(
                    f"drop {drop_id} is recorded in dataset {added.name} with {recorded['accepted']} accepted and "
                    f"{recorded['duplicates']} duplicate rows, but re-reading it gives {accepted} and {duplicates}; "
                    "the drop's files or the validation rules changed since: give the new data a new --drop-id"
                )
            logger.info("drop %s is already in dataset %s: finishing its interrupted ingest", drop_id, added.name)
            return FormatResult(accepted, duplicates, str(duplicates_path), added.name, True, added.manifest["rows"])
        if accepted == 0:
            name = parent.name if parent else None
            rows = parent_manifest["rows"] if parent_manifest else dict.fromkeys(SPLITS, 0)
            logger.info("no new rows: dataset %s unchanged", name)
            return FormatResult(0, duplicates, str(duplicates_path), name, False, rows)

        all_ids = np.concatenate([dataset_ids, id_view(drop_ids)[keep]])
        all_ids.sort()
        digest = hash_sorted_ids(all_ids, config.eval_ratio)
        del all_ids
        target = datasets / f"{VERSION_PREFIX}{digest[:16]}"
        if not (target / "manifest.json").exists():
            manifest = {
                "version": target.name,
                "content_hash": digest,
                "schema_version": CANONICAL_SCHEMA_VERSION,
                "parent": parent.name if parent else None,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "eval_ratio": config.eval_ratio,
                "drops": [*(parent_manifest["drops"] if parent_manifest else []), {**drop_record, "accepted": accepted,
                          "duplicates": duplicates}],
            }
            _write_version(target, parent, validated_path, keep, config, manifest)
        write_bytes_atomic(datasets / "CURRENT", f"{target.name}\n".encode())
        rows = DatasetVersion(target).manifest["rows"]
        logger.info("dataset %s: +%s rows (train %s, eval %s)", target.name, accepted, rows["train"], rows["eval"])
        return FormatResult(accepted, duplicates, str(duplicates_path), target.name, True, rows)
