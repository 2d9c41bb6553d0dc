"""Parity: a GGUF, loaded back with llama_cpp, against the merged HF model on the same rendered prompts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from foundation.artifacts import Parity


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _greedy_hf(hf_model, ids: list[int], last_logits: np.ndarray, steps: int) -> list[int]:
    """Greedy continuation, token by token through end-of-turn too (argmax on both sides: generate()'s
    min_new_tokens would suppress end-of-turn on the HF side only)."""
    import torch

    out, past, logits = [], None, last_logits
    with torch.no_grad():
        for _ in range(steps):
            token = int(np.argmax(logits))
            out.append(token)
            if past is None:
                step = hf_model(torch.tensor([ids + [token]]), use_cache=True)
            else:
                step = hf_model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past, logits = step.past_key_values, step.logits[0, -1].double().numpy()
    return out


def _greedy_gguf(llm, last_logits: np.ndarray, steps: int) -> list[int]:
    out, logits = [], last_logits
    for _ in range(steps):
        token = int(np.argmax(logits))
        out.append(token)
        llm.eval([token])
        logits = np.asarray(llm.scores[llm.n_tokens - 1])
    return out


def parity(gguf: Path, hf_model, tokenizer, prompts: list[str], greedy_tokens: int, lora: Path | None = None) -> Parity:
    """Compare a GGUF (optionally with a GGUF LoRA) with the HF model on rendered prompts."""
    import llama_cpp
    import torch

    width = max(len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts) + greedy_tokens + 8
    llm = llama_cpp.Llama(str(gguf), lora_path=str(lora) if lora else None, n_ctx=max(512, width),
                          logits_all=True, verbose=False, n_threads=os.cpu_count() or 1, seed=0)
    ids_equal, kls, top1, greedy_same = 0, [], [], 0
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
            hf_out = _greedy_hf(hf_model, hf_ids, theirs[-1], greedy_tokens)
            gguf_out = _greedy_gguf(llm, ours[-1], greedy_tokens)
            greedy_same += sum(a == b for a, b in zip(hf_out, gguf_out))
    finally:
        llm.close()
    return Parity(token_ids_equal=ids_equal / len(prompts), kl=float(np.mean(kls)), top1=float(np.mean(top1)),
                  greedy_match=greedy_same / (greedy_tokens * len(prompts)))


def check_thresholds(result: Parity, thresholds: dict) -> list[str]:
    """The thresholds a parity result misses (names and values); [] when it passes."""
    missed = []
    if result.token_ids_equal < 1.0:
        missed.append(f"token ids differ on {1 - result.token_ids_equal:.0%} of prompts")
    if "max_kl" in thresholds and result.kl > thresholds["max_kl"]:
        missed.append(f"KL {result.kl:.2e} > {thresholds['max_kl']:.0e}")
    if "min_top1" in thresholds and result.top1 < thresholds["min_top1"]:
        missed.append(f"top-1 agreement {result.top1:.3f} < {thresholds['min_top1']}")
    if "min_greedy" in thresholds and result.greedy_match < thresholds["min_greedy"]:
        missed.append(f"greedy match {result.greedy_match:.3f} < {thresholds['min_greedy']}")
    return missed


def parity_prompts(eval_split: Path, tokenizer, size: int, seed: int) -> list[str]:
    """Rendered generation prompts of a fixed sample of eval rows (the evaluation's own sample)."""
    import pyarrow.parquet as pq

    from tasks.engines.chat_format import render
    from tasks.evaluate import prompt_and_reference, sample_rows

    rows = sample_rows(pq.read_table(eval_split).to_pylist(), size, seed)
    return [render(tokenizer, prompt_and_reference(r["messages"])[0], generation_prompt=True) for r in rows]


def gguf_adds_bos(gguf: Path) -> bool:
    """Whether llama.cpp puts BOS before a prompt by itself for this GGUF (its vocabulary says so)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(b"x", add_bos=True, special=False)[:1] == [llm.token_bos()]
    finally:
        llm.close()
