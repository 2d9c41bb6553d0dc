"""Issue 14: what the data says about each turn reaches the labels: per-turn loss weights (LLaMA-Factory's
`loss_weight`, Axolotl's `weight` / `train`), plain-text rows trained on every token, tool calls kept beside
the text, reasoning kept, and preference rows taking their chosen conversation. Shown on rendered tokens of
the tiny model's real Llama-3 template; the families' own templates are in tests/test_families.py."""

from __future__ import annotations

import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from schemas.tables import CANONICAL_SCHEMA, upgrade_canonical
from tasks.engines.chat_format import chat_format
from tasks.ingest.formats import CanonicalRow, Rejection, normalize_record, record_format
from tasks.tokenize import IGNORE, tokenize_conversation


@pytest.fixture
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def canonical(record: dict) -> list[dict]:
    """A source record as the dataset stores it (normalised, through Arrow): the messages the tokenizer gets."""
    row = normalize_record(record, record_format(record))
    assert isinstance(row, CanonicalRow), row
    table = pa.Table.from_pylist([{"id": row.id, "messages": [dict(zip(("role", "content", "weight", "tool_calls",
                                   "reasoning"), m)) for m in row.messages], "tools": row.tools, "source_drop": "d",
                                   "source_file": "f", "source_row": 1, "source_format": "x"}], schema=CANONICAL_SCHEMA)
    return table.to_pylist()[0]["messages"]


def trained(tokenizer, messages: list[dict]) -> str:
    eot = tokenizer.convert_tokens_to_ids(chat_format(tokenizer).end_of_turn)
    example = tokenize_conversation(tokenizer, messages, None, 4096, eot)
    assert all(label in (IGNORE, token) for token, label in zip(example.input_ids, example.labels))
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE])


def test_a_turn_weighted_zero_contributes_no_loss(tokenizer):
    for key, off in (("loss_weight", 0), ("weight", 0.0), ("train", False), ("training", False)):
        record = {"messages": [{"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello, how can I help?", key: off},
                               {"role": "user", "content": "2+2?"},
                               {"role": "assistant", "content": "4"}]}
        messages = canonical(record)
        assert [m["weight"] for m in messages] == [None, 0.0, None, None]
        assert trained(tokenizer, messages) == "4<|eot_id|>", key
    # without weights both answers are trained, as before
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                          {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    assert trained(tokenizer, canonical(plain)) == "Hello<|eot_id|>4<|eot_id|>"


def test_a_user_turn_weighted_one_is_trained(tokenizer):
    record = {"conversations": [{"from": "human", "value": "Write a haiku.", "weight": 1},
                                {"from": "gpt", "value": "Autumn moonlight"}]}
    assert trained(tokenizer, canonical(record)) == "Write a haiku.Autumn moonlight<|eot_id|>"


def test_weights_other_than_zero_or_one_and_rows_teaching_nothing_are_quarantined():
    half = normalize_record({"messages": [{"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "a", "loss_weight": 0.5}]}, "openai")
    assert isinstance(half, Rejection) and half.reasons == ("invalid_weight:loss_weight",)
    assert "messages[1]: loss_weight is 0.5" in half.details
    nothing = normalize_record({"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a", "train": False}]}, "openai")
    assert isinstance(nothing, Rejection) and nothing.reasons == ("no_trained_turn",)


def test_weights_are_part_of_the_row_id_and_unweighted_rows_keep_their_version_1_id():
    import hashlib

    import orjson

    plain = normalize_record({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                             "openai")
    # canonical-row/1 hashed [[role, content], ..., tools]: a row ingested then deduplicates against one now
    assert plain.id == hashlib.sha256(orjson.dumps([["user", "q"], ["assistant", "a"], None])).hexdigest()
    weighted = normalize_record({"messages": [{"role": "user", "content": "q", "weight": 1},
                                              {"role": "assistant", "content": "a"}]}, "openai")
    assert weighted.id != plain.id


def test_a_text_row_is_trained_on_every_token_and_ends_with_eos(tokenizer):
    messages = canonical({"text": "The mitochondria is the powerhouse of the cell."})
    assert [(m["role"], m["content"]) for m in messages] == [("text", "The mitochondria is the powerhouse of the cell.")]
    eot = tokenizer.convert_tokens_to_ids(chat_format(tokenizer).end_of_turn)
    example = tokenize_conversation(tokenizer, messages, None, 4096, eot)
    assert example.labels == example.input_ids  # every token, no chat template around it
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example.input_ids, skip_special_tokens=True) == messages[0]["content"]
    assert "<|start_header_id|>" not in tokenizer.decode(example.input_ids)


def test_an_assistant_turn_with_text_and_tool_calls_keeps_both():
    row = normalize_record({"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "18C"},
        {"role": "assistant", "content": "It is 18C.", "reasoning_content": "The tool said 18C."}]}, "openai")
    assert row.messages[1][:2] == ("assistant", "Let me look.")
    assert row.messages[1][3] == ('[{"function":{"arguments":{"city":"Paris"},"name":"weather"},"id":"call_1",'
                                  '"type":"function"}]')
    assert row.messages[3][4] == "The tool said 18C."


def test_reasoning_and_tool_call_parts_are_kept_and_media_parts_are_named():
    row = normalize_record({"messages": [
        {"role": "user", "content": [{"type": "text", "value": "2+2?"}]},
        {"role": "assistant", "content": [{"type": "reasoning", "text": "Add them."},
                                          {"type": "text", "value": "4"}]}]}, "openai")
    assert [m[:2] for m in row.messages] == [("user", "2+2?"), ("assistant", "4")] and row.messages[1][4] == "Add them."
    for part in ({"type": "image", "image": "x.png"}, {"type": "input_audio", "input_audio": {"data": "..."}}):
        rejection = normalize_record({"messages": [{"role": "user", "content": [part, {"type": "text", "text": "?"}]},
                                                   {"role": "assistant", "content": "a"}]}, "openai")
        assert rejection.reasons == (f"unsupported_content:{part['type']}",)
    rejection = normalize_record({"instruction": "<image>What is this?", "output": "A cat.", "images": ["cat.png"]},
                                 "alpaca")
    assert rejection.reasons == ("unsupported_content:images",) and "field 'images' holds media" in rejection.details


@pytest.mark.parametrize("record", [
    {"prompt": "2+2?", "chosen": "4", "rejected": "5"},  # TRL standard, explicit prompt
    {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5"}]},  # TRL conversational
    {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
     "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]},  # TRL implicit prompt
    {"conversations": [{"from": "human", "value": "2+2?"}], "chosen": {"from": "gpt", "value": "4"},
     "rejected": {"from": "gpt", "value": "5"}},  # LLaMA-Factory sharegpt ranking
    {"instruction": "2+2?", "input": "", "chosen": "4", "rejected": "5"},  # LLaMA-Factory alpaca ranking
    {"question": "2+2?", "chosen": "4", "rejected": "5"},  # orca-style pairs
], ids=["trl-standard", "trl-conversational", "trl-implicit", "lf-sharegpt", "lf-alpaca", "question"])
def test_a_preference_row_takes_its_chosen_conversation(record):
    assert record_format(record) == "preference"
    row = normalize_record(record, "preference")
    assert [m[:2] for m in row.messages] == [("user", "2+2?"), ("assistant", "4")]


def test_an_alpaca_row_with_the_question_in_its_input_is_that_question():
    for instruction in ("", "   ", None):
        record = {"instruction": instruction, "input": "Convert 3 km to metres.", "output": "3000 m"}
        row = normalize_record(record, "alpaca")
        assert [m[:2] for m in row.messages] == [("user", "Convert 3 km to metres."), ("assistant", "3000 m")]
    blank = normalize_record({"instruction": "", "input": "", "output": "x"}, "alpaca")
    assert isinstance(blank, Rejection) and "empty_content" in blank.reasons


def test_a_dataset_of_canonical_row_version_1_reads_as_version_2():
    old = pa.struct([pa.field("role", pa.string(), nullable=False), pa.field("content", pa.string(), nullable=False)])
    batch = pa.RecordBatch.from_pydict({
        "id": ["a"], "messages": pa.array([[("user", "q"), ("assistant", "a")]], type=pa.list_(old)), "tools": [None],
        "source_drop": ["d"], "source_file": ["f"], "source_row": [1], "source_format": ["openai"]})
    upgraded = upgrade_canonical(batch)
    assert upgraded.schema.equals(CANONICAL_SCHEMA, check_metadata=False)
    assert upgraded.to_pylist()[0]["messages"] == [
        {"role": "user", "content": "q", "weight": None, "tool_calls": None, "reasoning": None},
        {"role": "assistant", "content": "a", "weight": None, "tool_calls": None, "reasoning": None}]
