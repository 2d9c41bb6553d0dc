"""Flow `evaluate_adapter`: score a training run's adapter against its base and the champion.

Run it:
    sftflow evaluate --run RUN_ID --json
Writes runs/<run_id>/eval.json (scores, the promotion decision and every sampled answer) and
publishes a table artifact (models x metrics) and a markdown artifact of answers side by side.
"""

from __future__ import annotations

from prefect import flow

from foundation.atomic import read_json
from foundation.errors import SftflowError
from foundation.workspace import Workspace
from tasks.evaluate import evaluate_models
from tasks.publish import champion_of


def run_dir_of(workspace: Workspace, run_id: str):
    run_dir = workspace.runs_dir / run_id
    if "/" in run_id or run_id.startswith(".") or not (run_dir / "manifest.json").exists():
        raise SftflowError(f"no finished training run {run_id!r} in {workspace.runs_dir}; list them with: ls {workspace.runs_dir}")
    return run_dir


@flow(name="evaluate_adapter")
def evaluate_adapter(run_id: str) -> dict:
    """Base vs candidate vs champion on the run's dataset version; returns scores and the decision."""
    workspace = Workspace.from_env()
    run_dir = run_dir_of(workspace, run_id)
    name = read_json(run_dir / "manifest.json")["config"]["name"]
    return evaluate_models(run_dir, champion_of(workspace, name))
