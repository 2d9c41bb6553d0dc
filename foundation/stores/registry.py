"""The registry: published versions of each model, and each model's champion.

    registry/<name>/
      v0001/                       a version, written under a temporary name and renamed into place:
        adapter/, gguf/, Modelfile, eval.json, export.json, run_manifest.json, README.md (model card)
        manifest.json              VersionManifest (sha256 and size of every file), written last
      CHAMPION                     the champion's version name, replaced atomically
      .lock                        held while a version is published
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from foundation.artifacts import RunManifest, VersionManifest
from foundation.atomic import exclusive_lock, remove_stale_tmp, staged_dir, write_bytes_atomic
from foundation.errors import NotFoundError, WorkspaceError

VERSION_PATTERN = re.compile(r"v\d{4,}")
MANIFEST = "manifest.json"  # a version's manifest, written last (here and in a remote copy)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


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
        """A file the version's manifest lists, by its relative path."""
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
        if not VERSION_PATTERN.fullmatch(version) or not found.manifest_path.exists():
            raise NotFoundError(f"no version {version!r} of {name}; list them with: ls {self.model_dir(name)}")
        return found

    def champion(self, name: str) -> str | None:
        """The champion's version name, or None when the model has none."""
        pointer = self.model_dir(name) / "CHAMPION"
        if not pointer.exists():
            return None
        version = pointer.read_text().strip()
        if not VERSION_PATTERN.fullmatch(version):
            raise WorkspaceError(f"{pointer} holds {version[:40]!r}, not a version name like v0001; "
                                 "write the champion's version there, or remove the file")
        return version

    def champion_ref(self, name: str) -> Champion | None:
        """The champion with what it takes to load it: its base model and its adapter."""
        version = self.champion(name)
        if version is None:
            return None
        found = self.version(name, version)
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
