"""Dataset versions: immutable directories named by a hash of their content, and the CURRENT pointer.

    datasets/
      CURRENT                                 name of the current version (replaced atomically)
      ds-<hash>/train.parquet, eval.parquet   canonical rows
      ds-<hash>/manifest.json                 DatasetManifest, written last
      ds-<hash>/tokenized/<key>/              the version's rows as tokenized for one tokenizer and config
                                              (tasks.tokenize's cache): {train,eval}.parquet, tokenized.json,
                                              mask.md; each entry appears whole; the rest of the version
                                              never changes after it is written
      .lock                                   held while a version is written (concurrent drops chain)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from foundation.artifacts import DatasetManifest
from foundation.atomic import exclusive_lock, remove_stale_tmp, staged_dir, write_bytes_atomic
from foundation.errors import DatasetError, NotFoundError

VERSION_PREFIX = "ds-"
SPLITS = ("train", "eval")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class TokenizedEntry:
    """One cached tokenization of a version's rows (written and read by tasks.tokenize)."""

    root: Path

    def path(self, split: str) -> Path:
        return self.root / f"{split}.parquet"

    record = property(lambda self: self.root / "tokenized.json")  # foundation.artifacts.Tokenized
    mask = property(lambda self: self.root / "mask.md")  # the training-example-mask artifact's markdown


@dataclass(frozen=True)
class DatasetVersion:
    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @functools.cached_property
    def manifest(self) -> DatasetManifest:
        return DatasetManifest.read(self.root / MANIFEST)

    def path(self, split: str) -> Path:
        return self.root / f"{split}.parquet"

    def tokenized_entry(self, key: str) -> TokenizedEntry:
        return TokenizedEntry(self.root / "tokenized" / key)

    def ids(self) -> pa.Array:
        """Every row id of the version (both splits)."""
        arrays = [pq.read_table(self.path(s), columns=["id"]).column("id").combine_chunks() for s in SPLITS]
        return pa.concat_arrays([a.cast(pa.string()) for a in arrays])


class DatasetStore:
    def __init__(self, root: Path):
        self.root = root

    def _version(self, name: str) -> DatasetVersion:
        return DatasetVersion(self.root / name)

    def _is_name(self, name: str) -> bool:
        return name.startswith(VERSION_PREFIX) and "/" not in name and name not in (".", "..")

    def current(self) -> DatasetVersion | None:
        pointer = self.root / "CURRENT"
        if not pointer.exists():
            return None
        name = pointer.read_text().strip()
        version = self._version(name)
        if not self._is_name(name) or not (version.root / MANIFEST).exists():
            raise DatasetError(f"{pointer} names {name!r}, which has no manifest.json; restore it or remove {pointer}")
        return version

    def find(self, name: str | None) -> DatasetVersion:
        """A named version, or the current one; a clear error when there is none."""
        if name is None:
            version = self.current()
            if version is None:
                raise NotFoundError(f"no dataset in {self.root}; ingest a drop first: sftflow ingest PATH")
            return version
        version = self._version(name)
        if not self._is_name(name) or not (version.root / MANIFEST).exists():
            raise NotFoundError(f"no dataset version {name!r} in {self.root}; list them with: sftflow datasets")
        return version

    def versions(self) -> list[DatasetVersion]:
        """Every complete version (in no particular order)."""
        if not self.root.is_dir():
            return []
        return [self._version(p.name) for p in self.root.iterdir()
                if self._is_name(p.name) and (p / MANIFEST).exists()]

    def parent_of(self, version: DatasetVersion) -> DatasetVersion | None:
        parent = version.manifest.parent
        return self._version(parent) if parent else None

    def version_that_added(self, drop_id: str) -> DatasetVersion | None:
        """The version whose write recorded `drop_id` (its parent does not list the drop), or None."""
        version = self.current()
        while version is not None and version.manifest.records(drop_id):
            parent = self.parent_of(version)
            if parent is None or not parent.manifest.records(drop_id):
                return version
            version = parent
        return None

    # Writing: under the lock, a new version directory appears whole, then CURRENT moves to it.

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the datasets lock; leftovers of writers that died are removed first."""
        self.root.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.root / ".lock"):
            remove_stale_tmp(self.root)
            yield

    def target(self, content_hash: str) -> DatasetVersion:
        return self._version(f"{VERSION_PREFIX}{content_hash[:16]}")

    def exists(self, version: DatasetVersion) -> bool:
        return (version.root / MANIFEST).exists()

    @contextlib.contextmanager
    def write_version(self, version: DatasetVersion) -> Iterator[Path]:
        """A temporary directory that becomes the version when the block exits cleanly (manifest last)."""
        with staged_dir(version.root) as tmp:
            yield tmp

    @staticmethod
    def split_path(directory: Path, split: str) -> Path:
        return directory / f"{split}.parquet"

    @staticmethod
    def write_manifest(directory: Path, manifest: DatasetManifest) -> None:
        manifest.write(directory / MANIFEST)

    def set_current(self, version: DatasetVersion) -> None:
        write_bytes_atomic(self.root / "CURRENT", f"{version.name}\n".encode())
