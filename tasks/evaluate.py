"""Evaluate: base vs candidate vs champion on the held-out split, and the promotion decision.

Metrics, for every model on the same rows:
- eval_loss / perplexity: mean response-token loss over the whole eval split (teacher forcing);
- on a fixed, seeded sample of eval rows answered by greedy generation: exact_match, rouge_l,
  chrf (0-100), json_valid (share of answers that parse as JSON, over rows whose reference is
  JSON), stop_rate (share of answers that ended with an end-of-turn token before the limit).

Scoring runs in a subprocess (`python -m tasks.engines.evaluator`) for the same reasons training
does: GPU memory is released, and Unsloth is imported before transformers. The pure metric and
decision functions here are what that process and the tests call.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import orjson
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from schemas.config import EvalConfig, RunConfig
from foundation.atomic import read_json, write_json_atomic
from foundation.errors import SftflowError

ROOT = Path(__file__).resolve().parent.parent
LOWER_IS_BETTER = {"eval_loss"}


# ---------------------------------------------------------------------------------------------
# Pure metric functions
# ---------------------------------------------------------------------------------------------


def normalise_answer(text: str) -> str:
    return " ".join(text.strip().split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise_answer(prediction) == normalise_answer(reference))


def rouge_l(prediction: str, reference: str) -> float:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure


def chrf(prediction: str, reference: str) -> float:
    import sacrebleu

    return sacrebleu.sentence_chrf(prediction, [reference]).score


def is_json(text: str) -> bool:
    text = text.strip()
    if not text or text[0] not in "[{":
        return False
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


def generation_metrics(answers: list[dict]) -> dict:
    """answers: [{"prediction", "reference", "stopped"}] -> the sample's mean metrics."""
    n = len(answers)
    if n == 0:
        return {"exact_match": None, "rouge_l": None, "chrf": None, "json_valid": None, "stop_rate": None}
    json_rows = [a for a in answers if is_json(a["reference"])]
    return {
        "exact_match": round(sum(exact_match(a["prediction"], a["reference"]) for a in answers) / n, 4),
        "rouge_l": round(sum(rouge_l(a["prediction"], a["reference"]) for a in answers) / n, 4),
        "chrf": round(sum(chrf(a["prediction"], a["reference"]) for a in answers) / n, 2),
        "json_valid": round(sum(is_json(a["prediction"]) for a in json_rows) / len(json_rows), 4) if json_rows else None,
        "stop_rate": round(sum(a["stopped"] for a in answers) / n, 4),
    }


def sample_rows(rows: list[dict], size: int, seed: int) -> list[dict]:
    """A fixed sample: the same rows for every model of every run on the same dataset version."""
    ordered = sorted(rows, key=lambda r: r["id"])
    return random.Random(seed).sample(ordered, min(size, len(ordered)))


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """Everything before the last assistant turn is the prompt; that turn is the reference."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def better(metric: str, a: float, b: float, margin: float) -> bool:
    return a <= b - margin if metric in LOWER_IS_BETTER else a >= b + margin


def decide(scores: dict[str, dict], config: EvalConfig) -> dict:
    """Promote when the candidate beats the base and the champion (if any) by the margin."""
    metric, margin = config.primary_metric, config.min_improvement
    candidate = scores["candidate"][metric]
    reasons = []
    for rival in ("base", "champion"):
        if rival not in scores:
            continue
        value = scores[rival][metric]
        if candidate is None or value is None or not better(metric, candidate, value, margin):
            direction = "lower" if metric in LOWER_IS_BETTER else "higher"
            reasons.append(f"{metric} {candidate} is not {direction} than the {rival}'s {value} by {margin}")
    promote = not reasons
    if promote:
        beaten = " and the champion" if "champion" in scores else " (no champion yet)"
        reasons.append(f"{metric} {candidate} beats the base{beaten} by at least {margin}")
    return {"promote": promote, "primary_metric": metric, "margin": margin, "reason": "; ".join(reasons)}


# ---------------------------------------------------------------------------------------------
# Model-side scoring (called in the evaluator subprocess)
# ---------------------------------------------------------------------------------------------


def score_loss(model, rows: list[dict], batch_size: int, pad_id: int) -> float:
    """Mean loss over every trained (label) token of the rows; batched, no grad."""
    import torch

    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        shifted = labels[:, 1:].to(device)
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += losses.item()
        count += int((shifted != -100).sum())
    return total / max(1, count)


def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int,
             eot_ids: set[int]) -> list[tuple[str, bool]]:
    """Greedy answers, batched with left padding and attention masks: (text, ended with end-of-turn)."""
    import torch

    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    out: list[tuple[str, bool]] = []
    for start in range(0, len(prompts), batch_size):
        rendered = [
            tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts[start : start + batch_size]
        ]
        enc = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            generated = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=sorted(eot_ids), temperature=None, top_p=None, top_k=None,
            )
        for row in generated[:, enc["input_ids"].shape[1] :].tolist():
            stop_at = next((i for i, t in enumerate(row) if t in eot_ids), None)
            tokens = row if stop_at is None else row[:stop_at]
            out.append((tokenizer.decode(tokens, skip_special_tokens=True), stop_at is not None))
    return out


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------


class EvaluationError(SftflowError):
    """The evaluator could not score the models; the message says why."""


def _markdown(scores: dict, answers: dict, decision: dict, limit: int = 5) -> str:
    models = list(scores)
    lines = [f"# Evaluation: {'promote' if decision['promote'] else 'do not promote'}", "", decision["reason"], "",
             "| prompt | reference | " + " | ".join(models) + " |", "|---" * (len(models) + 2) + "|"]

    def cell(text: str) -> str:
        text = " ".join(text.split())
        return (text[:117] + "…" if len(text) > 118 else text).replace("|", "\\|")

    for i, row in enumerate(answers[models[0]][:limit]):
        lines.append(f"| {cell(row['prompt'])} | {cell(row['reference'])} | "
                     + " | ".join(cell(answers[m][i]["prediction"]) for m in models) + " |")
    return "\n".join(lines)


@task(cache_policy=NO_CACHE)
def evaluate_models(run_dir: Path, champion: dict | None) -> dict:
    """Score base, candidate (and champion) in a subprocess; write eval.json; publish artifacts."""
    logger = get_run_logger()
    manifest = read_json(run_dir / "manifest.json")
    config = RunConfig.model_validate(manifest["config"])
    spec = run_dir / "evaluator_spec.json"
    models = {"base": {"model_path": manifest["model_path"], "adapter_dir": None},
              "candidate": {"model_path": manifest["model_path"], "adapter_dir": manifest["adapter_dir"]}}
    if champion is not None:
        models["champion"] = {"model_path": champion["model_path"], "adapter_dir": champion["adapter_dir"]}
    write_json_atomic(spec, {"run_dir": str(run_dir), "engine": manifest["engine"], "dataset_dir": manifest["dataset_dir"],
                             "config": manifest["config"], "models": models, "out": str(run_dir / "eval_scores.json")})
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with open(run_dir / "evaluator.log", "w") as log:
        done = subprocess.run([sys.executable, "-m", "tasks.engines.evaluator", str(spec)], stdout=log, stderr=log,
                              env=env, cwd=ROOT)
    if done.returncode != 0:
        tail = "".join((run_dir / "evaluator.log").read_text().splitlines(keepends=True)[-15:])
        raise EvaluationError(f"evaluation of {run_dir.name} failed (exit {done.returncode}):\n{tail}")
    scored = read_json(run_dir / "eval_scores.json")
    scores = {name: {**s["metrics"]} for name, s in scored.items()}
    decision = decide(scores, config.eval)
    result = {"run_id": run_dir.name, "dataset_version": manifest["dataset_version"], "scores": scores,
              "decision": decision, "champion": champion["version"] if champion else None,
              "sample_size": len(scored["candidate"]["answers"]), "eval_rows": scored["candidate"]["eval_rows"]}
    write_json_atomic(run_dir / "eval.json", {**result, "answers": {m: s["answers"] for m, s in scored.items()}})
    create_table_artifact(
        key="evaluation",
        table=[{"model": m, **s} for m, s in scores.items()],
        description=f"{run_dir.name}: base vs candidate vs champion ({'promote' if decision['promote'] else 'keep'})",
    )
    create_markdown_artifact(
        key="evaluation-answers",
        markdown=_markdown(scores, {m: s["answers"] for m, s in scored.items()}, decision),
        description=f"{run_dir.name}: prompts, references and each model's answer",
    )
    for name, s in scores.items():
        logger.info("%s: %s", name, json.dumps(s))
    logger.info("decision: %s", decision["reason"])
    return result
