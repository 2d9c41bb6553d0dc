"""Fixtures of the fault tests: a Prefect API shared with their helper processes, and the crash loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="session")
def prefect_api_url(tmp_path_factory):
    """The URL of a temporary Prefect API (SQLite) for this process and the helpers it starts.

    When a test harness of another test directory is already running in this session, it is reused
    (one server per session); otherwise one is started here.
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value() and not os.environ.get("PREFECT_API_URL"):
        yield PREFECT_API_URL.value()
        return
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def run_crash_loop(spec: dict, tmp_path: Path, api_url: str, timeout: int = 400) -> dict:
    """Run tests/reliability/crashloop.py on `spec` in a fresh process; returns its results."""
    spec = {**spec, "out": str(tmp_path / "crashloop.json")}
    spec_file = tmp_path / "crashloop-spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "PREFECT_API_URL": api_url, "SFTFLOW_PROGRESS": "0", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "tests.reliability.crashloop", str(spec_file)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(Path(spec["out"]).read_text())
