"""Issue 6, item 7: hostile input. Escaping drop ids and symlinks are refused, never followed; a model
with its own code needs trust_remote_code; only safetensors weights are loaded; the hub token never
appears in logs, artifacts, the model card or any file the pipeline writes."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest

from schemas.config import ModelConfig
from foundation.errors import ConfigError, DropError
from tests.conftest import logs_and_artifacts

GOOD_ROW = json.dumps({"instruction": "What is 2 + 2?", "output": "4"}) + "\n"


# ---------------------------------------------------------------------------------------------
# Drop ids, file names and symlinks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("drop_id", ["..", "../escape", "a/../../b", "/etc", "/tmp/x", "a/b", ".hidden", "", "x" * 129,
                                     "a\x00b", "a\nb", "abc\n", "~root", "..\\windows"])
def test_drop_ids_that_could_escape_the_workspace_are_refused(drop_id):
    from tasks.ingest.discovery import check_drop_id

    with pytest.raises(DropError, match="is not allowed: use 1-128 letters") as refused:
        check_drop_id(drop_id)
    assert "--drop-id" in str(refused.value)  # the fix


def test_a_symlinked_file_pointing_outside_the_drop_is_refused_not_followed(tmp_path):
    from tasks.ingest.discovery import list_drop_files

    secret = tmp_path / "outside" / "secret.jsonl"
    secret.parent.mkdir()
    secret.write_text(GOOD_ROW)
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "rows.jsonl").write_text(GOOD_ROW)
    (drop / "stolen.jsonl").symlink_to(secret)
    with pytest.raises(DropError) as refused:
        list_drop_files([str(drop)])
    message = str(refused.value)
    assert str(drop / "stolen.jsonl") in message and "outside the drop directory" in message
    assert "copy the file into the drop" in message

    # a symlinked directory out of the drop, and a file named directly that is such a link
    (drop / "stolen.jsonl").unlink()
    (drop / "more").symlink_to(secret.parent, target_is_directory=True)
    with pytest.raises(DropError, match="more: a symlink to .*outside the drop directory"):
        list_drop_files([str(drop)])
    (drop / "more").unlink()
    link = tmp_path / "elsewhere" / "rows.jsonl"
    link.parent.mkdir()
    link.symlink_to(secret)
    with pytest.raises(DropError, match="outside the drop directory"):
        list_drop_files([str(link)])
    # a symlink that stays inside the drop is harmless
    (drop / "alias.jsonl").symlink_to(drop / "rows.jsonl")
    assert len(list_drop_files([str(drop)])) == 2


@pytest.mark.slow
def test_the_ingest_flow_refuses_hostile_drops_and_writes_nothing(tmp_path, monkeypatch, prefect_api_url):
    from flows.ingest import ingest_drop

    home = tmp_path / "home"
    monkeypatch.setenv("SFTFLOW_HOME", str(home))
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "rows.jsonl").write_text(GOOD_ROW * 3)
    for drop_id in ("../../escape", "/tmp/absolute"):
        with pytest.raises(DropError, match="is not allowed"):
            ingest_drop(paths=[str(drop)], drop_id=drop_id)
    assert not (tmp_path / "escape").exists() and not list(home.rglob("escape*"))
    outside = tmp_path / "passwd.jsonl"
    outside.write_text(GOOD_ROW)
    (drop / "passwd.jsonl").symlink_to(outside)
    with pytest.raises(DropError, match="outside the drop directory"):
        ingest_drop(paths=[str(drop)], drop_id="hostile")
    assert not (home / "drops" / "hostile").exists() and not (home / "datasets" / "CURRENT").exists()


# ---------------------------------------------------------------------------------------------
# Model directories
# ---------------------------------------------------------------------------------------------


def model_dir(tmp_path, name="model", **config):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    (path / "model.safetensors").write_bytes(b"{}")
    return path


def test_a_model_with_its_own_code_needs_trust_remote_code(tmp_path, workspace):
    from tasks.base_model import resolve_model

    cases = {
        "auto_map in config.json": model_dir(tmp_path, "a", auto_map={"AutoModelForCausalLM": "modeling_x.Model"}),
        "modeling_evil.py": model_dir(tmp_path, "b"),
        "auto_map in tokenizer_config.json": model_dir(tmp_path, "c"),
    }
    (cases["modeling_evil.py"] / "modeling_evil.py").write_text("import os; os.system('echo owned')\n")
    (cases["auto_map in tokenizer_config.json"] / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["tok.Tok", None]}}))
    for what, path in cases.items():
        with pytest.raises(ConfigError, match="ships its own code") as refused:
            resolve_model(ModelConfig(name=str(path)), workspace)
        assert what in str(refused.value) and "model.trust_remote_code=true" in str(refused.value)
        assert resolve_model(ModelConfig(name=str(path), trust_remote_code=True), workspace).path == str(path.resolve())
    plain = model_dir(tmp_path, "plain")
    assert resolve_model(ModelConfig(name=str(plain)), workspace).path == str(plain.resolve())


def test_a_model_with_only_pickled_weights_is_refused(tmp_path, workspace):
    from tasks.base_model import resolve_model

    path = model_dir(tmp_path)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError, match=r"no \*\.safetensors weights; only safetensors are loaded"):
        resolve_model(ModelConfig(name=str(path)), workspace)


class _Payload:
    """Unpickling this runs code: it creates the marker file. It must never be unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_beside_safetensors_a_pickled_checkpoint_is_never_loaded(tmp_path, workspace, mini_model):
    """The training engine and the export's merge load the safetensors; a booby-trapped .bin is ignored."""
    from schemas.config import RunConfig
    from tasks.base_model import resolve_model
    from tasks.engines.hf import HFEngine
    from tasks.export.convert import merge_adapter

    model = tmp_path / "model"
    shutil.copytree(mini_model, model)
    marker = tmp_path / "unpickled"
    with open(model / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"model.embed_tokens.weight": _Payload(str(marker))}, fh)
    config = RunConfig.model_validate({"name": "t", "model": {"name": str(model)}, "train": {"engine": "hf"}})
    path = resolve_model(config.model, workspace).path
    loaded, _ = HFEngine()._base(path, config)
    assert loaded.num_parameters() > 0 and not marker.exists()

    from peft import LoraConfig, get_peft_model

    adapter = tmp_path / "adapter"
    get_peft_model(loaded, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    merge_adapter(path, str(adapter), tmp_path / "merged", "float32")
    assert (tmp_path / "merged" / "model.safetensors").exists() and not marker.exists()


# ---------------------------------------------------------------------------------------------
# The hub token
# ---------------------------------------------------------------------------------------------

TOKEN = "hf_sftflowTestSecret0123456789abcdefXYZ"


@pytest.mark.slow
def test_the_hub_token_never_appears_in_logs_artifacts_card_or_files(tmp_path, monkeypatch, prefect_api_url):
    """Publish with a token configured, through a hub client that fails with the token in its error (as
    an HTTP error echoing a request can): the token is in no file, log line, artifact or result."""
    import huggingface_hub

    from flows.publish import publish_model
    from tests.reliability.test_publish_killed import craft_run

    home = tmp_path / "home"
    monkeypatch.setenv("SFTFLOW_HOME", str(home))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    class LeakyHub:
        def __init__(self, token=None):
            calls.append(token)

        def create_repo(self, repo_id, exist_ok=False):
            raise RuntimeError(f"401 Client Error for https://huggingface.co/api/repos/create "
                               f"(request headers: {{'authorization': 'Bearer {TOKEN}'}})")

    monkeypatch.setattr(huggingface_hub, "HfApi", LeakyHub)
    run_dir = craft_run(home, "run-token", promote=True, remote=None, seed=3, templated=False)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["config"]["publish"]["hub_repo"] = "me/tiny-sft"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))

    state = publish_model(run_id="run-token", return_state=True)
    result = state.result()
    assert calls == [TOKEN]  # the token was really configured and used
    assert result.hub.startswith("failed: v0001 was not uploaded to me/tiny-sft (401 Client Error")
    assert "<HF_TOKEN>" in result.hub and TOKEN not in json.dumps(result.dump())

    # no file the pipeline wrote holds it (the model card included)
    for path in home.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert (home / "registry" / "tiny-sft" / "v0001" / "README.md").exists()

    logs, artifacts = logs_and_artifacts(state.state_details.flow_run_id)
    assert artifacts and any("hub: failed" in log.message for log in logs)  # the failure was logged, redacted
    assert all(TOKEN not in log.message for log in logs)
    assert all(TOKEN not in json.dumps(a.data, default=str) and TOKEN not in (a.description or "") for a in artifacts)
    assert os.environ["HF_TOKEN"] == TOKEN
