"""Rendering with the chat template, response-only labels, and every gate on a crafted bad example."""

from __future__ import annotations

import pyarrow as pa
import pytest
from transformers import AutoTokenizer, DataCollatorForLanguageModeling

from schemas.tables import CANONICAL_SCHEMA
from tasks.engines.chat_format import chat_format, end_of_turn_ids
from tasks.engines.tokenizer import TemplateError
from tasks.tokenize import IGNORE, GateError, check_pad_masking, run_gates, tokenize_conversation


@pytest.fixture
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def rows(*conversations) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {"id": f"{i:064x}", "messages": [{"role": r, "content": c} for r, c in turns], "tools": None,
             "source_drop": "d", "source_file": "f.jsonl", "source_row": i + 1, "source_format": "openai"}
            for i, turns in enumerate(conversations)
        ],
        schema=CANONICAL_SCHEMA,
    )


def eot(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(chat_format(tokenizer).end_of_turn)


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE])


def test_labels_are_exactly_the_assistant_turns_with_their_end_of_turn(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "tool", "content": '{"checked": true}'},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "8"},
    ]
    example = tokenize_conversation(tokenizer, messages, None, 512, eot(tokenizer))
    assert trained_text(tokenizer, example) == "5<|eot_id|>8<|eot_id|>"
    assert example.turns_missing_eot == [] and not example.truncated
    # labels equal input ids where trained: the model learns the tokens it sees
    assert all(label in (IGNORE, token) for token, label in zip(example.input_ids, example.labels))
    # the context (system, user, tool turns and assistant headers) is never trained
    context = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label == IGNORE])
    assert "Be brief." in context and '{"checked": true}' in context and "What is 2 + 3?" in context


def test_gate_no_trainable_token_names_the_row(tokenizer):
    bad = rows([("user", "hello"), ("assistant", "hi")], [("user", "only a question")])
    with pytest.raises(GateError, match=r"1 example\(s\) have no trainable token.*f.jsonl row 2"):
        run_gates(tokenizer, bad, 256, 0.5, "train")


def test_a_template_without_an_end_of_turn_token_is_refused_before_any_row(tokenizer):
    tokenizer.chat_template = (
        "{%- for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{ 'assistant: ' }}{%- endif %}"
    )
    with pytest.raises(TemplateError, match=r"ends an assistant turn with '\\n', which holds no special token"):
        run_gates(tokenizer, rows([("user", "q"), ("assistant", "a")]), 256, 0.5, "train")


def test_gate_end_of_turn_not_learned_names_the_row_and_turn(tokenizer):
    # a template that leaves out the end-of-turn token after some assistant turns (here: those starting with "a")
    tokenizer.chat_template = (
        "{{ bos_token }}{%- for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
        "+ m['content'] }}{% if m['role'] != 'assistant' or not m['content'].startswith('a') %}{{ '<|eot_id|>' }}"
        "{% endif %}{%- endfor %}{%- if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
    )
    with pytest.raises(GateError, match=r"end-of-turn token is not a label.*f.jsonl row 2.*assistant turns \[1\]"):
        run_gates(tokenizer, rows([("user", "q"), ("assistant", "b")], [("user", "q"), ("assistant", "a")]), 256,
                  0.5, "train")


def test_gate_pad_masking_the_end_of_turn(tokenizer):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    short = tokenize_conversation(tokenizer, messages, None, 64, eot(tokenizer))
    long = tokenize_conversation(tokenizer, messages * 3, None, 64, eot(tokenizer))
    check_pad_masking(tokenizer, [short, long], end_of_turn_ids(tokenizer))  # distinct pad: fine
    tokenizer.pad_token = "<|eot_id|>"
    # transformers' LM collator masks every pad id in the labels: with pad == eot the model never learns to stop
    masking = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    def collate(examples):
        return masking([{"input_ids": e["input_ids"]} for e in examples])

    with pytest.raises(GateError, match="padding masks the end-of-turn token"):
        check_pad_masking(tokenizer, [short, long], end_of_turn_ids(tokenizer), collate=collate)


def test_gate_truncation_rate(tokenizer):
    long = [("user", "word " * 200), ("assistant", "ok")]
    table = rows(long, [("user", "q"), ("assistant", "a")])
    with pytest.raises(GateError, match=r"1 of 2 rows \(50.0%\) are longer than train.max_seq_length=64"):
        run_gates(tokenizer, table, 64, 0.1, "train")
    tokenized, _, report = run_gates(tokenizer, table, 64, 0.6, "train")
    assert report.truncated == 1 and report.truncation_rate == 0.5
    assert tokenized.num_rows == 1 and report.dropped_no_labels == 1  # the truncated row lost its answer


def test_a_model_without_a_template_needs_one_named_or_written(tiny_model, tmp_path):
    from schemas.config import RunConfig
    from tasks.engines.tokenizer import load_tokenizer

    base = AutoTokenizer.from_pretrained(tiny_model)
    base.chat_template = None
    base.save_pretrained(tmp_path / "base")  # a base model's tokenizer: no chat template of its own
    (tmp_path / "base" / "chat_template.jinja").unlink(missing_ok=True)
    config = RunConfig.model_validate({"name": "b", "model": {"name": str(tmp_path / "base")}})
    with pytest.raises(TemplateError, match="has no chat template; set model.chat_template"):
        load_tokenizer(str(tmp_path / "base"), config)
    named = config.model_copy(update={"model": config.model.model_copy(update={"chat_template": "llama3"})})
    tokenizer = load_tokenizer(str(tmp_path / "base"), named)
    assert chat_format(tokenizer).end_of_turn == "<|eot_id|>"  # the named template, with the model's own tokens
    example = tokenize_conversation(tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "5"}],
                                    None, 64, eot(tokenizer))
    assert trained_text(tokenizer, example) == "5<|eot_id|>"


def test_tokenizing_on_several_processes_gives_the_rows_and_gate_counts_of_one(tokenizer, monkeypatch):
    """Large tables are tokenized in forked processes: same rows in the same order, same gate findings."""
    import tasks.tokenize as tokenize

    conversations = [[("user", f"What is {i} + {i}?"), ("assistant", str(2 * i))] for i in range(40)]
    conversations[7] = [("user", "only a question")]  # no trainable token
    conversations[23] = [("user", "a long one " * 200), ("assistant", "ok")]  # truncated
    table = rows(*conversations)
    serial, serial_examples, serial_found = tokenize.tokenize_table(tokenizer, table, 64)
    monkeypatch.setattr(tokenize, "ROWS_PER_PROCESS", 9)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    forked, forked_examples, forked_found = tokenize.tokenize_table(tokenizer, table, 64)
    assert forked.equals(serial) and forked.num_rows == 38
    assert [e.labels for e in forked_examples] == [e.labels for e in serial_examples]
    assert forked_found == serial_found
    assert serial_found["truncated"] == 1 and [w for w, _ in serial_found["no_labels"]] == [
        "f.jsonl row 8 (id 000000000000)", "f.jsonl row 24 (id 000000000000)"]
