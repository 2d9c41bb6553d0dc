"""A drop's descriptor through the `ingest_drop` flow and `sftflow ingest --map`: rows mapped by it are
accepted with the right contents, the drop report records it, and it is part of the drop's identity."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from flows.ingest import ingest_drop
from foundation.errors import DropError
from foundation.workspace import Workspace
from tests.conftest import ROOT


def write(path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def conversations(workspace: Workspace) -> set[tuple[tuple[str, str], ...]]:
    """Every conversation of the current dataset version (both splits), as (role, content) turns."""
    version = workspace.datasets.current()
    rows = [r for split in ("train", "eval") for r in pq.read_table(version.path(split)).to_pylist()]
    return {tuple((m["role"], m["content"]) for m in row["messages"]) for row in rows}


QA = [{"question": f"What is {i} times 3?", "answer": str(3 * i)} for i in range(12)]
CHATS = [{"dialogue": [{"speaker": "customer", "text": f"Where is order {i}?"},
                       {"speaker": "agent", "text": f"Order {i} ships today."}]} for i in range(8)]
SUPPORT = "You are a support agent."
DROP_YAML = f"""
tags: [weekly]
datasets:
  - files: qa.jsonl
    columns: {{instruction: question, output: answer}}
    tags: [faq]
  - files: "chats*.jsonl"
    format: openai
    columns: {{messages: dialogue}}
    message_keys: {{role: speaker, content: text}}
    roles: {{customer: user, agent: assistant}}
    system: {SUPPORT}
"""


def expected_qa(system: str | None = None) -> set:
    head = (("system", system),) if system else ()
    return {head + (("user", r["question"]), ("assistant", r["answer"])) for r in QA}


EXPECTED_CHATS = {(("system", SUPPORT), ("user", f"Where is order {i}?"), ("assistant", f"Order {i} ships today."))
                  for i in range(8)}


def test_a_drop_yaml_maps_columns_and_roles_and_the_report_records_it(workspace, tmp_path):
    drop = tmp_path / "drop"
    write(drop / "qa.jsonl", jsonl(QA))
    write(drop / "chats-1.jsonl", jsonl(CHATS))
    write(drop / "drop.yaml", DROP_YAML)
    report = ingest_drop(paths=[str(drop)], drop_id="mapped")
    assert (report.rows_in, report.accepted, report.quarantined, report.status) == (20, 20, 0, "ingested")
    assert conversations(workspace) == expected_qa() | EXPECTED_CHATS
    assert {url.rsplit("/", 1)[1]: f.format for url, f in report.files.items()} == {"qa.jsonl": "alpaca",
                                                                                    "chats-1.jsonl": "openai"}
    on_disk = json.loads((workspace.drops_dir / "mapped" / "report.json").read_text())
    descriptor = on_disk["descriptor"]
    assert descriptor == report.descriptor
    assert (descriptor["source"], descriptor["kind"]) == (f"{drop}/drop.yaml", "sftflow")
    assert {url.rsplit("/", 1)[1]: name for url, name in descriptor["files"].items()} == {
        "qa.jsonl": "datasets[0]", "chats-1.jsonl": "datasets[1]"}
    assert [d["tags"] for d in descriptor["datasets"]] == [["faq"], ["weekly"]]
    assert descriptor["datasets"][1]["roles"] == {"customer": "user", "agent": "assistant"}


def test_the_same_files_with_another_descriptor_are_another_drop(workspace, tmp_path):
    drop = tmp_path / "drop"
    write(drop / "qa.jsonl", jsonl(QA))
    write(drop / "drop.yaml", "columns: {instruction: question, output: answer}\n")
    first = ingest_drop(paths=[str(drop)])
    assert ingest_drop(paths=[str(drop)]).noop  # the same files, the same mapping
    write(drop / "drop.yaml", "columns: {instruction: question, output: answer}\nsystem: Multiply.\n")
    second = ingest_drop(paths=[str(drop)])
    assert not second.noop and second.drop_id != first.drop_id and second.fingerprint != first.fingerprint
    assert (second.accepted, second.duplicates, second.dataset_changed) == (12, 0, True)
    assert conversations(workspace) == expected_qa() | expected_qa("Multiply.")
    with pytest.raises(DropError, match="already ingested with other content"):
        ingest_drop(paths=[str(drop)], drop_id=first.drop_id)  # drops are immutable, mappings included


def test_a_llamafactory_dataset_info_beside_its_files(workspace, tmp_path):
    drop = tmp_path / "lf"
    write(drop / "dataset_info.json", json.dumps({
        "faq": {"file_name": "faq.json", "columns": {"prompt": "question", "response": "answer"}},
        "support": {"file_name": "support.json", "formatting": "sharegpt",
                    "columns": {"messages": "dialogue", "system": "persona"},
                    "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "customer",
                             "assistant_tag": "agent"}},
        "alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en"},
    }))
    write(drop / "faq.json", json.dumps(QA))
    write(drop / "support.json", json.dumps([{**chat, "persona": SUPPORT} for chat in CHATS]))
    report = ingest_drop(paths=[str(drop)], drop_id="llamafactory")
    assert sorted(url.rsplit("/", 1)[1] for url in report.files) == ["faq.json", "support.json"]  # the registry is no data
    assert (report.rows_in, report.accepted, report.quarantined) == (20, 20, 0)
    assert conversations(workspace) == expected_qa() | EXPECTED_CHATS
    assert report.descriptor["kind"] == "llamafactory"
    assert report.descriptor["notes"] == ["alpaca_en: its data is at hf_hub_url 'llamafactory/alpaca_en', not in the "
                                          "drop: not applied (sftflow reads only the drop's files and never downloads)"]


# --------------------------------------------------------------------------------------- the CLI

AXOLOTL = """
base_model: some/model
chat_template: chatml
datasets:
  - path: data/support.jsonl
    type: chat_template
    field_messages: dialogue
    message_property_mappings:
      role: speaker
      content: text
    roles:
      user: [customer]
      assistant: [agent]
    roles_to_train: [assistant]
"""


def cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SFTFLOW_HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "prefect"),
           "SFTFLOW_PROGRESS": "0"}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([sys.executable, "-m", "sftflow", "ingest", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_cli_ingests_with_an_axolotl_config_as_the_map(tmp_path):
    drop = tmp_path / "drop"
    write(drop / "support.jsonl", jsonl(CHATS))
    config = write(tmp_path / "axolotl.yaml", AXOLOTL)
    done = cli(tmp_path, str(drop), "--map", config, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert (result["rows_in"], result["accepted"], result["quarantined"]) == (8, 8, 0)
    assert result["descriptor"]["source"] == config and result["descriptor"]["kind"] == "axolotl"
    assert result["descriptor"]["datasets"][0]["roles"] == {"customer": "user", "agent": "assistant"}
    assert any("datasets[0]: roles_to_train not applied" in note for note in result["descriptor"]["notes"])
    expected = {(("user", f"Where is order {i}?"), ("assistant", f"Order {i} ships today.")) for i in range(8)}
    assert conversations(Workspace(tmp_path / "home")) == expected


@pytest.mark.parametrize("where", ["drop", "map"])
def test_cli_refuses_a_bad_descriptor_key_before_anything_runs(tmp_path, where):
    drop = tmp_path / "drop"
    write(drop / "qa.jsonl", jsonl(QA))
    bad = "columns: {instrction: question, output: answer}\n"
    if where == "drop":
        descriptor = write(drop / "drop.yaml", bad)
        done = cli(tmp_path, str(drop), "--json")
    else:
        descriptor = write(tmp_path / "mapping.yaml", bad)
        done = cli(tmp_path, str(drop), "--map", descriptor, "--json")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"error: {descriptor}: columns.instrction: unknown field; "
                                        "did you mean 'instruction'?"]
    assert not (tmp_path / "home").exists()  # no workspace made, no Prefect started
