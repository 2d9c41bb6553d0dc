"""Time `sftflow export` on a model of a real shape (random weights, random LoRA), on this machine.

    .venv/bin/python bench/export.py --shape 1b [--work /tmp/sftflow-export-bench]
    python bench/export.py --shape 1b --data .gpu/alpaca_en_demo.json     # on the GPU machine (bench/gpu_env.sh)
    python bench/export.py --shape 1b --data .gpu/alpaca_en_demo.json --parity-slots 1   # one check at a time
    .venv/bin/python bench/export.py --shape 1b --merge-dtype float16   # export.merge_dtype (default bfloat16)

Builds a random-weight Llama of the shape (bfloat16 safetensors) with the tiny model's tokenizer and
chat template, a LoRA adapter with random (non-zero) weights, a one-drop dataset from the sample
drops, then runs the project's own export (merge, GGUF f16/q8_0/q4_k_m, LoRA GGUF, parity checks
with the control) and prints one JSON line with the timings, file sizes and parity figures.
With --data (the Alpaca demo file; needs a GPU), the model is bench/train_gpu.py's instead: the real vocabulary
size (128,256 for Llama 3.x) and a SentencePiece tokenizer trained on the data; the export then runs its torch
work (merge, the HF side of parity) on the GPU. `wall_s` is the export alone (not the model build).
Parity on a random model is a strict test of the conversion (its logits have no structure to hide
behind), but its greedy figures say little; the KL and top-1 ones are the ones to read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, tie_word_embeddings=False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--work", default="/tmp/sftflow-export-bench")
    parser.add_argument("--data", help="The Alpaca demo file: build bench/train_gpu.py's model of the shape (GPU).")
    parser.add_argument("--parity-slots", type=int,
                        help="Parity checks at once (cores / N llama.cpp threads each); default: the export's choice.")
    parser.add_argument("--merge-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                        help="export.merge_dtype (the dtype the base is reloaded in to merge the adapter).")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    os.environ["SFTFLOW_HOME"] = str(work / "home")
    os.environ.setdefault("SFTFLOW_CACHE", str(work / "cache"))

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from schemas.config import RunConfig
    from foundation.workspace import Workspace
    from sftflow.stack import configure_prefect_env
    from tasks.base_model import tiny_model_dir
    from tasks.export.run import ExportSource, export_run

    workspace = Workspace.from_env().ensure()
    configure_prefect_env(workspace)
    tiny = tiny_model_dir(workspace, log=lambda *_: None)
    started = time.monotonic()
    if args.data:
        from bench.train_gpu import build_model
        from transformers import AutoModelForCausalLM

        model_dir = build_model(args.shape, work, Path(args.data))
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    else:
        model_dir = work / f"llama-{args.shape}"
        tokenizer = AutoTokenizer.from_pretrained(tiny)
        config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=1024,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **SHAPES[args.shape])
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(model_dir, safe_serialization=True)
        for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (tiny / name).exists():
                shutil.copyfile(tiny / name, model_dir / name)
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]))
    for name, weight in peft.named_parameters():
        if "lora_B" in name:  # gaussian init leaves B at zero; give the adapter an effect to detect
            torch.nn.init.normal_(weight, std=0.02)
    adapter_dir = work / "adapter"
    peft.save_pretrained(adapter_dir)
    del model, peft
    build_s = time.monotonic() - started

    from flows.ingest import ingest_drop

    report = ingest_drop(paths=[str(ROOT / "data" / "drops" / "arithmetic")], drop_id="bench")
    run = workspace.runs.create("export-bench")
    run_config = RunConfig.model_validate({"name": f"llama-{args.shape}", "model": {"name": str(model_dir)},
                                           "export": {"merge_dtype": args.merge_dtype, "parity_prompts": 4, "greedy_tokens": 8}})
    source = ExportSource(run_config.name, str(model_dir), str(adapter_dir),
                          workspace.datasets.find(report.dataset_version).path("eval"), run_config)
    run_dir = run.root
    if args.parity_slots:
        import tasks.export.run as export_module

        cores = os.cpu_count() or 1
        export_module.parity_slots = lambda job, checks: (args.parity_slots, max(1, cores // args.parity_slots))
    exported = time.monotonic()
    try:
        summary = export_run(run, source, workspace, log=lambda *a: print(*a, file=sys.stderr)).dump()
        passed, failures = True, []
    except Exception as exc:  # record what failed; the figures so far are in export.json
        summary = json.loads((run_dir / "export.json").read_text()) if (run_dir / "export.json").exists() else {}
        passed, failures = False, [str(exc)[:500]]
    wall = time.monotonic() - exported
    print(json.dumps({"bench": "export", "shape": args.shape, "device": "cuda" if torch.cuda.is_available() else "cpu",
                      "cpus": os.cpu_count(), "parity_slots": args.parity_slots or "auto", "merge_dtype": args.merge_dtype,
                      "passed": passed, "failures": failures, "wall_s": round(wall, 1),
                      "build_model_s": round(build_s, 1), "timings": summary.get("timings"),
                      "bytes": summary.get("bytes"), "parity": summary.get("parity")}))


if __name__ == "__main__":
    main()
