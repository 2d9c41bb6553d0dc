"""What git tracks is source: no generated state, no links, no file over 2 MiB.

A link committed from a worktree (`.sftflow -> /work/main/.sftflow`, once) is a loop in every clean clone, and
`make` failed on it before any test ran; git's ignore pattern `.sftflow/` matched the directory, not the link.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import ROOT

GENERATED = (".sftflow", ".venv", ".gpu", ".whl", "__pycache__", ".pytest_cache", ".hypothesis")


def tracked() -> list[tuple[str, str]]:
    """(mode, path) of every file git tracks here."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing tracked to check")
    out = subprocess.run(["git", "ls-files", "-s", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    rows = [entry.decode().split("\t", 1) for entry in out.split(b"\0") if entry]
    return [(meta.split()[0], path) for meta, path in rows]


def test_no_link_and_no_generated_state_is_tracked():
    files = tracked()
    links = [path for mode, path in files if mode == "120000"]
    assert not links, f"tracked symbolic links (a loop or a dangling path in a clean clone): {links}"
    generated = [path for _, path in files if set(path.split("/")) & set(GENERATED)]
    assert not generated, f"generated state is tracked: {generated[:5]}"


def test_no_tracked_file_is_over_2_mib():
    big = [path for _, path in tracked() if (ROOT / path).is_file() and (ROOT / path).stat().st_size > 2 << 20]
    assert not big, f"files over 2 MiB are tracked: {big}"


def test_git_ignores_the_workspace_as_a_link_too():
    """A path that is not there is no directory: a pattern that matches only directories misses it."""
    tracked()
    for name in (".sftflow", ".venv"):
        path = f"no-such-dir/{name}"
        assert not (ROOT / path).exists()
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
        assert ignored.returncode == 0, f"{name} is ignored only as a directory: .gitignore needs '{name}', no '/'"
