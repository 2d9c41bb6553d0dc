"""Evaluation at GPU speed: the evaluator's own scoring of one model (load, loss over an eval split, greedy
answers to a sample) against plain `generate`, in one call on one GPU (issue 17).

Run on the GPU machine (see ../shared/gpu/README.md), from the project root:

    source .gpu/on-device.sh && source bench/gpu_env.sh
    python bench/eval_gpu.py --data .gpu/alpaca_en_demo.json --out $OUT [--prompts 512] [--new-tokens 128]

It builds the random-weight Llama-3.2-1B-shaped model of bench/train_gpu.py (cached under --work), makes
canonical rows of the Alpaca demo, and measures, in this process:

- `evaluator`: `tasks.processes.evaluator.score_model` exactly as the evaluation process calls it, with the
  shipped 1B config (flows/configs/llama3_2_1b_qlora.yaml, the unsloth engine) and eval.sample_size = --prompts,
  eval.max_new_tokens = --new-tokens: the model's load, the loss over --eval-rows rows, and the greedy answers
  (eval.generation_batch_size prompts at a time, similar lengths together). Wall time includes the load.
- `plain_generate_batched`: the same loaded model's `generate` on the same prompts in the order given, in
  batches of eval.batch_size (what the evaluator did before), on the first --plain-prompts prompts.
- `plain_generate_single`: `generate` one prompt at a time, on the first --single-prompts prompts.

Random weights rarely pick an end-of-turn token, so nearly every answer runs to --new-tokens; the generated
token counts are what was produced (up to each answer's end-of-turn). Prints one JSON line (also
OUT/eval_gpu.json) with wall times, generated tokens and tokens/s of each, and the evaluator's timings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def canonical_rows(data: Path, count: int):
    """The first `count` Alpaca rows as a canonical table (the dataset version's eval split's schema)."""
    import pyarrow as pa

    from schemas.tables import CANONICAL_SCHEMA
    from tasks.ingest.formats import normalize_record

    rows = []
    records = json.loads(data.read_text())
    for i in range(count):
        record = records[i % len(records)]
        row = normalize_record(record, "alpaca")
        rows.append({"id": f"{i:06d}{row.id[6:]}", "messages": [{"role": r, "content": c} for r, c, *_ in row.messages],
                     "tools": None, "source_drop": "bench", "source_file": str(data), "source_row": i + 1,
                     "source_format": "alpaca"})
    return pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA)


def generated_tokens(replies_ids: list[list[int]], eot_ids: set[int]) -> int:
    return sum(next((i + 1 for i, t in enumerate(row) if t in eot_ids), len(row)) for row in replies_ids)


def plain_generate(model, tokenizer, prompts, new_tokens: int, batch_size: int, eot_ids: set[int]) -> dict:
    """`generate` on the prompts in their order, `batch_size` at a time (left padding): wall and tokens."""
    import torch

    from tasks.engines.chat_format import render

    tokenizer.padding_side = "left"
    torch.cuda.synchronize()
    started, produced = time.monotonic(), 0
    for start in range(0, len(prompts), batch_size):
        rendered = [render(tokenizer, p, generation_prompt=True) for p in prompts[start : start + batch_size]]
        enc = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False).to("cuda")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=sorted(eot_ids), temperature=None, top_p=None, top_k=None)
        produced += generated_tokens(out[:, enc["input_ids"].shape[1] :].tolist(), eot_ids)
    torch.cuda.synchronize()
    wall = time.monotonic() - started
    return {"prompts": len(prompts), "batch_size": batch_size, "wall_s": round(wall, 2),
            "generated_tokens": produced, "generated_tokens_per_s": round(produced / wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="The Alpaca demo file (a JSON array).")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sftflow-eval-bench"))
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--eval-rows", type=int, default=1000, help="Rows of the eval split scored for loss.")
    parser.add_argument("--plain-prompts", type=int, default=128)
    parser.add_argument("--single-prompts", type=int, default=16)
    parser.add_argument("--engine", default="unsloth")
    parser.add_argument("--generation-batch-sizes", default="",
                        help="Comma-separated: also time the evaluator's generation of every prompt at each of these "
                             "batch sizes, on the same loaded model (answers compared with the first size's).")
    parser.add_argument("--skip-plain", action="store_true", help="Leave out the plain `generate` baselines.")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)

    from tasks.engines import load_engine

    engine = load_engine(args.engine)  # first: unsloth patches transformers on import

    from bench.train_gpu import build_model
    from foundation.artifacts import ModelRef
    from schemas.config import load_run_config
    from tasks.engines.chat_format import end_of_turn_ids
    from tasks.evaluate import prompt_and_reference, sample_rows
    from tasks.processes.evaluator import score_model

    t = time.monotonic()
    model_dir = build_model(args.shape, args.work, args.data)
    build_s = time.monotonic() - t
    config = load_run_config(ROOT / "flows/configs/llama3_2_1b_qlora.yaml",
                             [f"model.name={model_dir}", f"eval.sample_size={args.prompts}",
                              f"eval.max_new_tokens={args.new_tokens}"])
    eval_rows = canonical_rows(args.data, args.eval_rows)
    sample = sample_rows(canonical_rows(args.data, max(args.prompts, args.eval_rows)).to_pylist(), args.prompts, 0)
    prompts, references = zip(*(prompt_and_reference(r["messages"]) for r in sample))

    import torch

    torch.cuda.synchronize()
    t = time.monotonic()
    scores = score_model(engine, ModelRef(model_path=str(model_dir), adapter_dir=None), config, eval_rows,
                         prompts, references)
    torch.cuda.synchronize()
    evaluator_wall = time.monotonic() - t

    model, tokenizer = engine.load_for_inference(str(model_dir), None, config)
    eot = end_of_turn_ids(tokenizer)
    user_ids = tokenizer([p[-1]["content"] for p in prompts], add_special_tokens=False).input_ids
    evaluator_tokens = scores.timings["generated_tokens"]
    sizes = {}
    for size in [int(n) for n in args.generation_batch_sizes.split(",") if n]:
        from tasks.processes.evaluator import generate

        torch.cuda.synchronize()
        t = time.monotonic()
        replies = generate(model, tokenizer, list(prompts), args.new_tokens, size, eot)
        torch.cuda.synchronize()
        seconds = time.monotonic() - t
        first = sizes.setdefault("answers", replies)
        tokens = sum(n for _, _, n in replies)
        sizes[str(size)] = {"seconds": round(seconds, 2), "generated_tokens": tokens,
                            "generated_tokens_per_s": round(tokens / seconds, 1),
                            "answers_equal_first_size": sum(a == b for a, b in zip(replies, first)),
                            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        print(json.dumps({"generation_batch_size": size, **sizes[str(size)]}), file=sys.stderr, flush=True)
    sizes.pop("answers", None)
    skip = args.skip_plain
    batched = None if skip else plain_generate(model, tokenizer, list(prompts[: args.plain_prompts]), args.new_tokens,
                                               config.eval.batch_size, eot)
    single = None if skip else plain_generate(model, tokenizer, list(prompts[: args.single_prompts]), args.new_tokens,
                                              1, eot)
    generate_s = scores.timings["generate_s"]
    result = {
        "bench": "eval_gpu", "shape": args.shape, "engine": args.engine, "gpu": torch.cuda.get_device_name(),
        "model_build_s": round(build_s, 1), "prompts": len(prompts), "new_tokens": args.new_tokens,
        "mean_user_tokens": round(sum(len(ids) for ids in user_ids) / len(user_ids), 1),  # before the template
        "evaluator": {"wall_s_with_load": round(evaluator_wall, 2), "timings": scores.timings,
                      "eval_rows": scores.eval_rows, "generation_batch_size": config.eval.generation_batch_size,
                      "generated_tokens": evaluator_tokens,
                      "generated_tokens_per_s": round(evaluator_tokens / generate_s, 1),
                      "stopped": sum(a.stopped for a in scores.answers), "metrics": scores.metrics},
        "plain_generate_batched": batched, "plain_generate_single": single, "generation_batch_sizes": sizes,
    }
    line = json.dumps(result)
    print(line)
    (args.out / "eval_gpu.json").write_text(line + "\n")


if __name__ == "__main__":
    main()
