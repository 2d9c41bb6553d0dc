"""Packed rows attend within their own document only: the packed path's logits, losses and gradients
equal those of each row run alone (CPU: the per-document path; the CUDA varlen kernel is checked
against it on the GPU by bench/train_gpu.py's packing-parity recipe)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tasks.engines import packed_attention


def test_document_boundaries_come_from_restarting_positions():
    cu, longest = packed_attention.document_boundaries(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    assert cu.tolist() == [0, 3, 5, 9] and cu.dtype == torch.int32 and longest == 4
    assert packed_attention.document_boundaries(torch.arange(6)[None]) is None  # one document
    assert packed_attention.document_boundaries(torch.arange(6).repeat(2, 1)) is None  # a real batch


def test_each_document_attends_only_to_itself_causally():
    torch.manual_seed(0)
    lengths = [5, 1, 7, 3]
    cu = torch.tensor([0, 5, 6, 13, 16], dtype=torch.int32)
    q, k, v = torch.randn(16, 4, 8), torch.randn(16, 2, 8), torch.randn(16, 2, 8)  # grouped-query: 4 heads, 2 kv
    before = packed_attention.CALLS["per_document"]
    out = packed_attention.varlen_causal_attention(q, k, v, cu, max(lengths))
    assert packed_attention.CALLS["per_document"] == before + 1  # no CUDA here: the per-document path
    assert out.shape == (16, 4, 8)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k[start:end].transpose(0, 1).repeat_interleave(2, 0),
            v[start:end].transpose(0, 1).repeat_interleave(2, 0), is_causal=True).transpose(0, 1)
        torch.testing.assert_close(out[start:end], alone)

    # changing the third document leaves the others alone, and the start of the third too (causal)
    k2, v2 = k.clone(), v.clone()
    k2[10:13] += 5.0
    v2[10:13] -= 3.0
    changed = packed_attention.varlen_causal_attention(q, k2, v2, cu, max(lengths))
    torch.testing.assert_close(changed[:10], out[:10])
    torch.testing.assert_close(changed[13:], out[13:])
    assert not torch.allclose(changed[10:13], out[10:13])


@pytest.fixture(scope="module")
def packed_model(model_cache):
    """The hf engine's model as the worker loads it for a packed run (tiny model, LoRA, CPU, fp32)."""
    from schemas.config import RunConfig
    from tasks.engines.hf import ENGINE

    config = RunConfig.model_validate({"name": "t", "model": {"name": str(model_cache), "load_in_4bit": False},
                                       "lora": {"r": 8, "alpha": 16},
                                       "train": {"engine": "hf", "packing": True, "max_steps": 1}})
    model, tokenizer = ENGINE.load(str(model_cache), config)
    with torch.no_grad():  # a non-zero adapter, so the gradients below reach every LoRA matrix
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    return model, tokenizer


def _rows(tokenizer, lengths):
    g = torch.Generator().manual_seed(1)
    rows = []
    for n in lengths:
        ids = torch.randint(10, len(tokenizer), (n,), generator=g).tolist()
        labels = [-100] * (n // 3) + ids[n // 3:]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _label_loss(logits, labels):
    return F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")


def test_packed_rows_train_exactly_like_rows_alone(packed_model, monkeypatch):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model, tokenizer = packed_model
    assert model.config._attn_implementation == packed_attention.ATTN_IMPLEMENTATION
    rows = _rows(tokenizer, [9, 23, 4, 15])
    packed = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(rows)
    assert packed["input_ids"].shape == (1, 51)

    model.zero_grad()
    before = packed_attention.CALLS["per_document"]
    logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
    assert packed_attention.CALLS["per_document"] == before + 4  # every layer took the packed path
    packed_loss = sum(_label_loss(logits[:, a:b], packed["labels"][:, a:b])
                      for a, b in [(0, 9), (9, 32), (32, 36), (36, 51)])
    packed_loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.zero_grad()
    alone_loss, start = 0.0, 0
    for row in rows:
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
        alone_logits = model(input_ids=ids).logits
        torch.testing.assert_close(logits[:, start:start + ids.shape[1]], alone_logits, atol=2e-5, rtol=1e-4)
        alone_loss = alone_loss + _label_loss(alone_logits, labels)
        start += ids.shape[1]
    alone_loss.backward()
    torch.testing.assert_close(packed_loss, alone_loss, atol=1e-4, rtol=1e-5)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(packed_grads[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)

    # the control: the same packed row, same positions, without the boundaries, does mix the rows
    model.zero_grad()
    monkeypatch.setattr(packed_attention, "document_boundaries", lambda position_ids: None)
    with torch.no_grad():
        mixed = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
    torch.testing.assert_close(mixed[:, :9], logits[:, :9].detach(), atol=2e-5, rtol=1e-4)
    assert (mixed[:, 9:] - logits[:, 9:].detach()).abs().max() > 1e-2


def test_padded_batches_still_mask_padding(packed_model):
    """Rows that are not packed (a padded eval batch) go through causal SDPA with the padding mask."""
    model, tokenizer = packed_model
    rows = _rows(tokenizer, [12, 5])
    ids = torch.full((2, 12), tokenizer.pad_token_id)
    mask = torch.zeros(2, 12, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        mask[i, : len(row["input_ids"])] = 1
    before = packed_attention.CALLS["unpacked"]
    with torch.no_grad():
        batch_logits = model(input_ids=ids, attention_mask=mask).logits
        assert packed_attention.CALLS["unpacked"] == before + 4
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits
            torch.testing.assert_close(batch_logits[i : i + 1, :n], alone, atol=2e-5, rtol=1e-4)
