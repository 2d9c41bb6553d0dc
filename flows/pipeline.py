"""Flow `sft_pipeline`: drops -> dataset version -> adapter -> evaluation -> GGUF -> registry.

Each stage is its own flow, so a pipeline run shows them as subflows:

    ingest_drop (one per drop) -> train_adapter -> evaluate_adapter -> export_model -> publish_model

Training goes to the `gpu` work pool through `run_deployment` when a Prefect server is configured
(PREFECT_API_URL) and the `train_adapter/train` deployment exists there; otherwise it runs in this
process. The stages hand each other only names (dataset version, run id): everything else lives in
the workspace ($SFTFLOW_HOME), which every worker must share.

Run it:
    sftflow demo                                     (the sample drops, the tiny model, no server)
or from Python:
    from flows.pipeline import sft_pipeline; sft_pipeline(drops=["data/drops/arithmetic"])

A run trains nothing, with the reason logged and returned, when the dataset version it would use
was already trained with the same config (a registry version records both) unless `force`, and,
when it was started for a given dataset version, when a newer version is current (the newer one
has its own run).
"""

from __future__ import annotations

import re
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.evaluate import evaluate_adapter
from flows.export import export_model
from flows.ingest import ingest_drop
from flows.publish import publish_model
from flows.train import run_summary, train_adapter
from schemas.config import IngestConfig, RunConfig, config_hash, load_run_config
from foundation.atomic import read_json
from foundation.errors import DropRejectedError, SftflowError
from sftflow.summaries import pipeline_text
from foundation.workspace import Workspace
from tasks.format import current_version, find_version

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = "flows/configs/tiny_cpu.yaml"
TRAIN_DEPLOYMENT = "train_adapter/train"
TRAIN_ATTEMPTS = 3  # a training flow run that crashes (its process killed) is started again this often


def resolve_config_path(config: str) -> Path:
    """A run config path as given, or relative to the project directory (deployments pass those)."""
    path = Path(config)
    if path.exists() or path.is_absolute():
        return path
    return PROJECT_DIR / path


def published_with(workspace: Workspace, name: str, dataset_version: str, config_digest: str) -> str | None:
    """The registry version already trained on this dataset version with this config, if any."""
    model_root = workspace.registry_dir / name
    for manifest_path in sorted(model_root.glob("v*/manifest.json")) if model_root.is_dir() else []:
        run = read_json(manifest_path.parent / "run_manifest.json")
        if run["dataset_version"] == dataset_version and run["config_hash"] == config_digest:
            return manifest_path.parent.name
    return None


def pipeline_run_id(workspace: Workspace, config: RunConfig, dataset_version: str, force: bool) -> str:
    """The run directory this pipeline trains in: one per dataset version and config.

    The same id comes back until that run has finished, so a pipeline run that dies (its process
    killed, its host lost) and is started again resumes the training from its last checkpoint
    instead of starting over. A finished run is reused (its adapter is evaluated, exported and
    published as if just trained) unless `force`, which starts a new attempt (`-r2`, `-r3`, ...).
    """
    base = f"{config.name}-{dataset_version}-{config_hash(config)[:8]}"
    pattern = re.compile(re.escape(base) + r"(?:-r(\d+))?")
    attempts = sorted((int(m.group(1) or 1), path.name) for path in workspace.runs_dir.glob(f"{base}*")
                      if (m := pattern.fullmatch(path.name)))
    if not attempts:
        return base
    number, latest = attempts[-1]
    if force and (workspace.runs_dir / latest / "manifest.json").exists():
        return f"{base}-r{number + 1}"
    return latest


def train_deployment_available() -> bool:
    """True when a Prefect server is configured (environment or profile) and it has the train deployment."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return False
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(TRAIN_DEPLOYMENT)
    except ObjectNotFound:
        return False
    return True


def train_stage(config: RunConfig, dataset_version: str, run_id: str) -> dict:
    """Train on the gpu pool when the deployment exists, else here; the run directory is the result.

    A run that already finished is not trained again. A training flow run on the gpu pool that
    crashes (its process killed, out of memory, the worker's host lost) is started again with the
    same run id, up to TRAIN_ATTEMPTS times; it resumes from the last checkpoint.
    """
    logger = get_run_logger()
    run_dir = Workspace.from_env().runs_dir / run_id
    if (run_dir / "manifest.json").exists():
        logger.info("run %s finished training earlier: reusing its adapter", run_id)
        return run_summary(run_dir)
    if not train_deployment_available():
        logger.info("training run %s in this process (no server, or no %s deployment)", run_id, TRAIN_DEPLOYMENT)
        return train_adapter(config=config, dataset_version=dataset_version, run_id=run_id)

    from prefect.deployments import run_deployment

    attempt = 0
    while True:
        attempt += 1
        logger.info("training run %s on the gpu pool (deployment %s, attempt %s of %s)", run_id, TRAIN_DEPLOYMENT,
                    attempt, TRAIN_ATTEMPTS)
        flow_run = run_deployment(
            TRAIN_DEPLOYMENT,
            parameters={"config": config.model_dump(mode="json"), "dataset_version": dataset_version, "run_id": run_id},
            as_subflow=True,
            timeout=None,
        )
        state = flow_run.state
        if state is not None and state.is_completed():
            return run_summary(run_dir)
        ended = state.name if state else "unknown"
        if state is not None and state.is_crashed() and attempt < TRAIN_ATTEMPTS:
            logger.warning("training flow run %s ended %s (%s): starting it again, it resumes from the last "
                           "checkpoint in %s", flow_run.name, ended, state.message, run_dir)
            continue
        raise SftflowError(f"training flow run {flow_run.name} ({flow_run.id}) ended {ended} (attempt {attempt} of "
                           f"{TRAIN_ATTEMPTS}): see its logs in the dashboard; the run directory is {run_dir}; "
                           "running the pipeline again resumes from its last checkpoint")


@flow(name="sft_pipeline")
def sft_pipeline(
    drops: list[str] | None = None,
    config: str = DEFAULT_CONFIG,
    overrides: list[str] | None = None,
    dataset_version: str | None = None,
    force: bool = False,
    ingest: IngestConfig | None = None,
) -> dict:
    """Ingest the drops (if any), then train, evaluate, export and publish (when promoted).

    drops: paths or fsspec URLs, one drop each. config: a run config YAML (relative paths are
    taken from the project directory). dataset_version: train on this version (default: the
    current one). force: train even when this dataset version was trained with this config.
    """
    logger = get_run_logger()
    workspace = Workspace.from_env().ensure()
    run_config = load_run_config(resolve_config_path(config), overrides or [])
    digest = config_hash(run_config)
    summary: dict = {"status": "running", "drops": [], "config": config, "config_hash": digest}

    for drop in drops or []:
        try:
            report = ingest_drop(paths=[drop], config=ingest, announce=False)  # this run trains on it
        except DropRejectedError as exc:
            logger.error("drop %s rejected: %s", drop, exc)
            report = exc.report
        summary["drops"].append({k: report.get(k) for k in ("drop_id", "status", "noop", "rows_in", "accepted",
                                                             "duplicates", "quarantined", "reasons",
                                                             "dataset_version", "dataset_rows")})

    current = current_version(workspace)
    if current is None:
        raise SftflowError(f"no dataset version in {workspace.datasets_dir}: ingest a drop first "
                           "(sftflow ingest PATH, or pass drops=[...])")
    if dataset_version and dataset_version != current.name:
        find_version(workspace, dataset_version)  # a clear error for a name that does not exist
        reason = (f"dataset version {dataset_version} is no longer current ({current.name} is): skipped, the newer "
                  "version is trained by its own run")
        return _finish(summary | {"status": "skipped", "reason": reason, "dataset_version": dataset_version}, logger)
    version = current.name
    summary["dataset_version"] = version
    summary["dataset_rows"] = current.manifest["rows"]

    already = published_with(workspace, run_config.name, version, digest)
    if already and not force:
        reason = (f"dataset version {version} was already trained with this config (config hash {digest[:12]}): "
                  f"registry {run_config.name}/{already}; nothing to do (force=True retrains)")
        return _finish(summary | {"status": "skipped", "reason": reason, "registry_version": already}, logger)

    run_id = pipeline_run_id(workspace, run_config, version, force)
    summary["training"] = train_stage(run_config, version, run_id)
    evaluation = evaluate_adapter(run_id=run_id)
    summary["evaluation"] = {k: evaluation[k] for k in ("scores", "decision")}
    exported = export_model(run_id=run_id)
    summary["gguf"] = {"dir": exported["gguf_dir"], "parity": exported["parity"]}
    if evaluation["decision"]["promote"]:
        summary["published"] = publish_model(run_id=run_id)
        summary["status"] = "published"
    else:
        summary["status"] = "not promoted"
        summary["reason"] = f"not published: {evaluation['decision']['reason']}"
    return _finish(summary, logger)


def _finish(summary: dict, logger) -> dict:
    if summary.get("reason"):
        logger.info(summary["reason"])
    markdown = f"# sft_pipeline: {summary['status']}\n\n```\n{pipeline_text(summary)}\n```\n"
    create_markdown_artifact(key="pipeline-summary", markdown=markdown,
                             description="What this sft_pipeline run did")
    return summary
