"""The evaluation process: `python -m tasks.processes.evaluator RUN_DIR/evaluator_spec.json`.

Scores each model of the spec (base, candidate, champion) one after another on the dataset
version's eval split, freeing each before loading the next, and writes `EvalScores`: every metric of
`schemas.metrics` and every sampled answer. Memory stays within training's: no gradients, batches of
`eval.batch_size`.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

from foundation.artifacts import Answer, EvalScores, EvaluatorSpec, ModelScores
from schemas.config import RunConfig


def by_length(lengths: list[int]) -> list[int]:
    """Indices longest first: a batch of neighbours pads little (and the first batch shows the peak memory)."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def score_loss(model, rows: list[dict], batch_size: int, pad_id: int) -> float:
    """Mean loss over every trained (label) token of the rows; batched by length, no grad."""
    import torch

    total, count = 0.0, 0
    device = next(model.parameters()).device
    rows = [rows[i] for i in by_length([len(r["input_ids"]) for r in rows])]
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
             eot_ids: set[int]) -> list[tuple[str, bool, int]]:
    """Greedy answers in the prompts' order: (text, ended with end-of-turn, tokens generated). Batched with
    left padding and attention masks, prompts of similar length together."""
    import torch

    from tasks.engines.chat_format import render

    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    rendered = [render(tokenizer, p, generation_prompt=True) for p in prompts]
    order = by_length([len(ids) for ids in tokenizer(rendered, add_special_tokens=False).input_ids])
    out: dict[int, tuple[str, bool, int]] = {}
    start = 0
    while start < len(order):
        batch = order[start : start + batch_size]
        enc = tokenizer([rendered[i] for i in batch], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(device)
        try:
            with torch.no_grad():
                generated = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=sorted(eot_ids), temperature=None, top_p=None, top_k=None,
                )
        except torch.cuda.OutOfMemoryError:
            # the KV cache of this batch does not fit beside the model: the same prompts in halves (the
            # longest batch comes first, so a smaller size found here serves the rest)
            if batch_size == 1:
                raise
            del enc
            torch.cuda.empty_cache()
            batch_size //= 2
            print(f"generation: out of GPU memory with {len(batch)} prompts at once; {batch_size} from now on",
                  file=sys.stderr, flush=True)
            continue
        start += len(batch)
        for index, row in zip(batch, generated[:, enc["input_ids"].shape[1] :].tolist()):
            stop_at = next((i for i, t in enumerate(row) if t in eot_ids), None)
            tokens = row if stop_at is None else row[:stop_at]
            out[index] = (tokenizer.decode(tokens, skip_special_tokens=True), stop_at is not None,
                          len(row) if stop_at is None else stop_at + 1)
    return [out[i] for i in range(len(prompts))]


def score_model(engine, target, config: RunConfig, eval_rows, prompts, references) -> ModelScores:
    """One model's metrics over the eval split and its answers to the sample's prompts."""
    from schemas.metrics import score
    from tasks.engines.chat_format import end_of_turn_ids
    from tasks.tokenize import tokenize_table

    started = time.monotonic()
    model, tokenizer = engine.load_for_inference(target.model_path, target.adapter_dir, config)
    loaded = time.monotonic()
    tokenized, _, _ = tokenize_table(tokenizer, eval_rows, config.train.max_seq_length)
    loss = score_loss(model, tokenized.select(["input_ids", "labels"]).to_pylist(), config.eval.batch_size,
                      tokenizer.pad_token_id)
    scored = time.monotonic()
    replies = generate(model, tokenizer, list(prompts), config.eval.max_new_tokens,
                       config.eval.generation_batch_size, end_of_turn_ids(tokenizer))
    answers = [Answer(prompt=p[-1]["content"], reference=ref, prediction=text, stopped=stopped)
               for p, ref, (text, stopped, _) in zip(prompts, references, replies)]
    timings = {"load_s": loaded - started, "loss_s": scored - loaded, "generate_s": time.monotonic() - scored}
    return ModelScores(metrics=score(loss, answers), answers=answers, eval_rows=tokenized.num_rows,
                       timings={**{k: round(v, 2) for k, v in timings.items()},
                                "generated_tokens": sum(n for _, _, n in replies)})


def main(spec_path: str) -> None:
    spec = EvaluatorSpec.read(Path(spec_path))
    from tasks.engines import load_engine

    engine = load_engine(spec.engine)  # first: unsloth patches transformers on import

    import pyarrow.parquet as pq
    import torch

    from foundation.stores.datasets import DatasetVersion
    from tasks.evaluate import prompt_and_reference, sample_rows

    config = RunConfig.model_validate(spec.config)
    eval_rows = pq.read_table(DatasetVersion(Path(spec.dataset_dir)).path("eval"))
    sample = sample_rows(eval_rows.to_pylist(), config.eval.sample_size, config.eval.seed)
    prompts, references = zip(*(prompt_and_reference(r["messages"]) for r in sample)) if sample else ((), ())
    results = {}
    for name, target in spec.models.items():
        results[name] = score_model(engine, target, config, eval_rows, prompts, references)
        print(json.dumps({"model": name, **results[name].metrics}), flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    EvalScores(models=results).write(Path(spec.out))


if __name__ == "__main__":
    main(sys.argv[1])
