"""The registry: published versions of each model, and each model's champion.

    registry/<name>/
      v0001/                       a version, written under a temporary name and renamed into place:
        adapter/, gguf/, Modelfile, eval.json, export.json, run_manifest.json, README.md (model card)
        manifest.json              VersionManifest (sha256 and size of every file), written last
      CHAMPION                     the champion's version name, replaced atomically
      .lock                        held while a version is published
      .verified.json               sha256 of files already checked, by (device, inode, size, mtime, ctime)

Every read of a version for use (`sftflow chat` / `serve`, the champion's adapter, a copy to a remote)
checks what it reads against the manifest: each path stays inside the version directory (no absolute
path, no '..', no symlink leading out) and each file's sha256 is the one published. `verify` reports
every file; `verified` hands out one file's path only once it checks out.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from datetime import datetime, timezone
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import orjson

from foundation.artifacts import RunManifest, VersionManifest
from foundation.atomic import exclusive_lock, remove_stale_tmp, sha256_of, staged_dir, write_bytes_atomic
from foundation.errors import NotFoundError, WorkspaceError

VERSION_PATTERN = re.compile(r"v\d{4,}")
MANIFEST = "manifest.json"  # a version's manifest, written last (here and in a remote copy)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HASH_CACHE = ".verified.json"
FILE_STATES = ("ok", "mismatch", "missing", "outside", "unlisted")


class IntegrityError(WorkspaceError):
    """A published file is not what its version's manifest says: changed, missing, unlisted, or outside the
    version directory."""


@dataclass(frozen=True)
class FileCheck:
    """One file of a version against its manifest. `status` is one of FILE_STATES."""

    path: str  # as the manifest lists it (or as found, for an unlisted file), relative to the version directory
    status: str
    detail: str = ""  # one line: what is wrong and how to fix it (empty when ok)
    published: str | None = None  # the sha256 the manifest lists
    actual: str | None = None  # the sha256 now, when the file was hashed

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def dump(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}


def _outside(root: Path, relative: str) -> str | None:
    """Why a manifest path would lead out of the version directory `root`, or None when it stays inside."""
    pure = PurePosixPath(relative)
    if not relative or "\x00" in relative:
        return "not a file name"
    if pure.is_absolute() or Path(relative).is_absolute():
        return "an absolute path"
    if ".." in pure.parts:
        return "a path with '..'"
    resolved = (root / relative).resolve()
    if not resolved.is_relative_to(root.resolve()):
        return f"a symlink leading to {resolved}"
    return None


class HashCache:
    """sha256 of files already hashed, keyed by what changes whenever a file's bytes do.

    The key holds the inode change time, which every write sets and no user can set back, so an edited or
    replaced file never matches its old record. A file changed in the last seconds is not recorded: its
    timestamps may not have ticked yet (git's "racily clean" problem). A record that cannot be read or
    written is ignored: the file is just hashed again.
    """

    RACY_NS = 2_000_000_000

    def __init__(self, path: Path):
        self.path = path
        try:
            self.records = orjson.loads(path.read_bytes()) if path.is_file() else {}
        except (OSError, orjson.JSONDecodeError):
            self.records = {}
        if not isinstance(self.records, dict):
            self.records = {}
        self.changed = False

    @staticmethod
    def _key(stat: os.stat_result) -> list[int]:
        return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]

    def sha256(self, name: str, path: Path) -> str:
        before = path.stat()
        record = self.records.get(name) if isinstance(self.records.get(name), dict) else {}
        if record.get("key") == self._key(before) and isinstance(record.get("sha256"), str):
            return record["sha256"]  # unchanged since it was hashed
        digest = sha256_of(path)
        after = path.stat()
        if self._key(after) == self._key(before) and time.time_ns() - after.st_ctime_ns > self.RACY_NS:
            self.records[name] = {"key": self._key(after), "sha256": digest}
            self.changed = True
        return digest

    def save(self) -> None:
        if not self.changed:
            return
        try:
            write_bytes_atomic(self.path, orjson.dumps(self.records))
        except OSError:
            pass
        self.changed = False


@dataclass(frozen=True)
class VersionDir:
    root: Path

    @property
    def version(self) -> str:
        return self.root.name

    adapter = property(lambda self: self.root / "adapter")
    gguf_dir = property(lambda self: self.root / "gguf")
    modelfile = property(lambda self: self.root / "Modelfile")
    eval_path = property(lambda self: self.root / "eval.json")
    export_path = property(lambda self: self.root / "export.json")
    run_manifest_path = property(lambda self: self.root / "run_manifest.json")
    model_card = property(lambda self: self.root / "README.md")
    manifest_path = property(lambda self: self.root / MANIFEST)

    def manifest(self) -> VersionManifest:
        return VersionManifest.read(self.manifest_path)

    def run_manifest(self) -> RunManifest:
        return RunManifest.read(self.run_manifest_path)

    def file(self, relative: str) -> Path:
        """A file the version's manifest lists, by its relative path; refused when the path leads out of the
        version directory. Its content is not checked: use `verified` for a file that is read."""
        if reason := _outside(self.root, relative):
            raise IntegrityError(f"{self.root / MANIFEST}: lists {relative[:200]!r}, {reason}, outside {self.root}; "
                                 "the manifest was changed: re-publish the run")
        return self.root / relative

    def _root_outside(self) -> str | None:
        """Why the version directory itself is not where it seems (a symlink to elsewhere), or None."""
        model = self.root.parent
        resolved = self.root.resolve()
        if resolved != model.parent.resolve() / model.name / self.root.name:
            return (f"{self.root} is a link to {resolved}, outside the registry; restore the version or re-publish "
                    "the run")
        return None

    def verify(self, select: Callable[[str], bool] | None = None, cached: bool = False) -> list[FileCheck]:
        """Check every file the manifest lists (or those `select` picks) and report files it does not list.

        `cached`: reuse the sha256 of files hashed before (the model's HASH_CACHE), and record new ones.
        """
        select = select or (lambda _: True)
        if reason := self._root_outside():
            return [FileCheck(".", "outside", reason)]
        if reason := _outside(self.root, MANIFEST):
            return [FileCheck(MANIFEST, "outside", f"{self.manifest_path}: {reason}; re-publish the run")]
        manifest = self.manifest()
        checks = []
        if (manifest.name, manifest.version) != (self.root.parent.name, self.version):
            checks.append(FileCheck(MANIFEST, "mismatch", f"{self.manifest_path}: describes {manifest.name}/"
                                    f"{manifest.version}, not {self.root.parent.name}/{self.version}; restore it or "
                                    "re-publish the run"))
        cache = HashCache(self.root.parent / HASH_CACHE) if cached else None
        for relative, digest in sorted(manifest.files.items()):
            if select(relative):
                checks.append(self._check(relative, digest.sha256, digest.bytes, cache))
        if cache:
            cache.save()
        listed = set(manifest.files) | {MANIFEST}
        for found in self._present():
            if found not in listed and select(found):
                checks.append(FileCheck(found, "unlisted", f"{self.root / found}: not in {self.manifest_path}; "
                                        "remove it or re-publish the run"))
        return checks

    def _check(self, relative: str, sha256: str, size: int, cache: HashCache | None) -> FileCheck:
        if reason := _outside(self.root, relative):
            return FileCheck(relative, "outside", f"{self.manifest_path}: lists {relative[:200]!r}, {reason}, outside "
                             f"{self.root}; the manifest was changed: re-publish the run", sha256)
        path = self.root / relative
        if not path.is_file():
            return FileCheck(relative, "missing", f"{path}: listed in {self.manifest_path} but missing; restore it or "
                             "re-publish the run", sha256)
        fix = "re-publish the run or restore the file"
        now = path.stat().st_size
        if now != size:
            return FileCheck(relative, "mismatch", f"{path}: size differs from the manifest (published {size} bytes, "
                             f"now {now}); {fix}", sha256)
        actual = cache.sha256(f"{self.version}/{relative}", path) if cache else sha256_of(path)
        if actual != sha256:
            return FileCheck(relative, "mismatch", f"{path}: sha256 differs from the manifest (published {sha256}, "
                             f"now {actual}); {fix}", sha256, actual)
        return FileCheck(relative, "ok", "", sha256, actual)

    def _present(self) -> list[str]:
        """Every file, symlink and special entry under the version directory (symlinked directories are not
        followed), by relative path."""
        found = []
        for folder, dirs, files in os.walk(self.root):
            base = Path(folder)
            found += [str((base / f).relative_to(self.root)) for f in files]
            found += [str((base / d).relative_to(self.root)) for d in dirs if (base / d).is_symlink()]
        return sorted(found)

    def require(self, select: Callable[[str], bool] | None = None, cached: bool = False) -> None:
        """Raise IntegrityError (naming the first bad file, and how many there are) unless every file checks."""
        failed = [c for c in self.verify(select, cached) if not c.ok]
        if failed:
            more = f" (and {len(failed) - 1} more: sftflow models verify {self.root.parent.name}@{self.version})"
            raise IntegrityError(failed[0].detail + (more if len(failed) > 1 else ""))

    def verified(self, relative: str, cached: bool = True) -> Path:
        """The path of a file the manifest lists, once it is inside the version and its sha256 is the published one."""
        if relative not in self.manifest().files:
            raise IntegrityError(f"{self.root / relative}: not in {self.manifest_path}; re-publish the run")
        self.require(lambda p: p == relative, cached)
        return self.root / relative


@dataclass(frozen=True)
class Champion:
    version: str
    model_path: str  # the base model the champion's adapter was trained on
    adapter_dir: str


def version_number(name: str) -> int:
    return int(name[1:]) if VERSION_PATTERN.fullmatch(name) else 0


class RegistryStore:
    def __init__(self, root: Path):
        self.root = root

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME_PATTERN.fullmatch(p.name))

    def model_dir(self, name: str) -> Path:
        return self.root / name

    def versions(self, name: str) -> list[VersionDir]:
        """The complete versions of a model, oldest first."""
        model = self.model_dir(name)
        if not NAME_PATTERN.fullmatch(name) or not model.is_dir():
            return []
        found = [VersionDir(p) for p in model.iterdir()
                 if VERSION_PATTERN.fullmatch(p.name) and (p / MANIFEST).exists()]
        return sorted(found, key=lambda v: version_number(v.version))

    def version(self, name: str, version: str) -> VersionDir:
        """A complete version; a clear error for any other name."""
        found = VersionDir(self.model_dir(name) / version)
        if not (NAME_PATTERN.fullmatch(name) and VERSION_PATTERN.fullmatch(version) and found.manifest_path.exists()):
            raise NotFoundError(f"no version {version!r} of {name}; list them with: ls {self.model_dir(name)}")
        if reason := found._root_outside():
            raise IntegrityError(reason)
        return found

    def champion(self, name: str) -> str | None:
        """The champion's version name, or None when the model has none; the pointer must be a small regular
        file naming a complete version of the model."""
        pointer = self.model_dir(name) / "CHAMPION"
        if not pointer.exists() and not pointer.is_symlink():
            return None
        fix = "write the champion's version there (ls the model's directory), or remove the file"
        if pointer.is_symlink() or not pointer.is_file():
            raise WorkspaceError(f"{pointer} is not a regular file (a symlink or a directory); {fix}")
        with open(pointer, "rb") as fh:
            version = fh.read(64).decode("utf-8", "replace").strip()
        if not VERSION_PATTERN.fullmatch(version):
            raise WorkspaceError(f"{pointer} holds {version[:40]!r}, not a version name like v0001; {fix}")
        if not (self.model_dir(name) / version / MANIFEST).is_file():
            raise WorkspaceError(f"{pointer} names {version}, which is not a complete version of {name}; {fix}")
        return version

    def champion_ref(self, name: str) -> Champion | None:
        """The champion with what it takes to load it: its base model and its adapter."""
        version = self.champion(name)
        if version is None:
            return None
        found = self.version(name, version)
        found.require(lambda p: p.startswith("adapter/") or p == "run_manifest.json")  # what evaluation loads
        return Champion(version, found.run_manifest().model_path, str(found.adapter))

    def set_champion(self, name: str, version: str) -> None:
        write_bytes_atomic(self.model_dir(name) / "CHAMPION", f"{version}\n".encode())

    def published_runs(self, name: str) -> dict[str, VersionDir]:
        """run id -> the version it was published as."""
        return {v.manifest().run_id: v for v in self.versions(name)}

    def next_version(self, name: str) -> str:
        """After the highest number, not the count: a removed version's number is never reused."""
        return f"v{max((version_number(v.version) for v in self.versions(name)), default=0) + 1:04d}"

    def published_with(self, name: str, dataset_version: str, config_hash: str) -> str | None:
        """The version already trained on this dataset version with this config, if any."""
        for version in self.versions(name):
            run = version.run_manifest()
            if run.dataset_version == dataset_version and run.config_hash == config_hash:
                return version.version
        return None

    def resolve(self, spec: str | None) -> VersionDir:
        """NAME[@VERSION]: NAME defaults to the only model; VERSION to the champion, else the newest."""
        names = self.names()
        name, _, version = (spec or "").partition("@")
        if not name:
            if len(names) != 1:
                raise NotFoundError(f"{len(names)} models in {self.root} ({', '.join(names) or 'none'}); "
                                    "choose one with --model NAME[@VERSION] (publish one with: sftflow publish --run "
                                    "RUN_ID)")
            name = names[0]
        if name not in names:
            raise NotFoundError(f"no model {name!r} in {self.root}; published: {', '.join(names) or 'none'}")
        if not version:
            versions = self.versions(name)
            version = self.champion(name) or (versions[-1].version if versions else "")
        return self.version(name, version)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold the model's publish lock; leftovers of publishers that died are removed first."""
        model = self.model_dir(name)
        model.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(model / ".lock"):
            remove_stale_tmp(model)
            yield

    @contextlib.contextmanager
    def write_version(self, name: str, version: str) -> Iterator[VersionDir]:
        """A temporary version directory that becomes `version` when the block exits cleanly."""
        with staged_dir(self.model_dir(name) / version) as tmp:
            yield VersionDir(tmp)


# Moving the champion by hand: `sftflow models promote` / `rollback`. Every move is one line of the model's
# CHAMPION_LOG (append-only, fsynced): who, when, from -> to, and why.

CHAMPION_LOG = "champion_log.jsonl"


@dataclass(frozen=True)
class ChampionMove:
    at: str  # ISO 8601, UTC
    user: str
    action: str  # "promote" or "rollback"
    from_version: str | None
    to_version: str
    reason: str | None = None

    def dump(self) -> dict:
        return {"at": self.at, "user": self.user, "action": self.action, "from": self.from_version,
                "to": self.to_version, "reason": self.reason}


def _current_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no login name in the environment nor in the password database
        return os.environ.get("USER") or "unknown"


def champion_log_path(registry: RegistryStore, name: str) -> Path:
    return registry.model_dir(name) / CHAMPION_LOG


def read_champion_log(registry: RegistryStore, name: str) -> list[ChampionMove]:
    """The model's champion moves, oldest first; a line that does not parse (a torn last write) is skipped."""
    path = champion_log_path(registry, name)
    if not path.is_file():
        return []
    moves = []
    for line in path.read_bytes().splitlines():
        try:
            entry = orjson.loads(line)
            moves.append(ChampionMove(str(entry["at"]), str(entry["user"]), str(entry["action"]), entry["from"],
                                      str(entry["to"]), entry.get("reason")))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
    return moves


def _append_line(path: Path, line: bytes) -> None:
    """Append one line and fsync it (and the directory, when the file is new). A last line left without its
    newline (a writer that died mid-append) is ended first, so the new line stays whole."""
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def champion_history(registry: RegistryStore, name: str) -> list[str]:
    """The champions in the order they took over, as a stack: a publish that promoted a version and every
    `promote` push; a `rollback` pops. The last entry is the pointer's version (pushed when the pointer was
    moved some other way)."""
    def when(text: str) -> datetime:
        moment = datetime.fromisoformat(text)
        return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)

    events = [(when(v.manifest().published_at), 0, "promote", v.version)
              for v in registry.versions(name) if v.manifest().promoted]
    events += [(when(m.at), 1, m.action, m.to_version) for m in read_champion_log(registry, name)]
    stack: list[str] = []
    for _, _, action, version in sorted(events):
        if action == "rollback":
            while stack and stack[-1] != version:
                stack.pop()
            if not stack:
                stack.append(version)
        elif not stack or stack[-1] != version:
            stack.append(version)
    current = registry.champion(name)
    if current and (not stack or stack[-1] != current):
        stack.append(current)
    return stack


def move_champion(registry: RegistryStore, name: str, version: str, action: str,
                  reason: str | None) -> ChampionMove | None:
    """Point CHAMPION at `version` (atomically, under the model's publish lock) and log the move; None when
    it already points there (nothing is written).

    The version must check against its manifest (IntegrityError otherwise). The pointer moves first, then
    the log line is appended: the log never records a move that did not happen.
    """
    found = registry.version(name, version)
    with registry.lock(name):
        found.require(cached=True)
        before = registry.champion(name)
        if before == version:
            return None
        registry.set_champion(name, version)
        move = ChampionMove(datetime.now(timezone.utc).isoformat(timespec="microseconds"), _current_user(), action,
                            before, version, reason)
        _append_line(champion_log_path(registry, name), orjson.dumps(move.dump()) + b"\n")
    return move


def promote(registry: RegistryStore, name: str, version: str, reason: str | None = None) -> ChampionMove | None:
    """Make `version` the champion; None when it already is (nothing is logged)."""
    return move_champion(registry, name, version, "promote", reason)


def rollback(registry: RegistryStore, name: str, reason: str | None = None) -> ChampionMove | None:
    """Move the champion back to the one before it (see `champion_history`)."""
    history = champion_history(registry, name)
    complete = {v.version for v in registry.versions(name)}
    previous = [v for v in history[:-1] if v in complete and v != (history[-1] if history else None)]
    if not previous:
        raise NotFoundError(f"no earlier champion of {name} to roll back to (champions so far: "
                            f"{', '.join(history) or 'none'}); choose one with: sftflow models promote "
                            f"{name}@VERSION (versions: {', '.join(sorted(complete)) or 'none'})")
    return move_champion(registry, name, previous[-1], "rollback", reason)
