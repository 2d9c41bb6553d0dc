"""Merge the adapter into its base, convert the result (and the adapter) to GGUF, quantise."""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path

from foundation.atomic import staged_dir
from schemas.quants import BY_NAME
from tasks.export import ExportError
from tasks.export.tools import ToolAhead, run_tool

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def export_device() -> str:
    """Where the export's torch work (the merge, the HF side of parity) runs: the GPU when there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def merge_adapter(model_path: str, adapter_dir: str, out_dir: Path, dtype: str, device: str = "cpu"):
    """Merge the adapter into the base reloaded in 16-bit (or fp32), never into a 4-bit base; the merged model
    is saved in `out_dir` and returned (in `dtype`, on `device`)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype), use_safetensors=True,
                                                device_map=device)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    with staged_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        # the base's tokenizer files (the converter reads a SentencePiece tokenizer.model), then the tokenizer as
        # trained, which the trainer saved with the adapter: the run's chat template and pad token go into the GGUF
        for source in (Path(model_path), Path(adapter_dir)):
            for name in TOKENIZER_FILES:
                if (source / name).exists():
                    shutil.copyfile(source / name, tmp / name)
    return merged


def gguf_model_name(model_name: str) -> str:
    """The name a GGUF carries (general.name): the base model's, never the directory the export converts.
    llama.cpp reads behaviour from it (Phi-3's tokenizer strips the whitespace after its special tokens only
    when the name says phi-3), so `merged` or a Hub snapshot's commit would tokenize differently."""
    return Path(model_name.rstrip("/")).name


CONVERT_HF = "convert_hf_to_gguf.py"


def convert_to_gguf(tools: Path, model_dir: Path, out_file: Path, log: Path, model_name: str,
                    ahead: ToolAhead | None = None) -> Path:
    """An f16 GGUF of a model directory, named `model_name` (see gguf_model_name); with `ahead`, by that
    converter started ahead (its imports already paid)."""
    args = [str(model_dir), "--outfile", str(out_file), "--outtype", "f16", "--model-name", model_name]
    if ahead:
        ahead.run(args)
    else:
        run_tool(tools, CONVERT_HF, args, log)
    return out_file


def convert_lora_to_gguf(tools: Path, base_dir: str, adapter_dir: str, out_file: Path, log: Path) -> Path:
    """The adapter as a GGUF LoRA. llama.cpp scales a LoRA by alpha / r and its converter copies lora_alpha as
    it is, so an rslora adapter (alpha / sqrt(r)) is converted from a copy of its config saying alpha * sqrt(r):
    the same scale where llama.cpp applies it."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    rslora = config.get("use_rslora")
    with tempfile.TemporaryDirectory(prefix="sftflow-lora-") if rslora else nullcontext() as view:
        if rslora:
            for path in Path(adapter_dir).iterdir():
                if path.name != "adapter_config.json":
                    (Path(view) / path.name).symlink_to(path.resolve())
            scaled = {**config, "use_rslora": False, "lora_alpha": config["lora_alpha"] * math.sqrt(config["r"])}
            (Path(view) / "adapter_config.json").write_text(json.dumps(scaled))
            adapter_dir = view
        run_tool(tools, "convert_lora_to_gguf.py",
                 ["--base", base_dir, "--outfile", str(out_file), "--outtype", "f16", adapter_dir], log)
    return out_file


def quantize(source: Path, target: Path, quant: str) -> Path:
    """llama.cpp's quantiser on an f16 GGUF, to the table's llama ftype of `quant`."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = BY_NAME[quant].llama_ftype
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0 or not target.exists():
        raise ExportError(f"llama.cpp could not quantize {source.name} to {quant} (status {status})")
    return target
