"""Issue 15, item 10: secrets stay where they are needed.

Credentials in `publish.remote` (`https://user:token@host/repo`, `s3://KEY:SECRET@bucket`) are redacted in
every dump of the config (the run manifest, `config validate`, Prefect's parameters) and so in the registry,
the logs, the artifacts and the result; the publish alone uses the real URL, from the config loaded in its
process. `sftflow up` gives the database URL to the Prefect server only, never to the workers, the watcher
or the setup commands.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import stringify_path

from foundation.credentials import (
    forget_urls, is_redacted, redact_url, remember_url, scrub, url_secrets, without_credentials,
)
from schemas.config import RunConfig, config_hash
from tests.conftest import logs_and_artifacts

TOKEN = "ghp_sftflowRemoteSecret0123456789abcdefXYZ"
REMOTE = f"credfs://sftflow:{TOKEN}@store/models"


@pytest.mark.parametrize("url, redacted", [
    (f"https://user:{TOKEN}@host/repo", "https://***@host/repo"),
    (f"https://{TOKEN}@host/repo.git", "https://***@host/repo.git"),
    ("s3://AKIAEXAMPLE:wJalr/XUtnFEMI+K7MDENG@bucket/models", "s3://***@bucket/models"),
    (f"abfs://models@account.dfs.core.windows.net/x?sv=2024&sig={TOKEN}",
     "abfs://models@account.dfs.core.windows.net/x?sv=2024&sig=***"),  # a container@account is no credential
    (f"https://host/x?X-Amz-Signature={TOKEN}&b=1", "https://host/x?X-Amz-Signature=***&b=1"),
    ("s3://bucket/models", "s3://bucket/models"),
    ("file:///mnt/share", "file:///mnt/share"),
])
def test_credentials_in_a_url_are_redacted_and_scrubbed_from_text(url, redacted):
    assert redact_url(url) == redacted and redact_url(redacted) == redacted
    assert is_redacted(redacted) == (url != redacted)
    for secret in url_secrets(url):
        assert secret not in redacted and secret not in without_credentials(url)
    message = f"403 Forbidden: {url} (auth {url_secrets(url)[0] if url_secrets(url) else '-'})"
    assert all(secret not in scrub(message, url) for secret in url_secrets(url))


def test_a_config_with_credentials_never_dumps_them_and_its_hash_ignores_them(tmp_path):
    from typer.testing import CliRunner

    from schemas.config import load_run_config
    from sftflow.cli import app

    path = tmp_path / "run.yaml"
    path.write_text(f"name: tiny-sft\nmodel: {{name: tiny}}\npublish: {{remote: '{REMOTE}'}}\n")
    config = load_run_config(path)
    assert config.publish.remote == REMOTE  # the value itself is real: the publish uses it
    for dumped in (json.dumps(config.model_dump(mode="json")), config.model_dump_json(), str(config.model_dump()),
                   repr(config), str(config)):
        assert TOKEN not in dumped
    assert config.model_dump()["publish"]["remote"] == "credfs://***@store/models"
    from prefect import flow

    @flow
    def takes_a_config(config: RunConfig) -> None:  # as train_adapter does: Prefect stores its parameters
        pass

    assert TOKEN not in json.dumps(takes_a_config.serialize_parameters({"config": config}))
    other = load_run_config(path, [f"publish.remote=credfs://sftflow:rotated-{TOKEN[:8]}@store/models"])
    assert config_hash(other) == config_hash(config)  # a rotated token is the same run

    done = CliRunner().invoke(app, ["config", "validate", str(path), "--json"])
    assert done.exit_code == 0 and TOKEN not in done.output
    assert json.loads(done.stdout)["config"]["publish"]["remote"] == "credfs://***@store/models"


def test_the_publish_gets_the_real_url_from_the_config_of_its_process_or_says_how_to_give_it(monkeypatch):
    import fsspec.config

    from tasks.publish import PublishError, remote_url

    remember_url(REMOTE)
    assert remote_url("credfs://***@store/models") == REMOTE
    assert remote_url("s3://bucket/models") == "s3://bucket/models"
    forget_urls()  # a fresh process, e.g. `sftflow publish --run` after `sftflow train`
    with pytest.raises(PublishError, match=r"publish.remote credfs://\*\*\*@store/models had credentials, which "
                                           r"sftflow writes nowhere.*FSSPEC_CREDFS_<KWARG>") as refused:
        remote_url("credfs://***@store/models")
    assert "\n" not in str(refused.value)
    monkeypatch.setitem(fsspec.config.conf, "credfs", {"password": "from-the-environment"})
    assert remote_url("credfs://***@store/models") == "credfs://store/models"  # fsspec brings its own


def test_an_error_of_the_remote_that_echoes_the_url_is_raised_without_the_token(tmp_path, locked_remote):
    from foundation.artifacts import VersionManifest
    from tasks.publish import PublishError, copy_to_remote, file_manifest

    version = tmp_path / "registry" / "m" / "v0001"
    version.mkdir(parents=True)
    (version / "README.md").write_text("card")
    VersionManifest(name="m", version="v0001", run_id="r", dataset_version="ds", promoted=True,
                    published_at="2026-12-01T00:00:00+00:00", files=file_manifest(version)).write(
        version / "manifest.json")
    refusal = r"copying to credfs://\*\*\*@store/models failed \(PermissionError: 403 Forbidden"
    with pytest.raises(PublishError, match=refusal) as refused:
        copy_to_remote(version, f"credfs://sftflow:wrong-{TOKEN}@store/models", "m")
    assert TOKEN not in str(refused.value) and refused.value.__suppress_context__


def test_a_run_manifest_written_with_the_token_is_copied_into_the_registry_without_it(tmp_path):
    from tasks.publish import copy_run_manifest

    source, target = tmp_path / "manifest.json", tmp_path / "run_manifest.json"
    source.write_text(json.dumps({"run_id": "r", "config": {"publish": {"remote": REMOTE, "hub_repo": None}}}))
    copy_run_manifest(source, target)
    assert TOKEN not in target.read_text()
    assert json.loads(target.read_text())["config"]["publish"]["remote"] == "credfs://***@store/models"
    source.write_text(json.dumps({"run_id": "r", "config": {"publish": {"remote": "s3://bucket/m"}}}))
    copy_run_manifest(source, target)
    assert target.read_bytes() == source.read_bytes()  # nothing to redact: a plain copy


# ---------------------------------------------------------------------------------------------
# A publish to a remote that takes the token, scanned for it everywhere
# ---------------------------------------------------------------------------------------------


class LockedFileSystem(LocalFileSystem):
    """credfs://USER:TOKEN@store/path: a local directory (BASE/store/path) that opens only with the token."""

    protocol = "credfs"
    base = "/nonexistent"
    opened: list[str] = []

    def __init__(self, username=None, password=None, **kwargs):
        if password != TOKEN:  # as an HTTP error echoing the request can: the credentials in the message
            raise PermissionError(f"403 Forbidden for credfs://{username}:{password}@store")
        type(self).opened.append(password)
        super().__init__(**kwargs)

    @classmethod
    def _get_kwargs_from_urls(cls, path):
        userinfo = path.split("://", 1)[-1].split("@", 1)[0] if "@" in path else ""
        username, _, password = userinfo.partition(":")
        return {"username": username or None, "password": password or None}

    @classmethod
    def _strip_protocol(cls, path):
        path = stringify_path(path)
        if path.startswith("credfs://"):
            return f"{cls.base}/{path[len('credfs://'):].split('@', 1)[-1]}".rstrip("/")
        return super()._strip_protocol(path)


@pytest.fixture
def locked_remote(tmp_path, monkeypatch):
    import fsspec

    store = tmp_path / "home" / "remote-store"  # inside the workspace: scanned with it
    monkeypatch.setattr(LockedFileSystem, "base", str(store))
    monkeypatch.setattr(LockedFileSystem, "opened", [])
    fsspec.register_implementation("credfs", LockedFileSystem, clobber=True)
    LockedFileSystem.clear_instance_cache()
    yield store / "store" / "models"
    forget_urls()


def files_holding(root: Path, secret: str, skip: frozenset[Path] = frozenset()) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p not in skip and secret.encode() in p.read_bytes()]


def assert_token_nowhere(home: Path, state, skip: frozenset[Path] = frozenset()) -> None:
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    result = state.result()
    assert TOKEN not in json.dumps(result.dump()) and result.remote.startswith("credfs://")
    assert files_holding(home, TOKEN, skip) == []  # runs, registry, model card, the remote's copy
    database = Path(str(PREFECT_API_DATABASE_CONNECTION_URL.value() or "").split(":///", 1)[-1])
    for path in (database, database.with_name(database.name + "-wal")):  # the harness's database, if local
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    logs, artifacts = logs_and_artifacts(state.state_details.flow_run_id)
    assert artifacts and any("copied tiny-sft/v0001 to credfs://" in log.message for log in logs)
    assert all(TOKEN not in log.message for log in logs)
    assert all(TOKEN not in json.dumps(a.data, default=str) and TOKEN not in (a.description or "") for a in artifacts)


@pytest.mark.slow
def test_a_token_in_the_remote_url_reaches_the_remote_and_no_file_log_or_artifact(tmp_path, monkeypatch,
                                                                                  prefect_api_url, locked_remote):
    """The run is configured with the token in publish.remote (its manifest written as training writes it);
    the publish copies the version to a remote that opens only with that token; then every file under the
    workspace (the remote's copy included), the run's logs, the artifacts and the result are scanned."""
    from flows.publish import publish_model
    from tests.conftest import verify_version
    from tests.reliability.test_publish_killed import craft_run

    home = tmp_path / "home"
    monkeypatch.setenv("SFTFLOW_HOME", str(home))
    run_dir = craft_run(home, "run-secret", promote=True, remote=REMOTE, seed=5, templated=False)
    assert TOKEN not in (run_dir / "manifest.json").read_text()  # redacted as the run manifest was written

    state = publish_model(run_id="run-secret", return_state=True)
    assert LockedFileSystem.opened and set(LockedFileSystem.opened) == {TOKEN}  # the real URL was used
    assert verify_version(locked_remote / "tiny-sft" / "v0001") == []
    recorded = json.loads((home / "registry" / "tiny-sft" / "v0001" / "run_manifest.json").read_text())
    assert recorded["config"]["publish"]["remote"] == "credfs://***@store/models"
    assert_token_nowhere(home, state)


@pytest.mark.slow
def test_a_run_manifest_that_holds_the_token_is_published_without_spreading_it(tmp_path, monkeypatch, prefect_api_url,
                                                                               locked_remote):
    """A run manifest written before credentials were redacted holds the URL as it was: the publish still
    uses it, and writes it nowhere else."""
    from flows.publish import publish_model
    from tests.reliability.test_publish_killed import craft_run

    home = tmp_path / "home"
    monkeypatch.setenv("SFTFLOW_HOME", str(home))
    run_dir = craft_run(home, "run-old", promote=True, remote=None, seed=6, templated=False)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["config"]["publish"]["remote"] = REMOTE
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    forget_urls()

    state = publish_model(run_id="run-old", return_state=True)
    assert set(LockedFileSystem.opened) == {TOKEN}
    assert_token_nowhere(home, state, skip=frozenset({run_dir / "manifest.json"}))


# ---------------------------------------------------------------------------------------------
# `sftflow up`: the database URL goes to the server alone
# ---------------------------------------------------------------------------------------------


def test_up_gives_the_database_url_to_the_server_only(workspace, monkeypatch):
    from foundation.artifacts import StackProcess
    from sftflow import stack

    password = "pg-secret-4f1c9e"
    database_url = f"postgresql+asyncpg://prefect:{password}@db.internal:5432/prefect"
    monkeypatch.setenv("SFTFLOW_DATABASE_URL", database_url)
    monkeypatch.setenv("PREFECT_API_DATABASE_PASSWORD", password)  # one set by hand, too
    started, ran = {}, []

    def spawn(name, command, env, logs):
        started[name] = env
        return StackProcess(pid=2 ** 22 + len(started), command=command, log=str(logs / f"{name}.log"))

    monkeypatch.setattr(stack, "_spawn", spawn)
    monkeypatch.setattr(stack, "_run", lambda command, env, what, logs: ran.append(env))
    monkeypatch.setattr(stack, "_wait_healthy", lambda *a, **k: None)
    monkeypatch.setattr(stack, "ensure_zombie_automation", lambda api_url: None)

    state = stack.up(workspace, port=4321, database_url=database_url, log=lambda m: None)
    assert set(started) == {"server", "worker-cpu", "worker-gpu", "watcher"} and ran
    assert started["server"]["PREFECT_API_DATABASE_CONNECTION_URL"] == database_url
    assert started["server"]["PREFECT_API_DATABASE_PASSWORD"] == password
    for env in [*(started[n] for n in ("worker-cpu", "worker-gpu", "watcher")), *ran]:
        assert not [k for k, v in env.items() if password in v], "a process other than the server got the database"
        assert env["PREFECT_API_URL"] == "http://127.0.0.1:4321/api" and env["SFTFLOW_STACK_ID"] == state["stack_id"]
    assert password not in workspace.stack_state.read_text() and state["database"] == "postgresql"

    # a worker that stopped is started again without it too
    monkeypatch.setattr(stack, "is_ours", lambda proc, stack_id: "worker" not in proc.log)  # the workers stopped
    restarted = stack.restart_stopped(workspace, stack.read_state(workspace), log=lambda m: None)
    assert restarted["restarted"] == ["worker-cpu", "worker-gpu"]
    assert not [k for k, v in started["worker-cpu"].items() if password in v]


def test_without_a_database_url_the_server_keeps_sqlite_and_nobody_gets_one(workspace, monkeypatch):
    from sftflow.stack import server_env, stack_env

    monkeypatch.delenv("SFTFLOW_DATABASE_URL", raising=False)
    monkeypatch.delenv("PREFECT_API_DATABASE_CONNECTION_URL", raising=False)
    env = stack_env(workspace, "http://127.0.0.1:1/api", "id")
    assert not [k for k in server_env(env, None) if "DATABASE" in k]
    assert env["SFTFLOW_HOME"] == str(workspace.root) and env["PREFECT_HOME"] == str(workspace.prefect_home)


def test_pipeline_overrides_reach_the_flow_run_redacted_and_publishing_still_has_the_url():
    """`sftflow pipeline --set publish.remote=...`: the flow run's parameters (stored by Prefect) hold the
    redacted URL; this process remembers the real one for publishing."""
    from foundation.credentials import real_url
    from sftflow.cli import _redacted_overrides

    forget_urls()
    token = "ghp_" + "s3cr3t" * 4
    sent = _redacted_overrides([f"publish.remote=https://bot:{token}@example.org/models", "train.max_steps=3"])
    assert sent == ["publish.remote=https://***@example.org/models", "train.max_steps=3"]
    assert token not in json.dumps(sent)
    assert real_url(sent[0].partition("=")[2]) == f"https://bot:{token}@example.org/models"
    forget_urls()
