"""Flow `sft_pipeline`: drops -> dataset version -> adapter -> evaluation -> GGUF -> registry.

Each stage is its own flow, so a pipeline run shows them as subflows:

    ingest_drop (one per drop) -> train_adapter -> evaluate_adapter -> publish_model (when promoted)
                                                  export_model     (beside the evaluation, or after it)

The export runs while the evaluation runs (on a thread of this flow, as a task that runs the subflow) when
both run in this process and the machine holds both (tasks.export.run.export_beside_evaluation); otherwise
after it.

Training, evaluation and export (the stages that load a model) go to the `gpu` work pool through
`run_deployment` when a Prefect server is configured (PREFECT_API_URL) and their deployments exist there
(tasks.gpu_pool); otherwise they run in this process. The stages hand each other only names (dataset version, run id): everything else lives in
the workspace ($SFTFLOW_HOME), which every worker must share.

Run it:
    sftflow demo                                     (the sample drops, the tiny model, no server)
or from Python:
    from flows.pipeline import sft_pipeline; sft_pipeline(drops=["data/drops/arithmetic"])

A run trains nothing, with the reason logged and returned, when the dataset version it would use
was already trained with the same config (a registry version records both) unless `force`, and,
when it was started for a given dataset version, when a newer version is current (the newer one
has its own run): `tasks.train.training_plan` decides.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.evaluate import evaluate_adapter
from flows.export import export_model
from flows.ingest import ingest_drop
from flows.publish import publish_model
from flows.train import train_adapter
from foundation.artifacts import (
    DropReport,
    DropSummary,
    EvalReport,
    EvaluationSummary,
    ExportReport,
    GgufSummary,
    PipelineSummary,
    RunSummary,
)
from foundation.errors import DropRejectedError
from foundation.settings import PROJECT_DIR
from schemas.config import IngestConfig, RunConfig, config_hash, load_run_config
from tasks.report import pipeline_commands, pipeline_text
from tasks.evaluate import evaluation_of
from tasks.export.run import export_beside_evaluation, export_of
from tasks.gpu_pool import deployment_available, run_on_gpu_pool
from tasks.train import finished_summary, plan_training, summarise_run

DEFAULT_CONFIG = "flows/configs/tiny_cpu.yaml"


def resolve_config_path(config: str) -> Path:
    """A run config path as given, or relative to the project directory (deployments pass those)."""
    path = Path(config)
    if path.exists() or path.is_absolute():
        return path
    return PROJECT_DIR / path


def ingest_for_pipeline(drop: str, config: IngestConfig | None) -> DropReport:
    """Ingest one drop without announcing its dataset version (this run trains on it); a rejected drop's
    report stands in the summary, and the run goes on with the dataset as it is."""
    try:
        return ingest_drop(paths=[drop], config=config, announce=False)
    except DropRejectedError as exc:
        get_run_logger().error("drop %s rejected: %s", drop, exc)
        return exc.report


def train_stage(config: RunConfig, dataset_version: str, run_id: str) -> RunSummary:
    """A run that already finished is reused; otherwise train on the gpu pool when its deployment exists,
    else in this process."""
    logger = get_run_logger()
    if (done := finished_summary(run_id)) is not None:
        logger.info("run %s finished training earlier: reusing its adapter", run_id)
        return done
    if deployment_available("train"):
        parameters = {"config": config.model_dump(mode="json"), "dataset_version": dataset_version, "run_id": run_id}
        run_on_gpu_pool("train", parameters, run_id)
        return summarise_run(run_id)
    logger.info("training run %s in this process (no server, or no train deployment)", run_id)
    return train_adapter(config=config, dataset_version=dataset_version, run_id=run_id)


def evaluate_stage(run_id: str, on_pool: bool) -> EvalReport:
    """Evaluate on the gpu pool when its deployment exists (on_pool; the models load there), else in this process."""
    if on_pool:
        run_on_gpu_pool("evaluate", {"run_id": run_id}, run_id)
        return evaluation_of(run_id)
    return evaluate_adapter(run_id=run_id)


def export_stage(run_id: str, on_pool: bool) -> ExportReport:
    """Export on the gpu pool when its deployment exists (on_pool; the merge and the parity check load models),
    else here."""
    if on_pool:
        run_on_gpu_pool("export", {"run_id": run_id}, run_id)
        return export_of(run_id)
    return export_model(run_id=run_id)


@task(cache_policy=NO_CACHE, task_run_name="export beside the evaluation")
def export_beside(run_id: str) -> ExportReport:
    return export_model(run_id=run_id)


def evaluate_and_export(run_id: str) -> tuple[EvalReport, ExportReport]:
    """The evaluation and the export of a trained run: side by side when both run in this process and
    export_beside_evaluation says so, else one after the other. A failed evaluation still lets a running
    export finish before its error is raised."""
    evaluate_on_pool, export_on_pool = deployment_available("evaluate"), deployment_available("export")
    if evaluate_on_pool or export_on_pool or not export_beside_evaluation(run_id, get_run_logger().info):
        return evaluate_stage(run_id, evaluate_on_pool), export_stage(run_id, export_on_pool)
    exporting = export_beside.submit(run_id)
    try:
        evaluation = evaluate_adapter(run_id=run_id)
    finally:
        exporting.wait()
    return evaluation, exporting.result()


@flow(name="sft_pipeline")
def sft_pipeline(
    drops: list[str] | None = None,
    config: str = DEFAULT_CONFIG,
    overrides: list[str] | None = None,
    dataset_version: str | None = None,
    force: bool = False,
    ingest: IngestConfig | None = None,
) -> PipelineSummary:
    """Ingest the drops (if any), then train, evaluate, export and publish (when promoted).

    drops: paths or fsspec URLs, one drop each. config: a run config YAML (relative paths are
    taken from the project directory). dataset_version: train on this version (default: the
    current one). force: train even when this dataset version was trained with this config.
    """
    run_config = load_run_config(resolve_config_path(config), overrides or [])
    summary = PipelineSummary(status="running", drops=[], config=config, config_hash=config_hash(run_config))
    summary.drops = [DropSummary.of(ingest_for_pipeline(drop, ingest)) for drop in drops or []]

    plan = plan_training(run_config, dataset_version, force)
    summary.dataset_version = plan.dataset_version
    if plan.dataset_rows is not None:
        summary.dataset_rows = plan.dataset_rows
    if plan.skip:
        summary.status, summary.reason = "skipped", plan.reason
        if plan.registry_version:
            summary.registry_version = plan.registry_version
        return finish(summary)

    summary.training = train_stage(run_config, plan.dataset_version, plan.run_id)
    evaluation, exported = evaluate_and_export(plan.run_id)
    summary.evaluation = EvaluationSummary(scores=evaluation.scores, decision=evaluation.decision)
    summary.gguf = GgufSummary(dir=exported.gguf_dir, parity=exported.parity)
    if evaluation.decision.promote:
        summary.published = publish_model(run_id=plan.run_id)
        summary.status = "published"
    else:
        summary.status, summary.reason = "not promoted", f"not published: {evaluation.decision.reason}"
    return finish(summary)


def finish(summary: PipelineSummary) -> PipelineSummary:
    if summary.reason:
        get_run_logger().info(summary.reason)
    markdown = f"# sft_pipeline: {summary.status}\n\n```\n{pipeline_text(summary)}\n```\n"
    if commands := pipeline_commands(summary):
        markdown += "\nOpen what it wrote:\n\n" + "".join(f"- `{c}`\n" for c in commands)
    create_markdown_artifact(key="pipeline-summary", markdown=markdown,
                             description="What this sft_pipeline run did")
    return summary
