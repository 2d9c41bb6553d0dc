"""Drops on disk: drop ids, the data files a drop holds, and the fingerprint of their content.

A data file is one whose suffix is in the readers table (`readers.READERS`), optionally gzipped.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import fsspec

from foundation.errors import DropError
from tasks.ingest.readers import SUPPORTED_SUFFIXES, file_suffix

DROP_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_drop_id(drop_id: str) -> str:
    """A drop id names a directory in the workspace, so it must not be able to escape it."""
    if not DROP_ID_PATTERN.fullmatch(drop_id) or ".." in drop_id:
        raise DropError(
            f"drop id {drop_id!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit, with no '..' and no '/' (e.g. --drop-id 2026-11-orders)"
        )
    return drop_id


def default_drop_id(paths: list[str], fingerprint: str) -> str:
    name = Path(paths[0].rstrip("/")).name
    for suffix in (".gz", *SUPPORTED_SUFFIXES):
        name = name.removesuffix(suffix)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-_") or "drop"
    return f"{stem[:100]}-{fingerprint[:12]}"


def refuse_escaping_links(path: Path) -> None:
    """A local drop must not lead outside itself: a symlink (to a file or a directory) whose target is
    outside the drop directory is refused, never followed. A file named directly counts its own
    directory as the drop."""
    root = (path if path.is_dir() else path.parent).resolve()
    candidates = [path] if not path.is_dir() else []
    if path.is_dir():
        for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
            candidates += [Path(dirpath) / name for name in [*dirnames, *filenames]]
    for candidate in candidates:
        if candidate.is_symlink() and not candidate.resolve().is_relative_to(root):
            raise DropError(
                f"{candidate}: a symlink to {os.readlink(candidate)}, outside the drop directory {root}; "
                "symlinks out of a drop are never followed: copy the file into the drop instead"
            )


def list_drop_files(paths: list[str]) -> list[str]:
    """Expand each PATH (file or directory, local or fsspec URL) to the data files it holds, sorted.

    In a directory, files with an unsupported suffix, hidden files and markers such as `_SUCCESS`
    are skipped; a file named explicitly must have a supported suffix.
    """
    files: list[str] = []
    for path in paths:
        fs, fs_path = fsspec.core.url_to_fs(path)
        if not fs.exists(fs_path):
            raise DropError(f"{path}: no such file or directory; pass a file or a directory of data files")
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        if prefix == "":
            refuse_escaping_links(Path(fs_path))
        if fs.isdir(fs_path):
            found = sorted(
                p
                for p in fs.find(fs_path)
                if file_suffix(p) in SUPPORTED_SUFFIXES and not Path(p).name.startswith((".", "_"))
            )
            files.extend(prefix + p for p in found)
        elif file_suffix(fs_path) in SUPPORTED_SUFFIXES:
            files.append(prefix + fs_path)
        else:
            raise DropError(
                f"{path}: unsupported file type; rename it or convert it to one of "
                f"{', '.join(SUPPORTED_SUFFIXES)} (optionally .gz)"
            )
    if not files:
        raise DropError(f"{', '.join(paths)}: no data files ({', '.join(SUPPORTED_SUFFIXES)}, optionally .gz) found")
    return files


def fingerprint_files(files: list[str]) -> str:
    """sha256 over every file's name and bytes: the identity of a drop's content."""
    digest = hashlib.sha256()
    for url in files:
        digest.update(Path(url).name.encode() + b"\0")
        with fsspec.open(url, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class DropSource:
    """A drop as found: its id, its data files (sorted) and the fingerprint of their content."""

    drop_id: str
    files: list[str]
    fingerprint: str


def find_drop(paths: list[str], drop_id: str | None = None) -> DropSource:
    """The drop the paths name: its files, their fingerprint, and its id (given, or the first path's name
    and a content hash), checked to be safe as a directory name."""
    files = list_drop_files(paths)
    fingerprint = fingerprint_files(files)
    return DropSource(check_drop_id(drop_id or default_drop_id(paths, fingerprint)), files, fingerprint)
