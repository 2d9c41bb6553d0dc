"""Issue 14, done-when: data shaped as other tools document it (written here from their documentation:
LLaMA-Factory's data/README, Axolotl's dataset formats, TRL's dataset-format guide, torchtune's and
Unsloth's chat data) goes through `sftflow ingest --json` as a user runs it: every row a careful reader would
accept is accepted, counts reconcile, per-turn weights reach the dataset, and media rows are quarantined
naming the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq

from foundation.workspace import Workspace
from tests.conftest import ROOT

N = 6
FILES = {
    # LLaMA-Factory sharegpt with content parts of `value` (its multimodal-capable messages) and loss_weight
    "llamafactory_parts.jsonl": [{"messages": [
        {"role": "system", "content": [{"type": "text", "value": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "value": f"Greet user {i}."}]},
        {"role": "assistant", "content": [{"type": "text", "value": "Hi!"}], "loss_weight": 0.0},
        {"role": "user", "content": [{"type": "text", "value": f"What is {i} + 1?"}]},
        {"role": "assistant", "content": [{"type": "text", "value": str(i + 1)}], "loss_weight": 1.0}]}
        for i in range(N)],
    # Alpaca as many exports write it: empty instruction, the question in input
    "alpaca_input_only.json": [{"instruction": "", "input": f"Translate 'cat {i}' to French.",
                                "output": f"chat {i}"} for i in range(N)],
    # ShareGPT with every role LLaMA-Factory names, a tool call and its observation
    "sharegpt_tools.json": [{"conversations": [
        {"from": "human", "value": f"Weather in city {i}?"},
        {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": f"c{i}"}})},
        {"from": "observation", "value": "sunny"},
        {"from": "gpt", "value": "It is sunny."}],
        "system": "You can call tools.", "tools": json.dumps([{"name": "weather", "parameters": {}}])}
        for i in range(N)],
    # Axolotl chat_template rows with per-message `train` / `weight`
    "axolotl_chat.jsonl": [{"messages": [
        {"role": "user", "content": f"Tell me fact {i}.", "train": False},
        {"role": "assistant", "content": "Draft answer.", "weight": 0},
        {"role": "user", "content": "Better?"},
        {"role": "assistant", "content": f"Fact {i} is true.", "train": True}]} for i in range(N)],
    # TRL: conversational prompt/completion, standard prompt/completion, language modeling, preference
    "trl_prompt_completion.jsonl": [{"prompt": [{"role": "user", "content": f"Capital of country {i}?"}],
                                     "completion": [{"role": "assistant", "content": f"City {i}."}]}
                                    for i in range(N)],
    "trl_text.jsonl": [{"text": f"Document number {i} is plain text."} for i in range(N)],
    "trl_preference.jsonl": [{"prompt": [{"role": "user", "content": f"Rate idea {i}."}],
                              "chosen": [{"role": "assistant", "content": "Good idea."}],
                              "rejected": [{"role": "assistant", "content": "Bad idea."}]} for i in range(N)],
    # torchtune / OpenAI chat with reasoning and a structured tool call beside text
    "openai_reasoning.jsonl": [{"messages": [
        {"role": "user", "content": f"Add {i} and 2."},
        {"role": "assistant", "content": "Let me compute.", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": json.dumps({"a": i, "b": 2})}}]},
        {"role": "tool", "content": str(i + 2)},
        {"role": "assistant", "content": f"It is {i + 2}.", "reasoning_content": "The tool answered."}]}
        for i in range(N)],
}
# rows a careful reader would not train a text model on: quarantined, naming the field
MEDIA = [{"messages": [{"role": "user", "content": "<image>What is this?"}, {"role": "assistant", "content": "A cat."}],
          "images": ["cat.png"]}]


def test_files_shaped_by_other_tools_are_accepted_row_for_row(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    for name, rows in FILES.items():
        path = drop / name
        path.write_text(json.dumps(rows) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in rows))
    (drop / "media.jsonl").write_text(json.dumps(MEDIA[0]) + "\n")
    home = tmp_path / "home"
    env = {**os.environ, "SFTFLOW_HOME": str(home), "PREFECT_API_URL": ""}
    proc = subprocess.run([sys.executable, "-m", "sftflow", "ingest", str(drop), "--json"], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["rows_in"] == N * len(FILES) + 1
    assert report["accepted"] == N * len(FILES) and report["quarantined"] == 1
    assert report["reasons"] == {"unsupported_content:images": 1}
    assert {os.path.basename(url): f["format"] for url, f in report["files"].items()} == {
        "llamafactory_parts.jsonl": "openai", "alpaca_input_only.json": "alpaca", "sharegpt_tools.json": "sharegpt",
        "axolotl_chat.jsonl": "openai", "trl_prompt_completion.jsonl": "prompt_completion", "trl_text.jsonl": "text",
        "trl_preference.jsonl": "preference", "openai_reasoning.jsonl": "openai", "media.jsonl": "openai"}

    os.environ["SFTFLOW_HOME"], saved = str(home), os.environ.get("SFTFLOW_HOME")
    try:
        version = Workspace.from_env().datasets.current()
    finally:
        os.environ.pop("SFTFLOW_HOME") if saved is None else os.environ.__setitem__("SFTFLOW_HOME", saved)
    rows = [r for split in ("train", "eval") for r in pq.read_table(version.path(split)).to_pylist()]
    by_file = {}
    for row in rows:
        by_file.setdefault(os.path.basename(row["source_file"]), []).append(row["messages"])
    # per-turn weights are kept as the data gave them
    for messages in by_file["llamafactory_parts.jsonl"]:
        assert [m["weight"] for m in messages] == [None, None, 0.0, None, 1.0]
    for messages in by_file["axolotl_chat.jsonl"]:
        assert [m["weight"] for m in messages] == [0.0, 0.0, None, 1.0]
    # the question in the input, the call beside its text, the reasoning, the chosen reply
    assert all(m[0]["content"].startswith("Translate") for m in by_file["alpaca_input_only.json"])
    for messages in by_file["openai_reasoning.jsonl"]:
        assert messages[1]["content"] == "Let me compute." and json.loads(messages[1]["tool_calls"])[0]["function"]["name"] == "add"
        assert messages[3]["reasoning"] == "The tool answered."
    assert all(json.loads(m[2]["tool_calls"])[0]["function"]["arguments"]["city"] for m in by_file["sharegpt_tools.json"])
    assert all([t["content"] for t in m] == [m[0]["content"], "Good idea."] for m in by_file["trl_preference.jsonl"])
    assert all([t["role"] for t in m] == ["text"] for m in by_file["trl_text.jsonl"])
