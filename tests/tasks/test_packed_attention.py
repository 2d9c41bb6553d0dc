"""Packed rows attend within their own document only: the packed path's logits, losses and gradients
equal those of each row run alone (CPU: the per-document path; the CUDA varlen kernel is checked
against it on the GPU by bench/train_gpu.py's packing-parity recipe)."""

from __future__ import annotations

import copy

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


@pytest.fixture(scope="module")
def gemma2_pair():
    """A tiny Gemma 2 (logit soft-capping, sliding-window layers) twice, same weights: through
    sftflow's attention, and through transformers' eager attention, the reference that honours both."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    packed_attention.register()
    config = Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                          attn_logit_softcapping=1.0, final_logit_softcapping=None, query_pre_attn_scalar=8,
                          layer_types=["sliding_attention", "full_attention"], pad_token_id=0)
    torch.manual_seed(0)
    ours = Gemma2ForCausalLM(config).eval()
    for param in ours.parameters():  # scores big enough that a cap of 1.0 bites
        param.data.normal_(std=0.5)
    reference = Gemma2ForCausalLM(copy.deepcopy(config)).eval()  # its own config: the attention is set there
    reference.load_state_dict(ours.state_dict())
    ours.set_attn_implementation(packed_attention.ATTN_IMPLEMENTATION)
    reference.set_attn_implementation("eager")
    return ours, reference


def test_soft_capping_and_sliding_windows_are_honoured_in_packed_rows(gemma2_pair, monkeypatch):
    """Gemma 2's soft-capped logits and 4-token windows: a packed row equals each document through
    transformers' own eager attention; neither feature is silently dropped."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    ours, reference = gemma2_pair
    rows = [{"input_ids": torch.randint(1, 96, (n,), generator=torch.Generator().manual_seed(n)).tolist()}
            for n in (9, 3, 12)]
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    before = packed_attention.CALLS["per_document_softcap"]
    with torch.no_grad():
        logits = ours(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
        assert packed_attention.CALLS["per_document_softcap"] == before + 2  # both layers, both features
        start = 0
        for row in rows:
            alone = reference(input_ids=torch.tensor([row["input_ids"]])).logits
            torch.testing.assert_close(logits[:, start:start + len(row["input_ids"])], alone, atol=1e-4, rtol=1e-4)
            start += len(row["input_ids"])

        # padded (unpacked) rows too: the window and the cap hold there as well
        ids = torch.zeros(2, 12, dtype=torch.long)
        mask = torch.zeros(2, 12, dtype=torch.long)
        for i, row in enumerate([rows[2], rows[0]]):
            ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
            mask[i, : len(row["input_ids"])] = 1
        batch = ours(input_ids=ids, attention_mask=mask).logits
        for i, row in enumerate([rows[2], rows[0]]):
            n = len(row["input_ids"])
            alone = reference(input_ids=torch.tensor([row["input_ids"]])).logits
            torch.testing.assert_close(batch[i : i + 1, :n], alone, atol=1e-4, rtol=1e-4)

        # the control: dropping the cap (what passing Gemma 2 to a plain varlen kernel would do) changes the logits
        monkeypatch.setattr(ours.config, "attn_logit_softcapping", None)
        for layer in ours.model.layers:
            monkeypatch.setattr(layer.self_attn, "attn_logit_softcapping", None)
        uncapped = ours(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
        assert (uncapped - logits).abs().max() > 1e-2


def test_unsloth_calls_the_route_takes_and_those_it_leaves():
    """Which of Unsloth's attention calls go to the varlen route, with what window (Unsloth's own
    descriptions of a call, as its Llama, Mistral and Gemma 2 modules build them)."""
    from types import SimpleNamespace as NS

    def call(flash, seq_info=object(), mask=None, sliding=None, kv=4096):
        config = NS(flash_varlen_kwargs=flash, sdpa_kwargs={})
        return NS(seq_info=seq_info, attention_mask=mask, prefix_seg_info=None, sliding_window=sliding,
                  kv_seq_len=kv), config

    llama = {"dropout_p": 0.0, "causal": True, "softmax_scale": 0.125}
    take = packed_attention.unsloth_packed_options
    context, config = call(llama)
    assert take(config, context) == {"scale": 0.125, "window": None}
    # Mistral: no window that bites -> (-1, -1); a 4096-key window over a longer row -> (4095, 4095)
    context, config = call({**llama, "window_size": (-1, -1)})
    assert take(config, context) == {"scale": 0.125, "window": None}
    context, config = call({**llama, "window_size": (4095, 4095)}, sliding=4096, kv=8192)
    assert take(config, context) == {"scale": 0.125, "window": 4096}
    # left to Unsloth: not packed, a padding mask, dropout, Gemma 2's cap (flash-attn's), a window only SDPA knows
    for context, config in (call(llama, seq_info=None), call(llama, mask=object()),
                            call({**llama, "dropout_p": 0.1}), call({**llama, "softcap": 50.0}),
                            call(llama, sliding=4096, kv=8192), call({**llama, "alibi_slopes": 1})):
        assert take(config, context) is None


def test_a_window_through_the_route_matches_a_windowed_mask():
    torch.manual_seed(0)
    cu = torch.tensor([0, 11, 14, 30], dtype=torch.int32)
    q, k, v = torch.randn(30, 4, 8), torch.randn(30, 2, 8), torch.randn(30, 2, 8)
    out = packed_attention.varlen_causal_attention(q, k, v, cu, 16, window=5)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        n = end - start
        i = torch.arange(n)
        keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 5)
        alone = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k[start:end].transpose(0, 1).repeat_interleave(2, 0),
            v[start:end].transpose(0, 1).repeat_interleave(2, 0), attn_mask=keep).transpose(0, 1)
        torch.testing.assert_close(out[start:end], alone)
    assert not torch.allclose(out, packed_attention.varlen_causal_attention(q, k, v, cu, 16))  # the window bites


def test_unsloth_refuses_to_pack_soft_capped_models_without_flash_attn():
    from transformers import Gemma2Config, LlamaConfig

    problem = packed_attention.unsloth_packing_problem(Gemma2Config(), flash_softcapping=False)
    assert "gemma2 caps attention logits at 50.0" in problem and "train.engine: hf" in problem
    assert packed_attention.unsloth_packing_problem(Gemma2Config(), flash_softcapping=True) is None
    assert packed_attention.unsloth_packing_problem(LlamaConfig(), flash_softcapping=False) is None
