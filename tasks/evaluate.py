"""Evaluate: base vs candidate vs champion on the held-out split, and the promotion decision.

Every metric of `schemas.metrics` is scored for every model on the same rows: the loss metrics over
the whole eval split (teacher forcing), the answer metrics on a fixed, seeded sample of eval rows
answered by greedy decoding.

Scoring runs in a subprocess (`python -m tasks.processes.evaluator`) for the same reasons training
does: GPU memory is released, and Unsloth is imported before transformers; a warm worker that has imported
the engine already takes the job when one is waiting (foundation.warm). The pure functions here
(the sample, the prompt of a row, the decision) are what that process, the export's parity check and
the tests call.
"""

from __future__ import annotations

import json
import random

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from foundation import processes, warm
from foundation.artifacts import Answer, Decision, EvalReport, EvalScores, EvaluatorSpec, ModelRef
from foundation.errors import SftflowError
from foundation.stores.runs import RunDir
from foundation.workspace import Workspace
from schemas.config import EvalConfig, RunConfig
from schemas.metrics import BY_NAME
from tasks.engines import cuda_available
from tasks.trackers import log_eval_metrics


EVALUATOR = "tasks.processes.evaluator"


def has_reference(messages: list[dict]) -> bool:
    """Does the conversation end in an answer to compare with (an assistant turn with text)? Plain-text
    rows and answers that only call tools count in the eval loss, not in the generated sample."""
    return bool(messages) and messages[-1]["role"] == "assistant" and bool(messages[-1]["content"].strip())


def sample_rows(rows: list[dict], size: int, seed: int) -> list[dict]:
    """A fixed sample: the same rows for every model of every run on the same dataset version."""
    ordered = sorted((r for r in rows if has_reference(r["messages"])), key=lambda r: r["id"])
    return random.Random(seed).sample(ordered, min(size, len(ordered)))


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """Everything before the last assistant turn is the prompt; that turn is the reference."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def decide(scores: dict[str, dict], config: EvalConfig) -> Decision:
    """Promote when the candidate beats the base and the champion (if any) by the margin."""
    metric, margin = BY_NAME[config.primary_metric], config.min_improvement
    candidate = scores["candidate"][metric.name]
    reasons = []
    for rival in ("base", "champion"):
        if rival not in scores:
            continue
        value = scores[rival][metric.name]
        if candidate is None or value is None or not metric.better(candidate, value, margin):
            direction = "lower" if metric.lower_is_better else "higher"
            reasons.append(f"{metric.name} {candidate} is not {direction} than the {rival}'s {value} by {margin}")
    promote = not reasons
    if promote:
        beaten = " and the champion" if "champion" in scores else " (no champion yet)"
        reasons.append(f"{metric.name} {candidate} beats the base{beaten} by at least {margin}")
    return Decision(promote=promote, primary_metric=metric.name, margin=margin, reason="; ".join(reasons))


class EvaluationError(SftflowError):
    """The evaluator could not score the models; the message says why."""


def answers_markdown(scores: dict, answers: dict[str, list[Answer]], decision: Decision, limit: int = 5) -> str:
    models = list(scores)
    lines = [f"# Evaluation: {'promote' if decision.promote else 'do not promote'}", "", decision.reason, "",
             "| prompt | reference | " + " | ".join(models) + " |", "|---" * (len(models) + 2) + "|"]

    def cell(text: str) -> str:
        text = " ".join(text.split())
        return (text[:117] + "…" if len(text) > 118 else text).replace("|", "\\|")

    for i, row in enumerate(answers[models[0]][:limit]):
        lines.append(f"| {cell(row.prompt)} | {cell(row.reference)} | "
                     + " | ".join(cell(answers[m][i].prediction) for m in models) + " |")
    return "\n".join(lines)


def evaluation_samples(answers: dict[str, list[Answer]]) -> list[dict]:
    """One row per sampled eval row: its prompt, the reference, and each model's answer (base, candidate,
    and the champion when there is one); the models answered the same rows in the same order."""
    models = list(answers)
    return [{"prompt": row.prompt, "reference": row.reference, **{m: answers[m][i].prediction for m in models}}
            for i, row in enumerate(answers[models[0]])] if models else []


def score_models(run: RunDir, models: dict[str, ModelRef]) -> EvalScores:
    """Run the evaluation process on the run's dataset version; its scores."""
    manifest = run.manifest()
    EvaluatorSpec(run_dir=str(run.root), engine=manifest.engine, dataset_dir=manifest.dataset_dir,
                  config=manifest.config, models=models, out=str(run.eval_scores)).write(run.evaluator_spec)
    workspace, env, args = Workspace.from_env(), processes.child_env(), [str(run.evaluator_spec)]
    # a warm worker that imported the engine (started with the training, or by the last evaluation) when one waits
    proc = (warm.claim(workspace.root, manifest.engine, EVALUATOR, args, run.evaluator_log, env)
            or processes.start(processes.module_command(EVALUATOR, *args), run.evaluator_log, env))
    warm.ensure(workspace.root, manifest.engine, env, workspace.warm_log, cuda=cuda_available)
    returncode = proc.wait()
    if returncode != 0:
        raise EvaluationError(f"evaluation of {run.run_id} failed (exit {returncode}):\n"
                              f"{processes.log_tail(run.evaluator_log)}")
    return EvalScores.read(run.eval_scores)


def publish_evaluation_artifacts(report: EvalReport) -> None:
    verdict = "promote" if report.decision.promote else "keep"
    create_table_artifact(
        key="evaluation",
        table=[{"model": m, **s} for m, s in report.scores.items()],
        description=f"{report.run_id}: base vs candidate vs champion ({verdict})",
    )
    create_markdown_artifact(
        key="evaluation-answers",
        markdown=answers_markdown(report.scores, report.answers, report.decision),
        description=f"{report.run_id}: prompts, references and each model's answer",
    )
    create_table_artifact(
        key="evaluation-samples",
        table=evaluation_samples(report.answers),
        description=f"{report.run_id}: every sampled eval row, its reference and each model's answer "
                    f"(sftflow runs show {report.run_id})",
    )


@task(cache_policy=NO_CACHE)
def evaluate_models(run_id: str) -> EvalReport:
    """Score base, candidate and the champion of the run's model in a subprocess; decide; write eval.json.

    Returns the report without the answers (they are in eval.json and the markdown artifact)."""
    logger = get_run_logger()
    workspace = Workspace.from_env()
    run = workspace.runs.finished(run_id)
    manifest = run.manifest()
    champion = workspace.registry.champion_ref(manifest.name)
    models = {"base": ModelRef(model_path=manifest.model_path, adapter_dir=None),
              "candidate": ModelRef(model_path=manifest.model_path, adapter_dir=manifest.adapter_dir)}
    if champion is not None:
        models["champion"] = ModelRef(model_path=champion.model_path, adapter_dir=champion.adapter_dir)
    scored = score_models(run, models).models
    scores = {name: s.metrics for name, s in scored.items()}
    config = RunConfig.model_validate(manifest.config)
    decision = decide(scores, config.eval)
    report = EvalReport(run_id=run_id, dataset_version=manifest.dataset_version, scores=scores, decision=decision,
                        champion=champion.version if champion else None,
                        sample_size=len(scored["candidate"].answers), eval_rows=scored["candidate"].eval_rows,
                        answers={name: s.answers for name, s in scored.items()})
    report.write(run.eval_path)
    publish_evaluation_artifacts(report)
    if trackers := log_eval_metrics(run, config.train.report_to, scores, manifest.global_step):
        logger.info("eval metrics logged to %s (the training's run there)", ", ".join(trackers))
    for name, s in scores.items():
        logger.info("%s: %s", name, json.dumps(s))
    logger.info("decision: %s", decision.reason)
    return report.without_answers()


def evaluation_of(run_id: str) -> EvalReport:
    """The evaluation a run holds (written by evaluate_models wherever it ran), without its answers."""
    report = Workspace.from_env().runs.finished(run_id).eval_report()
    if report is None:
        raise EvaluationError(f"run {run_id} has no evaluation; evaluate it: sftflow evaluate --run {run_id}")
    return report.without_answers()
