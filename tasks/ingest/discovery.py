"""Drops on disk: drop ids, the data files a drop holds, and the fingerprint of their content.

A data file is one whose suffix is in the readers table (`readers.READERS`), optionally gzipped. A drop
is named by paths, each a file or a directory, local or an fsspec URL, or `hf://datasets/ORG/NAME`:

- a directory holds the data files anywhere under it (sharded Parquet, Hive-style `split=train/`
  partitions, ...) except hidden or `_`-prefixed ones (`_SUCCESS`, `.crc`, `_temporary/`, `_delta_log/`);
- a directory written by Hugging Face `datasets`' `save_to_disk` (it holds `state.json`) is the Arrow
  files its `state.json` lists, in that order, and nothing else; one written by `DatasetDict.save_to_disk`
  (`dataset_dict.json`) is every split it lists;
- `hf://datasets/ORG/NAME[@REVISION][/PATH]` (huggingface_hub's URLs) is that dataset's snapshot in the
  local Hugging Face cache (HF_HOME, HF_HUB_CACHE), read like a local directory. sftflow never downloads.

Only regular files are read. In a local drop, whether named or in a directory (outside hidden and
`_`-prefixed names), a named pipe, a socket, a device, a symlink loop, a dangling symlink, a file that
cannot be read or a directory that cannot be listed refuses the whole drop with a DropError naming it:
never waited on (a pipe blocks its reader until a writer comes), never skipped in silence.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

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
    """The first path's name (an hf:// dataset's ORG-NAME) and the start of the content's fingerprint."""
    name = Path(paths[0].rstrip("/")).name
    if paths[0].startswith(HF_SCHEME):
        name = parse_hub_url(paths[0]).repo_id.replace("/", "-")
    for suffix in (".gz", *SUPPORTED_SUFFIXES):
        name = name.removesuffix(suffix)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-_") or "drop"
    return f"{stem[:100]}-{fingerprint[:12]}"


def refuse_escaping_links(path: Path, root: Path | None = None) -> None:
    """A local drop must not lead outside itself: a symlink (to a file or a directory) whose target is
    outside the drop directory (or `root`) is refused, never followed. A file named directly counts its
    own directory as the drop."""
    root = (root or (path if path.is_dir() else path.parent)).resolve()
    candidates = [path] if not path.is_dir() else []
    if path.is_dir():
        for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
            candidates += [Path(dirpath) / name for name in [*dirnames, *filenames]]
    for candidate in candidates:
        if not candidate.is_symlink():
            continue
        try:
            target = candidate.resolve()
        except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError on a loop, later ones OSError
            raise DropError(_symlink_loop(candidate)) from None
        if not target.is_relative_to(root):
            raise DropError(
                f"{candidate}: a symlink to {os.readlink(candidate)}, outside the drop directory {root}; "
                "symlinks out of a drop are never followed: copy the file into the drop instead"
            )


# What a path can be besides a regular file or a directory: none of them is ever opened.
_SPECIAL_FILES = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _symlink_loop(path: Path) -> str:
    return (f"{path}: a symlink loop ({path.name} -> {os.readlink(path)} leads back to itself); point the link at "
            "a file in the drop, or remove it")


def check_local_entry(path: Path) -> None:
    """`path` can be read without waiting: a regular file that opens for reading, or a directory that can be
    listed (symlinks followed). Else a DropError naming it, what it is and the fix."""
    try:
        info = path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DropError(_symlink_loop(path)) from None
        if path.is_symlink():
            raise DropError(f"{path}: a symlink to {os.readlink(path)}, which does not exist; copy the file into "
                            "the drop, or remove the link") from None
        if not os.path.lexists(path):
            raise DropError(f"{path}: no such file or directory; pass a file or a directory of data files") from None
        raise DropError(f"{path}: cannot be read ({exc.strerror}); give the user running sftflow access to it, "
                        "or remove it from the drop") from None
    if stat.S_ISDIR(info.st_mode):
        try:
            with os.scandir(path):
                pass
        except OSError as exc:
            raise DropError(f"{path}: the directory cannot be listed ({exc.strerror}); give the user running "
                            "sftflow read and search permission on it (chmod a+rx), or remove it from the drop"
                            ) from None
        return
    for is_kind, kind in _SPECIAL_FILES:
        if is_kind(info.st_mode):
            raise DropError(f"{path}: {kind}, not a regular file; a drop is read from regular files only (reading "
                            "a pipe or a device can wait forever): write its data to a file in the drop, or remove it")
    if not stat.S_ISREG(info.st_mode):
        raise DropError(f"{path}: not a regular file; a drop is read from regular files only: write its data to a "
                        "file in the drop, or remove it")
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # nonblocking: should it have become a pipe
    except OSError as exc:
        raise DropError(f"{path}: cannot be read ({exc.strerror}); give the user running sftflow read permission "
                        "on it (chmod a+r), or remove it from the drop") from None


def check_local_drop(path: Path) -> None:
    """`check_local_entry` for a local drop path and, for a directory, for everything under it but hidden and
    `_`-prefixed names (which are never read: see `_directory_files`)."""
    check_local_entry(path)
    if not path.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        dirnames[:] = [name for name in dirnames if not name.startswith((".", "_"))]
        for name in [*dirnames, *filenames]:
            if not name.startswith((".", "_")):
                check_local_entry(Path(dirpath) / name)


def list_drop_files(paths: list[str]) -> list[str]:
    """Expand each PATH (file or directory, local or fsspec URL, or hf:// dataset) to the data files it
    holds: a directory's sorted, a save_to_disk dataset's in the order of its `state.json`.

    In a directory, files with an unsupported suffix and anything under a hidden or `_`-prefixed name
    (markers such as `_SUCCESS`, `_temporary/`) are skipped; a file named explicitly must have a
    supported suffix and must not be a save_to_disk dataset's metadata.
    """
    files: list[str] = []
    for path in paths:
        if path.startswith(HF_SCHEME):
            target, repo_dir = hub_dataset_path(path)
            refuse_escaping_links(target, root=repo_dir)  # the snapshot's files link to the repo's blobs
            check_local_drop(target)
            files.extend(_files_at(fsspec.filesystem("file"), str(target), "", path))
            continue
        fs, fs_path = fsspec.core.url_to_fs(path)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        if prefix == "":
            if not os.path.lexists(fs_path):
                raise DropError(f"{path}: no such file or directory; pass a file or a directory of data files")
            refuse_escaping_links(Path(fs_path), root=hub_repo_dir(Path(fs_path)))
            check_local_drop(Path(fs_path))
        elif not fs.exists(fs_path):
            raise DropError(f"{path}: no such file or directory; pass a file or a directory of data files")
        files.extend(_files_at(fs, fs_path, prefix, path))
    if not files:
        raise DropError(f"{', '.join(paths)}: no data files ({', '.join(SUPPORTED_SUFFIXES)}, optionally .gz) found")
    return files


def _files_at(fs: fsspec.AbstractFileSystem, fs_path: str, prefix: str, shown: str) -> list[str]:
    """The data files at one path of `fs`: a directory's (see `_directory_files`), or the file itself."""
    if fs.isdir(fs_path):
        return [prefix + p for p in _directory_files(fs, fs_path.rstrip("/") or fs_path)]
    folder, name = _split(fs_path)
    if name in SAVED_METADATA or (name == SAVED_INFO and fs.exists(f"{folder}/{SAVED_STATE}")):
        raise DropError(f"{shown}: metadata of a Hugging Face save_to_disk dataset, not data; "
                        f"pass its directory ({prefix}{folder}) instead")
    if file_suffix(fs_path) not in SUPPORTED_SUFFIXES:
        raise DropError(
            f"{shown}: unsupported file type; rename it or convert it to one of "
            f"{', '.join(SUPPORTED_SUFFIXES)} (optionally .gz)"
        )
    return [prefix + fs_path]


# --------------------------------------------------------------------------- directories of data files

# What `datasets`' save_to_disk writes beside the Arrow files: a directory holding SAVED_STATE is a
# dataset, one holding SAVED_DICT a DatasetDict (a dataset per split, in subdirectories).
SAVED_STATE, SAVED_INFO, SAVED_DICT = "state.json", "dataset_info.json", "dataset_dict.json"
SAVED_METADATA = (SAVED_STATE, SAVED_DICT)


def _split(path: str) -> tuple[str, str]:
    folder, _, name = path.rpartition("/")
    return folder, name


def _directory_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Every data file under `root`, sorted; a save_to_disk dataset's files come as its state.json lists
    them, at the place of its directory. Anything under a hidden or `_`-prefixed name (relative to root)
    is skipped: markers (`_SUCCESS`), checksums (`.x.crc`), Spark's `_temporary/`, Delta's `_delta_log/`."""
    found = [
        p for p in fs.find(root)
        if not any(part.startswith((".", "_")) for part in p[len(root):].strip("/").split("/"))
    ]
    names = set(found)
    saved: dict[str, list[str]] = {}  # a save_to_disk directory -> its data files, in order
    for marker in sorted(p for p in found if _split(p)[1] == SAVED_DICT):
        folder = _split(marker)[0]
        splits = _read_json(fs, marker).get("splits")
        if not isinstance(splits, list) or not all(isinstance(s, str) and s and "/" not in s and s != ".."
                                                   for s in splits):
            raise DropError(f"{marker}: no \"splits\" list of split names (what DatasetDict.save_to_disk writes); "
                            "save the DatasetDict again, or remove dataset_dict.json if the directory is not one")
        saved[folder] = [f for split in splits for f in _saved_dataset_files(fs, f"{folder}/{split}", names)]
    for marker in sorted(p for p in found if _split(p)[1] == SAVED_STATE):
        folder = _split(marker)[0]
        if not any(folder == d or folder.startswith(d + "/") for d in saved):  # not a split read above
            saved[folder] = _saved_dataset_files(fs, folder, names)
    blocks = [(folder + "/", files) for folder, files in saved.items()]
    blocks += [
        (p, [p]) for p in found
        if file_suffix(p) in SUPPORTED_SUFFIXES and not any(p.startswith(d + "/") for d in saved)
    ]
    return [p for _key, files in sorted(blocks) for p in files]


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict:
    try:
        value = json.loads(fs.cat_file(path))
    except (OSError, ValueError) as exc:
        raise DropError(f"{path}: not readable JSON ({str(exc).splitlines()[0][:200]}); save the dataset again "
                        "with save_to_disk") from exc
    return value if isinstance(value, dict) else {}


def _saved_dataset_files(fs: fsspec.AbstractFileSystem, folder: str, names: set[str]) -> list[str]:
    """The Arrow files of a save_to_disk directory, as its state.json's `_data_files` lists them: a stray
    file beside them (an old cache file) is not data; a listed file that is missing is a DropError."""
    state = f"{folder}/{SAVED_STATE}"
    if state not in names:
        raise DropError(f"{folder}: a split listed in {_split(folder)[0]}/{SAVED_DICT} without its {SAVED_STATE}; "
                        "save the DatasetDict again with save_to_disk, or copy the whole directory")
    entries = _read_json(fs, state).get("_data_files")
    listed = [e.get("filename") if isinstance(e, dict) else None for e in entries or []] \
        if isinstance(entries, list) else None
    if not listed or not all(isinstance(n, str) and n and "/" not in n and n != ".." for n in listed):
        raise DropError(f"{state}: no \"_data_files\" list of file names (what datasets' save_to_disk writes); a "
                        "directory holding state.json is read as a save_to_disk dataset: save it again, or "
                        "rename state.json if it holds records")
    for name in listed:
        if f"{folder}/{name}" not in names:
            raise DropError(f"{state}: lists {name}, which is not in {folder}; the save_to_disk directory is "
                            "incomplete: copy the missing file or save the dataset again")
        if file_suffix(name) not in SUPPORTED_SUFFIXES:
            raise DropError(f"{state}: lists {name}, not an Arrow file; save the dataset again with save_to_disk")
    return [f"{folder}/{name}" for name in listed]


# ------------------------------------------------------------------------- hf:// datasets, offline

HF_SCHEME = "hf://"
# huggingface_hub's HfFileSystem URLs of datasets; a revision with a '/' is written %2F (refs%2Fconvert%2Fparquet)
HF_DATASET_URL = re.compile(
    r"hf://datasets/(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^/]+))?(?:/(?P<path>.*))?"
)


@dataclass(frozen=True)
class HubDatasetURL:
    """An hf://datasets/ORG/NAME[@REVISION][/PATH] URL, parsed."""

    repo_id: str
    revision: str | None
    path: str  # inside the repository; "" for all of it


def parse_hub_url(url: str) -> HubDatasetURL:
    match = HF_DATASET_URL.fullmatch(url)
    path = (match["path"] or "").strip("/") if match else ""
    if not match or ".." in match["repo"] or ".." in path.split("/"):
        raise DropError(f"{url}: not a Hugging Face dataset URL; write hf://datasets/ORG/NAME, optionally with "
                        "@REVISION and a path inside it (hf://datasets/ORG/NAME@main/data/train.parquet)")
    revision = unquote(match["revision"]) if match["revision"] else None
    # the cache looks a branch or tag up as a file under refs/: a revision must not lead out of there
    if revision is not None and any(part in ("", ".", "..") for part in revision.split("/")):
        raise DropError(f"{url}: {revision!r} is not a branch, tag or commit; write hf://datasets/ORG/NAME@REVISION "
                        "(e.g. @main, or @refs%2Fconvert%2Fparquet for refs/convert/parquet)")
    return HubDatasetURL(match["repo"], revision, path)


def hub_repo_dir(path: Path) -> Path | None:
    """The dataset's directory in a Hugging Face cache (`datasets--ORG--NAME`) when `path` is in one of its
    snapshots, whose files are links to the directory's blobs; else None."""
    for folder in [path.absolute(), *path.absolute().parents]:
        if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("datasets--"):
            return folder.parent.parent
    return None


def hub_dataset_path(url: str) -> tuple[Path, Path]:
    """The local path an hf:// dataset URL names in the Hugging Face cache, and the dataset's cache
    directory (whose blobs the snapshot links to). Offline: never downloads, never touches the network."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    ref = parse_hub_url(url)
    at = f" --revision {ref.revision}" if ref.revision else ""
    try:
        snapshot = Path(snapshot_download(ref.repo_id, repo_type="dataset", revision=ref.revision,
                                          local_files_only=True))
    except LocalEntryNotFoundError as exc:
        raise DropError(
            f"{url}: dataset {ref.repo_id}{'@' + ref.revision if ref.revision else ''} is not (completely) in the "
            f"Hugging Face cache {constants.HF_HUB_CACHE} and sftflow never downloads; run `hf download "
            f"--repo-type dataset {ref.repo_id}{at}` on a machine with internet and copy its cache here, set "
            "HF_HOME (or HF_HUB_CACHE) to the cache that holds it, or pass a local path"
        ) from exc
    except ValueError as exc:  # huggingface_hub's HFValidationError: not a valid repo id or revision
        raise DropError(f"{url}: {str(exc).splitlines()[0][:200]}; write hf://datasets/ORG/NAME[@REVISION]") from exc
    except OSError as exc:
        raise DropError(f"{url}: the Hugging Face cache {constants.HF_HUB_CACHE} could not be read "
                        f"({str(exc).splitlines()[0][:200]}); check its permissions, or pass a local path") from exc
    target = snapshot / ref.path if ref.path else snapshot
    if not target.exists():
        raise DropError(f"{url}: no {ref.path} in the cached snapshot {snapshot}; check the path inside the dataset, "
                        f"or download it again (hf download --repo-type dataset {ref.repo_id}{at})")
    return target, snapshot.parent.parent


def fingerprint_files(files: list[str]) -> str:
    """sha256 over every file's name and bytes: the identity of a drop's content."""
    digest = hashlib.sha256()
    for url in files:
        digest.update(Path(url).name.encode() + b"\0")
        try:
            with _open_regular(url) as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError as exc:
            raise DropError(f"{url}: cannot be read ({exc.strerror or exc}); give the user running sftflow read "
                            "permission on it, or remove it from the drop") from None
        digest.update(b"\0")
    return digest.hexdigest()


def _open_regular(url: str):
    """An fsspec URL opened for reading; a local path opened without waiting, and only if a regular file."""
    if "://" in url:
        return fsspec.open(url, "rb").open()
    fd = os.open(url, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        check_local_entry(Path(url))  # names what it is
        raise DropError(f"{url}: not a regular file; a drop is read from regular files only")
    return os.fdopen(fd, "rb")


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
