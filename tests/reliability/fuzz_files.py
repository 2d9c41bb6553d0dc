"""Hypothesis strategies for hostile drop files: each draws a `DropFile` (name, bytes, expected rows).

`expected_rows` is the number of rows a reader must report for the file, counted from how the file
was generated (one per non-blank JSONL line, per CSV data row, per array element, per Parquet row),
or None where the generator cannot know it (a truncated or corrupted file).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import strategies as st

BOM = b"\xef\xbb\xbf"


@dataclass
class DropFile:
    name: str
    data: bytes
    expected_rows: int | None
    kind: str


# ---------------------------------------------------------------------------------------------
# Values and records
# ---------------------------------------------------------------------------------------------

# text with the characters that break naive readers: NUL, BOM, CR/LF, quotes, commas, RTL, emoji
SPECIALS = ["", " ", "\x00", "a\x00b", "\ufeff", "\r\n", "\r", "\n", '"', "'", ",", "\\", "\t", "\u202e", "😀",
            "\\ud800", "{", "[", "null", "é", "\u2028"]
text = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
    st.sampled_from(SPECIALS),
    st.lists(st.sampled_from(SPECIALS), max_size=6).map("".join),
)
# huge strings: far over the 32k-character limit, cheap to generate
huge = st.builds(lambda ch, n: ch * n, st.sampled_from(["a", "é", "😀", "\x00", " "]), st.integers(33_000, 120_000))
good_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=30).filter(str.strip)
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), text)
anyjson = st.recursive(scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                       max_leaves=12)
field = st.one_of(good_text, good_text, good_text, text, huge, anyjson)
role = st.one_of(st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt", "observation",
                                  "function_call", "developer", "USER "]), text, scalar)


# content as the tools write it (issue 14/15): parts with text or value, reasoning and tool-call parts, media
# parts that must be quarantined by name, and junk
part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": field}),
    st.fixed_dictionaries({"type": st.just("text"), "value": field}),
    st.fixed_dictionaries({"type": st.sampled_from(["reasoning", "thinking"]), "text": field}),
    st.fixed_dictionaries({"type": st.just("tool_call"), "tool_call": anyjson}),
    st.fixed_dictionaries({"type": st.sampled_from(["image", "image_url", "input_audio", "video", "file"]), "url": text}),
    anyjson,
)
content = st.one_of(field, field, st.lists(part, max_size=4))
# what a turn may say beside its role and content: its loss weight, its calls, its reasoning
turn_extras = {"weight": scalar, "loss_weight": scalar, "train": scalar, "tool_calls": anyjson,
               "reasoning_content": field}


def _turns(role_key: str, content_key: str):
    turn = st.fixed_dictionaries({role_key: role, content_key: content}, optional=turn_extras) | anyjson
    conversation = st.lists(st.fixed_dictionaries({role_key: st.sampled_from(["user", "human"]), content_key: good_text}),
                            min_size=1, max_size=1).flatmap(
        lambda first: st.lists(turn, max_size=4).map(lambda rest: first + rest))
    return conversation | st.lists(turn, max_size=5) | anyjson


record = st.one_of(
    st.fixed_dictionaries({"instruction": field, "output": field},
                          optional={"input": field, "system": field, "history": anyjson, "tools": anyjson}),
    st.fixed_dictionaries({"conversations": _turns("from", "value")}, optional={"system": field, "tools": anyjson}),
    st.fixed_dictionaries({"messages": _turns("role", "content")},
                          optional={"tools": anyjson, "images": anyjson, "audios": anyjson}),
    st.fixed_dictionaries({"prompt": field | _turns("role", "content"), "completion": field | _turns("role", "content")}),
    st.fixed_dictionaries({"chosen": field | _turns("role", "content") | anyjson, "rejected": field | anyjson},
                          optional={"prompt": field | _turns("role", "content"), "question": field,
                                    "conversations": _turns("from", "value"), "instruction": field, "input": field}),
    st.fixed_dictionaries({"text": field}),
    st.dictionaries(text, anyjson, max_size=4),
    anyjson,
)


def deep(depth: int, inner: str = "1") -> str:
    """A JSON value nested `depth` arrays deep, as text (json.dumps would hit Python's recursion limit)."""
    return "[" * depth + inner + "]" * depth


deep_record = st.builds(
    lambda depth, key: '{"instruction": "q", "output": "a", "%s": %s}' % (key, deep(depth)),
    st.integers(500, 20_000), st.sampled_from(["tools", "history", "input", "extra"]))
deep_value = st.builds(deep, st.integers(500, 20_000))


def _is_json(value) -> bool:
    """JSON that a streaming reader reads to the end: no NaN/Infinity, and no integer beyond 64 bits
    (valid JSON, but ijson's C parser stops there; the file is then reported corrupt at that record)."""
    try:
        json.dumps(value, allow_nan=False, default=str)
    except ValueError:
        return False
    return not _big_int(value)


def _big_int(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return not -2**63 <= value < 2**64
    if isinstance(value, list):
        return any(_big_int(v) for v in value)
    if isinstance(value, dict):
        return any(_big_int(v) for v in value.values())
    return False


def _dumps(value, ascii_only: bool) -> str:
    return json.dumps(value, ensure_ascii=ascii_only)  # NaN and Infinity come out as non-JSON literals


# ---------------------------------------------------------------------------------------------
# Files, one strategy per reader
# ---------------------------------------------------------------------------------------------


@st.composite
def jsonl_files(draw) -> DropFile:
    ascii_only = draw(st.booleans())
    line = st.one_of(
        record.map(lambda r: _dumps(r, ascii_only).encode("utf-8", "surrogatepass")),
        record.map(lambda r: _dumps(r, ascii_only).encode("utf-8", "surrogatepass")),
        st.tuples(record, st.floats(0, 1)).map(  # truncated JSON
            lambda rf: _dumps(rf[0], ascii_only).encode("utf-8", "surrogatepass")[: int(len(_dumps(rf[0], True)) * rf[1])]),
        deep_record.map(str.encode),
        deep_value.map(str.encode),
        st.binary(max_size=60),  # random bytes, invalid UTF-8 included
        st.sampled_from([b"", b"   ", b"\t", b"\x00", b"\xff\xfe", b"null", b"[]", b"{}", b"1", b'"x"']),
    )
    lines = draw(st.lists(line, max_size=12))
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    data = eol.join(lines) + draw(st.sampled_from([b"", eol]))
    if draw(st.booleans()):
        data = BOM + data
    physical = data.split(b"\n")
    if physical and physical[0].startswith(BOM):
        physical[0] = physical[0][3:]
    expected = sum(1 for p in physical if p.rstrip(b"\r\n").strip())
    return DropFile("rows.jsonl", data, expected, "jsonl")


@st.composite
def json_files(draw) -> DropFile:
    records = draw(st.lists(record, max_size=10))
    shape = draw(st.sampled_from(["array", "array", "object_of_arrays", "single", "scalar", "deep", "empty"]))
    expected: int | None
    # NaN and Infinity are not JSON: a reader stops at the first one, so the count is unknown
    valid = _is_json(records)
    if shape == "array":
        text_value, expected = _dumps(records, draw(st.booleans())), len(records) if valid else None
    elif shape == "object_of_arrays":
        half = len(records) // 2
        text_value = _dumps({"train": records[:half], "test": records[half:]}, False)
        expected = len(records) if valid else None
    elif shape == "single":
        one = draw(st.fixed_dictionaries({"instruction": field, "output": field}))
        text_value, expected = _dumps(one, False), 1 if _is_json(one) else None
    elif shape == "scalar":
        value = draw(scalar)
        text_value, expected = _dumps(value, False), 1 if _is_json(value) else None
    elif shape == "deep":
        text_value, expected = "[" + draw(deep_record) + "]", 1
    else:
        text_value, expected = draw(st.sampled_from(["", "  \n", "[]", "{}"])), 0
    if draw(st.booleans()) and shape in ("array", "object_of_arrays", "single"):  # pretty-printed with CRLF
        # json.dumps escapes newlines inside strings, so every raw newline of an indented dump is structural
        text_value = json.dumps(json.loads(text_value), indent=2).replace("\n", "\r\n")
    data = text_value.encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        data = BOM + data
    if shape != "empty" and draw(st.integers(0, 3)) == 0:  # truncated at a random byte
        data, expected = data[: draw(st.integers(0, max(0, len(data) - 1)))], None
    return DropFile("rows.json", data, expected, "json")


CSV_HEADERS = [["instruction", "input", "output"], ["prompt", "completion"], ["messages"], ["conversations", "system"],
               ["instruction", "output", "system", "history"], ["a", "b"]]


@st.composite
def csv_files(draw) -> DropFile:
    header = draw(st.sampled_from(CSV_HEADERS))
    cell = st.one_of(good_text, text, huge, anyjson.map(lambda v: _dumps(v, False)),
                     record.map(lambda v: _dumps(v, False)))
    rows = draw(st.lists(st.lists(cell, min_size=len(header), max_size=len(header)) |
                         st.lists(cell, max_size=len(header) + 2), max_size=10))
    buffer = io.StringIO()
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
    writer = csv.writer(buffer, lineterminator=draw(st.sampled_from(["\n", "\r\n"])), quoting=quoting)
    writer.writerow(header)
    writer.writerows(rows)
    data = buffer.getvalue().encode("utf-8", "surrogatepass")
    expected: int | None = sum(1 for r in rows if r and not (len(r) == 1 and not r[0].strip()))
    if quoting == csv.QUOTE_MINIMAL and any("\r" in c for r in rows for c in r):
        expected = None  # csv.writer leaves a bare CR unquoted under a "\n" terminator: it splits the row
    if draw(st.booleans()):
        data = BOM + data
    if draw(st.integers(0, 4)) == 0:  # raw garbage appended: unbalanced quotes, NULs, invalid UTF-8
        data += draw(st.sampled_from([b'"unclosed, quote\n', b"\x00,\x00\n", b"\xff\xfe,x\n", b'a,"b""\n']))
        expected = None
    if draw(st.integers(0, 4)) == 0:
        data, expected = data[: draw(st.integers(0, len(data)))], None
    return DropFile("rows.csv", data, expected, "csv")


MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


@st.composite
def parquet_files(draw) -> DropFile:
    n = draw(st.integers(0, 8))
    columns = draw(st.sampled_from([["instruction", "input", "output"], ["prompt", "completion"], ["messages"],
                                    ["conversations"], ["x"]]))
    arrays = {}
    for name in columns:
        kind = draw(st.sampled_from(["string", "string", "int", "float", "bool", "null", "messages", "strings"]))
        if kind == "string":
            values, type_ = draw(st.lists(st.none() | good_text | text | huge, min_size=n, max_size=n)), pa.large_string()
        elif kind == "int":
            values, type_ = draw(st.lists(st.none() | st.integers(-2**63, 2**63 - 1), min_size=n, max_size=n)), pa.int64()
        elif kind == "float":
            values, type_ = draw(st.lists(st.floats(), min_size=n, max_size=n)), pa.float64()
        elif kind == "bool":
            values, type_ = draw(st.lists(st.booleans(), min_size=n, max_size=n)), pa.bool_()
        elif kind == "null":
            values, type_ = [None] * n, pa.null()
        elif kind == "messages":
            message = st.fixed_dictionaries({"role": st.none() | role.filter(lambda r: isinstance(r, str)),
                                             "content": st.none() | good_text | text})
            values, type_ = draw(st.lists(st.none() | st.lists(message, max_size=4), min_size=n, max_size=n)), MESSAGES
        else:
            values, type_ = draw(st.lists(st.lists(good_text | text, max_size=3), min_size=n, max_size=n)), pa.list_(pa.string())
        arrays[name] = pa.array([_no_surrogates(v) for v in values], type=type_)
    sink = io.BytesIO()
    pq.write_table(pa.table(arrays) if arrays else pa.table({"x": pa.array([], pa.null())}), sink)
    data, expected = sink.getvalue(), n
    corruption = draw(st.sampled_from(["none", "none", "truncate", "flip"]))
    if corruption == "truncate":
        data, expected = data[: draw(st.integers(0, len(data) - 1))], None
    elif corruption == "flip":
        at = draw(st.integers(0, len(data) - 1))
        data, expected = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:], None
    return DropFile("rows.parquet", data, expected, "parquet")


def _no_surrogates(value):
    """Arrow strings are UTF-8: lone surrogates cannot be in a Parquet file, so none are generated."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, list):
        return [_no_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {k: _no_surrogates(v) for k, v in value.items()}
    return value


@st.composite
def gzipped_files(draw) -> DropFile:
    inner = draw(st.one_of(jsonl_files(), json_files(), csv_files(), parquet_files()))
    data, expected = gzip.compress(inner.data), inner.expected_rows
    if draw(st.integers(0, 3)) == 0:  # a truncated gzip stream
        data, expected = data[: draw(st.integers(0, len(data) - 1))], None
    return DropFile(inner.name + ".gz", data, expected, "gz:" + inner.kind)


@st.composite
def mismatched_files(draw) -> DropFile:
    """Random bytes, or one format's content under another format's name (mixed formats)."""
    content = draw(st.one_of(st.binary(max_size=3000).map(lambda b: DropFile("", b, None, "bytes")),
                             jsonl_files(), json_files(), csv_files(), parquet_files()))
    suffix = draw(st.sampled_from([".jsonl", ".json", ".csv", ".parquet", ".jsonl.gz", ".csv.gz"]))
    data = gzip.compress(content.data) if suffix.endswith(".gz") else content.data
    same = ("rows" + suffix).removesuffix(".gz") == content.name
    return DropFile("rows" + suffix, data, content.expected_rows if same else None, "mixed")
