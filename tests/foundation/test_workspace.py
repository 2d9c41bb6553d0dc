"""The workspace's layout version, and the settings every SFTFLOW_* variable is read through."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from foundation.errors import ConfigError, WorkspaceError
from foundation.settings import Settings
from foundation.workspace import LAYOUT, LAYOUT_FILE, Workspace
from tests.conftest import ROOT


def test_a_new_workspace_records_its_layout_and_a_reader_records_nothing(tmp_path):
    Workspace(tmp_path / "read").check_layout()
    assert not (tmp_path / "read").exists()  # reading an absent workspace creates nothing
    Workspace(tmp_path / "new").ensure()
    assert json.loads((tmp_path / "new" / LAYOUT_FILE).read_text())["layout"] == LAYOUT


def test_a_workspace_of_another_layout_is_refused_with_what_to_do(tmp_path):
    root = tmp_path / "future"
    root.mkdir()
    (root / LAYOUT_FILE).write_text(json.dumps({"layout": LAYOUT + 1, "written_by": "sftflow 9.0"}))
    for open_it in (Workspace(root).ensure, Workspace(root).check_layout):
        with pytest.raises(WorkspaceError, match=r"written by sftflow 9\.0 in layout 2; .* reads layout 1") as refused:
            open_it()
        assert "SFTFLOW_HOME" in str(refused.value)
    (root / LAYOUT_FILE).write_text("{not json")
    with pytest.raises(WorkspaceError, match="unreadable"):
        Workspace(root).check_layout()


def test_the_cli_refuses_such_a_workspace_in_one_line(tmp_path):
    root = tmp_path / "future"
    root.mkdir()
    (root / LAYOUT_FILE).write_text(json.dumps({"layout": LAYOUT + 1, "written_by": "sftflow 9.0"}))
    env = {**os.environ, "SFTFLOW_HOME": str(root)}
    done = subprocess.run([sys.executable, "-m", "sftflow", "datasets", "--json"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: the workspace") and done.stderr.count("\n") == 1


def test_settings_read_every_variable_from_the_environment_given():
    settings = Settings.from_env({"SFTFLOW_HOME": "/w", "SFTFLOW_CACHE": "/c", "SFTFLOW_PROGRESS": "0",
                                  "SFTFLOW_CPU_RANKS": "2", "SFTFLOW_DATABASE_URL": "postgresql+asyncpg://db"})
    assert (settings.home, settings.cache, settings.progress, settings.cpu_ranks) == (Path("/w"), Path("/c"), False, 2)
    assert settings.database_url == "postgresql+asyncpg://db" and settings.stack_id is None
    keyed = Settings.from_env({"SFTFLOW_SERVE_API_KEY": "s3cret"})
    assert keyed.serve_api_key == "s3cret" and "s3cret" not in repr(keyed)  # a secret stays out of reprs and logs
    defaults = Settings.from_env({})
    assert defaults.home == Path(".sftflow").absolute() and defaults.cache is None and defaults.progress
    beside = {v: Settings.from_env({"SFTFLOW_EXPORT_BESIDE_EVAL": v}).export_beside_eval for v in ("1", "0", "auto")}
    assert beside == {"1": True, "0": False, "auto": None} and defaults.export_beside_eval is None
    with pytest.raises(ConfigError, match=r"^SFTFLOW_EXPORT_BESIDE_EVAL='yes': use auto, 1 or 0$"):
        Settings.from_env({"SFTFLOW_EXPORT_BESIDE_EVAL": "yes"})


def test_no_product_module_reads_an_sftflow_variable_but_the_settings():
    reads = []
    for package in ("sftflow", "flows", "tasks", "schemas", "foundation"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            for needle in ('environ.get("SFTFLOW_', 'environ["SFTFLOW_', 'getenv("SFTFLOW_', 'envvar="SFTFLOW_'):
                if needle in text and path.name != "settings.py":
                    reads.append(f"{path.relative_to(ROOT)}: {needle}")
    assert reads == []
