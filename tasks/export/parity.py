"""Parity: a GGUF, loaded back with llama_cpp, against the merged HF model on the same rendered prompts.

The HF side of the check (each prompt's logits and its greedy continuation) is the same for every GGUF of an
export, so `HfReference` computes it once, on the model's device (the GPU when the export has one), and the
GGUF files (f16, each quant, the LoRA, the control) are compared with it, several at once when the machine
has the cores, each check on its own share of them, so that a check never waits for another: alone, the 1B
export took the same time either way on 16 cores (44.6 s with 4 checks on 4 threads, 43.1 s one at a time on
16), and in the pipeline one at a time queued the quants' checks behind the slower control and LoRA ones
(bench/RESULTS.md, issue 17 session 23).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from foundation.artifacts import Parity

# The HF logits kept between GGUF files (float32, exactly as the reference model produced them); beyond this
# they are recomputed for each file instead (a long prompt of a large vocabulary holds ~0.5 GB).
KEEP_LOGITS_BYTES = 2 << 30


@dataclass
class HfAnswer:
    """One prompt on the HF side: its token ids, the reference logits over them, the greedy continuation."""

    ids: list[int]
    logits: object  # torch.Tensor [len(ids), vocab], float32, on the model's device
    greedy: list[int]


class HfReference:
    """The HF model's side of the parity check, computed once per prompt and kept while it fits; checks on
    several threads share it (one computes an answer at a time)."""

    def __init__(self, hf_model, tokenizer, prompts: list[str], greedy_tokens: int):
        self.model, self.tokenizer, self.prompts, self.greedy_tokens = hf_model, tokenizer, prompts, greedy_tokens
        self.device = next(hf_model.parameters()).device
        self._kept: dict[int, HfAnswer] = {}
        self._kept_bytes = 0
        self._lock = threading.Lock()
        self._width: int | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def width(self) -> int:
        """The context a GGUF needs for the longest prompt and its continuation (the prompts tokenized once)."""
        with self._lock:
            if self._width is None:
                self._width = max(len(self.tokenizer(p, add_special_tokens=False).input_ids) for p in self.prompts) \
                    + self.greedy_tokens + 8
            return self._width

    def answer(self, i: int) -> HfAnswer:
        with self._lock:
            return self._answer(i)

    def _answer(self, i: int) -> HfAnswer:
        if i in self._kept:
            return self._kept[i]
        import torch

        ids = self.tokenizer(self.prompts[i], add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = self.model(torch.tensor([ids], device=self.device)).logits[0].float()
        answer = HfAnswer(ids, logits, self._greedy(ids, logits[-1]))
        size = logits.numel() * 4
        if self._kept_bytes + size <= KEEP_LOGITS_BYTES:
            self._kept[i], self._kept_bytes = answer, self._kept_bytes + size
        return answer

    def _greedy(self, ids: list[int], last_logits) -> list[int]:
        """Greedy continuation, token by token through end-of-turn too (argmax on both sides: generate()'s
        min_new_tokens would suppress end-of-turn on the HF side only)."""
        import torch

        out, past, logits = [], None, last_logits
        with torch.no_grad():
            for _ in range(self.greedy_tokens):
                token = int(torch.argmax(logits.double()))
                out.append(token)
                if past is None:
                    step = self.model(torch.tensor([ids + [token]], device=self.device), use_cache=True)
                else:
                    step = self.model(torch.tensor([[token]], device=self.device), past_key_values=past,
                                      use_cache=True)
                past, logits = step.past_key_values, step.logits[0, -1].float()
        return out


def _greedy_gguf(llm, last_logits: np.ndarray, steps: int, theirs: list[int]) -> list[int]:
    """llama.cpp's greedy continuation (`steps` tokens) after the prompt llm holds, whose last logits are given.

    While it follows `theirs` (the HF greedy continuation) the tokens are read from one batched pass over
    theirs (the logits after each of their tokens); from the first token where it turns away, it goes on token
    by token. A file that agrees costs one pass instead of `steps`."""
    start = llm.n_tokens
    out = [int(np.argmax(last_logits))]
    if len(theirs) > 1 and out[0] == theirs[0]:
        fed = theirs[: steps - 1]
        llm.eval(fed)
        following = np.argmax(np.asarray(llm.scores[start : start + len(fed)]), axis=-1)
        for i, token in enumerate(following.tolist()):
            out.append(int(token))
            if token != theirs[i + 1]:
                break
        llm.n_tokens = start + len(out) - 1  # back to where the last token of out comes from; the rest is dropped
    while len(out) < steps:
        llm.eval([out[-1]])
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    return out[:steps]


def _compare(theirs, ours: np.ndarray) -> tuple[float, float]:
    """Mean KL(HF || GGUF) over the positions and the top-1 agreement, in float64 on the HF logits' device."""
    import torch

    p = torch.log_softmax(theirs.double(), -1)
    q = torch.log_softmax(torch.from_numpy(ours).to(theirs.device, torch.float64), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    top1 = (p.argmax(-1) == q.argmax(-1)).double().mean()
    return float(kl), float(top1)


def parity(gguf: Path, reference: HfReference, lora: Path | None = None, threads: int | None = None,
           greedy: bool = True) -> Parity:
    """Compare a GGUF (optionally with a GGUF LoRA) with the HF model on the reference's prompts, with llama.cpp
    on `threads` cores (default: all); greedy=False leaves the greedy continuations out (greedy_match None)."""
    import llama_cpp

    threads = threads or os.cpu_count() or 1
    llm = llama_cpp.Llama(str(gguf), lora_path=str(lora) if lora else None, n_ctx=max(512, reference.width()),
                          logits_all=True, verbose=False, n_threads=threads, n_threads_batch=threads, seed=0)
    ids_equal, kls, top1, greedy_same = 0, [], [], 0
    try:
        for i, prompt in enumerate(reference.prompts):
            hf = reference.answer(i)
            ids_equal += llm.tokenize(prompt.encode(), add_bos=False, special=True) == hf.ids
            llm.reset()
            llm.eval(hf.ids)
            ours = np.asarray(llm.scores[: len(hf.ids)], dtype=np.float64)
            kl, agree = _compare(hf.logits, ours)
            kls.append(kl)
            top1.append(agree)
            if greedy:
                gguf_out = _greedy_gguf(llm, ours[-1], reference.greedy_tokens, hf.greedy)
                greedy_same += sum(a == b for a, b in zip(hf.greedy, gguf_out))
    finally:
        llm.close()
    return Parity(token_ids_equal=ids_equal / len(reference), kl=float(np.mean(kls)), top1=float(np.mean(top1)),
                  greedy_match=greedy_same / (reference.greedy_tokens * len(reference)) if greedy else None)


def control_parity(gguf: Path, reference: HfReference, thresholds: dict, threads: int | None = None) -> Parity:
    """The control's check: the base without the adapter, which must miss `thresholds`. Its greedy continuation
    parts from the HF one at once, so llama.cpp decodes it token by token (`_greedy_gguf`), the dearest part
    of a check; it is computed only when the token ids, KL and top-1 do not already miss the thresholds."""
    result = parity(gguf, reference, threads=threads, greedy=False)
    return result if check_thresholds(result, thresholds) else parity(gguf, reference, threads=threads)


def check_thresholds(result: Parity, thresholds: dict) -> list[str]:
    """The thresholds a parity result misses (names and values); [] when it passes."""
    missed = []
    if result.token_ids_equal < 1.0:
        missed.append(f"token ids differ on {1 - result.token_ids_equal:.0%} of prompts")
    if "max_kl" in thresholds and result.kl > thresholds["max_kl"]:
        missed.append(f"KL {result.kl:.2e} > {thresholds['max_kl']:.0e}")
    if "min_top1" in thresholds and result.top1 < thresholds["min_top1"]:
        missed.append(f"top-1 agreement {result.top1:.3f} < {thresholds['min_top1']}")
    if "min_greedy" in thresholds and result.greedy_match is not None and result.greedy_match < thresholds["min_greedy"]:
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
