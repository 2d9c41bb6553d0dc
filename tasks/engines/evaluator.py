"""The evaluation subprocess: `python -m tasks.engines.evaluator RUN_DIR/evaluator_spec.json`.

Scores each model of the spec (base, candidate, champion) one after another on the dataset
version's eval split, freeing each before loading the next, and writes the scores as JSON. Memory
stays within training's: no gradients, batches of `eval.batch_size`.
"""

from __future__ import annotations

import gc
import json
import math
import sys
from pathlib import Path


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from tasks.engines import load_engine

    engine = load_engine(spec["engine"])  # first: unsloth patches transformers on import

    import pyarrow.parquet as pq
    import torch

    from schemas.config import RunConfig
    from foundation.atomic import write_json_atomic
    from tasks.evaluate import generate, generation_metrics, prompt_and_reference, sample_rows, score_loss
    from tasks.tokenize import end_of_turn_ids, tokenize_table

    config = RunConfig.model_validate(spec["config"])
    eval_rows = pq.read_table(Path(spec["dataset_dir"]) / "eval.parquet")
    sample = sample_rows(eval_rows.to_pylist(), config.eval.sample_size, config.eval.seed)
    prompts, references = zip(*(prompt_and_reference(r["messages"]) for r in sample)) if sample else ((), ())
    results = {}
    for name, target in spec["models"].items():
        model, tokenizer = engine.load_for_inference(target["model_path"], target["adapter_dir"], config)
        eot = end_of_turn_ids(tokenizer)
        tokenized, _, _ = tokenize_table(tokenizer, eval_rows, config.train.max_seq_length)
        loss = score_loss(model, tokenized.select(["input_ids", "labels"]).to_pylist(), config.eval.batch_size,
                          tokenizer.pad_token_id)
        answers = generate(model, tokenizer, list(prompts), config.eval.max_new_tokens, config.eval.batch_size, eot)
        rows = [{"prompt": p[-1]["content"], "reference": ref, "prediction": text, "stopped": stopped}
                for p, ref, (text, stopped) in zip(prompts, references, answers)]
        metrics = {"eval_loss": round(loss, 4), "perplexity": round(math.exp(min(loss, 50)), 3),
                   **generation_metrics(rows)}
        results[name] = {"metrics": metrics, "answers": rows, "eval_rows": tokenized.num_rows}
        print(json.dumps({"model": name, **metrics}), flush=True)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    write_json_atomic(Path(spec["out"]), results)


if __name__ == "__main__":
    main(sys.argv[1])
