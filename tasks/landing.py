"""The landing zone: where new drops arrive, and the `sftflow.drop.landed` event that starts ingest.

    $SFTFLOW_HOME/landing/<drop_id>/...        one directory per drop (files of any supported format)
    $SFTFLOW_HOME/landing/.emitted/<drop_id>.json   the drop was announced (its fingerprint, event id)
    $SFTFLOW_HOME/landing/.refused/<name>.json      an entry that will never be announced, and why

A drop is complete when it holds a `_SUCCESS` marker, or when nothing in it has changed for
`quiet_seconds`. Each complete drop is announced once: the event id is derived from the drop id and
its content, the `.emitted` record is written (and fsynced) after the server took the event, and
ingest is idempotent (the same drop id with the same content is a no-op), so a watcher killed
between the two steps announces the drop again under the same event id (which Prefect's triggers
see once) and nothing is ingested twice.

The watcher outlives what it finds: an entry it cannot use (a name that is not a drop id, a symlink
out of the landing zone, a special file, one it cannot read) is refused with its reason under
`.refused/` and the scan goes on; while the server cannot be reached, drops stay pending and are
tried again after a growing pause, and announced once it answers.

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
from foundation.errors import DropError, SftflowError
from foundation.stores.landing import SUCCESS_MARKER, LandingStore
from foundation.workspace import Workspace
from tasks.ingest.discovery import check_drop_id, fingerprint_files, list_drop_files

EVENT_LANDED = "sftflow.drop.landed"
EVENT_NAMESPACE = uuid.UUID("5f2b3c1e-6a1d-4c52-9a39-2f6f3b1e8d10")
SEND_TIMEOUT_SECONDS = 15.0  # per request of an attempt at sending an event; the watcher tries again later
MAX_BACKOFF_SECONDS = 60.0  # the longest pause of the watcher while the server cannot be reached


class DeliveryError(SftflowError):
    """The Prefect server did not take an event (down, unreachable, or refusing it). The drop stays
    landed and unannounced; it is sent again later under the same event id."""


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
    """Send `sftflow.drop.landed` to the configured Prefect server (POST /api/events: it answers once it
    has taken the event, which the websocket of Prefect's events client never says); one attempt, each
    request bounded by SEND_TIMEOUT_SECONDS. DeliveryError when the server did not take it."""
    from datetime import datetime, timezone

    from prefect.client.orchestration import get_client
    from prefect.events import Event
    from prefect.settings import (
        PREFECT_API_REQUEST_TIMEOUT,
        PREFECT_API_URL,
        PREFECT_CLIENT_MAX_RETRIES,
        temporary_settings,
    )

    api_url = PREFECT_API_URL.value()
    if not api_url:
        raise DeliveryError("events cannot be sent: no Prefect server is configured; start the stack with `sftflow up`")
    event = Event(
        event=EVENT_LANDED,
        resource={"prefect.resource.id": f"sftflow.drop.{drop.drop_id}", "prefect.resource.name": drop.drop_id},
        payload=drop.payload().dump(),
        id=drop.event_id,
        occurred=datetime.now(timezone.utc),
    )
    # one attempt, each of its requests (the client's CSRF token too) bounded: the caller tries again later
    one_attempt = {PREFECT_CLIENT_MAX_RETRIES: 0, PREFECT_API_REQUEST_TIMEOUT: SEND_TIMEOUT_SECONDS}
    try:
        with temporary_settings(one_attempt), get_client(sync_client=True) as client:
            client.request("POST", "/events", json=[event.model_dump(mode="json")])
    except Exception as exc:
        raise DeliveryError(f"the Prefect server at {api_url} did not take the event ({_one_line(exc)})") from exc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def announce(workspace: Workspace, drop: LandedDrop,
             send: Callable[[LandedDrop], None] = send_landed_event) -> EmittedRecord | None:
    """Send the event for one complete drop, then record that it was sent; None when it already was.

    The check, the send and the record happen under the landing zone's lock, so the watcher and
    `sftflow drop` never both announce the same drop. DeliveryError when the server did not take it
    (nothing is recorded: it is sent again later).
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
        try:
            send(drop)
        except DeliveryError:
            raise
        except Exception as exc:  # whatever the transport raised: the server did not take the event
            raise DeliveryError(f"announcing drop {drop.drop_id} failed ({_one_line(exc)})") from exc
        record = EmittedRecord(**drop.payload().dump(), event_id=str(drop.event_id), emitted_at=time.time())
        landing.record_emitted(record)
    return record


def _changed(path: Path, record: EmittedRecord) -> bool:
    """Cheap check of an announced drop: anything modified after it was announced?"""
    return last_change(path) > record.emitted_at


def printable(text: str) -> str:
    """`text` with the bytes of a name that is not UTF-8 written as escapes (it can be logged and stored)."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()


def _refusal_reason(exc: Exception) -> str:
    if isinstance(exc, SftflowError):
        return str(exc)
    if isinstance(exc, OSError):
        what = f"{exc.filename}: " if exc.filename else ""
        return (f"{what}cannot be read ({exc.strerror or _one_line(exc)}); fix it and land the drop again under a "
                "new name")
    return f"could not be examined ({_one_line(exc)}); land the drop again under a new name"


def _refuse(landing: LandingStore, name: str, reason: str, result: dict, log: Callable[[str], None]) -> None:
    """Record that an entry will never be announced, and why; a record that cannot be written (a full
    disk) is reported, and the entry is refused again on the next pass."""
    shown, reason = printable(name), printable(reason)
    try:
        landing.record_refused(RefusedRecord(name=shown, reason=reason, refused_at=time.time()), name=name)
    except Exception as exc:
        log(f"could not record the refusal of {shown} ({_one_line(exc)})")
    result["refused"].append({"name": shown, "reason": reason})
    log(f"refused {shown}: {reason}")


def scan_landing(workspace: Workspace, quiet_seconds: float, send: Callable[[LandedDrop], None] = send_landed_event,
                 log: Callable[[str], None] = print) -> dict:
    """One pass of the watcher: announce every complete drop not announced before.

    Returns {"announced": [...], "waiting": [...], "refused": [...], "pending": [...]} and, when the
    server did not take an event, "delivery_error". Refusals are recorded once under .refused/ and not
    reported again; an entry that cannot be used is refused and the pass goes on. After the first
    failed delivery no more sends are tried in this pass: the other complete drops are pending too.
    """
    landing = workspace.landing
    landing.root.mkdir(parents=True, exist_ok=True)
    result: dict[str, list] = {"announced": [], "waiting": [], "refused": [], "pending": []}
    for path in landing.entries():
        name = path.name
        try:
            if landing.refused(name):
                continue
            check_drop_id(name)  # a name that can never be a drop is refused at once, complete or not
            if not path.is_symlink() and path.is_dir() and not is_complete(path, quiet_seconds):
                result["waiting"].append(name)
                continue
            previous = None if path.is_symlink() else landing.emitted(name)
            if previous is not None and not _changed(path, previous):
                continue
            drop = describe(path)
            if "delivery_error" in result:
                result["pending"].append(name)
                continue
            record = announce(workspace, drop, send)
        except DeliveryError as exc:
            result["pending"].append(name)
            result["delivery_error"] = str(exc)
            log(f"not announced yet: {name} ({exc})")
            continue
        except FileNotFoundError:  # removed or renamed while it was looked at: seen again on the next pass
            continue
        except Exception as exc:  # one bad entry never stops the watcher
            _refuse(landing, name, _refusal_reason(exc), result, log)
            continue
        if record is not None:
            result["announced"].append(record.dump())
            log(f"announced drop {drop.drop_id} ({len(drop.files)} files, event {record.event_id})")
    return result


def next_pause(interval: float, failed_passes: int) -> float:
    """Seconds until the next pass: `interval`, doubled after each pass in a row whose sends failed, up to
    MAX_BACKOFF_SECONDS (or `interval`, when that is longer)."""
    if not failed_passes:
        return interval
    return min(interval * 2 ** failed_passes, max(interval, MAX_BACKOFF_SECONDS))


def watch_landing(workspace: Workspace, interval: float, quiet_seconds: float, once: bool = False,
                  send: Callable[[LandedDrop], None] = send_landed_event, log: Callable[[str], None] = print,
                  sleep: Callable[[float], None] = time.sleep) -> dict:
    """The watcher: a pass of `scan_landing` every `interval` seconds, for ever (or once); returns the
    last pass's result. While the server does not take events the pause grows (`next_pause`), and the
    pending drops are announced once it does; a pass that fails as a whole (the landing zone cannot be
    read) is reported and tried again."""
    failed_passes = 0
    while True:
        try:
            result = scan_landing(workspace, quiet_seconds, send, log)
        except Exception as exc:
            log(f"the scan of {workspace.landing_dir} failed ({_one_line(exc)}); trying again")
            result = {"announced": [], "waiting": [], "refused": [], "pending": [], "scan_error": _one_line(exc)}
        if once:
            return result
        failed_passes = failed_passes + 1 if (result["pending"] or "scan_error" in result) else 0
        pause = next_pause(interval, failed_passes)
        if result["pending"]:
            log(f"{len(result['pending'])} drop(s) not announced yet; trying again in {pause:g} s")
        sleep(pause)


def land_drop(workspace: Workspace, source: Path, drop_id: str | None = None) -> LandedDrop:
    """Copy a drop (a directory or one file) into the landing zone with _SUCCESS, whole or not at all.

    The source is checked first (drop id, symlinks, data files) and the copy again before it is renamed
    into place, so nothing of a refused drop is left behind. The rename never replaces: of several
    `sftflow drop` racing for one drop id, one lands its copy and the others get that drop back when it
    holds the same content (as a drop landed twice does), a DropError naming the id when it does not.
    """
    source = Path(source)
    if not source.exists():
        raise DropError(f"{source}: no such file or directory")
    name = drop_id or (source.name if source.is_dir() else source.name.split(".")[0])
    drop_id = check_drop_id(name)
    if source.is_dir():
        landing_entries(source)  # refuse symlinks before copying anything
    elif source.is_symlink() or not source.is_file():
        raise DropError(f"{source}: pass a regular file or a directory of data files")
    list_drop_files([str(source)])  # a DropError when it holds no data file, or is not one
    landing = workspace.landing
    target = landing.dir_of(drop_id)
    if target.exists() or target.is_symlink():
        return _landed_before(target, drop_id, fingerprint_files(list_drop_files([str(source)])))
    with landing.incoming(drop_id) as tmp:
        if source.is_dir():
            shutil.copytree(source, tmp, symlinks=True)
        else:
            tmp.mkdir()
            shutil.copyfile(source, tmp / source.name)
        (tmp / SUCCESS_MARKER).touch()
        landing_entries(tmp)  # the copy is checked as the watcher will check it
        files = list_drop_files([str(tmp)])
        fingerprint = fingerprint_files(files)
        try:
            landing.land(tmp, drop_id)
        except FileExistsError:  # another `sftflow drop` landed this id while we copied
            return _landed_before(target, drop_id, fingerprint, racing=True)
    return LandedDrop(drop_id, target, [str(target / os.path.relpath(f, tmp)) for f in files], fingerprint)


def _landed_before(target: Path, drop_id: str, fingerprint: str, racing: bool = False) -> LandedDrop:
    """The drop already at `target` when it holds the content `fingerprint` names; else a DropError."""
    try:
        existing = describe(target)
    except DropError as exc:
        raise DropError(f"{target} is in the way of drop id {drop_id!r} and is not a complete drop ({exc}); "
                        "remove it, or choose another --drop-id") from exc
    if existing.fingerprint == fingerprint:
        return existing
    when = " (another `sftflow drop` landed it while this one copied)" if racing else ""
    raise DropError(f"{target} already holds other data under drop id {drop_id!r}{when}; drops are immutable: "
                    "choose another --drop-id")
