"""Descriptors (tasks/ingest/descriptor.py): sftflow's drop.yaml, LLaMA-Factory's dataset_info.json and an
Axolotl config's datasets, read into one normalised form, checked with one-line errors, applied to records.

The flow through Prefect (the drop report, the fingerprint, the CLI's --map) is in
tests/flows/test_ingest_descriptor.py."""

from __future__ import annotations

import json

import pytest
import yaml

from foundation import staging
from foundation.errors import ConfigError
from schemas.config import IngestConfig
from tasks.ingest.descriptor import (
    Descriptor,
    assign_files,
    file_format,
    find_descriptor,
    find_mapped_drop,
    parse_descriptor,
    read_descriptor,
    record_mapper,
)
from tasks.ingest.discovery import find_drop
from tasks.ingest.formats import CanonicalRow, normalize_record
from tasks.ingest.stage import stage_file


def write(path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def only(descriptor_file) -> Descriptor:
    (entry,) = descriptor_file.entries
    return entry


def turns(record, fmt) -> list[tuple[str, str]]:
    row = normalize_record(record, fmt)
    assert isinstance(row, CanonicalRow), row
    return [m[:2] for m in row.messages]


# --------------------------------------------------------------------------------------- sftflow's own


def test_a_question_answer_file_maps_onto_alpaca():
    entry = only(parse_descriptor({"columns": {"instruction": "question", "output": "answer"}}, "drop.yaml"))
    record = record_mapper(entry)({"question": "What is 2+2?", "answer": "4", "source": "quiz"})
    assert record == {"instruction": "What is 2+2?", "output": "4", "source": "quiz"}  # `source` passes through
    assert turns(record, "alpaca") == [("user", "What is 2+2?"), ("assistant", "4")]


def test_turn_keys_and_custom_roles_are_mapped_and_a_system_prompt_added():
    entry = only(parse_descriptor(yaml.safe_load("""
        format: openai
        columns: {messages: conversation}
        message_keys: {role: speaker, content: text, weight: loss_weight}
        roles: {customer: user, agent: assistant}
        system: You are a support agent.
        tags: [support, 2026-11]
    """), "drop.yaml"))
    assert (entry.format, entry.tags) == ("openai", ("support", "2026-11"))
    record = record_mapper(entry)({"conversation": [
        {"speaker": "customer", "text": "My order is late."},
        {"speaker": "agent", "text": "Sorry! It ships today.", "loss_weight": 1},
    ]})
    assert record["messages"][2] == {"role": "assistant", "content": "Sorry! It ships today.", "weight": 1}
    assert turns(record, "openai") == [("system", "You are a support agent."), ("user", "My order is late."),
                                       ("assistant", "Sorry! It ships today.")]


def test_the_system_prompt_is_only_for_rows_that_have_none():
    entry = Descriptor(name="", system="Default.")
    apply = record_mapper(entry)
    assert apply({"instruction": "q", "output": "a"})["system"] == "Default."
    assert apply({"instruction": "q", "output": "a", "system": "Own."})["system"] == "Own."
    own_turn = {"messages": [{"role": "system", "content": "Own."}, {"role": "user", "content": "q"}]}
    assert apply(own_turn) == own_turn
    shared = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert turns(apply(shared), "sharegpt")[0] == ("system", "Default.")  # ShareGPT reads its `system` field


def test_columns_can_swap_and_turn_lists_in_csv_cells_are_mapped():
    swap = record_mapper(Descriptor(name="", columns={"instruction": "output", "output": "instruction"}))
    assert swap({"instruction": "a", "output": "q"}) == {"instruction": "q", "output": "a"}
    cell = record_mapper(Descriptor(name="", message_keys={"content": "text"}, roles={"bot": "assistant"}))
    record = cell({"messages": '[{"role": "user", "text": "hi"}, {"role": "bot", "text": "hello"}]'})
    assert turns(record, "openai") == [("user", "hi"), ("assistant", "hello")]
    assert cell(["not an object"]) == ["not an object"] and cell({"prompt": "[not json"}) == {"prompt": "[not json"}


def test_datasets_give_each_group_of_files_its_mapping_with_shared_defaults():
    parsed = parse_descriptor({"tags": ["weekly"], "roles": {"bot": "assistant"}, "datasets": [
        {"files": "qa/*.jsonl", "columns": {"instruction": "q", "output": "a"}},
        {"files": ["chats-*.json", "more.json"], "format": "sharegpt", "tags": ["chats"]},
    ]}, "drop.yaml")
    first, second = parsed.entries
    assert (first.name, first.files, first.tags, first.roles) == ("datasets[0]", ("qa/*.jsonl",), ("weekly",),
                                                                  {"bot": "assistant"})
    assert (second.files, second.format, second.tags) == (("chats-*.json", "more.json"), "sharegpt", ("chats",))


@pytest.mark.parametrize("data, message", [
    ({"columns": {"instrction": "question"}}, "drop.yaml: columns.instrction: unknown field; did you mean 'instruction'?"),
    ({"fromat": "sharegpt"}, "drop.yaml: fromat: unknown field; did you mean 'format'?"),
    ({"format": "sharegtp"}, "drop.yaml: format: 'sharegtp' is not a format; did you mean 'sharegpt'?"),
    ({"message_keys": {"rol": "speaker"}}, "drop.yaml: message_keys.rol: unknown field; did you mean 'role'?"),
    ({"roles": {"customer": "usr"}}, "drop.yaml: roles.customer: 'usr' is not a role; did you mean 'user'?"),
    ({"columns": {"instruction": ["q"]}},
     "drop.yaml: columns.instruction: expected the data's column (a non-empty string), got a list"),
    ({"columns": ["instruction"]}, "drop.yaml: columns: expected a mapping of our field -> the data's column, got a list"),
    ({"system": ""}, "drop.yaml: system: expected a system prompt (a non-empty string), got an empty string"),
    ({"datasets": [{"files": "a.jsonl"}, {"fils": "b.jsonl"}]},
     "drop.yaml: datasets[1].fils: unknown field; did you mean 'files'?"),
    ({"datasets": []}, "drop.yaml: datasets: expected a list of descriptors"),
    ({"colums": {"instruction": "q"}}, "drop.yaml: colums: unknown field; did you mean 'columns'?"),
    (["a list"], "drop.yaml: expected a mapping of descriptor keys"),
])
def test_a_bad_descriptor_is_one_line_naming_the_file_and_the_key(data, message):
    with pytest.raises(ConfigError) as raised:
        parse_descriptor(data, "drop.yaml")
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_an_unreadable_descriptor_file_names_the_line(tmp_path):
    path = write(tmp_path / "drop.yaml", "columns:\n  instruction: [unclosed\n")
    with pytest.raises(ConfigError, match=r"drop.yaml: not valid YAML \(line 3, column 1: .*\); fix the syntax$"):
        read_descriptor(path)
    with pytest.raises(ConfigError, match="no such descriptor file"):
        read_descriptor(str(tmp_path / "missing.yaml"))


# --------------------------------------------------------------------------------------- LLaMA-Factory

LLAMAFACTORY_INFO = {
    "faq": {"file_name": "faq.json", "columns": {"prompt": "question", "query": "context", "response": "answer",
                                                  "system": "persona", "history": "earlier"}},
    "chats": {"file_name": "chats.jsonl", "formatting": "sharegpt",
              "columns": {"messages": "dialogue", "system": "sys", "tools": "functions"},
              "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "customer",
                       "assistant_tag": "agent", "observation_tag": "api", "function_tag": "call"}},
    "pairs": {"file_name": "pairs.json", "ranking": True, "columns": {"prompt": "q", "chosen": "good", "rejected": "bad"}},
    "photos": {"file_name": "photos.json", "columns": {"prompt": "q", "response": "a", "images": "pictures"}},
    "alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en", "num_samples": 100},
    "sharded": {"file_name": "shards", "num_samples": 10},
}


def test_a_llamafactory_registry_maps_each_entry():
    parsed = parse_descriptor(LLAMAFACTORY_INFO, "drop/dataset_info.json")
    assert parsed.kind == "llamafactory"
    by_name = {e.name: e for e in parsed.entries}
    assert set(by_name) == {"faq", "chats", "pairs", "photos", "sharded"}  # the Hub one is not in the drop
    faq, chats, pairs = by_name["faq"], by_name["chats"], by_name["pairs"]
    assert (faq.files, faq.format) == (("faq.json",), "alpaca")
    assert faq.columns == {"instruction": "question", "input": "context", "output": "answer", "system": "persona",
                           "history": "earlier"}
    assert (chats.format, chats.columns) == ("sharegpt", {"conversations": "dialogue", "system": "sys",
                                                          "tools": "functions"})
    assert chats.message_keys == {"role": "speaker", "content": "text"}
    assert chats.roles == {"customer": "user", "agent": "assistant", "api": "tool", "call": "function_call"}
    assert (pairs.format, pairs.columns) == ("preference", {"instruction": "q", "chosen": "good", "rejected": "bad"})
    assert by_name["photos"].columns["images"] == "pictures"
    assert by_name["sharded"].files == ("shards/*",)  # a folder of files
    assert any(n.startswith("alpaca_en: its data is at hf_hub_url 'llamafactory/alpaca_en'") for n in parsed.notes)
    assert any(n.startswith("sharded: num_samples 10 not applied") for n in parsed.notes)


def test_llamafactory_rows_read_as_the_registry_says():
    by_name = {e.name: e for e in parse_descriptor(LLAMAFACTORY_INFO, "dataset_info.json").entries}
    faq = record_mapper(by_name["faq"])({"question": "Convert 2 km", "context": "to metres", "answer": "2000 m",
                                         "persona": "Be exact.", "earlier": [["Hi", "Hello"]]})
    assert turns(faq, "alpaca") == [("system", "Be exact."), ("user", "Hi"), ("assistant", "Hello"),
                                    ("user", "Convert 2 km\nto metres"), ("assistant", "2000 m")]
    chats = record_mapper(by_name["chats"])({"sys": "Be brief.", "dialogue": [
        {"speaker": "customer", "text": "Weather in Oslo?"},
        {"speaker": "call", "text": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
        {"speaker": "api", "text": '{"temp": 3}'},
        {"speaker": "agent", "text": "3 degrees."},
    ]})
    row = normalize_record(chats, "sharegpt")
    assert [m[0] for m in row.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert row.messages[2][3] is not None and "weather" in row.messages[2][3]  # read as the assistant's tool call
    pairs = record_mapper(by_name["pairs"])({"q": "2+2?", "good": "4", "bad": "5"})
    assert turns(pairs, "preference") == [("user", "2+2?"), ("assistant", "4")]
    photos = normalize_record(record_mapper(by_name["photos"])({"q": "What is this?", "a": "A cat.",
                                                                "pictures": ["cat.png"]}), "alpaca")
    assert "unsupported_content:images" in photos.reasons  # media rows are quarantined by name


def test_a_llamafactory_sharegpt_ranking_row_maps_its_chosen_turn():
    entry = only(parse_descriptor({"d": {"file_name": "d.json", "formatting": "sharegpt", "ranking": True,
                                         "columns": {"messages": "msgs", "chosen": "yes", "rejected": "no"},
                                         "tags": {"role_tag": "who", "content_tag": "says"}}}, "dataset_info.json"))
    record = record_mapper(entry)({"msgs": [{"who": "human", "says": "2+2?"}], "yes": {"who": "gpt", "says": "4"},
                                   "no": {"who": "gpt", "says": "5"}})
    assert record["chosen"] == {"role": "gpt", "content": "4"}
    assert turns(record, "preference") == [("user", "2+2?"), ("assistant", "4")]


@pytest.mark.parametrize("entry, message", [
    ({"file_nmae": "d.json"}, "dataset_info.json: d.file_nmae: unknown field; did you mean 'file_name'?"),
    ({"file_name": "d.json", "columns": {"promt": "q"}},
     "dataset_info.json: d.columns.promt: unknown field; did you mean 'prompt'?"),
    ({"file_name": "d.json", "tags": {"role_tags": "r"}},
     "dataset_info.json: d.tags.role_tags: unknown field; did you mean 'role_tag'?"),
    ({"file_name": "d.json", "formatting": "openai"},
     "dataset_info.json: d.formatting: 'openai' is not a LLaMA-Factory formatting"),
    ({"file_name": "d.json", "columns": {"kto_tag": "label"}},
     "dataset_info.json: d.columns.kto_tag: KTO data (each answer labelled good or bad) is not supported"),
    ({"formatting": "alpaca"}, "dataset_info.json: d: no file_name; name the entry's file in the drop"),
])
def test_a_bad_llamafactory_entry_names_the_dataset_and_the_key(entry, message):
    with pytest.raises(ConfigError) as raised:
        parse_descriptor({"d": entry}, "dataset_info.json")
    assert str(raised.value).startswith(message)


def test_save_to_disk_metadata_is_never_read_as_a_llamafactory_registry(tmp_path):
    info = {"citation": "", "description": "", "features": {"text": {"dtype": "string", "_type": "Value"}}}
    with pytest.raises(ConfigError, match="save_to_disk dataset, not LLaMA-Factory's"):
        parse_descriptor(info, "dataset_info.json")
    drop = tmp_path / "drop"
    write(drop / "dataset_info.json", json.dumps(info))
    write(drop / "rows.jsonl", jsonl([{"prompt": "p", "completion": "c"}]))
    assert find_descriptor([str(drop)]) == (None, set())


# --------------------------------------------------------------------------------------- Axolotl

AXOLOTL = """
base_model: some/model
sequence_len: 2048
datasets:
  - path: data/support.jsonl
    type: chat_template
    chat_template: chatml
    field_messages: dialogue
    message_property_mappings:
      role: speaker
      content: text
    roles:
      assistant: [agent, bot]
      user: [customer]
    field_system: persona
    roles_to_train: [assistant]
  - path: org/hub-dataset
    data_files: [train/qa.jsonl]
    type: alpaca
  - path: notes.jsonl
    type: completion
    field: body
  - path: legacy.json
    type: sharegpt
    message_field_role: from
    message_field_content: value
"""


def test_an_axolotl_config_maps_its_datasets():
    parsed = parse_descriptor(yaml.safe_load(AXOLOTL), "axolotl.yaml")
    assert parsed.kind == "axolotl"
    support, qa, notes, legacy = parsed.entries
    assert (support.files, support.format) == (("support.jsonl",), "openai")
    assert support.columns == {"messages": "dialogue", "system": "persona"}
    assert support.message_keys == {"role": "speaker", "content": "text"}
    assert support.roles == {"agent": "assistant", "bot": "assistant", "customer": "user"}
    assert (qa.files, qa.format) == (("qa.jsonl",), "alpaca")
    assert (notes.format, notes.columns) == ("text", {"text": "body"})
    assert (legacy.columns, legacy.message_keys) == ({"messages": "conversations"}, {"role": "from", "content": "value"})
    assert any("chat_template, roles_to_train not applied" in n for n in parsed.notes)
    record = record_mapper(support)({"persona": "Be kind.", "dialogue": [
        {"speaker": "customer", "text": "Hi"}, {"speaker": "bot", "text": "Hello!"}]})
    assert turns(record, "openai") == [("user", "Hi"), ("assistant", "Hello!")]  # OpenAI rows carry no `system` field


def test_an_axolotl_user_defined_type_is_alpaca_with_its_fields():
    entry = only(parse_descriptor({"datasets": [{"path": "d.jsonl", "type": {
        "field_instruction": "task", "field_output": "solution", "system_prompt": "Solve it.",
        "format": "[INST] {instruction} [/INST]"}}]}, "axolotl.yaml"))
    assert (entry.format, entry.columns, entry.system) == ("alpaca", {"instruction": "task", "output": "solution"},
                                                           "Solve it.")


@pytest.mark.parametrize("entry, message", [
    ({"path": "d.jsonl", "type": "orpo.chat_template"},
     "axolotl.yaml: datasets[0].type: 'orpo.chat_template' is not supported; choose one of chat_template, sharegpt, "
     "alpaca, completion"),
    ({"path": "d.jsonl"}, "axolotl.yaml: datasets[0].type: missing; choose one of chat_template"),
    ({"path": "d.jsonl", "type": "chat_template", "message_property_mappings": {"rol": "from"}},
     "axolotl.yaml: datasets[0].message_property_mappings.rol: unknown field; did you mean 'role'?"),
    ({"path": "d.jsonl", "type": "chat_template", "roles": {"asistant": ["gpt"]}},
     "axolotl.yaml: datasets[0].roles.asistant: 'asistant' is not a role; did you mean 'assistant'?"),
    ({"path": "d.jsonl", "type": "chat_template", "feild_messages": "m"},
     "axolotl.yaml: datasets[0].feild_messages: unknown field; did you mean 'field_messages'?"),
])
def test_a_bad_axolotl_entry_names_the_key(entry, message):
    with pytest.raises(ConfigError) as raised:
        parse_descriptor({"base_model": "m", "datasets": [entry]}, "axolotl.yaml")
    assert str(raised.value).startswith(message)


# --------------------------------------------------------------------------------------- a drop and its files


def test_a_llamafactory_registry_beside_the_files_is_found_and_is_not_data(tmp_path):
    drop = tmp_path / "drop"
    write(drop / "dataset_info.json", json.dumps({"faq": {"file_name": "faq.json", "columns": {"prompt": "q"}}}))
    write(drop / "faq.json", json.dumps([{"q": "2+2?", "output": "4"}]))
    write(drop / "rows.jsonl", jsonl([{"prompt": "p", "completion": "c"}]))
    mapped = find_mapped_drop([str(drop)])
    assert [f.rsplit("/", 1)[1] for f in mapped.drop.files] == ["faq.json", "rows.jsonl"]
    assert {f.rsplit("/", 1)[1]: d.name for f, d in mapped.descriptors.items()} == {"faq.json": "faq"}
    record = mapped.record
    assert (record["source"], record["kind"]) == (f"{drop}/dataset_info.json", "llamafactory")
    assert record["files"] == {f"{drop}/faq.json": "faq"} and record["datasets"][0]["columns"] == {"instruction": "q"}


def test_the_descriptor_is_part_of_the_drops_identity(tmp_path):
    drop = tmp_path / "drop"
    write(drop / "rows.jsonl", jsonl([{"q": "2+2?", "a": "4"}]))
    plain = find_mapped_drop([str(drop)])
    assert plain.drop == find_drop([str(drop)]) and plain.record is None  # no descriptor: as before
    write(drop / "drop.yaml", "columns: {instruction: q, output: a}\n")
    first = find_mapped_drop([str(drop)])
    write(drop / "drop.yaml", "# the same mapping, commented\ncolumns:\n  instruction: q\n  output: a\n")
    assert find_mapped_drop([str(drop)]).drop.fingerprint == first.drop.fingerprint
    write(drop / "drop.yaml", "columns: {instruction: q, output: a}\nsystem: Be exact.\n")
    second = find_mapped_drop([str(drop)])
    assert len({plain.drop.fingerprint, first.drop.fingerprint, second.drop.fingerprint}) == 3
    assert first.drop.drop_id != second.drop.drop_id  # a default id carries the fingerprint


def test_map_overrides_the_drops_descriptor_and_both_are_left_out_of_the_data(tmp_path):
    drop = tmp_path / "drop"
    write(drop / "dataset_info.json", json.dumps({"x": {"file_name": "rows.jsonl"}}))
    write(drop / "rows.jsonl", jsonl([{"q": "2+2?", "a": "4"}]))
    mapping = write(drop / "mapping.json", json.dumps({"columns": {"instruction": "q", "output": "a"}}))
    mapped = find_mapped_drop([str(drop)], map_file=mapping)
    assert [f.rsplit("/", 1)[1] for f in mapped.drop.files] == ["rows.jsonl"]
    assert mapped.record["source"] == mapping and mapped.record["kind"] == "sftflow"
    assert mapped.record["notes"] == [f"{drop}/dataset_info.json: not applied, --map {mapping} was given instead"]


def test_two_descriptors_in_one_drop_are_refused(tmp_path):
    drop = tmp_path / "drop"
    write(drop / "drop.yaml", "format: alpaca\n")
    write(drop / "dataset_info.json", json.dumps({"x": {"file_name": "rows.jsonl"}}))
    with pytest.raises(ConfigError, match="a drop has one descriptor; keep one, or pick one with --map"):
        find_descriptor([str(drop)])


def test_files_are_assigned_to_one_entry_each(tmp_path):
    files = [write(tmp_path / "drop" / "a.jsonl", ""), write(tmp_path / "drop" / "sub" / "b.jsonl", "")]
    both = parse_descriptor({"datasets": [{"files": "*.jsonl"}, {"files": "sub/*"}]}, "drop.yaml")
    with pytest.raises(ConfigError, match=r"drop.yaml: sub/b.jsonl matches both datasets\[0\] and datasets\[1\]"):
        assign_files(both, files, [f"{tmp_path}/drop"])
    typo = parse_descriptor({"files": "*.jsnol"}, "drop.yaml")
    with pytest.raises(ConfigError, match=r"drop.yaml: files: '\*.jsnol' matches none of the drop's files "
                                          r"\(a.jsonl, sub/b.jsonl\); fix the glob"):
        assign_files(typo, files, [f"{tmp_path}/drop"])
    registry = parse_descriptor({"a": {"file_name": "a.jsonl"}, "c": {"file_name": "c.json"}}, "dataset_info.json")
    assigned, notes = assign_files(registry, files, [f"{tmp_path}/drop"])
    assert {url: d.name for url, d in assigned.items()} == {files[0]: "a"}
    assert notes == ["c: 'c.json' matches no file of the drop: not applied"]


def test_a_descriptors_format_and_format_option_must_agree():
    entry = Descriptor(name="datasets[0]", format="sharegpt")
    assert file_format("auto", entry) == file_format("sharegpt", entry) == "sharegpt"
    assert file_format("alpaca", None) == file_format("alpaca", Descriptor(name="")) == "alpaca"
    with pytest.raises(ConfigError, match=r"--format alpaca contradicts the descriptor's format sharegpt \(datasets\[0\]\)"):
        file_format("alpaca", entry)


def test_stage_file_maps_records_before_detection_and_keeps_the_raw_text(tmp_path):
    rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(3)] + [{"unrelated": 1}]
    url = write(tmp_path / "qa.jsonl", jsonl(rows))
    entry = Descriptor(name="", columns={"instruction": "question", "output": "answer"}, system="Add.")
    (tmp_path / "staging").mkdir()
    outcome = stage_file(0, url, "d", IngestConfig(), tmp_path / "staging", entry)
    assert outcome["format"] == "alpaca"  # detected from the mapped records
    assert (outcome["counts"]["staged"], outcome["counts"]["quarantined"]) == (3, 1)
    staged = [r for b in staging.iter_batches(outcome["staged_path"]) for r in b.to_pylist()]
    assert [(m["role"], m["content"]) for m in staged[1]["messages"]] == [
        ("system", "Add."), ("user", "What is 1 + 1?"), ("assistant", "2")]
    assert json.loads(staged[1]["raw"]) == rows[1]  # the source's text, as the drop held it


def test_a_map_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    """Issue 15: `--map` naming a FIFO (or a device) is refused in one line, never opened."""
    import os
    import signal

    from tasks.ingest.descriptor import read_descriptor

    fifo = tmp_path / "drop.yaml"
    os.mkfifo(fifo)
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("read_descriptor waited on a FIFO")))
    signal.alarm(10)
    try:
        with pytest.raises(ConfigError, match=r"drop\.yaml: not a regular file \(a FIFO"):
            read_descriptor(str(fifo))
    finally:
        signal.alarm(0)
