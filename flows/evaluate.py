"""Flow `evaluate_adapter`: score a training run's adapter against its base and the champion.

Run it:
    sftflow evaluate --run RUN_ID --json
Writes runs/<run_id>/eval.json (scores, the promotion decision and every sampled answer) and
publishes a table artifact (models x metrics) and a markdown artifact of answers side by side.
"""

from __future__ import annotations

from prefect import flow

from foundation.artifacts import EvalReport
from tasks.evaluate import evaluate_models


@flow(name="evaluate_adapter")
def evaluate_adapter(run_id: str) -> EvalReport:
    """Base vs candidate vs champion on the run's dataset version; returns the scores and the decision."""
    return evaluate_models(run_id)
