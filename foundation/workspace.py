"""The workspace: one directory for all generated state, never inside the source tree's git.

    $SFTFLOW_HOME (default ./.sftflow)
      workspace.json                                           the layout version this workspace is written in
      datasets/<version>/{train,eval}.parquet, manifest.json   immutable dataset versions (stores.datasets)
      datasets/<version>/tokenized/<key>/                     its rows as tokenized for training (a cache: tasks.tokenize)
      datasets/CURRENT                                         name of the current version
      drops/<drop_id>/{report.json,quarantine.parquet,duplicates.parquet}   (stores.drops)
      staging/                                                 a flow run's intermediate tables, removed after it
      landing/<drop_id>/                                       new drops waiting to be announced (stores.landing)
      runs/<run_id>/                                           training runs (stores.runs)
      registry/<name>/<version>/                               published models (stores.registry)
      cache/                                                   model caches ($SFTFLOW_CACHE moves them)
      prefect/                                                 PREFECT_HOME (SQLite database of the local API and the stack)
      prefect/local-api.json, local-api.log                    the local Prefect API commands share (sftflow/local_api.py)
      stack/                                                   `sftflow up`: state.json and process logs
      warm-workers.log                                         the warm workers' own output (foundation/warm.py)

A workspace written by a version of sftflow with another layout is refused before anything in it is
read or written, with what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import orjson

from foundation.atomic import write_json_atomic
from foundation.errors import WorkspaceError
from foundation.settings import settings

# Bump when a file's place or meaning changes so that an older sftflow could misread it.
LAYOUT = 1
LAYOUT_FILE = "workspace.json"


def sftflow_version() -> str:
    try:
        return metadata.version("sftflow")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def from_env(cls) -> "Workspace":
        return cls(settings().home)

    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    @property
    def drops_dir(self) -> Path:
        return self.root / "drops"

    @property
    def landing_dir(self) -> Path:
        return self.root / "landing"

    @property
    def staging_dir(self) -> Path:
        return self.root / "staging"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def registry_dir(self) -> Path:
        return self.root / "registry"

    @property
    def stack_dir(self) -> Path:
        return self.root / "stack"

    @property
    def stack_state(self) -> Path:
        return self.stack_dir / "state.json"

    @property
    def stack_logs(self) -> Path:
        return self.stack_dir / "logs"

    @property
    def cache(self) -> Path:
        """Model caches; SFTFLOW_CACHE shares one between workspaces."""
        return settings().cache or self.root / "cache"

    @property
    def models_cache(self) -> Path:
        return self.cache / "models"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    @property
    def local_api_state(self) -> Path:
        return self.prefect_home / "local-api.json"

    @property
    def local_api_log(self) -> Path:
        return self.prefect_home / "local-api.log"

    @property
    def warm_log(self) -> Path:
        return self.root / "warm-workers.log"

    # The stores: each alone knows the layout under its directory.

    @property
    def datasets(self):
        from foundation.stores.datasets import DatasetStore

        return DatasetStore(self.datasets_dir)

    @property
    def drops(self):
        from foundation.stores.drops import DropStore

        return DropStore(self.drops_dir, self.staging_dir)

    @property
    def runs(self):
        from foundation.stores.runs import RunStore

        return RunStore(self.runs_dir)

    @property
    def registry(self):
        from foundation.stores.registry import RegistryStore

        return RegistryStore(self.registry_dir)

    @property
    def landing(self):
        from foundation.stores.landing import LandingStore

        return LandingStore(self.landing_dir)

    def check_layout(self) -> "Workspace":
        """Refuse a workspace that another layout version wrote (readers call this; it writes nothing)."""
        _check_layout(self.root, record=False)
        return self

    def ensure(self) -> "Workspace":
        """Check the layout, record it in a new workspace, and make the top-level directories (writers)."""
        _check_layout(self.root, record=True)
        for path in (self.datasets_dir, self.drops_dir, self.landing_dir, self.staging_dir, self.runs_dir,
                     self.registry_dir, self.cache):
            path.mkdir(parents=True, exist_ok=True)
        return self


# (root, mtime of its layout file) pairs already checked by this process: a command checks once.
_checked: set[tuple[Path, int]] = set()


def _check_layout(root: Path, record: bool) -> None:
    path = root / LAYOUT_FILE
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        # A new workspace, or one written before the layout was recorded (layout 1): record it.
        if record:
            write_json_atomic(path, {"layout": LAYOUT, "written_by": f"sftflow {sftflow_version()}"})
        return
    if (root, mtime) in _checked:
        return
    try:
        recorded = orjson.loads(path.read_bytes())
        layout, writer = recorded["layout"], recorded.get("written_by", "an unknown version of sftflow")
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise WorkspaceError(
            f"{path}: unreadable ({exc}); it records the workspace's layout version: restore it, or point "
            "SFTFLOW_HOME at another directory"
        ) from exc
    if layout != LAYOUT:
        raise WorkspaceError(
            f"the workspace {root} was written by {writer} in layout {layout}; this sftflow "
            f"({sftflow_version()}) reads layout {LAYOUT}. Use the sftflow version that wrote it, or start a new "
            f"workspace for this version (SFTFLOW_HOME=another directory; ingest the drops there again)"
        )
    _checked.add((root, mtime))
