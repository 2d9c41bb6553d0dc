"""Readers, format detection and normalisation: every shape in, canonical rows or reasons out."""

from __future__ import annotations

import gzip
import io
import json

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from foundation.errors import DropError
from tasks.ingest.discovery import check_drop_id, default_drop_id, list_drop_files
from tasks.ingest.formats import CanonicalRow, Rejection, detect_format, normalize_record, row_id
from tasks.ingest.readers import iter_file_records
from tasks.ingest.readers.csv_file import read_csv
from tasks.ingest.readers.json_file import read_json
from tasks.ingest.readers.jsonl import read_jsonl


def jsonl(*lines: bytes) -> io.BytesIO:
    return io.BytesIO(b"\n".join(lines) + b"\n")


# --------------------------------------------------------------------------------------- readers


def test_jsonl_isolates_bad_lines_and_keeps_line_numbers():
    records = list(
        read_jsonl(
            jsonl(
                b'{"prompt": "a", "completion": "b"}',
                b'{"prompt": "truncated',
                b"",
                b'{"prompt": "\xff\xfe", "completion": "x"}',
                b"[1, 2]",
                b'{"prompt": "c", "completion": "d"}\r',
            )
        )
    )
    assert [r.source_row for r in records] == [1, 2, 4, 5, 6]
    assert records[0].value == {"prompt": "a", "completion": "b"}
    assert records[1].reasons == ("malformed_json",) and records[1].raw == '{"prompt": "truncated'
    assert records[2].reasons == ("invalid_utf8",) and "\\xff" in records[2].raw
    assert records[3].value == [1, 2]  # parses; normalisation rejects it as not an object
    assert records[4].value == {"prompt": "c", "completion": "d"}


def test_jsonl_strips_bom():
    (record,) = read_jsonl(io.BytesIO(b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\n'))
    assert record.value == {"prompt": "a", "completion": "b"}


def test_json_array_object_of_arrays_and_single_record():
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]
    array = list(read_json(io.BytesIO(json.dumps(rows).encode())))
    assert [r.value for r in array] == rows and [r.source_row for r in array] == [1, 2, 3]

    splits = list(read_json(io.BytesIO(json.dumps({"train": rows[:2], "test": rows[2:]}).encode())))
    assert [r.value for r in splits] == rows

    single = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    (one,) = read_json(io.BytesIO(b"\xef\xbb\xbf" + json.dumps(single).encode()))
    assert one.value == single


def test_json_truncated_keeps_the_records_before_the_damage():
    text = json.dumps([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}])
    records = list(read_json(io.BytesIO(text[:-25].encode())))
    assert records[0].value == {"prompt": "a", "completion": "b"}
    assert records[-1].reasons == ("malformed_json",)
    assert "corrupt after record 1" in records[-1].details
    assert len(records) == 2


def test_json_scalar_values_in_array_are_rows_not_crashes():
    records = list(read_json(io.BytesIO(b'[1, "x", {"prompt": "p", "completion": "c"}]')))
    assert [r.value for r in records] == [1, "x", {"prompt": "p", "completion": "c"}]


def test_csv_wrong_column_count_and_bad_bytes_are_rows():
    data = b'prompt,completion\n"a, with comma",b\nx,y,z\n\xff\xfe,q\n"multi\nline",ok\n'
    records = list(read_csv(io.BytesIO(data)))
    assert records[0].value == {"prompt": "a, with comma", "completion": "b"} and records[0].source_row == 2
    assert records[1].reasons == ("malformed_csv",) and records[1].source_row == 3
    assert records[2].reasons == ("invalid_utf8",) and records[2].source_row == 4
    assert records[3].value == {"prompt": "multi\nline", "completion": "ok"} and records[3].source_row == 5


def test_csv_cell_with_json_messages_normalises():
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    data = "messages\n" + '"' + json.dumps(messages).replace('"', '""') + '"\n'
    (record,) = read_csv(io.BytesIO(data.encode()))
    row = normalize_record(record.value, "openai")
    assert isinstance(row, CanonicalRow) and [m[:2] for m in row.messages] == [(m["role"], m["content"]) for m in messages]


def test_parquet_and_gzip_through_fsspec(tmp_path):
    rows = [{"instruction": "q", "input": "", "output": "a"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    with gzip.open(tmp_path / "rows.jsonl.gz", "wb") as fh:
        fh.write(b'{"prompt": "p", "completion": "c"}\n')
    assert [r.value for r in iter_file_records(str(tmp_path / "rows.parquet"), 100)] == rows
    assert [r.value for r in iter_file_records(str(tmp_path / "rows.jsonl.gz"), 100)] == [{"prompt": "p", "completion": "c"}]


def test_unreadable_files_become_one_quarantined_row(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "p"}\n' * 100)[:40])
    (parquet,) = iter_file_records(str(tmp_path / "bad.parquet"), 100)
    assert parquet.reasons == ("unreadable_file",)
    assert any(r.reasons == ("unreadable_file",) for r in iter_file_records(str(tmp_path / "bad.jsonl.gz"), 100))


# ------------------------------------------------------------------------------ files and drop ids


def test_list_drop_files_skips_markers_and_rejects_unknown_suffix(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "b.csv.gz").write_bytes(gzip.compress(b"prompt,completion\n"))
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / ".hidden.json").write_text("[]")
    assert [p.rsplit("/", 1)[1] for p in list_drop_files([str(tmp_path)])] == ["a.jsonl", "b.csv.gz"]
    with pytest.raises(DropError, match="unsupported file type.*jsonl"):
        list_drop_files([str(tmp_path / "notes.md")])
    with pytest.raises(DropError, match="no such file"):
        list_drop_files([str(tmp_path / "missing.jsonl")])


def test_memory_url_is_read_through_fsspec():
    import fsspec

    with fsspec.open("memory://drops/x/rows.jsonl", "wb") as fh:
        fh.write(b'{"prompt": "p", "completion": "c"}\n')
    (url,) = list_drop_files(["memory://drops/x"])
    assert url.startswith("memory://")
    assert [r.value for r in iter_file_records(url, 10)] == [{"prompt": "p", "completion": "c"}]


@pytest.mark.parametrize("bad", ["../etc", "a/../../b", "/abs", "a/b", ".hidden", "", "x" * 200, "dots..dots"])
def test_unsafe_drop_ids_are_refused(bad):
    with pytest.raises(DropError, match="drop id .* is not allowed"):
        check_drop_id(bad)


def test_default_drop_id_is_safe_and_content_addressed():
    drop_id = default_drop_id(["/data/my drop!/"], "ab" * 32)
    assert check_drop_id(drop_id) == "my-drop-abababababab"


# -------------------------------------------------------------------------------- normalisation


def test_alpaca_with_system_history_and_input():
    row = normalize_record(
        {
            "system": "Be terse.",
            "history": [["hi", "hello"]],
            "instruction": "Convert to metres.",
            "input": "3 km",
            "output": "3000 m",
        },
        "alpaca",
    )
    assert [m[:2] for m in row.messages] == [
        ("system", "Be terse."),
        ("user", "hi"),
        ("assistant", "hello"),
        ("user", "Convert to metres.\n3 km"),
        ("assistant", "3000 m"),
    ]


def test_alpaca_collects_every_reason():
    rejection = normalize_record({"instruction": "  ", "output": 42, "history": "nope"}, "alpaca")
    assert isinstance(rejection, Rejection)
    assert set(rejection.reasons) == {"empty_content", "wrong_type:output", "wrong_type:history"}
    assert "'output' is int" in rejection.details


def test_sharegpt_roles_tools_and_observation():
    tools = [{"name": "get_time", "parameters": {"type": "object"}}]
    row = normalize_record(
        {
            "conversations": [
                {"from": "system", "value": "You can call tools."},
                {"from": "human", "value": "Time?"},
                {"from": "function_call", "value": '{"name": "get_time", "arguments": {}}'},
                {"from": "observation", "value": '{"time": "12:00"}'},
                {"from": "gpt", "value": "It is noon."},
            ],
            "tools": json.dumps(tools),
        },
        "sharegpt",
    )
    assert [m[0] for m in row.messages] == ["system", "user", "assistant", "tool", "assistant"]
    # ShareGPT's function_call turn is the assistant's structured call, its value parsed (not kept as text)
    assert row.messages[2][1] == "" and json.loads(row.messages[2][3]) == [
        {"type": "function", "function": {"name": "get_time", "arguments": {}}}]
    assert json.loads(row.tools) == tools


def test_sharegpt_tools_that_are_not_json_are_rejected():
    rejection = normalize_record(
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "tools": "{oops"}, "sharegpt"
    )
    assert rejection.reasons == ("invalid_tools_json",)


def test_openai_content_parts_tool_calls_and_developer_role():
    row = normalize_record(
        {
            "messages": [
                {"role": "developer", "content": "Rules."},
                {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "two"}]},
                {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "content": "42"},
                {"role": "assistant", "content": "The answer is 42."},
            ]
        },
        "openai",
    )
    assert row.messages[0][:2] == ("system", "Rules.")
    assert row.messages[1][:2] == ("user", "part one\ntwo")
    # a turn that only calls tools: no text, the calls in OpenAI's shape with their arguments parsed
    assert row.messages[2][:2] == ("assistant", "")
    assert json.loads(row.messages[2][3]) == [{"type": "function", "function": {"name": "f", "arguments": {}}}]


def test_openai_image_part_is_unsupported():
    rejection = normalize_record(
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "openai"
    )
    assert rejection.reasons == ("unsupported_content:image_url",)
    assert "messages[0].content[0] is a part of type 'image_url'" in rejection.details


def test_prompt_completion_plain_and_conversational():
    plain = normalize_record({"prompt": "2+2?", "completion": "4"}, "prompt_completion")
    conversational = normalize_record(
        {"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}]},
        "prompt_completion",
    )
    assert plain.messages == conversational.messages
    assert plain.id == conversational.id


def test_wrong_types_and_missing_fields_name_the_field():
    assert normalize_record({"prompt": "x"}, "prompt_completion").reasons == ("missing_field:completion",)
    assert normalize_record({"messages": "hello"}, "openai").reasons == ("wrong_type:messages",)
    assert normalize_record({"conversations": [{"value": "x"}]}, "sharegpt").reasons == ("missing_field:from",)
    assert normalize_record("just a string", "alpaca").reasons == ("not_an_object",)


def test_format_mismatch_in_a_file_of_another_format():
    rejection = normalize_record({"messages": []}, "prompt_completion")
    assert rejection.reasons == ("format_mismatch",) and "--format" in rejection.details


def test_lone_surrogate_is_invalid_utf8():
    rejection = normalize_record({"prompt": "bad \ud800", "completion": "c"}, "prompt_completion")
    assert rejection.reasons == ("invalid_utf8",)


def test_detect_format_by_majority():
    assert detect_format([{"messages": []}, {"messages": []}, {"prompt": "x"}]) == "openai"
    assert detect_format([{"conversations": []}]) == "sharegpt"
    assert detect_format([{"instruction": "a", "output": "b"}]) == "alpaca"
    assert detect_format([{"prompt": "a", "completion": "b"}]) == "prompt_completion"
    assert detect_format([{"text": "a"}, 3]) == "text"
    assert detect_format([{"body": "a"}, 3]) is None


def test_row_id_depends_on_content_roles_and_tools_only():
    messages = [("user", "a", None, None, None), ("assistant", "b", None, None, None)]
    assert row_id(messages, None) == row_id([tuple(m) for m in messages], None)
    assert row_id(messages, None) != row_id(messages, "[]")
    swapped = [("assistant", "a", None, None, None), ("user", "b", None, None, None)]
    assert row_id(messages, None) != row_id(swapped, None)
    assert len(row_id(messages, None)) == 64 and orjson.loads(orjson.dumps(row_id(messages, None)))


@pytest.mark.parametrize("content", [b"", b"  \n", b"[]", b"{}", b"\xef\xbb\xbf"])
def test_empty_json_files_have_no_rows(content):
    assert list(read_json(io.BytesIO(content))) == []


def test_an_integer_beyond_64_bits_does_not_cost_the_files_other_records():
    """JSON allows any integer; ijson's C parser stops at one beyond 64 bits (found by the fuzz suite): the
    file is read again by the Python parser, and every record is read once, in order."""
    big = b'[{"prompt": "a", "completion": "b", "n": 9223372036854775808}, {"prompt": "c", "completion": "d"}]'
    records = list(read_json(io.BytesIO(big)))
    assert [(r.source_row, r.reasons) for r in records] == [(1, ()), (2, ())]
    assert records[0].value["n"] == 2**63 and records[1].value == {"prompt": "c", "completion": "d"}
    nested = b'{"train": [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d", "n": -' + b"9" * 30 + b"}]}"
    assert [r.value["prompt"] for r in read_json(io.BytesIO(nested))] == ["a", "c"]
