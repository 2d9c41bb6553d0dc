"""The landing zone: new drops waiting to be announced, and what was announced or refused.

    landing/
      <drop_id>/...              one directory per drop (with _SUCCESS when it is complete)
      .emitted/<drop_id>.json    EmittedRecord: the drop was announced (its fingerprint, event id)
      .refused/<name>.json       RefusedRecord: an entry that will never be announced, and why
      .lock                      held while a drop is announced or renamed into place
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from foundation.artifacts import EmittedRecord, RefusedRecord
from foundation.atomic import TMP_PREFIX, exclusive_lock, fsync_dir, fsync_tree, rename_noreplace

SUCCESS_MARKER = "_SUCCESS"


def record_name(name: str) -> str:
    """A file name for an entry's record: the entry's name when short and valid UTF-8, else a prefix and
    a hash of its bytes (a name too long for the file system, or not UTF-8, still gets its refusal
    recorded)."""
    raw = os.fsencode(name)
    with contextlib.suppress(UnicodeDecodeError):
        if len(raw) <= 200 and raw.decode():
            return f"{name}.json"
    prefix = raw[:100].decode(errors="ignore").encode("ascii", "backslashreplace").decode()[:100]
    return f"{prefix}-{hashlib.sha256(raw).hexdigest()[:16]}.json"


class LandingStore:
    def __init__(self, root: Path):
        self.root = root

    def entries(self) -> list[Path]:
        """The entries that may be drops (hidden and temporary ones are the store's own)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if not p.name.startswith("."))

    def dir_of(self, drop_id: str) -> Path:
        return self.root / drop_id

    def emitted(self, drop_id: str) -> EmittedRecord | None:
        path = self.root / ".emitted" / record_name(drop_id)
        return EmittedRecord.read(path) if path.exists() else None

    def record_emitted(self, record: EmittedRecord) -> None:
        record.write(self.root / ".emitted" / record_name(record.drop_id))

    def refused(self, name: str) -> bool:
        return (self.root / ".refused" / record_name(name)).exists()

    def record_refused(self, record: RefusedRecord, name: str | None = None) -> None:
        """Record a refusal under the entry's `name` (default: the record's, which is printable)."""
        record.write(self.root / ".refused" / record_name(name if name is not None else record.name))

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.root / ".lock"):
            yield

    @contextlib.contextmanager
    def incoming(self, drop_id: str) -> Iterator[Path]:
        """A temporary path beside the drops (not created) for a copy that is renamed into place;
        whatever is left there when the block ends is removed."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{TMP_PREFIX}{drop_id}-{uuid.uuid4().hex[:8]}"
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def land(self, staged: Path, drop_id: str) -> Path:
        """Rename a complete copy (from `incoming`) into place as <drop_id>/, durably (its files, then the
        landing directory, fsynced). Never replaces: FileExistsError when <drop_id> is there already."""
        target = self.dir_of(drop_id)
        fsync_tree(staged)
        with self.lock():  # rename_noreplace is atomic on Linux; the lock serializes its fallback
            rename_noreplace(staged, target)
        fsync_dir(self.root)
        return target
