"""Time `sftflow export` on a model of a real shape (random weights, random LoRA), on this machine.

    .venv/bin/python bench/export.py --shape 1b [--work /tmp/sftflow-export-bench]

Builds a random-weight Llama of the shape (bfloat16 safetensors) with the tiny model's tokenizer and
chat template, a LoRA adapter with random (non-zero) weights, a one-drop dataset from the sample
drops, then runs the project's own export (merge, GGUF f16/q8_0/q4_k_m, LoRA GGUF, parity checks
with the control) and prints one JSON line with the timings, file sizes and parity figures.
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
    from foundation.stores.runs import RunDir
    from tasks.export.run import ExportSource, export_run

    workspace = Workspace.from_env().ensure()
    configure_prefect_env(workspace)
    tiny = tiny_model_dir(workspace, log=lambda *_: None)
    started = time.monotonic()
    model_dir = work / f"llama-{args.shape}"
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPES[args.shape])
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
                                           "export": {"merge_dtype": "bfloat16", "parity_prompts": 4, "greedy_tokens": 8}})
    source = ExportSource(run_config.name, str(model_dir), str(adapter_dir),
                          workspace.datasets.find(report.dataset_version).path("eval"), run_config)
    run_dir = run.root
    try:
        summary = export_run(run, source, workspace, log=lambda *a: print(*a, file=sys.stderr)).dump()
        passed, failures = True, []
    except Exception as exc:  # record what failed; the figures so far are in export.json
        summary = json.loads((run_dir / "export.json").read_text()) if (run_dir / "export.json").exists() else {}
        passed, failures = False, [str(exc)[:500]]
    print(json.dumps({"bench": "export", "shape": args.shape, "passed": passed, "failures": failures,
                      "build_model_s": round(build_s, 1), "timings": summary.get("timings"),
                      "bytes": summary.get("bytes"), "parity": summary.get("parity")}))


if __name__ == "__main__":
    main()
