"""Outputs appear whole or not at all: write under a temporary name, fsync, rename, fsync the parent.

A reader never sees a half-written file or directory: a crash leaves at most a `.tmp-*` entry,
which is ignored by every reader and removed by the next writer of the same target.

Replacing a directory (`replace_dir`, `staged_dir`) never leaves the target absent where Linux's
renameat2(RENAME_EXCHANGE) works (kernel >= 3.15; ext4, xfs, btrfs, tmpfs, overlayfs): the new
directory and the old one swap names in one step. Elsewhere (another OS, a C library or file system
without it) the old one is renamed aside, then the new one in: a reader may find the target absent
for the instant between the two renames, and a crash there leaves the old directory under
`.tmp-old~<hex>~<name>`, which `remove_stale_tmp` puts back; at no point is neither of them on disk.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson

TMP_PREFIX = ".tmp-"
# an old directory renamed aside by the fallback of replace_dir: .tmp-old~<hex>~<name>
ASIDE = re.compile(re.escape(TMP_PREFIX) + r"old~[0-9a-f]{8}~(?P<name>.+)", re.DOTALL)

# renameat2(2) (Linux): flags and the "current directory" file descriptor
RENAME_NOREPLACE, RENAME_EXCHANGE, AT_FDCWD = 1, 2, -100


def _load_renameat2():
    """The C library's renameat2, or None (not Linux, or glibc < 2.28)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags); False when the kernel, C library or file system cannot do it."""
    if _renameat2 is None:
        return False
    if _renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap the names of two existing entries in one atomic step; False where that is not supported."""
    return _rename2(a, b, RENAME_EXCHANGE)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename src to dst; FileExistsError when dst exists (an empty directory included), atomically
    where renameat2(RENAME_NOREPLACE) works. Elsewhere the check and the rename are two steps: callers
    that race there hold a lock."""
    if _rename2(src, dst, RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from exc
        raise


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


def ensure_dir(path: Path) -> None:
    """`mkdir -p` that makes what it creates durable: each new directory's parent is fsynced (else a
    crash can lose a new directory and every file written into it)."""
    missing = []
    while not path.is_dir() and path != path.parent:
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir()
        fsync_dir(directory.parent)


def tmp_sibling(target: Path) -> Path:
    return target.with_name(f"{TMP_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}")


def write_bytes_atomic(target: Path, data: bytes) -> None:
    ensure_dir(target.parent)
    tmp = tmp_sibling(target)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def write_json_atomic(target: Path, obj: object) -> None:
    write_bytes_atomic(target, orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")


def read_json(path: Path) -> dict:
    return orjson.loads(path.read_bytes())


def sha256_of(path: Path) -> str:
    """The sha256 hex digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def replace_dir(staged: Path, target: Path) -> None:
    """Make the complete directory `staged` (a sibling of `target`) the directory `target`, durably.

    Its files are fsynced, it is renamed into place (swapped with the old `target` when there is one:
    see the module's docstring for what a reader can see), the parent is fsynced, then the old one is
    removed.
    """
    fsync_tree(staged)
    try:
        rename_noreplace(staged, target)
        old = None
    except FileExistsError:
        old = staged if exchange_paths(staged, target) else _replace_via_aside(staged, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _replace_via_aside(staged: Path, target: Path) -> Path:
    """The fallback of replace_dir: the old target renamed aside, then `staged` renamed in; returns
    where the old one is. A failure in between puts the old one back."""
    aside = target.with_name(f"{TMP_PREFIX}old~{uuid.uuid4().hex[:8]}~{target.name}")
    os.rename(target, aside)
    try:
        os.rename(staged, target)
    except BaseException:
        os.rename(aside, target)
        raise
    return aside


@contextlib.contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes `target` when the block exits cleanly (`replace_dir`).

    If `target` exists already it is replaced: at every instant `target` is either the old complete
    directory or the new complete one.
    """
    ensure_dir(target.parent)
    tmp = tmp_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_tmp(parent: Path) -> None:
    """Remove leftovers of writers that died (only entries with the temporary prefix); an old directory
    that a writer renamed aside and died before its replacement was in place is put back instead."""
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        if (aside := ASIDE.fullmatch(entry.name)) and not os.path.lexists(parent / aside["name"]):
            os.rename(entry, parent / aside["name"])
            fsync_dir(parent)
        elif entry.name.startswith(TMP_PREFIX):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock (flock) for the block; released by the kernel if we die."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
