"""Metrics, the promotion decision, and batched greedy generation."""

from __future__ import annotations

import pytest

from foundation.artifacts import Answer
from schemas.config import EvalConfig
from schemas.metrics import METRICS, answer_metrics, chrf, exact_match, is_json, rouge_l, score
from tasks.evaluate import decide, prompt_and_reference, sample_rows
from tasks.processes.evaluator import generate


def test_text_metrics():
    assert exact_match(" 42 ", "42") == 1.0 and exact_match("41", "42") == 0.0
    assert rouge_l("the cat sat", "the cat sat") == 1.0 and rouge_l("dog", "the cat sat") == 0.0
    assert chrf("3500 m", "3500 m") == 100.0 and 0 < chrf("3400 m", "3500 m") < 100
    assert is_json('{"a": 1}') and not is_json("{oops") and not is_json("42")


def answers(*rows: tuple[str, str, bool]) -> list[Answer]:
    return [Answer(prompt="p", prediction=p, reference=r, stopped=s) for p, r, s in rows]


def test_generation_metrics_count_json_only_where_the_reference_is_json():
    metrics = answer_metrics(answers(('{"age": 3}', '{"age": 3}', True), ("{broken", '{"age": 4}', False),
                                     ("77", "77", True)))
    assert metrics["exact_match"] == round(2 / 3, 4)
    assert metrics["json_valid"] == 0.5 and metrics["stop_rate"] == round(2 / 3, 4)


def test_every_metric_of_the_table_is_scored_in_table_order():
    scored = score(2.0, answers(("a b", "a b", True)))
    assert list(scored) == [m.name for m in METRICS]
    assert scored["eval_loss"] == 2.0 and scored["perplexity"] == round(2.718281828 ** 2, 3)
    assert scored["exact_match"] == 1.0 and scored["json_valid"] is None  # no JSON reference to count
    assert score(2.0, [])["rouge_l"] is None  # an empty sample scores no answer metric


def test_a_metric_added_to_the_table_shows_in_the_scores(monkeypatch):
    from schemas import metrics

    length = metrics.Metric("answer_chars", "characters per answer", promotable=False,
                            of_answer=lambda a: float(len(a.prediction)))
    monkeypatch.setattr(metrics, "METRICS", (*metrics.METRICS, length))
    monkeypatch.setattr(metrics, "NAMES", (*metrics.NAMES, "answer_chars"))
    assert metrics.score(1.0, answers(("abcd", "x", True), ("ab", "y", True)))["answer_chars"] == 3.0


def test_sample_is_fixed_by_seed_and_independent_of_row_order():
    answer = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    rows = [{"id": f"{i:03d}", "messages": answer} for i in range(50)]
    assert sample_rows(rows, 10, 0) == sample_rows(list(reversed(rows)), 10, 0)
    assert sample_rows(rows, 10, 0) != sample_rows(rows, 10, 1)
    assert len(sample_rows(rows, 100, 0)) == 50


def test_rows_without_an_answer_to_compare_are_left_out_of_the_sample():
    answer = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    calls_only = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": "[]"}]
    rows = [{"id": "a", "messages": answer}, {"id": "b", "messages": [{"role": "text", "content": "A document."}]},
            {"id": "c", "messages": calls_only}]
    assert [r["id"] for r in sample_rows(rows, 10, 0)] == ["a"]


def test_prompt_is_everything_before_the_last_assistant_turn():
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    prompt, reference = prompt_and_reference(messages)
    assert prompt == messages[:3] and reference == "d"


@pytest.mark.parametrize(
    "scores, promote, why",
    [
        ({"base": {"rouge_l": 0.1}, "candidate": {"rouge_l": 0.5}}, True, "beats the base (no champion yet)"),
        ({"base": {"rouge_l": 0.1}, "candidate": {"rouge_l": 0.5}, "champion": {"rouge_l": 0.6}}, False,
         "not higher than the champion's 0.6"),
        ({"base": {"rouge_l": 0.5}, "candidate": {"rouge_l": 0.505}}, False, "not higher than the base's 0.5 by 0.01"),
    ],
)
def test_decision(scores, promote, why):
    decision = decide(scores, EvalConfig(primary_metric="rouge_l", min_improvement=0.01))
    assert decision.promote is promote and why in decision.reason


def test_decision_on_loss_wants_lower():
    scores = {"base": {"eval_loss": 3.0}, "candidate": {"eval_loss": 2.0}, "champion": {"eval_loss": 2.5}}
    assert decide(scores, EvalConfig(primary_metric="eval_loss", min_improvement=0.1)).promote
    scores["champion"]["eval_loss"] = 1.95
    assert not decide(scores, EvalConfig(primary_metric="eval_loss", min_improvement=0.1)).promote


def test_batched_greedy_generation_equals_one_by_one(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.engines.chat_format import end_of_turn_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompts = [[{"role": "user", "content": text}] for text in
               ("What is 2 + 2?", "Convert the quantity to metres.\n3.5 km", "hi", "Extract the city as JSON: Ana lives in Porto.")]
    eot = end_of_turn_ids(tokenizer)
    batched = generate(model, tokenizer, prompts, 24, 4, eot)
    single = [generate(model, tokenizer, [p], 24, 1, eot)[0] for p in prompts]
    assert batched == single
    # batches of prompts sorted by length, across batch boundaries: the answers still in the prompts' order
    assert generate(model, tokenizer, prompts, 24, 3, eot) == single
    assert len(set(single)) == len(single)  # distinct answers, so a reordering would show
    assert tokenizer.pad_token_id not in eot  # left padding with a distinct pad token


def test_generation_halves_its_batch_when_the_gpu_runs_out_of_memory(tiny_model, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.engines.chat_format import end_of_turn_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompts = [[{"role": "user", "content": f"What is {n} + {n}?"}] for n in range(7)]
    eot = end_of_turn_ids(tokenizer)
    expected = generate(model, tokenizer, prompts, 12, 1, eot)
    real, sizes = model.generate, []

    def generate_in_2_at_most(**kwargs):  # a GPU whose memory holds the KV cache of 2 prompts at once
        sizes.append(kwargs["input_ids"].shape[0])
        if sizes[-1] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(**kwargs)

    model.generate = generate_in_2_at_most
    assert generate(model, tokenizer, prompts, 12, 8, eot) == expected  # every prompt, in order, the same answers
    assert sizes == [7, 4, 2, 2, 2, 1]  # 8 -> 4 -> 2, then the rest in twos
    assert "out of GPU memory with 7 prompts at once; 4 from now on" in capsys.readouterr().err


def test_rouge_l_scores_chinese_and_japanese_answers():
    assert rouge_l("今天天气很好", "今天天气很好") == 1.0  # rouge_score's own tokenizer scores this 0
    assert rouge_l("東京は日本の首都です", "東京は日本の首都です") == 1.0
    assert 0 < rouge_l("今天下雨", "今天天气很好") < 1
    assert rouge_l("The Cat, sat!", "the cat sat") == 1.0 and rouge_l("dog", "the cat sat") == 0.0


def test_the_evaluation_samples_table_has_a_row_per_sampled_prompt_and_a_column_per_model():
    from tasks.evaluate import evaluation_samples

    def answers(*predictions):
        return [Answer(prompt=f"q{i}", reference=f"r{i}", prediction=p, stopped=True) for i, p in enumerate(predictions)]

    rows = evaluation_samples({"base": answers("a", "b"), "candidate": answers("r0", "c"), "champion": answers("x", "r1")})
    assert rows == [{"prompt": "q0", "reference": "r0", "base": "a", "candidate": "r0", "champion": "x"},
                    {"prompt": "q1", "reference": "r1", "base": "b", "candidate": "c", "champion": "r1"}]
