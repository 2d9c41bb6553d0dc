"""Flow `publish_model`: an evaluated training run -> a registry version (+ champion if promoted).

Run it:
    sftflow publish --run RUN_ID --json
"""

from __future__ import annotations

from prefect import flow

from foundation.artifacts import PublishResult
from tasks.publish import publish_run


@flow(name="publish_model")
def publish_model(run_id: str) -> PublishResult:
    """Write registry/<name>/<version>/ atomically; the champion pointer moves only on promotion."""
    return publish_run(run_id)
