"""The ingest registries: every row of the formats table and of the readers table works, and `--format`
is checked against the formats table (in the ingest package and, before anything runs, in the CLI)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from foundation.errors import ConfigError
from schemas.config import IngestConfig
from tasks.ingest.discovery import list_drop_files
from tasks.ingest.formats import (
    FORMAT_NAMES,
    FORMATS,
    CanonicalRow,
    Rejection,
    check_format,
    detect_format,
    normalize_record,
    record_format,
)
from tasks.ingest.readers import READERS, SUPPORTED_SUFFIXES, iter_file_records
from tests.conftest import ROOT

# The smallest record of each format: a new format adds its own here.
MINIMAL_RECORDS = {
    "openai": {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
    "alpaca": {"instruction": "2+2?", "input": "", "output": "4"},
    "prompt_completion": {"prompt": "2+2?", "completion": "4"},
    "preference": {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    "text": {"text": "2+2 is 4."},
}
# What each minimal record becomes: (role, content) of its messages
EXPECTED_TURNS = {name: [("user", "2+2?"), ("assistant", "4")] for name in MINIMAL_RECORDS} | {
    "text": [("text", "2+2 is 4.")]}
CHOICES = ", ".join(("auto", *FORMAT_NAMES))


def test_every_format_has_a_minimal_record_here():
    assert sorted(MINIMAL_RECORDS) == sorted(FORMAT_NAMES)
    assert len(set(FORMAT_NAMES)) == len(FORMATS)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda fmt: fmt.name)
def test_every_format_detects_and_normalises_its_own_record(fmt):
    record = MINIMAL_RECORDS[fmt.name]
    assert fmt.detect(record)
    assert record_format(record) == fmt.name
    assert detect_format([record, {"unrelated": 1}, "not an object"]) == fmt.name
    row = normalize_record(record, fmt.name)
    assert isinstance(row, CanonicalRow), row
    assert [m[:2] for m in row.messages] == EXPECTED_TURNS[fmt.name]
    assert all(m[2:] == (None, None, None) for m in row.messages)  # no weight, tool calls or reasoning given
    assert row.tools is None and len(row.id) == 64


def test_detection_follows_the_order_of_the_table():
    assert FORMAT_NAMES == ("preference", "openai", "sharegpt", "alpaca", "prompt_completion", "text")
    every_field = {key: value for record in MINIMAL_RECORDS.values() for key, value in record.items()}
    assert record_format(every_field) == "preference"
    assert record_format({**MINIMAL_RECORDS["openai"], **MINIMAL_RECORDS["text"]}) == "openai"
    assert record_format({**MINIMAL_RECORDS["alpaca"], **MINIMAL_RECORDS["prompt_completion"]}) == "alpaca"
    assert record_format({"body": "no format's fields"}) is None and record_format(["a list"]) is None


@pytest.mark.parametrize("fmt", [fmt for fmt in FORMATS if fmt.rejects_other_formats], ids=lambda fmt: fmt.name)
def test_a_record_of_another_format_is_a_mismatch_naming_the_files_fields(fmt):
    other = next(name for name in FORMAT_NAMES if name != fmt.name)
    rejection = normalize_record(MINIMAL_RECORDS[other], fmt.name)
    assert isinstance(rejection, Rejection) and rejection.reasons == ("format_mismatch",)
    assert f"record looks like {other}, but the file is {fmt.name} (fields {fmt.fields})" in rejection.details


def test_an_alpaca_file_names_the_missing_fields_instead_of_a_mismatch():
    (alpaca,) = [fmt for fmt in FORMATS if fmt.name == "alpaca"]
    assert not alpaca.rejects_other_formats
    rejection = normalize_record(MINIMAL_RECORDS["openai"], "alpaca")
    assert rejection.reasons == ("missing_field:instruction", "missing_field:output")


@pytest.mark.parametrize("name", ["auto", *FORMAT_NAMES])
def test_check_format_accepts_auto_and_every_format_of_the_table(name):
    assert check_format(name) == name


@pytest.mark.parametrize("name", ["nope", "Alpaca", ""])
def test_check_format_rejects_another_name_naming_the_choices(name):
    with pytest.raises(ConfigError) as raised:
        check_format(name)
    assert str(raised.value) == f"--format {name}: choose from {CHOICES}"


def test_read_drop_checks_the_format_before_reading(tmp_path):
    from tasks.ingest.stage import read_drop

    with pytest.raises(ConfigError, match="choose from auto, preference, openai"):
        read_drop.fn(["never-read.jsonl"], "drop", IngestConfig(format="xml"), tmp_path / "staging")
    assert not (tmp_path / "staging").exists()


def test_formats_import_neither_prefect_nor_pyarrow():
    """The CLI imports the formats table to check --format: it must stay quick to import."""
    code = ("import sys, tasks.ingest.formats; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'pyarrow', 'fsspec', 'ijson'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------- readers


def _one_record_file(suffix: str) -> bytes:
    """A file of the given type holding the record {"prompt": "p", "completion": "c"}; a new reader adds its own."""
    table = pa.Table.from_pylist([{"prompt": "p", "completion": "c"}])
    sink = pa.BufferOutputStream()
    if suffix == ".parquet":
        pq.write_table(table, sink)
        return sink.getvalue().to_pybytes()
    if suffix in (".arrow", ".feather"):  # Arrow IPC: the stream format (as `datasets` writes it), the file format
        with (pa.ipc.new_stream if suffix == ".arrow" else pa.ipc.new_file)(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue().to_pybytes()
    return {
        ".jsonl": b'{"prompt": "p", "completion": "c"}\n',
        ".json": b'[{"prompt": "p", "completion": "c"}]',
        ".csv": b"prompt,completion\np,c\n",
    }[suffix]


def test_supported_suffixes_are_the_readers_table():
    assert SUPPORTED_SUFFIXES == tuple(READERS)


@pytest.mark.parametrize("suffix", SUPPORTED_SUFFIXES)
def test_every_file_type_of_the_table_is_listed_and_read(tmp_path, suffix):
    plain, gzipped = tmp_path / f"rows{suffix}", tmp_path / f"more{suffix}.gz"
    plain.write_bytes(_one_record_file(suffix))
    gzipped.write_bytes(gzip.compress(_one_record_file(suffix)))
    assert list_drop_files([str(tmp_path)]) == [str(gzipped), str(plain)]
    assert list_drop_files([str(plain)]) == [str(plain)]
    for url in (plain, gzipped):
        (record,) = iter_file_records(str(url), 100)
        assert record.value == {"prompt": "p", "completion": "c"} and record.reasons == ()


# ------------------------------------------------------------------------------------------- CLI


def test_cli_rejects_an_unknown_format_before_anything_runs(tmp_path):
    home = tmp_path / "home"
    (tmp_path / "rows.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    env = {**os.environ, "SFTFLOW_HOME": str(home), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([sys.executable, "-m", "sftflow", "ingest", str(tmp_path / "rows.jsonl"), "--format", "nope",
                           "--json"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.splitlines() == [f"error: --format nope: choose from {CHOICES}"]
    assert not home.exists()  # no workspace made, no Prefect started


def test_cli_format_help_lists_the_table():
    import typer.main

    from sftflow.cli import app

    command = typer.main.get_command(app).commands["ingest"]
    (option,) = [param for param in command.params if param.name == "format"]
    assert option.help.startswith("|".join(("auto", *FORMAT_NAMES)))


def test_tools_and_tool_calls_keep_integers_beyond_64_bits_and_refuse_only_real_depth():
    """JSON allows any integer; orjson writes 64-bit ones only. A big integer in a tool definition or a call's
    arguments is kept exactly, not quarantined as too deeply nested (which only real depth is)."""
    import json

    from tasks.ingest.readers.raw import dump_raw

    call = {"type": "function", "function": {"name": "pay", "arguments": {"cents": 2**70}}}
    record = {"messages": [{"role": "user", "content": "pay it"},
                           {"role": "assistant", "content": "", "tool_calls": [call]},
                           {"role": "tool", "content": "paid"}, {"role": "assistant", "content": "Done."}],
              "tools": [{"type": "function", "function": {"name": "pay", "max_cents": 2**80}}]}
    row = normalize_record(record, "openai")
    assert isinstance(row, CanonicalRow), row
    calls = json.loads(row.messages[1][3])
    assert calls[0]["function"]["arguments"]["cents"] == 2**70
    assert json.loads(row.tools)[0]["function"]["max_cents"] == 2**80
    assert normalize_record(record, "openai").id == row.id  # equal rows, equal ids
    assert str(2**70) in dump_raw(record)

    deep: list = []
    inner = deep
    for _ in range(300):
        inner.append([])
        inner = inner[0]
    call["function"]["arguments"] = {"nested": deep}
    rejected = normalize_record(record, "openai")
    assert isinstance(rejected, Rejection) and rejected.reasons == ("too_deeply_nested",)
    assert "tool_calls" in rejected.details
    surrogate = {**record, "tools": [{"type": "function", "function": {"name": "\ud800"}}]}
    surrogate["messages"][1]["tool_calls"] = [{"type": "function", "function": {"name": "pay", "arguments": {}}}]
    assert normalize_record(surrogate, "openai").reasons == ("invalid_utf8",)
