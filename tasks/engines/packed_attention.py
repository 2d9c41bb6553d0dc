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
that is not a mask-free packed row (a padding mask, a KV cache, a sliding window) takes the usual
path. CALLS counts the path each attention call took, so a run can show which kernel trained.
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


def _varlen(query, key, value, cu_seqlens, max_seqlen, scale):
    kwargs: dict[str, Any] = {}
    if "window_size" in _VARLEN_PARAMS:  # torch >= 2.11: causal = no window to the right
        kwargs["window_size"] = (-1, 0)
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


def _per_document(query, key, value, cu_seqlens, scale, dropout):
    bounds = cu_seqlens.tolist()
    gqa = key.shape[1] != query.shape[1]
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = (x[start:end].transpose(0, 1) for x in (query, key, value))  # (heads, length, dim)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout, enable_gqa=gqa)
        outs.append(out.transpose(0, 1))
    return torch.cat(outs, dim=0)


def varlen_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                            max_seqlen: int, scale: float | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Causal attention within each document of a packed row.

    query (T, H, D), key and value (T, H_kv, D) with H a multiple of H_kv; cu_seqlens (n_docs + 1)
    cumulative document lengths, from 0 to T. Returns (T, H, D). No token sees another document."""
    if query.is_cuda and query.dtype == torch.float32 and torch.cuda.is_bf16_supported():
        # hf engine with 4-bit weights: peft's prepare_model_for_kbit_training keeps norms in fp32, so the
        # projections come out fp32. The varlen kernel takes half precision only; attention then runs in
        # bf16 and its output goes back to fp32, as transformers' flash-attention path does.
        half = [x.to(torch.bfloat16) for x in (query, key, value)]  # cast once, for the check and the kernel
        if _varlen_fits(half[0], cu_seqlens.numel() - 1, dropout):
            CALLS["varlen"] += 1
            return _varlen(*half, cu_seqlens, max_seqlen, scale).to(torch.float32)
    if _varlen_fits(query, cu_seqlens.numel() - 1, dropout):
        CALLS["varlen"] += 1
        return _varlen(query, key, value, cu_seqlens, max_seqlen, scale)
    CALLS["per_document"] += 1
    return _per_document(query, key, value, cu_seqlens, scale, dropout)


# ------------------------------------------------------------------ hf engine: transformers' interface


def _masked_sdpa(query, key, value, attention_mask, scaling, dropout):
    """Rows that are not packed: causal SDPA, with the 2D padding mask when there is one."""
    q_len, kv_len = query.shape[2], key.shape[2]
    gqa = key.shape[1] != query.shape[1]
    if attention_mask is None and q_len == kv_len:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, dropout_p=dropout,
                                             enable_gqa=gqa)
    else:
        keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)[None, None]
        if attention_mask is not None:
            keep = keep & attention_mask[:, None, None, :].to(torch.bool)
        keep = keep | ~keep.any(dim=-1, keepdim=True)  # a padding query sees nothing: any finite row beats NaN
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=keep, scale=scaling, dropout_p=dropout,
                                             enable_gqa=gqa)
    return out.transpose(1, 2).contiguous()


def attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query (B, H, T, D), key/value (B, H_kv, S, D) ->
    ((B, T, H, D), no weights). The mask is what `flash_attention_mask` builds: None, or (B, S)
    padding."""
    bounds = None
    if attention_mask is None and position_ids is not None and query.shape[2] == key.shape[2]:
        bounds = document_boundaries(position_ids)
    if bounds is None:
        CALLS["unpacked"] += 1
        return _masked_sdpa(query, key, value, attention_mask, scaling, dropout), None
    cu_seqlens, longest = bounds
    out = varlen_causal_attention(query.squeeze(0).transpose(0, 1), key.squeeze(0).transpose(0, 1),
                                  value.squeeze(0).transpose(0, 1), cu_seqlens, longest, scale=scaling,
                                  dropout=dropout)
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


def _unsloth_packed_row(config, context, Q: torch.Tensor, K: torch.Tensor) -> bool:
    flash = config.flash_varlen_kwargs or {}
    return (
        context.seq_info is not None
        and context.attention_mask is None
        and getattr(context, "prefix_seg_info", None) is None
        and getattr(context, "sliding_window", None) is None
        and getattr(context, "is_causal", True)
        and Q.shape[0] == 1
        and Q.shape[-2] == K.shape[-2]  # no KV cache
        and Q.is_cuda
        and Q.dtype in (torch.float16, torch.bfloat16)
        and set(flash) <= {"dropout_p", "causal", "softmax_scale"}
        and not flash.get("dropout_p")
        and flash.get("causal", True)
        and set(config.sdpa_kwargs or {}) <= {"scale"}
    )


def route_unsloth_packed_rows() -> bool:
    """Send Unsloth's packed rows (its `seq_info`, built from the same restarting position_ids) to
    `varlen_causal_attention`.

    Unsloth 2026.10 takes torch's varlen kernel only when it has `enable_gqa` (torch >= 2.12); on
    older torch, without flash-attn or xformers, it runs one SDPA call per run of equal-length
    documents: per document, for real data (5x slower than this on the H200, see bench/RESULTS.md).
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
        if not _unsloth_packed_row(config, context, Q, K):
            CALLS["unsloth"] += 1
            return original(config=config, context=context, Q=Q, K=K, V=V)
        # the collator's pad tail, if any, becomes a document of its own
        cu_seqlens, longest = cover_padded_cu_seqlens(context.seq_info, Q.shape[-2])
        scale = (config.flash_varlen_kwargs or {}).get("softmax_scale", (config.sdpa_kwargs or {}).get("scale"))
        # (1, H, T, D) -> (T, H, D); squeeze, not [0], whose backward zero-fills a whole new gradient
        out = varlen_causal_attention(*(x.squeeze(0).transpose(0, 1) for x in (Q, K, V)), cu_seqlens, longest,
                                      scale=scale)
        return out.unsqueeze(0)  # Unsloth expects (1, T, H, D)

    run_attention.sftflow_packed = True
    run_attention.unsloth_original = original  # the benchmark times both
    attention_dispatch._run_attention = run_attention
    return True
