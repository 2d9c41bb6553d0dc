"""Remote copies of a published version, and the Hub upload's offline behaviour."""

from __future__ import annotations

from foundation.artifacts import VersionManifest
from tasks.publish import copy_to_remote, file_manifest, upload_to_hub


def version_dir(tmp_path):
    version = tmp_path / "registry" / "m" / "v0001"
    (version / "adapter").mkdir(parents=True)
    (version / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (version / "README.md").write_text("card")
    VersionManifest(name="m", version="v0001", run_id="r", dataset_version="ds", promoted=True,
                    published_at="2026-12-01T00:00:00+00:00", files=file_manifest(version)).write(version / "manifest.json")
    return version


def test_copy_to_a_local_fsspec_url_keeps_every_file(tmp_path):
    version = version_dir(tmp_path)
    target = copy_to_remote(version, f"file://{tmp_path / 'remote'}", "m")
    copied = tmp_path / "remote" / "m" / "v0001"
    assert target == str(copied)
    assert file_manifest(copied) == file_manifest(version)


def test_copy_to_memory_url_writes_the_manifest_last(tmp_path, monkeypatch):
    import fsspec

    version = version_dir(tmp_path)
    fs = fsspec.filesystem("memory")
    order = []
    original = type(fs).put_file
    monkeypatch.setattr(type(fs), "put_file", lambda self, lpath, rpath, **kw: (order.append(rpath), original(self, lpath, rpath, **kw))[1])
    assert copy_to_remote(version, "memory://bucket/models", "m") == "memory:///bucket/models/m/v0001"
    assert order[-1].endswith("/manifest.json") and len(order) == 3


def test_hub_upload_is_skipped_with_a_clear_message_without_a_token(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert upload_to_hub(version_dir(tmp_path), "me/model") == "skipped: no HF_TOKEN set, v0001 was not uploaded to me/model"
    monkeypatch.setenv("HF_TOKEN", "secret")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = upload_to_hub(version_dir(tmp_path / "b"), "me/model")
    assert message.startswith("skipped: HF_HUB_OFFLINE=1") and "secret" not in message


def test_the_champion_pointer_moves_only_to_a_promoted_newer_version():
    from tasks.publish import champion_moves

    assert champion_moves(True, None, "v0001")
    assert champion_moves(True, "v0001", "v0002")
    assert not champion_moves(False, "v0001", "v0002")  # not promoted
    assert not champion_moves(True, "v0002", "v0002")  # already the champion
    assert not champion_moves(True, "v0010", "v0009")  # an older version never takes it back


def test_the_published_model_artifact_names_its_path_and_the_commands_not_a_file_link():
    from tasks.publish import published_markdown

    markdown = published_markdown("tiny-sft", "v0002", "/ws/registry/tiny-sft/v0002", "run-1", champion=True)
    assert markdown.startswith("# Published `tiny-sft@v0002` (champion)")
    assert "`/ws/registry/tiny-sft/v0002`" in markdown and "file://" not in markdown
    for command in ("sftflow models show tiny-sft@v0002", "sftflow chat --model tiny-sft@v0002",
                    "sftflow serve --model tiny-sft@v0002", "sftflow runs show run-1"):
        assert f"`{command}`" in markdown


def test_a_run_file_is_linked_into_the_registry_or_copied_where_links_fail(tmp_path, monkeypatch):
    import errno
    import os

    from tasks.publish import link_or_copy

    run_file = tmp_path / "run" / "model-q8_0.gguf"
    run_file.parent.mkdir()
    run_file.write_bytes(b"GGUF" + bytes(range(256)))
    linked = link_or_copy(str(run_file), str(tmp_path / "linked.gguf"))
    assert os.stat(linked).st_ino == run_file.stat().st_ino

    def cross_device(source, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)  # the registry on another file system
    copied = link_or_copy(str(run_file), str(tmp_path / "copied.gguf"))
    assert os.stat(copied).st_ino != run_file.stat().st_ino
    assert open(copied, "rb").read() == run_file.read_bytes()
