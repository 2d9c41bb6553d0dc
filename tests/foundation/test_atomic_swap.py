"""Issue 15, item 9: replacing a directory never leaves it absent, and renames are made durable.

A reader polls the target while it is replaced many times and must always find a complete version;
`os.fsync` is wrapped to see what is synced, and when (the parent after the rename).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from foundation import atomic
from foundation.atomic import (
    exchange_paths,
    remove_stale_tmp,
    rename_noreplace,
    replace_dir,
    staged_dir,
    write_bytes_atomic,
)


def _exchange_works(tmp_path: Path) -> bool:
    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.mkdir()
    b.mkdir()
    try:
        return exchange_paths(a, b)
    finally:
        a.rmdir()
        b.rmdir()


def _write_version(directory: Path, n: int) -> None:
    for name in ("a.txt", "b.txt"):
        (directory / name).write_text(str(n))


@pytest.fixture
def no_exchange(monkeypatch):
    """The fallback of a system without renameat2 (another OS, an old C library or file system)."""
    monkeypatch.setattr(atomic, "_renameat2", None)


class FsyncLog:
    """Wraps os.fsync: the path of every synced descriptor, and what `probe` said at that moment."""

    def __init__(self, monkeypatch, probe=lambda: None):
        self.calls: list[tuple[str, object]] = []
        real = os.fsync

        def fsync(fd):
            self.calls.append((os.readlink(f"/proc/self/fd/{fd}"), probe()))
            return real(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    def paths(self) -> list[str]:
        return [path for path, _ in self.calls]


def test_a_reader_never_finds_a_replaced_directory_absent_or_half_written(tmp_path):
    if not _exchange_works(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here; the fallback is tested below")
    target = tmp_path / "version"
    with staged_dir(target) as tmp:
        _write_version(tmp, 0)
    seen, problems, done = [], [], threading.Event()

    def read_file(directory_fd: int, name: str) -> str:
        fd = os.open(name, os.O_RDONLY, dir_fd=directory_fd)
        try:
            return os.read(fd, 100).decode()
        finally:
            os.close(fd)

    def read():
        while not done.is_set():
            try:  # the directory opened once, its files read through it: one version's files
                directory_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                problems.append("absent")
                continue
            try:
                versions = {read_file(directory_fd, name) for name in ("a.txt", "b.txt")}
            except FileNotFoundError as exc:
                if os.fstat(directory_fd).st_ino == os.stat(target).st_ino:  # not an old one, being removed
                    problems.append(f"incomplete: {exc}")
                continue
            finally:
                os.close(directory_fd)
            if len(versions) != 1:
                problems.append(f"mixed versions {versions}")
            seen.append(versions.pop())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(1, 301):
            with staged_dir(target) as tmp:
                _write_version(tmp, n)
    finally:
        done.set()
        reader.join()
    assert problems == []
    assert len(set(seen)) > 10  # the reader did see the replacements happen
    assert (target / "a.txt").read_text() == "300"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_the_parent_is_fsynced_after_the_new_directory_is_in_place(tmp_path, monkeypatch):
    target = tmp_path / "out"
    with staged_dir(target) as tmp:
        _write_version(tmp, 1)
    log = FsyncLog(monkeypatch, probe=lambda: (target / "a.txt").read_text() if target.exists() else None)
    with staged_dir(target) as tmp:
        _write_version(tmp, 2)
    synced = log.paths()
    assert any(p.endswith("/a.txt") for p in synced) and any(p.endswith("/b.txt") for p in synced)
    parent_syncs = [seen for path, seen in log.calls if path == str(tmp_path)]
    assert parent_syncs and parent_syncs[-1] == "2"  # synced once the new version is the target


def test_the_fallback_replaces_too_and_leaves_nothing_behind(tmp_path, no_exchange, monkeypatch):
    target = tmp_path / "out"
    for n in (1, 2):
        with staged_dir(target) as tmp:
            _write_version(tmp, n)
    assert (target / "a.txt").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    log = FsyncLog(monkeypatch, probe=lambda: (target / "a.txt").read_text() if target.exists() else None)
    with staged_dir(target) as tmp:
        _write_version(tmp, 3)
    assert [seen for path, seen in log.calls if path == str(tmp_path)][-1] == "3"


def test_the_fallback_puts_the_old_directory_back_when_the_new_one_cannot_go_in(tmp_path, no_exchange, monkeypatch):
    target = tmp_path / "out"
    with staged_dir(target) as tmp:
        _write_version(tmp, 1)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new one into place
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="No space"), staged_dir(target) as tmp:
        _write_version(tmp, 2)
    assert (target / "a.txt").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_crash_between_the_fallbacks_renames_leaves_the_old_directory_which_is_put_back(tmp_path):
    # the state a writer leaves when it dies after moving the old version aside, before the new one is in
    target = tmp_path / "out"
    target.mkdir()
    _write_version(target, 1)
    aside = tmp_path / ".tmp-old~0123abcd~out"
    os.rename(target, aside)
    staged = tmp_path / ".tmp-out-89abcdef"
    staged.mkdir()
    _write_version(staged, 2)
    remove_stale_tmp(tmp_path)
    assert (target / "a.txt").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    # an aside whose target is back in place is a leftover like any other
    aside.mkdir()
    remove_stale_tmp(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("mode", ["renameat2", "fallback"])
def test_rename_noreplace_never_replaces_even_an_empty_directory(tmp_path, monkeypatch, mode):
    if mode == "fallback":
        monkeypatch.setattr(atomic, "_renameat2", None)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "x").write_text("new")
    dst.mkdir()
    with pytest.raises(FileExistsError):
        rename_noreplace(src, dst)
    (dst / "y").write_text("old")
    with pytest.raises(FileExistsError):
        rename_noreplace(src, dst)
    assert (src / "x").exists() and (dst / "y").read_text() == "old"
    rename_noreplace(src, tmp_path / "free")
    assert (tmp_path / "free" / "x").read_text() == "new"


def test_replace_dir_into_a_free_name_and_new_parents_are_fsynced(tmp_path, monkeypatch):
    log = FsyncLog(monkeypatch)
    write_bytes_atomic(tmp_path / "new" / "deeper" / "f.json", b"{}")
    synced = log.paths()
    # the new directories' entries are durable: each one's parent was synced
    assert str(tmp_path) in synced and str(tmp_path / "new") in synced and str(tmp_path / "new" / "deeper") in synced
    staged = tmp_path / ".tmp-d-00000000"
    staged.mkdir()
    (staged / "f").write_text("1")
    replace_dir(staged, tmp_path / "d")
    assert (tmp_path / "d" / "f").read_text() == "1" and not staged.exists()
