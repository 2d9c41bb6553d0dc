"""Flow `publish_model`: an evaluated training run -> a registry version (+ champion if promoted).

Run it:
    sftflow publish --run RUN_ID --json
"""

from __future__ import annotations

from prefect import flow

from flows.evaluate import run_dir_of
from foundation.workspace import Workspace
from tasks.publish import publish_run


@flow(name="publish_model")
def publish_model(run_id: str) -> dict:
    """Write registry/<name>/<version>/ atomically; the champion pointer moves only on promotion."""
    workspace = Workspace.from_env().ensure()
    return publish_run(run_dir_of(workspace, run_id), workspace)
