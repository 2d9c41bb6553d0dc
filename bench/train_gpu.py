"""GPU training throughput: sftflow's training path against the usual recipes, on one H200.

Run on the GPU machine (see ../shared/gpu/README.md), from the project root:

    source .gpu/on-device.sh && source bench/gpu_env.sh
    python bench/train_gpu.py --shape 1b --data .gpu/alpaca_en_demo.json --out $OUT
    python bench/train_gpu.py --shape 8b --recipes sftflow-unsloth-packed,dense --steps 20 ...

No weights can be downloaded there, so it builds a random-weight model of the real shape and vocabulary
size on the GPU (`--shape`: Llama 1b/8b, qwen2.5-1.5b, gemma2-2b, mistral-7b; throughput and memory do
not depend on the weights' values) and a SentencePiece tokenizer (8k vocabulary, Llama-3 chat template)
trained on the data file. The data is the Alpaca demo file,
repeated `--repeat` times, tokenized once with sftflow's own code (chat template, response-only
labels) and given to every recipe, so they all see the same tokens:

- sftflow-unsloth-packed / sftflow-hf-packed: the project's training process (`tasks.processes.trainer`), packing on,
  `--packed-batch` sequences of 2048 tokens per step (`sftflow-unsloth-packed@32`: 32 of them);
- sftflow-unsloth-unpacked: the same, packing off (its loss is the reference for the packed run);
- ref-hf-padded: plain transformers + peft + bitsandbytes 4-bit + trl SFTTrainer, batch 8, padded;
- ref-unsloth-notebook: Unsloth's notebook recipe (FastLanguageModel + SFTTrainer, batch 8, no packing);
- dense / dense@N: a bare ceiling, random tokens at seq 2048 x batch 4 (or N, as many tokens a step as
  sftflow-unsloth-packed@N), no padding, no masking, Unsloth model, fp32 AdamW, no logging;
- dense-worker@N: the honest ceiling: the project's worker (same trainer, 8-bit optimizer, logging and
  callbacks as sftflow-unsloth-packed@N) on N rows of 2048 random tokens a step, every token trained;
- packing-parity / packing-parity-hf: the packed attention path checked on the GPU on the unsloth (or hf)
  engine's model (kernel against per-document SDPA; the same rows packed, padded and one by one) and
  timed against Unsloth's own packed path.

SFTFLOW_BENCH_TRAIN='{"dataloader_workers": 2, ...}' (JSON) sets more `train.*` fields of the
sftflow-* recipes, for comparing options on the same data in one call.

Each recipe runs in its own process (peak memory is per recipe) and prints one JSON line:
{"bench": "train_gpu", "shape", "recipe", "trained_tokens_per_s", "non_pad_tokens_per_s",
"peak_gib", "loss_first", "loss_last", "steps", ...}; all lines also go to OUT/train_gpu_<shape>.jsonl.

Where a step's time goes: `--profile sftflow-unsloth-packed@32,dense` runs those recipes as usual, then
profiles a few more steps with torch.profiler (bench/profile_step.py): wall time per step against
the GPU's busy time, the idle gap split over the phases of the step, host syncs and copies per step,
top CUDA and CPU ops, and the Python call sites of the syncs (OUT/profile_<model>_<recipe>.json, .txt).

Several GPUs (data-parallel, as `train.num_gpus` runs it: torchrun, one rank per GPU):

    python bench/train_gpu.py --shape 8b,1b --gpus 1,2 --steps 12 --data .gpu/alpaca_en_demo.json --out $OUT

runs the project's path (sftflow-unsloth-packed; sftflow-hf-packed when that fails) on 1 and on 2 GPUs
with the same global batch: N GPUs accumulate max(gpus)/N micro-batches, so every run takes the same
rows in each optimizer step. Each run prints a line with "gpus", trained tokens/s in all and per GPU
(over the steps after --warmup-steps), each rank's peak memory and the global batch; then per shape
{"bench": "train_gpu_scaling", "shape", "recipe", "efficiency" (tokens/s on N / (N x tokens/s on 1),
for the largest N), "loss_rel_diff" (mean loss of the last 5 steps, N GPUs against 1), ...}.
`--budget-s` skips the runs that would start after that many seconds, so partial results still come back.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# shape -> (transformers class prefix, config of the real checkpoint's shape and vocabulary size)
SHAPES = {
    "1b": ("Llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0)),
    "8b": ("Llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0)),
    "qwen2.5-1.5b": ("Qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                   tie_word_embeddings=True, rope_theta=1000000.0)),
    "gemma2-2b": ("Gemma2", dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                                 num_key_value_heads=4, head_dim=256, vocab_size=256000, tie_word_embeddings=True,
                                 attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096,
                                 query_pre_attn_scalar=256, rope_theta=10000.0)),
    "mistral-7b": ("Mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=32768,
                                   tie_word_embeddings=False, sliding_window=None, rope_theta=1000000.0)),
}
ALL_RECIPES = ["sftflow-unsloth-packed", "sftflow-unsloth-unpacked", "ref-unsloth-notebook", "ref-hf-padded",
               "sftflow-hf-packed", "dense", "dense-worker", "packing-parity", "packing-parity-hf"]
PROFILE_STEPS = 5  # --profile: 3 steps timed by torch.profiler, one plain, one with Python stacks (sync call sites)


# ------------------------------------------------------------------------------------------ setup


def build_model(shape: str, work: Path, data: Path) -> Path:
    """A random-weight model of the family and shape (real vocabulary size) + a tokenizer, under work/<shape>."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    from tasks.base_model import train_tokenizer

    family, dims = SHAPES[shape]
    target = work / (f"llama-{shape}" if family == "Llama" else shape)
    if (target / "config.json").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    rows = json.loads(data.read_text())
    corpus = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in rows]
    train_tokenizer(corpus, target, vocab_size=8192)
    tokenizer = AutoTokenizer.from_pretrained(target)
    config = getattr(transformers, f"{family}Config")(
        **dims, max_position_embeddings=8192, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = getattr(transformers, f"{family}ForCausalLM")(config).to(torch.bfloat16)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    del model
    torch.cuda.empty_cache()
    return target


def build_tokenized(model_dir: Path, data: Path, repeat: int, work: Path) -> Path:
    """The Alpaca rows x repeat, tokenized by sftflow (chat template, response-only labels)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from schemas.tables import CANONICAL_SCHEMA
    from tasks.ingest.formats import normalize_record
    from tasks.tokenize import tokenize_table

    out = work / f"tokenized-{model_dir.name}-x{repeat}"
    if (out / "train.parquet").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for copy in range(repeat):
        for i, record in enumerate(json.loads(data.read_text())):
            row = normalize_record(record, "alpaca")
            rows.append({"id": f"{copy:02d}{row.id[2:]}", "messages": [{"role": r, "content": c} for r, c, *_ in row.messages],
                         "tools": None, "source_drop": "bench", "source_file": str(data), "source_row": i + 1,
                         "source_format": "alpaca"})
    table, _, found = tokenize_table(tokenizer, pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA), 2048)
    pq.write_table(table, out / "train.parquet")
    pq.write_table(table.slice(0, 64), out / "eval.parquet")
    lengths = [len(x) for x in table.column("input_ids").to_pylist()]
    (out / "stats.json").write_text(json.dumps({"rows": table.num_rows, "mean_tokens": sum(lengths) / len(lengths),
                                                "max_tokens": max(lengths), "truncated": found["truncated"]}))
    return out


# ---------------------------------------------------------------------------------------- recipes


def run_sftflow(model_dir: Path, tokenized: Path, engine: str, packing: bool, batch: int, steps: int,
                work: Path, name: str, gpus: int = 1, accumulation: int = 1, warmup_steps: int = 1,
                profile: Path | None = None) -> dict:
    """The project's own training worker, exactly as the train task launches it (under torchrun on
    `gpus` > 1 GPUs, with the train task's environment). With `profile` (a path prefix), one GPU:
    bench/profile_step.py starts the same worker and profiles PROFILE_STEPS more steps after `steps`
    (left out of the timed window and the losses), writing its summary to <profile>.json and .txt."""
    from foundation.artifacts import WorkerSpec
    from schemas.config import RunConfig
    from tasks.train import DATA_PARALLEL_ENV, worker_command

    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: a checkpoint left there would be resumed
    (run_dir / "tokenized").mkdir(parents=True, exist_ok=True)
    for split in ("train", "eval"):
        target = run_dir / "tokenized" / f"{split}.parquet"
        target.unlink(missing_ok=True)
        target.symlink_to(tokenized / f"{split}.parquet")
    config = RunConfig.model_validate({
        "name": "bench",
        "model": {"name": str(model_dir), "load_in_4bit": True, "dtype": "bfloat16"},
        "lora": {"r": 16, "alpha": 16},
        "train": {"engine": engine, "max_seq_length": 2048, "packing": packing, "batch_size": batch,
                  "gradient_accumulation_steps": accumulation, "num_gpus": gpus,
                  "max_steps": steps + (PROFILE_STEPS if profile else 0),
                  "learning_rate": 2e-4, "optim": "adamw_8bit", "logging_steps": 1,
                  "save_steps": 100000, "report_to": [], "warmup_steps": 0,
                  **json.loads(os.environ.get("SFTFLOW_BENCH_TRAIN", "{}"))},
    })
    spec = run_dir / "worker_spec.json"
    WorkerSpec(run_dir=str(run_dir), model_path=str(model_dir), engine=engine,
               config=config.model_dump(mode="json")).write(spec)
    started = time.monotonic()
    env = {**os.environ, **(DATA_PARALLEL_ENV if gpus > 1 else {})}
    command = worker_command(spec, gpus)
    if profile:  # the same worker plus the profiling callback: steps + 1 .. + 3 profiled, + 5 sync call sites
        command = [sys.executable, str(ROOT / "bench" / "profile_step.py"), str(spec), str(profile), str(steps + 1),
                   str(PROFILE_STEPS - 2)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]  # the worker's stdout is events only
    end = next((e for e in events if e["event"] == "end"), None)
    if proc.returncode != 0 or end is None:
        refused = [e["message"] for e in events if e["event"] == "error"]  # the worker's one-line error, if any
        raise RuntimeError(f"worker failed ({proc.returncode}): {' '.join(refused)}\n{proc.stderr[-3000:]}")
    logs = [e for e in events if e["event"] == "log" and e["step"] <= steps]  # the profiled steps are not timed
    if len(logs) < 2:
        raise RuntimeError(f"worker logged {len(logs)} steps; end={end}\nstdout tail:\n{proc.stdout[-1500:]}"
                           f"\nstderr tail:\n{proc.stderr[-1500:]}")
    # throughput over the steps after the warm-up ones (compilation, allocator, NCCL set-up)
    first, last = logs[min(warmup_steps, len(logs) - 2)], logs[-1]
    window_s = last["elapsed_s"] - first["elapsed_s"]
    window_tokens = last["trained_tokens"] - first["trained_tokens"]
    return {
        "gpus": end.get("world_size", 1),
        "gradient_accumulation_steps": end.get("gradient_accumulation_steps"),
        "global_batch_size": end.get("global_batch_size"),
        "trained_tokens_per_s": round(window_tokens / window_s, 1),
        "trained_tokens_per_s_per_gpu": round(window_tokens / window_s / end.get("world_size", 1), 1),
        "timed_steps": f"{first['step']}-{last['step']}",
        "step_s": round(window_s / max(1, last["step"] - first["step"]), 4),
        "peak_gib_per_gpu": end.get("peak_mem_gib_per_rank"),
        "loss_last5_mean": round(sum(e["loss"] for e in logs[-5:]) / len(logs[-5:]), 5),
        "trained_tokens_per_s_whole_run": round(end["trained_tokens"] / end["train_runtime"], 1),
        "non_pad_tokens_per_s_whole_run": round(end["non_pad_tokens"] / end["train_runtime"], 1),
        "trained_share_of_non_pad": round(end["trained_tokens"] / max(1, end["non_pad_tokens"]), 4),
        "peak_gib": end["peak_mem_gib"],
        "loss_first": logs[0]["loss"],
        "loss_last": logs[-1]["loss"],
        "loss_mean": round(sum(e["loss"] for e in logs) / len(logs), 4),
        "steps": end["global_step"],
        "tokens_per_step": batch * 2048 * accumulation * gpus if packing else None,
        "attention_calls": end.get("attention_calls"),
        "profile": _profile_line(profile) if profile else None,
        "unsloth_block_compile": [line[:200] for line in proc.stderr.splitlines()
                                  if "block compile failed" in line or "compiling each transformer block" in line][:5],
        "wall_s": round(time.monotonic() - started, 1),
    }


def _profile_line(prefix: Path) -> dict:
    """The profile's headline figures for the JSON line (the whole summary is in prefix.json / .txt)."""
    path = prefix.with_suffix(".json")
    if not path.exists():
        return {"error": f"no {path.name}: see the recipe's .err"}
    summary = json.loads(path.read_text())
    timing = summary.get("timing", {})
    line = {k: timing.get(k) for k in ("wall_ms_per_step", "gpu_busy_ms_per_step", "gpu_idle_ms_per_step",
                                       "gpu_busy_share", "kernel_ms_per_step", "host_calls_per_step",
                                       "host_blocked_ms_per_step")}
    line["gpu_idle_ms_by_phase"] = {k: v["gpu_idle_ms"] for k, v in timing.get("phases", {}).items()}
    line["sync_sites"] = summary.get("sync_sites", [])[:6]
    line["files"] = [prefix.with_suffix(".json").name, prefix.with_suffix(".txt").name]
    return line


class CountingCollator:
    """Wraps a collator to count the tokens that carry a label (the ones the model learns) and the tokens
    that are not padding (the ones the model computes on usefully): the plain recipes' token counts."""

    def __init__(self, inner):
        self.inner = inner
        self.trained_tokens = 0
        self.non_pad_tokens = 0

    def __call__(self, examples):
        batch = self.inner(examples)
        self.trained_tokens += int((batch["labels"] != -100).sum())
        mask = batch.get("attention_mask")
        self.non_pad_tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return batch


def _plain_trainer(model, tokenizer, tokenized: Path, batch: int, steps: int, work: Path, unsloth: bool):
    import datasets
    from trl import SFTConfig, SFTTrainer

    rows = datasets.Dataset.from_parquet(str(tokenized / "train.parquet")).remove_columns("id")
    args = SFTConfig(output_dir=str(work / "ref-out"), per_device_train_batch_size=batch, max_steps=steps,
                     learning_rate=2e-4, optim="adamw_8bit", logging_steps=1, save_strategy="no", report_to="none",
                     bf16=True, max_length=2048, packing=False, disable_tqdm=True, dataset_num_proc=None,
                     gradient_checkpointing=not unsloth, seed=42)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    return trainer, counter


def _timed_train(trainer, counter) -> dict:
    import torch
    from transformers import TrainerCallback

    marks = []

    class Mark(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                torch.cuda.synchronize()
                marks.append((time.monotonic(), counter.trained_tokens, counter.non_pad_tokens, logs["loss"]))

    trainer.add_callback(Mark())
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    (t0, tr0, np0, _), (t1, tr1, np1, _) = marks[1], marks[-1]
    return {
        "trained_tokens_per_s": round((tr1 - tr0) / (t1 - t0), 1),
        "non_pad_tokens_per_s": round((np1 - np0) / (t1 - t0), 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "loss_first": marks[0][3],
        "loss_last": marks[-1][3],
        "loss_mean": round(sum(m[3] for m in marks) / len(marks), 4),
        "steps": len(marks),
    }


def run_ref_hf(model_dir: Path, tokenized: Path, steps: int, work: Path) -> dict:
    """transformers + peft + bitsandbytes nf4 + trl SFTTrainer, batch 8, padded, sdpa, checkpointing."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa", device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer, counter = _plain_trainer(model, tokenizer, tokenized, 8, steps, work, unsloth=False)
    return _timed_train(trainer, counter)


def run_ref_unsloth(model_dir: Path, tokenized: Path, steps: int, work: Path) -> dict:
    """Unsloth's notebook recipe: FastLanguageModel 4-bit, get_peft_model, SFTTrainer batch 8, packing off."""
    import unsloth  # noqa: F401
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(model_dir), max_seq_length=2048,
                                                         load_in_4bit=True, dtype=None)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"],
                                             use_gradient_checkpointing="unsloth", random_state=3407)
    trainer, counter = _plain_trainer(model, tokenizer, tokenized, 8, steps, work, unsloth=True)
    return _timed_train(trainer, counter)


def run_dense(model_dir: Path, steps: int, profile: Path | None = None, batch: int = 4) -> dict:
    """The ceiling: random tokens, seq 2048 x `batch` (dense@N: N rows, as many tokens a step as the packed
    recipe @N), every token trained, Unsloth QLoRA. With `profile`
    (a path prefix), 3 more steps under torch.profiler, as bench/profile_step.py profiles the worker's."""
    import unsloth  # noqa: F401
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(model_name=str(model_dir), max_seq_length=2048, load_in_4bit=True,
                                                 dtype=None)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"],
                                             use_gradient_checkpointing="unsloth", random_state=3407)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ids = torch.randint(0, 8192, (batch, 2048), device="cuda")
    losses, torch_start = [], None
    torch.cuda.reset_peak_memory_stats()
    for step in range(steps):
        if step == 3:
            torch.cuda.synchronize()
            torch_start = time.monotonic()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    torch.cuda.synchronize()
    seconds = time.monotonic() - torch_start
    rate = batch * 2048 * (steps - 3) / seconds
    result = {"trained_tokens_per_s": round(rate, 1), "non_pad_tokens_per_s": round(rate, 1),
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3), "loss_first": losses[0],
              "loss_last": losses[-1], "steps": steps, "step_s": round(seconds / (steps - 3), 4),
              "tokens_per_step": batch * 2048}
    if profile:
        from bench.profile_step import StepProfiler

        profiler = StepProfiler(0, 3, profile)
        profiler.start()
        for _ in range(3):
            profiler.enter("forward")
            loss = model(input_ids=ids, labels=ids).loss
            profiler.enter("backward")
            loss.backward()
            profiler.enter("optimizer")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            profiler.enter("log")
            loss.item()
        profiler.stop()
        result["profile"] = _profile_line(profile)
    return result


def build_dense_tokenized(model_dir: Path, work: Path, rows: int = 512, length: int = 2048) -> Path:
    """Rows of `length` random tokens of the model's vocabulary, every token labelled: the ceiling's data in
    the shape the worker reads (tokenized parquet), so `dense-worker@N` runs the same trainer, optimizer,
    logging cadence and collator as the packed recipe, on rows that need no padding and no packing."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.tokenize import TOKENIZED_SCHEMA

    out = work / f"dense-{model_dir.name}-{length}"
    if (out / "train.parquet").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    ids = np.random.default_rng(0).integers(0, min(vocab, 8192), size=(rows, length), dtype=np.int32).tolist()
    table = pa.table({"id": [f"{i:064x}" for i in range(rows)], "input_ids": ids, "labels": ids}, schema=TOKENIZED_SCHEMA)
    pq.write_table(table, out / "train.parquet")
    pq.write_table(table.slice(0, 8), out / "eval.parquet")
    return out


def _engine_model(model_dir: Path, packing: bool, engine: str = "unsloth"):
    """The model exactly as the worker trains it: the engine's load (QLoRA r=16, packed route)."""
    from schemas.config import RunConfig
    from tasks.engines import load_engine

    config = RunConfig.model_validate({"name": "bench", "model": {"name": str(model_dir), "load_in_4bit": True},
                                       "train": {"engine": engine, "packing": packing, "max_steps": 1}})
    return load_engine(engine).load(str(model_dir), config)


def run_packing_parity(model_dir: Path, tokenized: Path, engine: str = "unsloth") -> dict:
    """Is the packed path exact, and what does it save? On the engine's own model (`packing-parity`:
    unsloth, `packing-parity-hf`: the hf engine, whose packed attention has no Unsloth path to compare):

    - kernel: varlen_causal_attention on CUDA (torch's varlen flash kernel) against each document
      alone through SDPA (the CPU path the tests check), outputs and gradients, GQA 32/8 heads;
    - rows: the same 8 rows packed into one sequence (trl's padding-free collator), padded into one
      batch of 8 (the unpacked run), and one by one: summed label loss of each;
    - speed: forward + backward of one packed micro-batch of 16k and of 64k tokens through the packed
      route, through Unsloth's own packed path, and the same tokens as dense rows of 2048."""
    model, tokenizer = _engine_model(model_dir, packing=True, engine=engine)  # imports unsloth first
    import pyarrow.parquet as pq
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from tasks.engines import load_engine, packed_attention

    class _NoDispatch:  # the hf engine: attention goes through transformers' registry, nothing to swap
        _run_attention = None

    if engine == "unsloth":
        from unsloth.utils import attention_dispatch
    else:
        attention_dispatch = _NoDispatch()
    out: dict = {"engine": engine, "torch": torch.__version__, "varlen_params": sorted(packed_attention._VARLEN_PARAMS),
                 "routed": getattr(attention_dispatch._run_attention, "sftflow_packed", engine == "hf"),
                 "attn_implementation": getattr(model.config, "_attn_implementation", None),
                 # not None: the worker refuses packing for this model (the packed sums below show why)
                 "packing_problem": load_engine(engine).packing_problem(model)}

    # kernel
    torch.manual_seed(0)
    lengths = [300, 17, 1024, 5, 611, 91]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), device="cuda", dtype=torch.int32)
    total = sum(lengths)
    q = torch.randn(total, 32, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grads = []
    for path in ("varlen", "per_document"):
        before = packed_attention.CALLS[path]
        if path == "varlen":
            o = packed_attention.varlen_causal_attention(q, k, v, cu, max(lengths))
        else:
            o = packed_attention._per_document(q, k, v, cu, None, 0.0)
        (o.float() * torch.linspace(-1, 1, o.numel(), device="cuda").view_as(o)).sum().backward()
        grads.append((o.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()))
        q.grad = k.grad = v.grad = None
        if path == "varlen":
            out["kernel_took_varlen"] = packed_attention.CALLS[path] == before + 1
    out["kernel_max_abs_diff"] = {name: round(float((a - b).abs().max()), 5)
                                  for name, a, b in zip(("out", "dq", "dk", "dv"), *grads)}
    out["kernel_max_abs"] = round(float(grads[1][0].abs().max()), 3)

    # rows
    rows = pq.read_table(tokenized / "train.parquet").to_pylist()
    examples = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    free = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)

    def label_loss_sum(logits, labels):
        return torch.nn.functional.cross_entropy(logits[..., :-1, :].flatten(0, -2).float(),
                                                 labels[..., 1:].flatten(), reduction="sum", ignore_index=-100).item()

    model.eval()
    with torch.no_grad():
        calls = dict(packed_attention.CALLS)
        batch = {k: t.cuda() for k, t in free(examples[:8]).items()}
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        out["packed_loss_sum"] = round(label_loss_sum(logits, batch["labels"]), 4)
        out["packed_forward_calls"] = {p: packed_attention.CALLS[p] - calls.get(p, 0) for p in packed_attention.CALLS}
        batch = {k: t.cuda() for k, t in padded(examples[:8]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        out["unpacked_batch_loss_sum"] = round(label_loss_sum(logits, batch["labels"]), 4)
        single = 0.0
        for e in examples[:8]:
            ids, labels = torch.tensor([e["input_ids"]], device="cuda"), torch.tensor([e["labels"]], device="cuda")
            single += label_loss_sum(model(input_ids=ids, use_cache=False).logits, labels)
        out["separate_loss_sum"] = round(single, 4)
    out["relative_difference_packed_vs_separate"] = round(abs(out["packed_loss_sum"] - single) / single, 7)
    out["relative_difference_packed_vs_unpacked_batch"] = round(
        abs(out["packed_loss_sum"] - out["unpacked_batch_loss_sum"]) / out["unpacked_batch_loss_sum"], 7)

    # the same in training mode and speed: forward + backward of one packed micro-batch through each
    # path; dense_rows = the same number of tokens as unmasked rows of 2048 (the ceiling's shape,
    # for which Unsloth compiles its decoder blocks)
    model.train()
    routed = attention_dispatch._run_attention
    modes = ({"route": routed, "unsloth_own": routed.unsloth_original, "dense_rows": routed.unsloth_original}
             if engine == "unsloth" else {"route": None, "dense_rows": None})
    with torch.no_grad():
        batch = {k: t.cuda() for k, t in free(examples[:8]).items()}
        n_labels = int((batch["labels"][0, 1:] != -100).sum())
        for name in [m for m in modes if m != "dense_rows"]:
            attention_dispatch._run_attention = modes[name]
            out[f"train_mode_packed_loss_sum_{name}"] = round(model(**batch).loss.item() * n_labels, 4)
        attention_dispatch._run_attention = routed
        single = 0.0
        for e in examples[:8]:
            ids, labels = torch.tensor([e["input_ids"]], device="cuda"), torch.tensor([e["labels"]], device="cuda")
            single += model(input_ids=ids, labels=labels).loss.item() * int((labels[0, 1:] != -100).sum())
        out["train_mode_separate_loss_sum"] = round(single, 4)
    timings = {}
    for budget in (16384, 65536):
        chunk, used = [], 0
        for e in examples:
            if used + len(e["input_ids"]) > budget:
                break
            chunk.append(e)
            used += len(e["input_ids"])
        packed_batch = {k: t.cuda() for k, t in free(chunk).items()}
        ids = packed_batch["input_ids"][:, : used // 2048 * 2048].reshape(-1, 2048)
        for name, attention in modes.items():
            attention_dispatch._run_attention = attention
            batch = {"input_ids": ids, "labels": ids} if name == "dense_rows" else packed_batch
            tokens = batch["input_ids"].numel()
            calls = dict(packed_attention.CALLS)
            try:
                for i in range(5):
                    if i == 2:
                        torch.cuda.synchronize()
                        t0 = time.monotonic()
                    model(**batch).loss.backward()
                torch.cuda.synchronize()
                seconds = (time.monotonic() - t0) / 3
                timings[f"{name}_{budget}"] = {"ms": round(seconds * 1000, 1), "tokens_per_s": round(tokens / seconds),
                                                "tokens": tokens, "documents": len(chunk),
                                                "calls": {p: packed_attention.CALLS[p] - calls.get(p, 0)
                                                          for p in packed_attention.CALLS}}
            except Exception as exc:  # one path's failure must not cost the others' figures
                timings[f"{name}_{budget}"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            model.zero_grad(set_to_none=True)
    attention_dispatch._run_attention = routed
    out["forward_backward"] = timings
    out["attention_calls_total"] = dict(packed_attention.CALLS)
    return out


def file_safe(name: str) -> str:
    """A recipe's name as a file name the device tool brings back (letters, digits, '.', '_', '-')."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)


def run_recipe(args) -> dict:
    import faulthandler

    # a recipe that does not finish in time says where it was: every thread's stack on stderr (its .err file)
    faulthandler.dump_traceback_later(max(30, args.recipe_timeout_s - 20), repeat=True)
    work, model_dir, tokenized = Path(args.work), Path(args.model_dir), Path(args.tokenized)
    name = args.run_recipe
    base, _, batch = name.partition("@")  # e.g. sftflow-unsloth-packed@32: 32 packed sequences per step
    if base.startswith("packing-parity"):
        # numerics in eager mode: Unsloth compiles some families' decoder blocks (Qwen2's) as one region, and
        # every row length this recipe feeds one by one recompiles them (over 150 s on the Qwen2.5-1.5B shape)
        os.environ["TORCHDYNAMO_DISABLE"] = "1"
    packed_batch = int(batch) if batch else args.packed_batch
    profile = None
    if name in (args.profile or "").split(",") and args.run_gpus == 1:  # sftflow-*-packed recipes and dense
        profile = Path(args.out) / f"profile_{model_dir.name}_{file_safe(name)}"
    if base in ("sftflow-unsloth-packed", "sftflow-hf-packed"):
        engine = "unsloth" if base == "sftflow-unsloth-packed" else "hf"
        return run_sftflow(model_dir, tokenized, engine, True, packed_batch, args.steps, work,
                           f"{name}-{args.run_gpus}gpu", gpus=args.run_gpus, accumulation=args.accumulation,
                           warmup_steps=args.warmup_steps, profile=profile)
    if name == "sftflow-unsloth-unpacked":
        return run_sftflow(model_dir, tokenized, "unsloth", False, 8, args.steps, work, name)
    if name == "ref-hf-padded":
        return run_ref_hf(model_dir, tokenized, args.steps, work)
    if name == "ref-unsloth-notebook":
        return run_ref_unsloth(model_dir, tokenized, args.steps, work)
    if base == "dense":
        return run_dense(model_dir, min(args.steps, 20), profile, batch=int(batch) if batch else 4)
    if base == "dense-worker":  # the ceiling through the project's own worker: same trainer, optimizer, logging
        dense = build_dense_tokenized(model_dir, work)
        result = run_sftflow(model_dir, dense, "unsloth", False, packed_batch, args.steps, work, f"{name}-dense",
                             warmup_steps=args.warmup_steps)
        return {**result, "tokens_per_step": packed_batch * 2048}
    if name in ("packing-parity", "packing-parity-hf"):
        return run_packing_parity(model_dir, tokenized, engine="hf" if name.endswith("-hf") else "unsloth")
    raise SystemExit(f"unknown recipe {name}")


def parse_gpus(text: str | None) -> list[int]:
    """`--gpus 1,2` -> [1, 2]: GPU counts, ascending, starting at 1 (the baseline the others scale against)."""
    if not text:
        return []
    counts = sorted({int(n) for n in text.split(",") if n.strip()})
    if not counts or counts[0] != 1:
        raise SystemExit(f"--gpus {text}: list GPU counts starting with 1, the baseline, e.g. --gpus 1,2")
    return counts


def scaling_summary(shape: str, recipe: str, runs: dict[int, dict]) -> dict:
    """The train_gpu_scaling line: efficiency of each GPU count against one GPU, and how far the losses
    (same global batch, same steps) are from the one-GPU run's."""
    line: dict = {"bench": "train_gpu_scaling", "shape": shape, "recipe": recipe, "gpus": sorted(runs)}
    ok = {n: r for n, r in runs.items() if "error" not in r and "skipped" not in r}
    if 1 not in ok or len(ok) < 2:
        line["error"] = "no one-GPU run and another to compare" + "".join(
            f"; {n} GPU(s): {(r.get('error') or r.get('skipped'))[-300:]}" for n, r in runs.items() if n not in ok)
        return line
    base = ok[1]
    line["trained_tokens_per_s"] = {n: r["trained_tokens_per_s"] for n, r in ok.items()}
    line["peak_gib_per_gpu"] = {n: r.get("peak_gib_per_gpu") for n, r in ok.items()}
    line["global_batch_size"] = {n: r.get("global_batch_size") for n, r in ok.items()}
    line["loss_last5_mean"] = {n: r["loss_last5_mean"] for n, r in ok.items()}
    line["efficiency_by_gpus"] = {n: round(r["trained_tokens_per_s"] / (n * base["trained_tokens_per_s"]), 4)
                                  for n, r in ok.items() if n > 1}
    line["loss_rel_diff_by_gpus"] = {n: round(abs(r["loss_last5_mean"] - base["loss_last5_mean"])
                                              / base["loss_last5_mean"], 5) for n, r in ok.items() if n > 1}
    top = max(ok)
    line["efficiency"] = line["efficiency_by_gpus"][top]
    line["loss_rel_diff"] = line["loss_rel_diff_by_gpus"][top]
    line["same_global_batch"] = len(set(line["global_batch_size"].values())) == 1
    return line


def run_child(recipe: str, model_dir: Path, tokenized: Path, args, gpus: int = 1, accumulation: int = 1) -> dict:
    """One recipe in its own process (its peak memory alone); its result, or {"error": ...}."""
    suffix = f"-{gpus}gpu-{model_dir.name}" if args.gpus else f"-{model_dir.name}"  # one .err per run
    err_file = Path(args.out) / f"{file_safe(recipe)}{suffix}.err"
    try:
        with open(err_file, "w") as err:  # a file, not a pipe: all of it survives a timeout's kill
            proc = subprocess.run(
            [sys.executable, __file__, "--run-recipe", recipe, "--model-dir", str(model_dir), "--tokenized",
             str(tokenized), "--work", str(args.work), "--steps", str(args.steps), "--packed-batch",
             str(args.packed_batch), "--run-gpus", str(gpus), "--accumulation", str(accumulation),
             "--warmup-steps", str(args.warmup_steps), "--profile", args.profile or "", "--out", str(args.out),
             "--recipe-timeout-s", str(args.recipe_timeout_s)],
            stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, timeout=args.recipe_timeout_s,
            )
        result = next((json.loads(l[7:]) for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        return result if result is not None else {"error": err_file.read_text()[-2500:]}
    except subprocess.TimeoutExpired:  # its stacks (faulthandler) are in the .err file
        return {"error": f"did not finish in {args.recipe_timeout_s} s; stacks in {err_file.name}",
                "stderr_tail": err_file.read_text()[-1500:]}
    except Exception:  # a recipe's failure must not cost the others' figures
        return {"error": traceback.format_exc()[-2500:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1b", help=f"one or more of {sorted(SHAPES)}, comma-separated, run in order")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "alpaca_en_demo.json"))
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--packed-batch", type=int, default=8, help="packed sequences of 2048 tokens per step")
    parser.add_argument("--recipes", default=None,
                        help=f"comma-separated; default all ({','.join(ALL_RECIPES)}), with --gpus sftflow-unsloth-packed")
    parser.add_argument("--gpus", default=None,
                        help="data-parallel scaling: GPU counts to compare, e.g. 1,2 (same global batch for each)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="steps left out of the tokens/s window")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no run after this many seconds (the rest are reported as skipped)")
    parser.add_argument("--recipe-timeout-s", type=int, default=900,
                        help="a recipe's process is stopped after this long (its stacks are dumped to its .err first)")
    parser.add_argument("--work", default="/tmp/sftflow-bench")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--run-recipe", help=argparse.SUPPRESS)
    parser.add_argument("--run-gpus", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--accumulation", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--tokenized", help=argparse.SUPPRESS)
    parser.add_argument("--profile", default=None,
                        help="comma-separated recipes to profile with torch.profiler after their timed steps "
                             "(bench/profile_step.py; sftflow-*-packed on one GPU and dense): "
                             "OUT/profile_<model>_<recipe>.json and .txt, headline figures in the recipe's line")
    args = parser.parse_args()

    if args.run_recipe:  # child process: one recipe, one JSON line
        result = run_recipe(args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    shapes = [s for s in args.shape.split(",") if s]
    if unknown := [s for s in shapes if s not in SHAPES]:
        raise SystemExit(f"--shape: unknown {unknown}; choose from {sorted(SHAPES)}")
    gpu_counts = parse_gpus(args.gpus)
    recipes = (args.recipes or ("sftflow-unsloth-packed" if gpu_counts else ",".join(ALL_RECIPES))).split(",")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bench_start = time.monotonic()

    def out_of_time() -> bool:
        return args.budget_s is not None and time.monotonic() - bench_start > args.budget_s

    for shape in shapes:
        if out_of_time():
            print(json.dumps({"bench": "train_gpu", "shape": shape, "skipped": "--budget-s reached"}), flush=True)
            continue
        t0 = time.monotonic()
        model_dir = build_model(shape, work, Path(args.data))
        tokenized = build_tokenized(model_dir, Path(args.data), args.repeat, work)
        stats = json.loads((tokenized / "stats.json").read_text())
        print(f"setup {shape} {time.monotonic() - t0:.0f}s: {stats}", file=sys.stderr, flush=True)
        out = Path(args.out) / f"train_gpu_{shape}.jsonl"

        def report(line: dict) -> None:
            print(json.dumps(line), flush=True)
            with open(out, "a") as fh:
                fh.write(json.dumps(line) + "\n")

        for recipe in recipes:
            runs: dict[int, dict] = {}
            for gpus in gpu_counts or [1]:
                started = time.monotonic()
                line = {"bench": "train_gpu", "shape": shape, "recipe": recipe, "data": stats}
                if out_of_time():
                    result = {"skipped": "--budget-s reached"}
                elif gpu_counts:
                    line["gpus"] = gpus
                    result = run_child(recipe, model_dir, tokenized, args, gpus, accumulation=max(gpu_counts) // gpus)
                else:
                    result = run_child(recipe, model_dir, tokenized, args)
                line.update(result)
                line["recipe_wall_s"] = round(time.monotonic() - started, 1)
                report(line)
                runs[gpus] = result
            if gpu_counts:
                summary = scaling_summary(shape, recipe, runs)
                report(summary)
                if "error" in summary and recipe == "sftflow-unsloth-packed" and "sftflow-hf-packed" not in recipes:
                    recipes.append("sftflow-hf-packed")  # the project's other engine, when Unsloth cannot


if __name__ == "__main__":
    main()
