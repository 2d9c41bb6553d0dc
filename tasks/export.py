"""Export: merge the adapter into a 16-bit base, make GGUF files with llama.cpp's own tools, check parity.

The converter scripts (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`, their `conversion/`
package and `gguf-py`) come from the pinned llama-cpp-python sdist on PyPI, checked against its
sha256, and are extracted into the model cache; the quantiser is llama.cpp's, through the
`llama_cpp` bindings built from that same sdist. So converter, gguf-py and runtime are one version.

Every GGUF is loaded back with `llama_cpp.Llama` and compared with the HF model on eval prompts:
token ids, mean KL and top-1 agreement of next-token distributions, greedy continuations.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

from foundation.atomic import staged_dir, write_bytes_atomic
from foundation.errors import SftflowError
from foundation.workspace import Workspace
from tasks.preflight import check_export_fits

LLAMA_CPP_PYTHON = "0.3.36"
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
TOOL_MEMBERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")
QUANT_FTYPES = {"q8_0": 7, "q4_k_m": 15}  # llama_ftype values (LLAMA_FTYPE_MOSTLY_*)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


class ExportError(SftflowError):
    """An export step failed or a GGUF missed its parity thresholds; the message says which."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_sdist(target_dir: Path) -> Path:
    """The pinned sdist from PyPI (pip's own client), verified by sha256."""
    target_dir.mkdir(parents=True, exist_ok=True)
    sdist = target_dir / SDIST
    if not sdist.exists():
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(target_dir),
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
            capture_output=True, text=True,
        )
        if done.returncode != 0 or not sdist.exists():
            raise ExportError(f"could not download llama-cpp-python {LLAMA_CPP_PYTHON} from PyPI: {done.stderr[-500:]}")
    if sha256_of(sdist) != SDIST_SHA256:
        sdist.unlink()
        raise ExportError(f"{sdist}: sha256 does not match the pinned {SDIST_SHA256}; refusing to use it")
    return sdist


# Shared with the Makefile, which builds the llama_cpp wheel from this very file at install time.
SDIST_CACHE = Path(os.environ.get("SFTFLOW_SDIST_CACHE", Path.home() / ".cache" / "sftflow" / "sdist"))


def llama_cpp_tools(workspace: Workspace) -> Path:
    """The converter scripts and gguf-py of the pinned sdist, extracted once into the model cache."""
    tools = workspace.cache / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    if (tools / "convert_hf_to_gguf.py").exists():
        return tools
    sdist = fetch_sdist(SDIST_CACHE)
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    with staged_dir(tools) as tmp, tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            name = member.name.removeprefix(prefix)
            if member.name.startswith(prefix) and name.startswith(TOOL_MEMBERS) and member.isfile():
                member.name = name
                archive.extract(member, tmp, filter="data")
    return tools


def _run_tool(tools: Path, script: str, args: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tools / "gguf-py"), str(tools)])}
    with open(log, "a") as fh:
        done = subprocess.run([sys.executable, str(tools / script), *args], stdout=fh, stderr=fh, env=env, cwd=tools)
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-10:])
        raise ExportError(f"{script} failed (exit {done.returncode}):\n{tail}")


def merge_adapter(model_path: str, adapter_dir: str, out_dir: Path, dtype: str) -> Path:
    """Merge the adapter into the base reloaded in 16-bit (or fp32), never into a 4-bit base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype), use_safetensors=True)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    with staged_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:  # the base's tokenizer files, unchanged (GGUF reads tokenizer.model)
            if (Path(model_path) / name).exists():
                shutil.copyfile(Path(model_path) / name, tmp / name)
    return out_dir


def convert_to_gguf(tools: Path, model_dir: Path, out_file: Path, log: Path) -> Path:
    _run_tool(tools, "convert_hf_to_gguf.py", [str(model_dir), "--outfile", str(out_file), "--outtype", "f16"], log)
    return out_file


def convert_lora_to_gguf(tools: Path, base_dir: str, adapter_dir: str, out_file: Path, log: Path) -> Path:
    _run_tool(tools, "convert_lora_to_gguf.py",
              ["--base", base_dir, "--outfile", str(out_file), "--outtype", "f16", adapter_dir], log)
    return out_file


def quantize(source: Path, target: Path, quant: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[quant]
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0 or not target.exists():
        raise ExportError(f"llama.cpp could not quantize {source.name} to {quant} (status {status})")
    return target


# ---------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def parity(gguf: Path, hf_model, tokenizer, prompts: list[str], greedy_tokens: int, lora: Path | None = None) -> dict:
    """Compare a GGUF (optionally with a GGUF LoRA) with the HF model on rendered prompts."""
    import llama_cpp
    import torch

    width = max(len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts) + greedy_tokens + 8
    llm = llama_cpp.Llama(str(gguf), lora_path=str(lora) if lora else None, n_ctx=max(512, width),
                          logits_all=True, verbose=False, n_threads=os.cpu_count() or 1, seed=0)
    ids_equal, kls, top1, greedy_same, greedy_total = 0, [], [], 0, 0
    try:
        for prompt in prompts:
            hf_ids = tokenizer(prompt, add_special_tokens=False).input_ids
            ids_equal += llm.tokenize(prompt.encode(), add_bos=False, special=True) == hf_ids
            llm.reset()
            llm.eval(hf_ids)
            ours = np.asarray(llm.scores[: len(hf_ids)], dtype=np.float64)
            with torch.no_grad():
                theirs = hf_model(torch.tensor([hf_ids])).logits[0].double().numpy()
            p, q = _log_softmax(theirs), _log_softmax(ours)
            kls.append(float((np.exp(p) * (p - q)).sum(-1).mean()))
            top1.append(float((p.argmax(-1) == q.argmax(-1)).mean()))
            # greedy continuations, token by token, through end-of-turn too (argmax on both sides:
            # generate()'s min_new_tokens would suppress end-of-turn on the HF side only)
            hf_out, past, step_logits = [], None, theirs[-1]
            with torch.no_grad():
                for _ in range(greedy_tokens):
                    token = int(np.argmax(step_logits))
                    hf_out.append(token)
                    if past is None:
                        out = hf_model(torch.tensor([hf_ids + [token]]), use_cache=True)
                    else:
                        out = hf_model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                    past, step_logits = out.past_key_values, out.logits[0, -1].double().numpy()
            gguf_out, logits = [], ours[-1]
            for _ in range(greedy_tokens):
                token = int(np.argmax(logits))
                gguf_out.append(token)
                llm.eval([token])
                logits = np.asarray(llm.scores[llm.n_tokens - 1])
            greedy_same += sum(a == b for a, b in zip(hf_out, gguf_out))
            greedy_total += greedy_tokens
    finally:
        llm.close()
    return {
        "token_ids_equal": ids_equal / len(prompts),
        "kl": float(np.mean(kls)),
        "top1": float(np.mean(top1)),
        "greedy_match": greedy_same / greedy_total,
    }


def check_thresholds(result: dict, thresholds: dict) -> list[str]:
    """The thresholds a parity result misses (names and values); [] when it passes."""
    missed = []
    if result["token_ids_equal"] < 1.0:
        missed.append(f"token ids differ on {1 - result['token_ids_equal']:.0%} of prompts")
    if "max_kl" in thresholds and result["kl"] > thresholds["max_kl"]:
        missed.append(f"KL {result['kl']:.2e} > {thresholds['max_kl']:.0e}")
    if "min_top1" in thresholds and result["top1"] < thresholds["min_top1"]:
        missed.append(f"top-1 agreement {result['top1']:.3f} < {thresholds['min_top1']}")
    if "min_greedy" in thresholds and result["greedy_match"] < thresholds["min_greedy"]:
        missed.append(f"greedy match {result['greedy_match']:.3f} < {thresholds['min_greedy']}")
    return missed


def ollama_modelfile(gguf_name: str, stop_tokens: list[str], system: str | None = None) -> str:
    """An Ollama Modelfile whose TEMPLATE renders the Llama-3 chat format the model was trained on."""
    template = (
        "<|begin_of_text|>{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------


def parity_prompts(dataset_dir: str, tokenizer, size: int, seed: int) -> list[str]:
    """Rendered generation prompts of a fixed sample of eval rows (the evaluation's own sample)."""
    import pyarrow.parquet as pq

    from tasks.evaluate import prompt_and_reference, sample_rows

    rows = sample_rows(pq.read_table(Path(dataset_dir) / "eval.parquet").to_pylist(), size, seed)
    return [tokenizer.apply_chat_template(prompt_and_reference(r["messages"])[0], tokenize=False,
                                          add_generation_prompt=True) for r in rows]


def export_run(run_dir: Path, workspace: Workspace, quants: list[str] | None = None, log=print) -> dict:
    """Merge, convert, quantize, check parity; gguf/ appears only when every check passed."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from schemas.config import RunConfig
    from foundation.atomic import read_json, write_json_atomic

    manifest = read_json(run_dir / "manifest.json")
    config = RunConfig.model_validate(manifest["config"]).export
    quants = sorted(set(quants or config.quants) | {"f16"}, key=["f16", "q8_0", "q4_k_m"].index)
    name = manifest["config"]["name"]
    timings: dict[str, float] = {}
    # refuse before anything is downloaded, loaded or written when the files or models cannot fit
    check_export_fits(run_dir, manifest["model_path"], RunConfig.model_validate(manifest["config"]), quants, log=log)
    started = time.monotonic()
    tools = llama_cpp_tools(workspace)
    timings["tools_s"] = round(time.monotonic() - started, 2)
    log_file = run_dir / "export.log"

    t = time.monotonic()
    merged = merge_adapter(manifest["model_path"], manifest["adapter_dir"], run_dir / "merged", config.merge_dtype)
    timings["merge_s"] = round(time.monotonic() - t, 2)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    prompts = parity_prompts(manifest["dataset_dir"], tokenizer, config.parity_prompts, seed=0)

    results, failures = {}, []
    target = run_dir / "gguf"
    with staged_dir(target) as tmp:
        t = time.monotonic()
        files = {"f16": convert_to_gguf(tools, merged, tmp / f"{name}-f16.gguf", log_file)}
        timings["convert_s"] = round(time.monotonic() - t, 2)
        for quant in quants[1:]:
            t = time.monotonic()
            files[quant] = quantize(files["f16"], tmp / f"{name}-{quant}.gguf", quant)
            timings[f"quantize_{quant}_s"] = round(time.monotonic() - t, 2)
        control = convert_to_gguf(tools, Path(manifest["model_path"]), run_dir / "base-f16.gguf.tmp", log_file)
        if config.lora_gguf:
            t = time.monotonic()
            files["lora"] = convert_lora_to_gguf(tools, manifest["model_path"], manifest["adapter_dir"],
                                                 tmp / f"{name}-lora-f16.gguf", log_file)
            timings["convert_lora_s"] = round(time.monotonic() - t, 2)
        t = time.monotonic()
        for kind, path in files.items():
            if kind == "lora":  # the base GGUF with the adapter applied at load time
                results[kind] = parity(control, reference, tokenizer, prompts, config.greedy_tokens, lora=path)
            else:
                results[kind] = parity(path, reference, tokenizer, prompts, config.greedy_tokens)
            missed = check_thresholds(results[kind], config.thresholds.get(kind, {}))
            results[kind]["passed"] = not missed
            failures += [f"{kind}: {m}" for m in missed]
            log(f"parity {kind}: {results[kind]}")
        # the control: the base without the adapter must be clearly worse, or the check proves nothing
        results["control_base_f16"] = parity(control, reference, tokenizer, prompts, config.greedy_tokens)
        control.unlink()
        if not check_thresholds(results["control_base_f16"], config.thresholds["f16"]):
            failures.append("control: the base model without the adapter passes the f16 thresholds, so parity "
                            "cannot tell the adapter apart; tighten export.thresholds")
        timings["parity_s"] = round(time.monotonic() - t, 2)
        if failures:
            write_json_atomic(run_dir / "export.json", {"passed": False, "parity": results, "failures": failures,
                                                        "timings": timings})
            raise ExportError("GGUF parity failed: " + "; ".join(failures))
    from tasks.tokenize import end_of_turn_ids

    stop = [tokenizer.convert_ids_to_tokens(i) for i in sorted(end_of_turn_ids(tokenizer))]
    write_bytes_atomic(run_dir / "Modelfile", ollama_modelfile(f"gguf/{name}-{quants[-1]}.gguf", stop).encode())
    summary = {
        "run_id": run_dir.name, "passed": True, "gguf_dir": str(target), "modelfile": str(run_dir / "Modelfile"),
        "files": {k: str(target / Path(v).name) for k, v in files.items()},
        "bytes": {k: (target / Path(v).name).stat().st_size for k, v in files.items()},
        "parity": results, "timings": {**timings, "total_s": round(time.monotonic() - started, 2)},
        "merged_dir": str(merged), "llama_cpp_python": LLAMA_CPP_PYTHON,
    }
    write_json_atomic(run_dir / "export.json", summary)
    return summary


if __name__ == "__main__":  # `python -m tasks.export`: fetch, verify and extract the tools (make does this)
    print(llama_cpp_tools(Workspace.from_env().ensure()))
