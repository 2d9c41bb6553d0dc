"""The stores answer the questions the rest of the project asks of the workspace, and refuse bad names."""

from __future__ import annotations

import pytest

from foundation.artifacts import FileDigest, VersionManifest
from foundation.errors import DatasetError, NotFoundError, WorkspaceError
from foundation.workspace import Workspace


def publish(workspace: Workspace, name: str, version: str, run_id: str) -> None:
    with workspace.registry.write_version(name, version) as tmp:
        tmp.adapter.mkdir()
        VersionManifest(name=name, version=version, run_id=run_id, dataset_version="ds-1", promoted=False,
                        published_at="2026-12-01T00:00:00+00:00",
                        files={"adapter/x": FileDigest(sha256="0" * 64, bytes=0)}).write(tmp.manifest_path)


def test_registry_versions_champion_and_resolution(workspace):
    registry = workspace.registry
    assert registry.names() == [] and registry.next_version("m") == "v0001"
    for number, run in ((1, "r1"), (2, "r2"), (10, "r10")):
        publish(workspace, "m", f"v{number:04d}", run)
    (registry.model_dir("m") / ".tmp-v0011-dead").mkdir()  # a publisher that died: never a version
    assert [v.version for v in registry.versions("m")] == ["v0001", "v0002", "v0010"]  # by number, not by name
    assert registry.next_version("m") == "v0011"
    assert {run: v.version for run, v in registry.published_runs("m").items()} == {"r1": "v0001", "r2": "v0002",
                                                                                   "r10": "v0010"}
    assert registry.champion("m") is None and registry.resolve(None).version == "v0010"  # the newest
    registry.set_champion("m", "v0002")
    assert registry.resolve("m").version == "v0002" and registry.resolve("m@v0001").version == "v0001"
    with pytest.raises(NotFoundError, match="no version 'v0009' of m"):
        registry.resolve("m@v0009")
    with pytest.raises(NotFoundError, match="no model 'other'"):
        registry.resolve("other")
    publish(workspace, "n", "v0001", "r")
    with pytest.raises(NotFoundError, match="2 models .* choose one with --model"):
        registry.resolve(None)


def test_a_champion_pointer_or_version_name_that_could_escape_is_refused(workspace):
    publish(workspace, "m", "v0001", "r1")
    (workspace.registry.model_dir("m") / "CHAMPION").write_text("../../../elsewhere\n")
    with pytest.raises(WorkspaceError, match="not a version name like v0001"):
        workspace.registry.champion("m")
    for bad in ("m@../v0001", "m@v0001/..", "../m"):
        with pytest.raises(NotFoundError):
            workspace.registry.resolve(bad)


def test_runs_are_found_only_when_finished_and_attempts_are_numbered(workspace):
    runs = workspace.runs
    with pytest.raises(NotFoundError, match="no finished training run 'r'"):
        runs.finished("r")
    runs.create("r")
    with pytest.raises(NotFoundError):
        runs.finished("r")  # started, not finished
    for bad in ("../r", ".hidden"):
        with pytest.raises(NotFoundError):
            runs.finished(bad)
    assert runs.attempt("base", force=True) == "base"
    runs.create("base").manifest_path.write_text("{}")
    assert runs.attempt("base", force=False) == "base" and runs.attempt("base", force=True) == "base-r2"


def test_datasets_find_refuses_unknown_names_and_a_broken_pointer(workspace):
    datasets = workspace.datasets
    assert datasets.current() is None and datasets.versions() == []
    with pytest.raises(NotFoundError, match="ingest a drop first"):
        datasets.find(None)
    with pytest.raises(NotFoundError, match="no dataset version '../x'"):
        datasets.find("../x")
    (workspace.datasets_dir / "CURRENT").write_text("ds-missing\n")
    with pytest.raises(DatasetError, match="has no manifest.json"):
        datasets.current()
