"""The evaluation metrics: one table that evaluation, the config's promotion gate, `sftflow evaluate`'s
columns and the model card all read. Adding a metric is one row here (with its scoring function) and
its test; it then shows everywhere.

A metric comes either from the mean response-token loss over the whole eval split (teacher forcing),
or from each greedy answer of the fixed generation sample, averaged over the answers it applies to.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import orjson

from foundation.artifacts import Answer


def normalise_answer(text: str) -> str:
    return " ".join(text.strip().split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise_answer(prediction) == normalise_answer(reference))


class ScriptAwareWords:
    """ROUGE's tokens in any script: runs of letters and digits (lowercased), and each Han or kana character on
    its own, since Chinese and Japanese do not separate words by spaces. (rouge_score's own tokenizer keeps
    only [a-z0-9], so two identical Chinese answers would score 0.)"""

    _TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_\u3040-\u30ff\u3400-\u4dbf"
                        r"\u4e00-\u9fff\uf900-\ufaff]+")

    def tokenize(self, text: str) -> list[str]:
        return self._TOKEN.findall(text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=ScriptAwareWords())
    return scorer.score(reference, prediction)["rougeL"].fmeasure


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


@dataclass(frozen=True)
class Metric:
    name: str
    description: str
    lower_is_better: bool = False
    promotable: bool = True  # may be `eval.primary_metric`
    digits: int = 4  # rounding of the reported value
    of_loss: Callable[[float], float] | None = None  # from the mean response-token loss
    of_answer: Callable[[Answer], float | None] | None = None  # per answer; None where it does not apply

    def better(self, a: float, b: float, margin: float) -> bool:
        """`a` beats `b` by at least `margin`."""
        return a <= b - margin if self.lower_is_better else a >= b + margin


METRICS: tuple[Metric, ...] = (
    Metric("eval_loss", "mean loss over every response token of the eval split", lower_is_better=True,
           of_loss=lambda loss: loss),
    Metric("perplexity", "exp(eval_loss)", lower_is_better=True, promotable=False, digits=3,
           of_loss=lambda loss: math.exp(min(loss, 50))),
    Metric("exact_match", "answers equal to the reference (whitespace normalised)",
           of_answer=lambda a: exact_match(a.prediction, a.reference)),
    Metric("rouge_l", "ROUGE-L F-measure against the reference", of_answer=lambda a: rouge_l(a.prediction, a.reference)),
    Metric("chrf", "chrF (0-100) against the reference", digits=2, of_answer=lambda a: chrf(a.prediction, a.reference)),
    Metric("json_valid", "answers that parse as JSON, over the rows whose reference is JSON", promotable=False,
           of_answer=lambda a: float(is_json(a.prediction)) if is_json(a.reference) else None),
    Metric("stop_rate", "answers that ended with an end-of-turn token before the token limit", promotable=False,
           of_answer=lambda a: float(a.stopped)),
)

BY_NAME = {metric.name: metric for metric in METRICS}
NAMES = tuple(BY_NAME)
PromotableMetric = Literal[tuple(m.name for m in METRICS if m.promotable)]  # type: ignore[valid-type]


def loss_metrics(loss: float) -> dict[str, float]:
    return {m.name: round(m.of_loss(loss), m.digits) for m in METRICS if m.of_loss}


def answer_metrics(answers: list[Answer]) -> dict[str, float | None]:
    """The sample's mean of each answer metric (None when no answer counts for it)."""
    out: dict[str, float | None] = {}
    for metric in METRICS:
        if metric.of_answer is None:
            continue
        values = [v for v in map(metric.of_answer, answers) if v is not None]
        out[metric.name] = round(sum(values) / len(values), metric.digits) if values else None
    return out


def score(loss: float, answers: list[Answer]) -> dict[str, float | None]:
    """Every metric, in table order."""
    values = loss_metrics(loss) | answer_metrics(answers)
    return {name: values[name] for name in NAMES}
