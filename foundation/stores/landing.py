"""The landing zone: new drops waiting to be announced, and what was announced or refused.

    landing/
      <drop_id>/...              one directory per drop (with _SUCCESS when it is complete)
      .emitted/<drop_id>.json    EmittedRecord: the drop was announced (its fingerprint, event id)
      .refused/<name>.json       RefusedRecord: an entry that will never be announced, and why
      .lock                      held while a drop is announced or landed
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from foundation.artifacts import EmittedRecord, RefusedRecord
from foundation.atomic import TMP_PREFIX, exclusive_lock

SUCCESS_MARKER = "_SUCCESS"


def record_name(name: str) -> str:
    """A file name for an entry's record: the entry's name when short, else a prefix and a hash of it
    (a name too long for the file system still gets its refusal recorded)."""
    if len(name.encode()) <= 200:
        return f"{name}.json"
    return f"{name[:100]}-{hashlib.sha256(name.encode()).hexdigest()[:16]}.json"


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

    def record_refused(self, record: RefusedRecord) -> None:
        record.write(self.root / ".refused" / record_name(record.name))

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
