"""The CLI's outputs stay what users and scripts rely on: the keys of every `--json` object and the
lines of the pipeline summary (the demo prints the same summary) are compared with
`tests/golden/cli_outputs.json`, recorded from the release before the architecture change.

Values differ between runs (timings, hashes, losses), so the comparison is on shape: the keys of every
object (keys that are file paths count as one `<path>` key), and the summary's lines with numbers,
hashes and paths masked. A change of the CLI's output that is wanted is recorded with
`SFTFLOW_RECORD_GOLDEN=1 .venv/bin/python -m pytest tests/test_cli_outputs.py`, and shows in the diff.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, SAMPLE_DROPS

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).parent / "golden" / "cli_outputs.json"
CONFIG = str(ROOT / "flows" / "configs" / "tiny_cpu.yaml")
QUICK = ["train.max_steps=12", "train.save_steps=12", "eval.primary_metric=eval_loss", "eval.sample_size=4",
         "eval.max_new_tokens=8", "export.quants=[f16]", "export.parity_prompts=2", "export.greedy_tokens=4"]


def shape(value):
    """The keys of a JSON value, recursively; scalars are None, a list is the shape of its first item."""
    if isinstance(value, dict):
        return {("<path>" if "/" in key else key): shape(item) for key, item in sorted(value.items())}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return None


def masked_lines(text: str, home: Path) -> list[str]:
    """The lines of a human-readable output with what differs between runs masked."""
    text = text.replace(str(home), "<home>")
    text = re.sub(r"\b[0-9a-f]{6,}\b", "<hex>", text)
    text = re.sub(r"\d+(\.\d+)?(e[+-]\d+)?", "<n>", text)
    return text.splitlines()


def run(env: dict, *args: str, status: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "sftflow", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=900)
    assert done.returncode == status, f"sftflow {' '.join(args)}: exit {done.returncode}\n{done.stderr[-3000:]}"
    return done


def test_cli_json_keys_and_the_pipeline_summary_are_unchanged(workspace, tiny_model, tmp_path):
    env = {**os.environ, "SFTFLOW_HOME": str(workspace.root), "PREFECT_HOME": str(tmp_path / "cli-prefect"),
           "SFTFLOW_PROGRESS": "0"}
    env.pop("PREFECT_API_URL", None)
    # the flow commands share the workspace's local Prefect API, as a user's do (one start, not one each);
    # it is stopped before the commands whose output says that no server runs
    shared = {**env, "SFTFLOW_LOCAL_API_IDLE_S": "300"}
    quick = [item for o in QUICK for item in ("--set", o)]
    seen: dict = {}

    def record(name: str, *args: str, status: int = 0, environ: dict = env) -> dict:
        output = json.loads(run(environ, *args, "--json", status=status).stdout)
        seen[name] = shape(output)
        return output

    try:
        record("config validate", "config", "validate", CONFIG)
        record("ingest", "ingest", str(SAMPLE_DROPS / "arithmetic"), "--drop-id", "golden-arithmetic",
               environ=shared)
        record("ingest (rejected)", "ingest", str(SAMPLE_DROPS / "json-extraction"), "--drop-id", "golden-rejected",
               "--max-reject-rate", "0.01", status=1, environ=shared)
        record("datasets", "datasets")
        pipeline = record("pipeline", "pipeline", str(SAMPLE_DROPS / "unit-conversions"), "--config", CONFIG, *quick,
                          environ=shared)
        record("pipeline (skipped)", "pipeline", "--config", CONFIG, *quick, environ=shared)
        run_id = record("train", "train", "--config", CONFIG, *QUICK, environ=shared)["run_id"]
        record("train --dry-run", "train", "--config", CONFIG, *quick, "--dry-run", environ=shared)
        record("evaluate", "evaluate", "--run", run_id, environ=shared)
        record("export", "export", "--run", run_id, "--quant", "f16", environ=shared)
        record("publish", "publish", "--run", run_id, environ=shared)
    finally:
        run(shared, "down")
    record("drop (no server)", "drop", str(SAMPLE_DROPS / "support-chats"), "--drop-id", "golden-landed")
    record("status (no stack)", "status")
    record("down (no stack)", "down")
    summary = run(env, "pipeline", str(SAMPLE_DROPS / "unit-conversions"), "--config", CONFIG, *quick,
                  "--force").stdout
    seen["pipeline summary (forced)"] = masked_lines(summary, workspace.root)
    assert pipeline["status"] == "published"

    if os.environ.get("SFTFLOW_RECORD_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(seen, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    for name in golden:
        assert seen[name] == golden[name], f"the output of `sftflow {name}` changed"
    assert set(seen) == set(golden)
