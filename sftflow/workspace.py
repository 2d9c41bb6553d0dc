"""The workspace: one directory for all generated state, never inside the source tree's git.

    $SFTFLOW_HOME (default ./.sftflow)
      datasets/<version>/{train,eval}.parquet, manifest.json   immutable dataset versions
      datasets/CURRENT                                         name of the current version
      drops/<drop_id>/{report.json,quarantine.parquet,duplicates.parquet}
      landing/<drop_id>/                                       new drops waiting to be announced (the watcher)
      runs/<run_id>/                                           training runs (config, adapter, manifest)
      registry/ cache/                                         published models; model caches ($SFTFLOW_CACHE)
      prefect/                                                 PREFECT_HOME (embedded SQLite API, server DB)
      stack/                                                   `sftflow up`: state.json and process logs
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def from_env(cls) -> "Workspace":
        return cls(Path(os.environ.get("SFTFLOW_HOME", ".sftflow")).absolute())

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def drops(self) -> Path:
        return self.root / "drops"

    @property
    def landing(self) -> Path:
        return self.root / "landing"

    @property
    def stack(self) -> Path:
        return self.root / "stack"

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    @property
    def cache(self) -> Path:
        """Model caches; SFTFLOW_CACHE shares one between workspaces."""
        shared = os.environ.get("SFTFLOW_CACHE")
        return Path(shared).absolute() if shared else self.root / "cache"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    def ensure(self) -> "Workspace":
        for path in (self.datasets, self.drops, self.landing, self.staging, self.runs, self.registry, self.cache):
            path.mkdir(parents=True, exist_ok=True)
        return self


def configure_prefect_env(workspace: Workspace) -> None:
    """Point Prefect at the workspace before it is imported.

    With no PREFECT_API_URL set, Prefect runs flows against its embedded (ephemeral) API backed by
    SQLite under PREFECT_HOME; keeping that under the workspace keeps the source tree clean. When
    `sftflow up` runs a server for this workspace, flows report to it (and show in its dashboard).
    Values the user already set win.
    """
    if "PREFECT_API_URL" not in os.environ:
        from sftflow.stack import active_api_url

        if api_url := active_api_url(workspace):  # `sftflow up` runs a server for this workspace: use it
            os.environ["PREFECT_API_URL"] = api_url
    os.environ.setdefault("PREFECT_HOME", str(workspace.prefect_home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
    # the embedded server's start-up waits 20 s by default, too little on a loaded 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
