"""A Hub id is resolved once to a local snapshot (offline here: a Hugging Face cache laid out by the test),
and every way that can fail names the fix."""

from __future__ import annotations

import json

import pytest

from foundation.errors import ConfigError
from schemas.config import ModelConfig
from tasks.base_model import resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """HF_HOME with one cached model, org/tiny at main, and the Hub out of reach."""
    home = tmp_path / "hf"
    repo = home / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (snapshot / "model.safetensors").write_bytes(b"{}")
    (snapshot / "tokenizer_config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snapshot


def test_a_hub_id_resolves_to_its_cached_snapshot_and_commit(hub_cache, workspace):
    resolved = resolve_model(ModelConfig(name="org/tiny"), workspace, log=lambda *_: None)
    assert resolved.path == str(hub_cache) and resolved.revision == COMMIT
    pinned = resolve_model(ModelConfig(name="org/tiny", revision=COMMIT), workspace, log=lambda *_: None)
    assert pinned.path == str(hub_cache)


def test_a_model_missing_offline_names_the_fix(hub_cache, workspace):
    with pytest.raises(ConfigError, match=r"model.name org/other: not in the Hugging Face cache .*"
                                          r"\(huggingface-cli download org/other\)"):
        resolve_model(ModelConfig(name="org/other"), workspace, log=lambda *_: None)


def test_a_cached_snapshot_is_checked_like_a_directory(hub_cache, workspace):
    (hub_cache / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no \\*.safetensors weights"):
        resolve_model(ModelConfig(name="org/tiny"), workspace, log=lambda *_: None)


@pytest.mark.parametrize("name", ["../etc", "org/../../etc", "https://example.com/model", "a/b/c", "./missing"])
def test_names_that_are_neither_a_directory_nor_a_hub_id_are_refused(name, workspace):
    with pytest.raises(ConfigError, match="no such directory, and not a Hub id"):
        resolve_model(ModelConfig.model_construct(name=name), workspace, log=lambda *_: None)  # its own check, behind the config's
