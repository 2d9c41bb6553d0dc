"""The stages that load a model (train, evaluate, export) run on the stack's gpu pool: each through its
deployment, as a subflow of the pipeline that waits for it. A flow run that crashes there (its process
killed, out of memory, its host lost) is started again with the same parameters, which resume from what
it left on disk (a training run from its last checkpoint); what it wrote is read back from the workspace.

Without a server, or without the deployment, the caller runs the stage's flow in its own process.
"""

from __future__ import annotations

from prefect import get_run_logger

from foundation.errors import SftflowError

DEPLOYMENTS = {"train": "train_adapter/train", "evaluate": "evaluate_adapter/evaluate", "export": "export_model/export"}
ATTEMPTS = 3  # a flow run that crashes is started again this often


def deployment_available(stage: str) -> bool:
    """True when a Prefect server is configured (environment or profile) and it has the stage's deployment."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return False
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(DEPLOYMENTS[stage])
    except ObjectNotFound:
        return False
    return True


def start_again(crashed: bool, attempt: int) -> bool:
    """A flow run that crashed is started again, up to ATTEMPTS times in all; one that failed or was cancelled
    said why, and is not."""
    return crashed and attempt < ATTEMPTS


def run_on_gpu_pool(stage: str, parameters: dict, run_id: str) -> None:
    """Run the stage's deployment as a subflow of the caller until it completes; SftflowError when it does not."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    for attempt in range(1, ATTEMPTS + 1):
        logger.info("%s of run %s on the gpu pool (deployment %s, attempt %s of %s)", stage, run_id,
                    DEPLOYMENTS[stage], attempt, ATTEMPTS)
        flow_run = run_deployment(DEPLOYMENTS[stage], parameters=parameters, as_subflow=True, timeout=None)
        state = flow_run.state
        if state is not None and state.is_completed():
            return
        ended = state.name if state else "unknown"
        if not start_again(state is not None and state.is_crashed(), attempt):
            break
        logger.warning("%s flow run %s ended %s (%s): starting it again, it resumes from what run %s holds", stage,
                       flow_run.name, ended, state.message, run_id)
    raise SftflowError(f"{stage} flow run {flow_run.name} ({flow_run.id}) of run {run_id} ended {ended} (attempt "
                       f"{attempt} of {ATTEMPTS}): see its logs in the dashboard; running the pipeline again resumes it")
