"""Issue 15, item 3: a registry version is checked against its manifest before anything of it is used.

`sftflow chat` / `serve` load a GGUF only once its sha256 is the published one and its path stays inside
the version directory; the champion pointer names a complete version; the champion's adapter (evaluation)
and a copy to a remote are checked too; `sftflow models verify` reports every file. The version is a real
one: a crafted run (tests/reliability/test_publish_killed.py) published by the publish code itself.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from foundation.errors import NotFoundError, WorkspaceError
from foundation.stores.registry import IntegrityError
from tasks.serve import published_gguf

NAME = "tiny-sft"
GGUF = "gguf/tiny-sft-q4_k_m.gguf"
FIX = "re-publish the run or restore the file"


@pytest.fixture
def published(workspace):
    """A workspace with v0001 of tiny-sft published (the champion), GGUF files included."""
    from tasks.publish import publish_version
    from tests.reliability.test_publish_killed import craft_run

    craft_run(workspace.root, "run-a", promote=True, remote=None, seed=1, templated=False)
    version, champion = publish_version(workspace.registry, workspace.runs.finished("run-a"), None, lambda m: None)
    assert champion == "v0001"
    return version


def cli(*args: str):
    from sftflow.cli import app

    return CliRunner().invoke(app, list(args))


def rewrite_manifest(version, change) -> None:
    document = json.loads(version.manifest_path.read_text())
    change(document["files"])
    version.manifest_path.write_text(json.dumps(document))


def test_an_intact_version_verifies_and_chat_gets_its_smallest_gguf(workspace, published):
    assert published_gguf(workspace, None) == published.root / GGUF
    assert published_gguf(workspace, f"{NAME}@v0001") == published.root / GGUF
    done = cli("models", "verify", NAME, "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["ok"] and report["version"] == "v0001" and report["name"] == NAME
    listed = json.loads(published.manifest_path.read_text())["files"]
    assert {f["path"]: f["status"] for f in report["files"]} == {p: "ok" for p in listed}
    assert all(f["actual"] == listed[f["path"]]["sha256"] for f in report["files"])
    human = cli("models", "verify")  # the only model, its champion
    assert human.exit_code == 0 and f"  ok        {GGUF}" in human.stdout.splitlines()


def test_a_gguf_changed_after_publishing_is_refused_by_chat_serve_and_verify(workspace, published):
    path = published.root / GGUF
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # same size, other bytes
    path.write_bytes(bytes(data))
    published_sha = json.loads(published.manifest_path.read_text())["files"][GGUF]["sha256"]

    with pytest.raises(IntegrityError, match=rf"{GGUF}: sha256 differs from the manifest \(published {published_sha}, "
                                             rf"now [0-9a-f]{{64}}\); {FIX}$"):
        published_gguf(workspace, NAME)
    for command in (["chat"], ["serve", "--port", "1"]):
        done = cli(*command, "--model", NAME)
        assert done.exit_code == 2 and done.stdout == ""
        assert done.stderr.startswith(f"error: {path}: sha256 differs from the manifest")
        assert done.stderr.count("\n") == 1

    done = cli("models", "verify", f"{NAME}@v0001", "--json")
    assert done.exit_code == 2
    report = json.loads(done.stdout)
    assert not report["ok"]
    assert [(f["path"], f["status"]) for f in report["files"] if f["status"] != "ok"] == [(GGUF, "mismatch")]
    assert done.stderr.startswith(f"error: {path}: sha256 differs") and done.stderr.count("\n") == 1

    path.write_bytes(bytes(data[:-1]))  # a truncated copy: told by its size, without hashing
    with pytest.raises(IntegrityError, match=r"size differs from the manifest \(published 100004 bytes, now 100003\)"):
        published_gguf(workspace, NAME)


def test_a_manifest_path_or_symlink_leading_out_of_the_version_is_refused(workspace, published, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    planted = elsewhere / "x-q4_k_m.gguf"
    shutil.copyfile(published.root / GGUF, planted)  # the same bytes: the sha256 alone would let it through
    digest = json.loads(published.manifest_path.read_text())["files"][GGUF]

    escaping = "gguf/../../../../elsewhere/x-q4_k_m.gguf"
    for bad, reason in ((escaping, "a path with '..'"), (str(planted), "an absolute path")):
        def swap(files, bad=bad):
            files.pop(GGUF)
            files[bad] = digest
        rewrite_manifest(published, swap)
        if bad.startswith("gguf/"):  # chat picks it: the smallest quant under gguf/
            with pytest.raises(IntegrityError, match=f"lists {bad!r}, {reason}, outside .*re-publish the run"):
                published_gguf(workspace, NAME)
        done = cli("models", "verify", NAME, "--json")
        assert done.exit_code == 2
        assert {f["path"]: f["status"] for f in json.loads(done.stdout)["files"]}[bad] == "outside"
        with pytest.raises(IntegrityError, match="outside"):
            published.file(bad)
        rewrite_manifest(published, lambda files: (files.pop(bad), files.__setitem__(GGUF, digest)))

    (published.root / GGUF).unlink()
    (published.root / GGUF).symlink_to(planted)  # listed as it was published, but a link to outside
    with pytest.raises(IntegrityError, match=f"a symlink leading to {planted}"):
        published_gguf(workspace, NAME)
    assert (published.root / GGUF).is_symlink()


def test_missing_and_unlisted_files_fail_verification(workspace, published):
    (published.root / "README.md").unlink()
    (published.root / "gguf" / "extra.gguf").write_bytes(b"GGUF planted")
    done = cli("models", "verify", NAME, "--json")
    assert done.exit_code == 2
    statuses = {f["path"]: f["status"] for f in json.loads(done.stdout)["files"] if f["status"] != "ok"}
    assert statuses == {"README.md": "missing", "gguf/extra.gguf": "unlisted"}
    assert done.stderr.startswith("error: ") and "(and 1 more above)" in done.stderr and done.stderr.count("\n") == 1
    assert published_gguf(workspace, NAME) == published.root / GGUF  # chat reads neither: it still starts


def test_the_champion_pointer_must_name_a_complete_version_by_a_regular_file(workspace, published, tmp_path):
    pointer = published.root.parent / "CHAMPION"
    pointer.write_text("v0007\n")
    with pytest.raises(WorkspaceError, match="CHAMPION names v0007, which is not a complete version of tiny-sft"):
        published_gguf(workspace, NAME)
    done = cli("chat")
    assert done.exit_code == 2 and "CHAMPION names v0007" in done.stderr and done.stderr.count("\n") == 1

    outside = tmp_path / "pointer"
    outside.write_text("v0001\n")
    pointer.unlink()
    pointer.symlink_to(outside)
    with pytest.raises(WorkspaceError, match="CHAMPION is not a regular file"):
        workspace.registry.champion(NAME)
    pointer.unlink()
    pointer.write_text("v0001\n" + "x" * 10_000)  # only the start is read; this one is no version name
    with pytest.raises(WorkspaceError, match="not a version name like v0001"):
        workspace.registry.champion(NAME)
    pointer.write_text("v0001\n")
    assert workspace.registry.champion_ref(NAME).version == "v0001"


def test_a_version_directory_that_is_a_link_to_elsewhere_is_refused(workspace, published, tmp_path):
    moved = tmp_path / "elsewhere-v0001"
    published.root.rename(moved)
    published.root.symlink_to(moved)
    with pytest.raises(IntegrityError, match="v0001 is a link to .*elsewhere-v0001, outside the registry"):
        published_gguf(workspace, NAME)
    for bad in (f"{NAME}@../{NAME}/v0001", f"{NAME}@v0001/.."):
        with pytest.raises(NotFoundError):
            workspace.registry.resolve(bad)


def test_the_champions_adapter_is_checked_before_evaluation_loads_it(workspace, published):
    weights = published.root / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"!")
    with pytest.raises(IntegrityError, match=f"{weights}: sha256 differs from the manifest"):
        workspace.registry.champion_ref(NAME)


def test_a_changed_version_is_not_copied_to_a_remote_and_only_listed_files_go(workspace, published, tmp_path):
    from tasks.publish import copy_to_remote

    remote = tmp_path / "remote"
    copy_to_remote(published.root, f"file://{remote}", NAME)
    listed = set(json.loads(published.manifest_path.read_text())["files"]) | {"manifest.json"}
    copied = remote / NAME / "v0001"
    assert {str(p.relative_to(copied)) for p in copied.rglob("*") if p.is_file()} == listed

    (published.root / "eval.json").write_text("{}")
    with pytest.raises(IntegrityError, match="eval.json: size differs from the manifest"):
        copy_to_remote(published.root, f"file://{tmp_path / 'other'}", NAME)
    assert not (tmp_path / "other").exists()


def test_a_gguf_is_hashed_once_and_a_change_that_keeps_size_and_mtime_is_still_caught(workspace, published,
                                                                                     monkeypatch):
    import time

    from foundation.stores import registry

    hashed = []
    real_sha = registry.sha256_of
    monkeypatch.setattr(registry, "sha256_of", lambda path: (hashed.append(path.name), real_sha(path))[1])
    # the file was written a moment ago: a record is kept only for a file older than the racy window
    monkeypatch.setattr(registry.HashCache, "RACY_NS", -1)
    for _ in range(3):
        assert published_gguf(workspace, NAME) == published.root / GGUF
    assert hashed == ["tiny-sft-q4_k_m.gguf"]  # once, then by its recorded (inode, size, mtime, ctime)
    assert (published.root.parent / ".verified.json").exists()

    path = published.root / GGUF
    stat = path.stat()
    time.sleep(0.05)  # let the inode change time tick past the recorded one
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    with open(path, "r+b") as fh:  # in place: same inode, same size
        fh.write(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the modification time set back
    with pytest.raises(IntegrityError, match="sha256 differs from the manifest"):
        published_gguf(workspace, NAME)

    (published.root.parent / ".verified.json").write_text("{not json")  # a broken record is only a miss
    path.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 0xFF]))
    assert published_gguf(workspace, NAME) == path
