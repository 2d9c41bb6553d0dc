"""Attention over packed rows from document boundaries, never through a materialised mask.

With `train.packing`, trl's padding-free collator concatenates a micro-batch into one row (1, T)
whose position_ids restart at 0 where each document starts. Masking that row for SDPA takes a
(T, T) block-diagonal mask: quadratic memory, and work that is almost all masked out. Here the
restarts become cu_seqlens (flash attention's varlen layout) and causal attention runs inside each
document only:

- CUDA, fp16/bf16: torch's varlen flash kernel (`torch.nn.attention.varlen.varlen_attn`), one call
  for the whole row;
- anywhere else (the CPU tests, fp32): each document alone through causal SDPA.

Both engines send packed rows here. The hf engine names ATTN_IMPLEMENTATION as its
`attn_implementation` (registered with transformers' AttentionInterface by `register`); Unsloth's
Llama attention calls Unsloth's own dispatcher, which `route_unsloth_packed_rows` wraps. Anything
that is not a mask-free packed row (a padding mask, a KV cache) takes the usual path. Features the
varlen kernel has no argument for are honoured on a slower exact path, never dropped: a sliding
window (Mistral v0.1, Gemma, Qwen with `use_sliding_window`) goes to the kernel's `window_size`, or
per document with a window mask; logit soft-capping (Gemma 2) runs per document in eager attention.
CALLS counts the path each attention call took, so a run can show which kernel trained.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "sftflow_varlen"
CALLS: Counter = Counter()  # varlen | per_document | unpacked (hf, not a packed row) | unsloth (Unsloth's own path)

# flash attention 2's varlen backward indexes its dq accumulator with int32 and faults past this
_INT32_ELEMENTS = 2**31


def _load_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


_VARLEN, _VARLEN_PARAMS = _load_varlen()
_bounds_cache: tuple[torch.Tensor, tuple[torch.Tensor, int] | None] | None = None


def document_boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """(cu_seqlens int32 [n_docs + 1], longest document) of a packed row, whose positions restart at
    0 where each document starts; None unless the row is (1, T) and holds more than one document.

    Every layer of a forward pass gets the same position_ids tensor, so the boundaries (one device
    read) are computed once per pass."""
    global _bounds_cache
    if _bounds_cache is not None and _bounds_cache[0] is position_ids:
        return _bounds_cache[1]
    result = None
    if position_ids.dim() == 2 and position_ids.shape[0] == 1:
        row = position_ids[0]
        starts = (row == 0).nonzero().flatten()
        if starts.numel() > 1 and int(starts[0]) == 0:
            total = torch.tensor([row.numel()], device=row.device)
            cu_seqlens = torch.cat([starts, total]).to(torch.int32)
            result = (cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))
    _bounds_cache = (position_ids, result)
    return result


def _varlen_fits(query: torch.Tensor, n_docs: int, dropout: float) -> bool:
    if _VARLEN is None or not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16) or dropout:
        return False
    total, heads, head_dim = query.shape
    if head_dim > 256 or head_dim % 8:
        return False
    rounded = (head_dim + 31) // 32 * 32
    return (total + 128 * n_docs) * heads * rounded < _INT32_ELEMENTS


def _varlen(query, key, value, cu_seqlens, max_seqlen, scale, window: int | None = None):
    kwargs: dict[str, Any] = {}
    if "window_size" in _VARLEN_PARAMS:  # torch >= 2.11: causal = no window to the right
        # transformers' window keeps key k for query q when k > q - window: window - 1 keys to the left
        kwargs["window_size"] = (-1 if window is None else window - 1, 0)
    else:
        kwargs["is_causal"] = True
    if scale is not None:
        if "scale" in _VARLEN_PARAMS:
            kwargs["scale"] = scale
        else:
            query = query * (scale * math.sqrt(query.shape[-1]))
    if key.shape[1] != query.shape[1]:
        if "enable_gqa" in _VARLEN_PARAMS:  # torch >= 2.12
            kwargs["enable_gqa"] = True
        else:
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    cu_seqlens = cu_seqlens.to(device=query.device, dtype=torch.int32)
    return _VARLEN(query.contiguous(), key.contiguous(), value.contiguous(), cu_seqlens, cu_seqlens,
                   max_seqlen, max_seqlen, **kwargs)


def _keep(q_len: int, kv_len: int, window: int | None, device) -> torch.Tensor:
    """(q_len, kv_len) bool: causal (queries are the last q_len keys), within `window` keys if set."""
    q = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None, :]
    keep = k <= q
    if window is not None:
        keep &= k > q - window
    return keep


def _eager(q, k, v, keep, scale, softcap, dropout):
    """Attention written out, for logit soft-capping (no SDPA kernel takes it): q (..., H, T, D), k/v
    (..., H_kv, S, D), keep broadcastable to (..., H, T, S). Softmax in fp32, as transformers' eager
    Gemma 2 attention."""
    if k.shape[-3] != q.shape[-3]:
        groups = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = F.dropout(weights, p=dropout, training=dropout > 0)
    return torch.matmul(weights, v)


def _per_document(query, key, value, cu_seqlens, scale, dropout, window=None, softcap=None):
    bounds = cu_seqlens.tolist()
    gqa = key.shape[1] != query.shape[1]
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = (x[start:end].transpose(0, 1) for x in (query, key, value))  # (heads, length, dim)
        if softcap is not None:
            out = _eager(q, k, v, _keep(end - start, end - start, window, q.device), scale, softcap, dropout)
        elif window is not None and end - start > window:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=_keep(end - start, end - start, window, q.device),
                                                 scale=scale, dropout_p=dropout, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout,
                                                 enable_gqa=gqa)
        outs.append(out.transpose(0, 1))
    return torch.cat(outs, dim=0)


def varlen_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                            max_seqlen: int, scale: float | None = None, dropout: float = 0.0,
                            window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal attention within each document of a packed row.

    query (T, H, D), key and value (T, H_kv, D) with H a multiple of H_kv; cu_seqlens (n_docs + 1)
    cumulative document lengths, from 0 to T. `window`: a query sees itself and the window - 1 keys
    before it (transformers' sliding window); `softcap`: scores pass through softcap * tanh(s / softcap)
    (Gemma 2). Returns (T, H, D). No token sees another document."""
    if window is not None and max_seqlen <= window:
        window = None  # no document is longer than the window: plain causal attention is the same
    if softcap is not None:  # no varlen kernel in torch takes it: exact, per document
        CALLS["per_document_softcap"] += 1
        return _per_document(query, key, value, cu_seqlens, scale, dropout, window, softcap)
    kernel_window = window is None or "window_size" in _VARLEN_PARAMS
    if kernel_window and query.is_cuda and query.dtype == torch.float32 and torch.cuda.is_bf16_supported():
        # hf engine with 4-bit weights: peft's prepare_model_for_kbit_training keeps norms in fp32, so the
        # projections come out fp32. The varlen kernel takes half precision only; attention then runs in
        # bf16 and its output goes back to fp32, as transformers' flash-attention path does.
        half = [x.to(torch.bfloat16) for x in (query, key, value)]  # cast once, for the check and the kernel
        if _varlen_fits(half[0], cu_seqlens.numel() - 1, dropout):
            CALLS["varlen"] += 1
            return _varlen(*half, cu_seqlens, max_seqlen, scale, window).to(torch.float32)
    if kernel_window and _varlen_fits(query, cu_seqlens.numel() - 1, dropout):
        CALLS["varlen"] += 1
        return _varlen(query, key, value, cu_seqlens, max_seqlen, scale, window)
    CALLS["per_document"] += 1
    return _per_document(query, key, value, cu_seqlens, scale, dropout, window)


# ------------------------------------------------------------------ hf engine: transformers' interface


def _masked_sdpa(query, key, value, attention_mask, scaling, dropout, window=None, softcap=None):
    """Rows that are not packed: causal SDPA, with the 2D padding mask when there is one (eager
    attention for soft-capped logits)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    gqa = key.shape[1] != query.shape[1]
    if window is not None and kv_len <= window:
        window = None
    if attention_mask is None and q_len == kv_len and window is None and softcap is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, dropout_p=dropout,
                                             enable_gqa=gqa)
    else:
        keep = _keep(q_len, kv_len, window, query.device)[None, None]
        if attention_mask is not None:
            keep = keep & attention_mask[:, None, None, :].to(torch.bool)
        keep = keep | ~keep.any(dim=-1, keepdim=True)  # a padding query sees nothing: any finite row beats NaN
        if softcap is not None:
            out = _eager(query, key, value, keep, scaling, softcap, dropout)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=keep, scale=scaling,
                                                 dropout_p=dropout, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous()


def attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      position_ids: torch.Tensor | None = None, sliding_window: int | None = None,
                      softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query (B, H, T, D), key/value (B, H_kv, S, D) ->
    ((B, T, H, D), no weights). The mask is what `flash_attention_mask` builds: None, or (B, S)
    padding; `sliding_window` and `softcap` are what the family's attention module passes (Gemma 2
    passes both)."""
    bounds = None
    if attention_mask is None and position_ids is not None and query.shape[2] == key.shape[2]:
        bounds = document_boundaries(position_ids)
    if bounds is None:
        CALLS["unpacked"] += 1
        return _masked_sdpa(query, key, value, attention_mask, scaling, dropout, sliding_window, softcap), None
    cu_seqlens, longest = bounds
    out = varlen_causal_attention(query.squeeze(0).transpose(0, 1), key.squeeze(0).transpose(0, 1),
                                  value.squeeze(0).transpose(0, 1), cu_seqlens, longest, scale=scaling,
                                  dropout=dropout, window=sliding_window, softcap=softcap)
    return out.unsqueeze(0), None


def register() -> str:
    """Make ATTN_IMPLEMENTATION a valid `attn_implementation` for transformers; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)
    # like flash attention: no (T, T) mask is ever built; a padded batch passes its 2D mask through
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flash_attention_mask)
    return ATTN_IMPLEMENTATION


# ------------------------------------------------------------ unsloth engine: Unsloth's own dispatcher


def unsloth_packed_options(config, context) -> dict[str, Any] | None:
    """What `varlen_causal_attention` needs to run one of Unsloth's attention calls exactly ({scale,
    window}), or None when the call is not a packed training row this route can honour
    (a padding mask, prefix groups, dropout, non-causal, SDPA options it does not know).

    Unsloth's attention modules describe the call in `config.flash_varlen_kwargs`: Mistral and Gemma 2
    add `window_size` (flash's (left, right): (-1, -1) for none, (w - 1, w - 1) for transformers'
    window of w keys; causal masking cuts the right side) and Gemma 2 `softcap` (left to Unsloth)."""
    flash = config.flash_varlen_kwargs or {}
    if (context.seq_info is None or context.attention_mask is not None
            or getattr(context, "prefix_seg_info", None) is not None or not getattr(context, "is_causal", True)
            or not set(flash) <= {"dropout_p", "causal", "softmax_scale", "window_size", "softcap"}
            or flash.get("dropout_p") or not flash.get("causal", True)
            or not set(config.sdpa_kwargs or {}) <= {"scale"}):
        return None
    if flash.get("softcap") is not None:
        return None  # Gemma 2 reaches here only with flash-attn >= 2.6.3, whose varlen kernel takes the cap
    left = (flash.get("window_size") or (-1, -1))[0]
    window = None if left is None or left < 0 else left + 1
    sliding = getattr(context, "sliding_window", None)
    if window is None and sliding is not None and sliding < context.kv_seq_len:
        return None  # a window Unsloth applies through its SDPA path only: leave the call to it
    return {"scale": flash.get("softmax_scale", (config.sdpa_kwargs or {}).get("scale")), "window": window}


def unsloth_packing_problem(model_config, flash_softcapping: bool) -> str | None:
    """Why Unsloth cannot keep this model's packed documents apart, with the fix; None when it can.
    A model that caps attention logits (Gemma 2) runs, without flash-attn >= 2.6.3, through Unsloth's
    soft-capping attention over the whole packed row under one causal mask."""
    cap = getattr(model_config, "attn_logit_softcapping", None)
    if cap is None or flash_softcapping:
        return None
    return (f"{model_config.model_type} caps attention logits at {cap}, and without flash-attn >= 2.6.3 Unsloth "
            "lets packed documents attend to each other; install flash-attn>=2.6.3 on the GPU worker, or set "
            "train.engine: hf (sftflow's packed attention honours the cap)")


def route_unsloth_packed_rows() -> bool:
    """Send Unsloth's packed rows (its `seq_info`, built from the same restarting position_ids) to
    `varlen_causal_attention`.

    Unsloth 2026.10 takes torch's varlen kernel only when it has `enable_gqa` (torch >= 2.12); on
    older torch, without flash-attn or xformers, it runs one SDPA call per run of equal-length
    documents: per document, for real data (5x slower than this on the H200, see bench/RESULTS.md).
    Which calls qualify is `unsloth_packed_options`: Mistral's carry a flash `window_size`, passed on
    as the kernel's window (declining them cost Mistral-7B packed training 2.7x, bench/RESULTS.md).
    Unsloth runs its decoder blocks eagerly, not compiled, for packed rows; measured, compiling
    them around this kernel gained nothing. Returns whether the route is in place (False, with a
    warning, if this Unsloth has no such dispatcher: packed rows then stay exact, only slower)."""
    try:
        from unsloth.utils import attention_dispatch
        from unsloth.utils.packing import cover_padded_cu_seqlens
    except ImportError as exc:
        print(f"sftflow: packed rows take Unsloth's own attention path ({exc})", file=sys.stderr)
        return False
    original = attention_dispatch._run_attention
    if getattr(original, "sftflow_packed", False):
        return True

    def run_attention(*, config, context, Q, K, V):
        options = unsloth_packed_options(config, context)
        if (options is None or Q.shape[0] != 1 or Q.shape[-2] != K.shape[-2]  # one row, no KV cache
                or not Q.is_cuda or Q.dtype not in (torch.float16, torch.bfloat16)):
            CALLS["unsloth"] += 1
            return original(config=config, context=context, Q=Q, K=K, V=V)
        # the collator's pad tail, if any, becomes a document of its own
        cu_seqlens, longest = cover_padded_cu_seqlens(context.seq_info, Q.shape[-2])
        # (1, H, T, D) -> (T, H, D); squeeze, not [0], whose backward zero-fills a whole new gradient
        out = varlen_causal_attention(*(x.squeeze(0).transpose(0, 1) for x in (Q, K, V)), cu_seqlens, longest,
                                      **options)
        return out.unsqueeze(0)  # Unsloth expects (1, T, H, D)

    run_attention.sftflow_packed = True
    run_attention.unsloth_original = original  # the benchmark times both
    attention_dispatch._run_attention = run_attention
    return True
