"""Issue 6, item 2: publish killed (kill -9) before every file-system mutation of writing a registry version.

The run being published is crafted from files (publish only copies and hashes them): an adapter, an
evaluation that says promote, an export with GGUF files, and an fsspec remote. The registry already
has a champion (v0001). For every mutation k of an uninterrupted publish, a fresh process runs the
real `publish_model` flow and is SIGKILLed just before mutation k (tests/reliability/crashloop.py);
then the state a reader sees is checked, and a re-run of the publish must finish the job.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from schemas.config import RunConfig, config_hash
from tests.reliability.conftest import run_crash_loop

pytestmark = pytest.mark.slow

NAME = "tiny-sft"


def craft_run(home: Path, run_id: str, promote: bool, remote: str | None, seed: int, templated: bool) -> Path:
    """A finished, evaluated and exported run directory, as train/evaluate/export leave it."""
    from foundation.artifacts import (
        Decision, DatasetManifest, DropRecord, EvalReport, ExportReport, FileDigest, Parity, RunManifest, SplitRows,
        Tokenized, TokenizedSplit,
    )

    rng = random.Random(seed)
    run_dir = home / "runs" / run_id
    adapter = run_dir / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(rng.randbytes(200_000))
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "peft_type": "LORA"}))
    (adapter / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>"}))
    gguf = run_dir / "gguf"
    gguf.mkdir()
    files = {}
    for kind in ("f16", "q4_k_m"):
        path = gguf / f"{NAME}-{kind}.gguf"
        path.write_bytes(b"GGUF" + rng.randbytes(100_000))
        files[kind] = str(path)
    (run_dir / "Modelfile").write_text(f"FROM ./gguf/{NAME}-q4_k_m.gguf\n")
    parity = Parity(kl=1e-5, top1=1.0, greedy_match=1.0, token_ids_equal=1.0, passed=True)
    ExportReport(passed=True, files=files, bytes={k: 100_004 for k in files}, llama_cpp_python="0.3.36", timings={},
                 parity={**{k: parity for k in files},
                         "control_base_f16": Parity(kl=5.0, top1=0.1, greedy_match=0.0, token_ids_equal=1.0)},
                 ).write(run_dir / "export.json")
    scores = {"eval_loss": 3.1, "perplexity": 22.2, "exact_match": 0.1, "rouge_l": 0.3, "chrf": 20.0,
              "json_valid": None, "stop_rate": 1.0}
    dataset = home / "datasets" / "ds-0000000000000000"
    EvalReport(run_id=run_id, dataset_version=dataset.name, scores={"base": {**scores, "rouge_l": 0.0}, "candidate": scores},
               decision=Decision(promote=promote, primary_metric="rouge_l", margin=0.01, reason="crafted for the kill test"),
               champion=None, sample_size=0, eval_rows=0, answers={}).write(run_dir / "eval.json")
    dataset.mkdir(parents=True, exist_ok=True)
    rows = SplitRows(train=90, eval=10)
    DatasetManifest(version=dataset.name, content_hash="0" * 64, schema_version="canonical-row/1", parent=None,
                    created_at="2026-12-01T00:00:00+00:00", eval_ratio=0.1, rows=rows,
                    files={"train.parquet": FileDigest(sha256="0" * 64, bytes=0)},
                    drops=[DropRecord(drop_id="sample-arithmetic", fingerprint="0" * 64, rows_in=100, quarantined=0,
                                      ingested_at="2026-12-01T00:00:00+00:00", accepted=100, duplicates=0)],
                    ).write(dataset / "manifest.json")
    config = RunConfig.model_validate({"name": NAME, "model": {"name": "tiny"}, "publish": {"remote": remote}})
    split = TokenizedSplit(rows=1, trainable_tokens=1, truncated=0, truncation_rate=0.0, trainable_share=1.0,
                           dropped_no_labels=0, pad_is_eot=False, path="tokenized")
    manifest = RunManifest(
        run_id=run_id, config=config.model_dump(mode="json"), config_hash=config_hash(config),
        dataset_version=dataset.name, dataset_dir="{HOME}/datasets/" + dataset.name, model_path="/models/tiny",
        seed=42, engine="hf", libraries={}, hardware={"platform": "test"}, global_step=10, loss_first=2.0,
        loss_last=1.0, trained_tokens=1000, train_runtime_s=10.0, tokens_per_s=100.0, peak_mem_gib=0.4,
        peak_mem_gib_per_rank=None, tokenized=Tokenized(train=split, eval=split, eos_ids=[2]),
        adapter_dir="{HOME}/runs/" + run_id + "/adapter",
    ).model_dump_json()
    # {HOME} stays for the crash loop to fill in with each workspace copy; else it is this workspace
    (run_dir / "manifest.json").write_text(manifest if templated else manifest.replace("{HOME}", str(home)))
    return run_dir


def test_publish_killed_at_every_step_leaves_whole_versions_and_a_whole_champion(tmp_path, monkeypatch,
                                                                                prefect_api_url):
    from flows.publish import publish_model

    pristine = tmp_path / "pristine"
    monkeypatch.setenv("SFTFLOW_HOME", str(pristine))
    craft_run(pristine, "run-a", promote=True, remote=None, seed=1, templated=False)
    assert publish_model(run_id="run-a").champion == "v0001"  # the champion the kills must not lose
    run_b = craft_run(pristine, "run-b", promote=True, remote="file://{HOME}/remote", seed=2, templated=True)

    results = run_crash_loop({
        "action": "publish", "args": {"run_id": "run-b"}, "pristine": str(pristine), "work": str(tmp_path / "work"),
        "watch": ["registry", "remote"], "observe": "tests.reliability.observe:registry",
        "templated": [str((run_b / "manifest.json").relative_to(pristine))],
    }, tmp_path, prefect_api_url)

    # the uninterrupted publish: v0002, champion, copied to the remote
    done = results["uninterrupted"]
    assert "error" not in done, done.get("traceback")
    assert (done["result"]["version"], done["result"]["champion"]) == ("v0002", "v0002")
    assert done["observed"]["remote"] == {"v0002": []}
    kills = results["kills"]
    assert len(kills) == results["survived_at"] - 1 == len(done["trace"]) >= 15, done["trace"]
    # the real, orchestrated flow does the same
    real = results["orchestrated"]
    assert "error" not in real, real.get("traceback")
    assert {k: real["result"][k] for k in ("version", "champion", "promoted")} == \
        {k: done["result"][k] for k in ("version", "champion", "promoted")}
    assert {k: real["observed"][k] for k in ("visible", "champion", "remote")} == \
        {k: done["observed"][k] for k in ("visible", "champion", "remote")}

    for kill in kills:
        seen = kill["after_kill"]
        where = f"killed before mutation {kill['k']}: {done['trace'][kill['k'] - 1]}"
        # no visible partial version: every visible version has a manifest that verifies
        assert set(seen["versions"]) <= {"v0001", "v0002"}, where
        for version, state in seen["versions"].items():
            assert state["manifest"] and state["mismatched"] == [], (where, version, state)
        assert seen["versions"]["v0001"]["run_id"] == "run-a", where
        # the champion pointer is the old one or the new one, and names a whole version
        assert seen["champion"] in ("v0001", "v0002") and seen["champion"] in seen["versions"], where
        # a remote copy is visible only once its manifest is there, and then it verifies
        assert all(mismatched == [] for mismatched in seen["remote"].values()), where

        # re-running the publish finishes the job: one new version, champion, remote copy, no leftovers
        recovery, after = kill["recovery"], kill["after_recovery"]
        assert "error" not in recovery, (where, recovery.get("traceback"))
        assert (recovery["result"]["version"], recovery["result"]["champion"]) == ("v0002", "v0002"), where
        assert after["visible"] == ["CHAMPION", "v0001", "v0002"] and after["champion"] == "v0002", where
        assert all(state["mismatched"] == [] for state in after["versions"].values()), where
        assert after["versions"]["v0002"]["run_id"] == "run-b" and after["tmp"] == [], where
        assert after["remote"] == {"v0002": []}, where

    champions = {kill["after_kill"]["champion"] for kill in kills}
    assert champions == {"v0001", "v0002"}  # kills landed on both sides of the pointer move
    print(f"\npublish killed: {len(kills)} kill points survived, {results['seconds']} s")

