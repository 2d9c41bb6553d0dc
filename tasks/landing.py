"""The landing zone: where new drops arrive, and the `sftflow.drop.landed` event that starts ingest.

    $SFTFLOW_HOME/landing/<drop_id>/...        one directory per drop (files of any supported format)
    $SFTFLOW_HOME/landing/.emitted/<drop_id>.json   the drop was announced (its fingerprint, event id)
    $SFTFLOW_HOME/landing/.refused/<name>.json      an entry that will never be announced, and why

A drop is complete when it holds a `_SUCCESS` marker, or when nothing in it has changed for
`quiet_seconds`. Each complete drop is announced once: the event id is derived from the drop id and
its content, the `.emitted` record is written after the event was sent, and ingest is idempotent
(the same drop id with the same content is a no-op), so a watcher killed between the two steps
announces the drop again under the same event id and nothing is ingested twice.

Entries that could lead outside the landing zone are refused, never followed: names that are not
valid drop ids, symlinks (the drop directory itself or any file in it) and special files.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from foundation.artifacts import EmittedRecord, LandedPayload, RefusedRecord
from foundation.atomic import fsync_tree
from foundation.errors import DropError
from foundation.stores.landing import SUCCESS_MARKER
from foundation.workspace import Workspace
from tasks.ingest.discovery import check_drop_id, fingerprint_files, list_drop_files

EVENT_LANDED = "sftflow.drop.landed"
EVENT_NAMESPACE = uuid.UUID("5f2b3c1e-6a1d-4c52-9a39-2f6f3b1e8d10")


@dataclass(frozen=True)
class LandedDrop:
    drop_id: str
    path: Path
    files: list[str]
    fingerprint: str

    @property
    def event_id(self) -> uuid.UUID:
        return uuid.uuid5(EVENT_NAMESPACE, f"{self.drop_id}/{self.fingerprint}")

    def payload(self) -> LandedPayload:
        return LandedPayload(drop_id=self.drop_id, path=str(self.path), files=len(self.files),
                             fingerprint=self.fingerprint)


def landing_entries(drop_dir: Path) -> list[Path]:
    """Every entry under a drop directory; raises DropError on anything that could escape it."""
    entries = []
    for root, dirs, files in os.walk(drop_dir, followlinks=False):
        for name in [*dirs, *files]:
            path = Path(root) / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise DropError(f"{path}: symlinks are not accepted in a drop (it points to {os.readlink(path)}); "
                                "copy the file itself into the drop")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise DropError(f"{path}: not a regular file; a drop holds only files and directories")
            entries.append(path)
    return entries


def check_drop_dir(path: Path) -> str:
    """The drop id a landing-zone directory stands for; refuses names and entries that could escape."""
    if path.is_symlink():
        raise DropError(f"{path}: a symlink in the landing zone is not followed; copy the drop there instead "
                        "(sftflow drop PATH)")
    if not path.is_dir():
        raise DropError(f"{path}: only directories are drops; put the file in a directory (sftflow drop FILE)")
    drop_id = check_drop_id(path.name)
    landing_entries(path)
    return drop_id


def is_complete(path: Path, quiet_seconds: float, now: float | None = None) -> bool:
    """True when the drop has a _SUCCESS marker, or nothing in it changed for quiet_seconds."""
    if (path / SUCCESS_MARKER).is_file():
        return True
    return (now if now is not None else time.time()) - last_change(path) >= quiet_seconds


def last_change(path: Path) -> float:
    """Latest modification or status change under path (ctime too: a copy that keeps old mtimes is still new)."""
    stats = [path.lstat(), *(p.lstat() for p in landing_entries(path))]
    return max(max(s.st_mtime, s.st_ctime) for s in stats)


def describe(path: Path) -> LandedDrop:
    drop_id = check_drop_dir(path)
    files = list_drop_files([str(path)])
    if not files:
        raise DropError(f"{path}: no data files (.jsonl, .json, .csv, .parquet, optionally .gz) in the drop")
    return LandedDrop(drop_id, path, files, fingerprint_files(files))


def send_landed_event(drop: LandedDrop) -> None:
    """Send `sftflow.drop.landed` to the configured Prefect server; raises when it cannot be delivered."""
    import asyncio
    from datetime import datetime, timezone

    from prefect.events import Event
    from prefect.events.clients import get_events_client
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise DropError("events cannot be sent: no Prefect server is configured; start the stack with `sftflow up`")
    event = Event(
        event=EVENT_LANDED,
        resource={"prefect.resource.id": f"sftflow.drop.{drop.drop_id}", "prefect.resource.name": drop.drop_id},
        payload=drop.payload().dump(),
        id=drop.event_id,
        occurred=datetime.now(timezone.utc),
    )

    async def send() -> None:
        async with get_events_client(reconnection_attempts=3) as client:
            await client.emit(event)

    asyncio.run(send())


def announce(workspace: Workspace, drop: LandedDrop,
             send: Callable[[LandedDrop], None] = send_landed_event) -> EmittedRecord | None:
    """Send the event for one complete drop, then record that it was sent; None when it already was.

    The check, the send and the record happen under the landing zone's lock, so the watcher and
    `sftflow drop` never both announce the same drop.
    """
    landing = workspace.landing
    with landing.lock():
        previous = landing.emitted(drop.drop_id)
        if previous is not None:
            if previous.fingerprint != drop.fingerprint:
                raise DropError(f"{drop.path}: the drop changed after it was announced (fingerprint "
                                f"{previous.fingerprint[:12]} -> {drop.fingerprint[:12]}); drops are immutable: "
                                "land new data under a new name")
            return None
        send(drop)
        record = EmittedRecord(**drop.payload().dump(), event_id=str(drop.event_id), emitted_at=time.time())
        landing.record_emitted(record)
    return record


def _changed(path: Path, record: EmittedRecord) -> bool:
    """Cheap check of an announced drop: anything modified after it was announced?"""
    return last_change(path) > record.emitted_at


def scan_landing(workspace: Workspace, quiet_seconds: float, send: Callable[[LandedDrop], None] = send_landed_event,
                 log: Callable[[str], None] = print) -> dict:
    """One pass of the watcher: announce every complete drop not announced before.

    Returns {"announced": [...], "waiting": [...], "refused": [...]} (refusals are recorded once
    under .refused/ and not reported again).
    """
    landing = workspace.landing
    landing.root.mkdir(parents=True, exist_ok=True)
    result: dict[str, list] = {"announced": [], "waiting": [], "refused": []}
    for path in landing.entries():
        name = path.name
        if landing.refused(name):
            continue
        try:
            if not path.is_symlink() and path.is_dir() and not is_complete(path, quiet_seconds):
                result["waiting"].append(name)
                continue
            previous = None if path.is_symlink() else landing.emitted(name)
            if previous is not None and not _changed(path, previous):
                continue
            drop = describe(path)
            record = announce(workspace, drop, send)
        except DropError as exc:
            landing.record_refused(RefusedRecord(name=name, reason=str(exc), refused_at=time.time()))
            result["refused"].append({"name": name, "reason": str(exc)})
            log(f"refused {name}: {exc}")
            continue
        if record is not None:
            result["announced"].append(record.dump())
            log(f"announced drop {drop.drop_id} ({len(drop.files)} files, event {record.event_id})")
    return result


def land_drop(workspace: Workspace, source: Path, drop_id: str | None = None) -> LandedDrop:
    """Copy a drop (a directory or one file) into the landing zone, whole or not at all, with _SUCCESS."""
    source = Path(source)
    if not source.exists():
        raise DropError(f"{source}: no such file or directory")
    name = drop_id or (source.name if source.is_dir() else source.name.split(".")[0])
    drop_id = check_drop_id(name)
    if source.is_dir():
        landing_entries(source)  # refuse symlinks before copying anything
    elif source.is_symlink() or not source.is_file():
        raise DropError(f"{source}: pass a regular file or a directory of data files")
    target = workspace.landing.dir_of(drop_id)
    if target.exists() or target.is_symlink():
        existing = describe(target)
        incoming = fingerprint_files(list_drop_files([str(source)]))
        if existing.fingerprint == incoming:
            return existing
        raise DropError(f"{target} already holds other data under drop id {drop_id!r}; drops are immutable: "
                        "choose another --drop-id")
    with workspace.landing.incoming(drop_id) as tmp:
        if source.is_dir():
            shutil.copytree(source, tmp, symlinks=True)
        else:
            tmp.mkdir()
            shutil.copyfile(source, tmp / source.name)
        (tmp / SUCCESS_MARKER).touch()
        fsync_tree(tmp)
        os.rename(tmp, target)
    return describe(target)
