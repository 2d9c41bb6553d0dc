"""Shared fixtures. Tests never download: data comes from tmp files, data/drops and ../shared/datasets."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DROPS = ROOT / "data" / "drops"
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"

# Keep Prefect and GX off the network and out of the source tree for the whole test session.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
# Commands run their own temporary Prefect server, as before the local API: hundreds of CLI subprocesses in
# fresh workspaces must not leave a server each behind. tests/test_local_api.py turns it on where it tests it.
os.environ["SFTFLOW_LOCAL_API_IDLE_S"] = "0"
# No warm workers either (they are off without CUDA anyway, but a test run on a GPU machine would start one per
# training); tests/flows/test_warm_workers.py turns them on where it tests them.
os.environ["SFTFLOW_WARM_WORKER_IDLE_S"] = "0"


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...), or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None


def pid_alive(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z"  # a zombie has died; only its exit status is left


@pytest.fixture(scope="session", autouse=True)
def no_local_api_left(tmp_path_factory):
    """At the end of the session, stop any local Prefect API or warm worker still running from this session's
    workspaces (a test that failed before its own teardown)."""
    yield
    import signal

    base = str(tmp_path_factory.getbasetemp())
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(v.startswith(b"SFTFLOW_LOCAL_API_ID=") for v in environ) and any(
                v.startswith(b"PREFECT_HOME=" + base.encode()) for v in environ):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)
    from foundation import warm

    for name in warm.listening():  # warm workers of this session's workspaces
        if (found := warm.ask(name, {"describe": True})) and found["workspace"].startswith(base):
            warm.ask(name, {"stop": found["workspace"]})


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A fresh SFTFLOW_HOME per test."""
    from foundation.workspace import Workspace

    home = tmp_path / "home"
    monkeypatch.setenv("SFTFLOW_HOME", str(home))
    return Workspace(home).ensure()


def verify_version(version_dir: Path) -> list[str]:
    """Files of a registry version whose content does not match its manifest (missing, changed or
    unlisted); [] when it is intact."""
    from foundation.stores.registry import VersionDir
    from tasks.publish import file_manifest

    version = VersionDir(version_dir)
    listed = version.manifest().files
    actual = file_manifest(version_dir)
    actual.pop("manifest.json", None)
    return sorted(p for p in set(listed) | set(actual) if listed.get(p) != actual.get(p))


def subflow_runs(flow_run_id, nested: bool = False) -> list[tuple[str, object]]:
    """(flow name, run) of each subflow run of a flow run (and of its subflows', nested). Filtered by the
    server: the session's Prefect API holds every test's runs, and an unfiltered read returns some 200 of them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    found, parents = [], [flow_run_id]
    with get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        while parents:
            children = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=parents))
            runs = all_pages(lambda offset: client.read_flow_runs(flow_run_filter=children, offset=offset))
            found += [(flows[r.flow_id], r) for r in runs]
            parents = [r.id for r in runs] if nested else []
    return found


def logs_and_artifacts(flow_run_id) -> tuple[list, list]:
    """Every log line and artifact of a flow run and its subflows, read from the server page by page (after the
    run's logs, shipped in the background, have reached it)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    runs = [flow_run_id, *(run.id for _, run in subflow_runs(flow_run_id, nested=True))]
    with get_client(sync_client=True) as client:
        logs = all_pages(lambda offset: client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=runs)), offset=offset))
        artifacts = all_pages(lambda offset: client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=runs)), offset=offset))
    return logs, artifacts


def all_pages(read, page: int = 200) -> list:
    """Every item of a Prefect read whose server returns at most `page` (PREFECT_API_DEFAULT_LIMIT) per call."""
    items = []
    while True:
        batch = read(len(items))
        items += batch
        if len(batch) < page:
            return items


def shared_dataset(name: str) -> Path:
    path = SHARED_DATASETS / name
    if not path.exists():
        pytest.skip(f"{path} is not beside the checkout (CI provides ../shared)")
    return path


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """One model cache (SFTFLOW_CACHE) for the session: the tiny model is built once (~1 minute).

    SFTFLOW_TEST_CACHE=DIR keeps it in DIR across sessions (the model is deterministic and its
    directory is named by a hash of its recipe): for running a few tests at a time while developing.
    CI leaves it unset, so every run builds the model it tests.
    """
    kept = os.environ.get("SFTFLOW_TEST_CACHE")
    cache = Path(kept) if kept else tmp_path_factory.mktemp("model-cache")
    os.environ["SFTFLOW_CACHE"] = str(cache)
    from foundation.workspace import Workspace
    from tasks.base_model import tiny_model_dir

    path = tiny_model_dir(Workspace(cache.parent / "unused"), log=lambda *_: None)
    yield path
    os.environ.pop("SFTFLOW_CACHE", None)


@pytest.fixture
def tiny_model(model_cache, monkeypatch):
    monkeypatch.setenv("SFTFLOW_CACHE", str(model_cache.parent.parent))
    return model_cache


@pytest.fixture(scope="session")
def family_cache(tmp_path_factory) -> Path:
    """The model cache the tiny models of real families (tests/families.py) are built in: SFTFLOW_TEST_CACHE
    when set (kept across sessions, as for the tiny model), else a fresh one per session."""
    from tests.families import sdist_path

    if not sdist_path().exists():
        pytest.skip(f"{sdist_path()} is missing: run `make` (it downloads and checks the pinned sdist)")
    kept = os.environ.get("SFTFLOW_TEST_CACHE")
    return Path(kept) if kept else tmp_path_factory.mktemp("family-cache")


@pytest.fixture(scope="session")
def llama_tools(family_cache) -> Path:
    """llama.cpp's converter scripts, extracted into the family cache."""
    from foundation.workspace import Workspace
    from tasks.export.tools import llama_cpp_tools

    with pytest.MonkeyPatch.context() as env:
        env.setenv("SFTFLOW_CACHE", str(family_cache))
        return llama_cpp_tools(Workspace.from_env())


def _family_names() -> list[str]:
    from tests.families import FAMILIES

    return sorted(FAMILIES)


@pytest.fixture(scope="session", params=_family_names())
def family(request, family_cache):
    """(a Family row, its built model directory): each built once per session (or once, with SFTFLOW_TEST_CACHE)."""
    from tests.families import FAMILIES, family_model

    return FAMILIES[request.param], family_model(request.param, family_cache, log=lambda *_: None)
