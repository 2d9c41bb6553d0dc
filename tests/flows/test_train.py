"""The `train_adapter` flow on CPU with the hf engine and the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flows.train import train_adapter
from schemas.config import load_run_config
from foundation.stores.runs import RunDir
from tests.conftest import ROOT
from tests.flows.conftest import train_until_checkpoint

CONFIG = ROOT / "flows" / "configs" / "tiny_cpu.yaml"

pytestmark = pytest.mark.slow


def tensorboard_scalars(run_dir) -> dict[str, list]:
    """Every scalar series in a run's TensorBoard logdir, read with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for logdir in {p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents*")}:
        events = EventAccumulator(str(logdir))
        events.Reload()
        scalars |= {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}
    return scalars


def test_training_changes_the_adapter_and_lowers_the_loss(workspace, two_drop_dataset):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = load_run_config(CONFIG, ["train.max_steps=40", "train.save_steps=20", "train.logging_steps=2"])
    summary = train_adapter(config=config)
    assert summary.engine == "hf" and summary.dataset_version == two_drop_dataset and summary.global_step == 40
    assert summary.loss_last < 0.8 * summary.loss_first
    assert summary.trained_tokens > 0 and summary.tokens_per_s > 0

    adapter = load_file(os.path.join(summary.adapter_dir, "adapter_model.safetensors"))
    lora_b = [w for name, w in adapter.items() if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(w) > 0 for w in lora_b)  # lora_B starts at zero

    run_dir = workspace.runs_dir / summary.run_id
    base = AutoModelForCausalLM.from_pretrained(json.loads((run_dir / "worker_spec.json").read_text())["model_path"])
    tuned = PeftModel.from_pretrained(base, summary.adapter_dir)
    ids = torch.tensor([[1, 4, 5, 6]])
    with torch.no_grad():
        with tuned.disable_adapter():
            before = tuned(input_ids=ids).logits
        after = tuned(input_ids=ids).logits
    assert not torch.allclose(before, after)  # the adapter changes the model's predictions

    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(summary.adapter_dir)
    assert "<|start_header_id|>" in saved.chat_template

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config_hash"] == summary.config_hash and manifest["dataset_version"] == two_drop_dataset
    assert manifest["seed"] == 42 and manifest["libraries"]["trl"] == "1.15.0"
    assert (run_dir / "loss.png").read_bytes().startswith(b"\x89PNG")
    # `tensorboard --logdir` reads the run: its own reader finds a train loss at every logged step
    assert [e.step for e in tensorboard_scalars(run_dir)["train/loss"]] == list(range(2, 41, 2))


def test_a_killed_worker_is_resumed_to_the_same_step_count(workspace, two_drop_dataset):
    config = load_run_config(CONFIG, ["train.max_steps=36", "train.save_steps=6", "train.logging_steps=2"])
    run_dir = workspace.runs_dir / "killed"
    runner, result = train_until_checkpoint(config, run_dir, 12)
    os.kill(int((run_dir / "worker.pid").read_text()), signal.SIGKILL)
    runner.join(600)

    assert result["summary"].global_step == 36
    begins = [e for e in RunDir(run_dir).events() if e.event == "begin"]
    assert len(begins) == 2 and begins[1].resumed_from_step >= 12
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert not list(run_dir.glob(".tmp-*"))


def _loss_curves(run_id: str) -> list:
    """The versions of the loss-curve artifact of one run, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    # the newest 200 (a read returns at most 200, by default in random id order: the session's runs made more)
    with get_client(sync_client=True) as client:
        versions = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["loss-curve"])),
                                         sort=ArtifactSort.CREATED_DESC)
    return sorted((a for a in versions if f"`{run_id}`" in a.data), key=lambda a: a.created)


def test_the_loss_curve_artifact_grows_while_the_run_trains(workspace, two_drop_dataset):
    import re
    import threading

    config = load_run_config(CONFIG, ["train.max_steps=60", "train.save_steps=60", "train.logging_steps=2"])
    run_id = "live-curve"
    runner = threading.Thread(target=lambda: train_adapter(config=config, run_id=run_id))
    runner.start()
    seen_while_training = set()
    run = RunDir(workspace.runs_dir / run_id)
    while runner.is_alive():
        ended = any(e.event == "end" for e in run.events())  # read before the artifacts: these were made earlier
        if not ended:
            for artifact in _loss_curves(run_id):
                if step := re.search(r": step (\d+) of 60 \(live\)", artifact.description):
                    seen_while_training.add(int(step[1]))
        time.sleep(0.1)
    runner.join()

    # a new version every 2 logged steps (30 logs in the run), seen on the server before the run ended
    assert len(seen_while_training) >= 2, seen_while_training
    versions = _loss_curves(run_id)
    live = [int(m[1]) for a in versions if (m := re.search(r": step (\d+) of 60 \(live\)", a.description))]
    assert live == list(range(4, 61, 4))
    assert all(f"step {step} of 60 (live)" in a.data for step, a in zip(live, versions))
    assert versions[-1].description == f"Training loss of {run_id}: finished at step 60"
    assert "finished at step 60" in versions[-1].data and len(versions) == len(live) + 1
    assert all(a.type == "markdown" and "data:image/png;base64," in a.data for a in versions)
    assert all(f"sftflow runs show {run_id}" in a.data for a in versions)


def test_cli_train_json(workspace, two_drop_dataset, tmp_path):
    env = {**os.environ, "SFTFLOW_HOME": str(workspace.root), "PREFECT_HOME": str(tmp_path / "cli-prefect"),
           "SFTFLOW_PROGRESS": "0"}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "sftflow", "train", "--config", str(CONFIG), "train.max_steps=6", "train.save_steps=6",
         "--json"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert set(summary) >= {"run_id", "adapter_dir", "engine", "loss_first", "loss_last", "trained_tokens",
                            "tokens_per_s", "peak_mem_gib", "dataset_version", "config_hash"}
    assert summary["dataset_version"] == two_drop_dataset and summary["global_step"] == 6


def test_cli_config_errors_name_every_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {name: tiny}\ntrain: {learning_rate: -1, batch_size: 0, epoch: 3}\n")
    done = subprocess.run([sys.executable, "-m", "sftflow", "config", "validate", str(bad), "lora.r=0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2
    for field in ("train.learning_rate", "train.batch_size", "train.epoch: unknown field", "lora.r"):
        assert field in done.stderr


def test_evaluation_scores_base_and_candidate_and_decides(workspace, two_drop_dataset):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from flows.evaluate import evaluate_adapter

    config = load_run_config(CONFIG, ["train.epochs=6", "eval.sample_size=16", "eval.max_new_tokens=24"])
    run = train_adapter(config=config)
    result = evaluate_adapter(run_id=run.run_id)
    base, candidate = result.scores["base"], result.scores["candidate"]
    assert candidate["eval_loss"] < 0.6 * base["eval_loss"]  # clearly better on the held-out split
    assert candidate["chrf"] > base["chrf"]
    assert result.sample_size == 16 and "champion" not in result.scores
    assert result.decision.primary_metric == "eval_loss" and result.decision.promote
    assert "beats the base" in result.decision.reason
    saved = json.loads((workspace.runs_dir / run.run_id / "eval.json").read_text())
    assert saved["scores"] == result.scores and len(saved["answers"]["candidate"]) == 16

    async def newest(key: str) -> list:  # a read returns at most 200, by default in random id order
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                               sort=ArtifactSort.CREATED_DESC)

    table = next(a for a in asyncio.run(newest("evaluation")) if a.description.startswith(f"{run.run_id}:"))
    assert table.type == "table" and "candidate" in str(table.data)

    [table] = [a for a in asyncio.run(newest("evaluation-samples")) if run.run_id in a.description]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert table.type == "table" and len(rows) == 16
    assert [list(r) for r in rows] == [["prompt", "reference", "base", "candidate"]] * 16
    answers = saved["answers"]
    assert [r["candidate"] for r in rows] == [a["prediction"] for a in answers["candidate"]]
    assert [(r["prompt"], r["reference"], r["base"]) for r in rows] == [
        (a["prompt"], a["reference"], a["prediction"]) for a in answers["base"]]


def test_train_loss_and_eval_metrics_land_in_the_same_mlflow_run_and_tensorboard_logdir(workspace, two_drop_dataset, tmp_path,
                                                                                     monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is optional: pip install mlflow-skinny")
    from mlflow.tracking import MlflowClient

    from flows.evaluate import evaluate_adapter

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 wants a database; a directory suffices here
    config = load_run_config(CONFIG, ["train.max_steps=12", "train.save_steps=12", "train.logging_steps=2",
                                      "train.report_to=[tensorboard,mlflow]", "eval.sample_size=4",
                                      "eval.max_new_tokens=8"])
    run = train_adapter(config=config)
    result = evaluate_adapter(run_id=run.run_id)
    run_dir = workspace.runs_dir / run.run_id

    # mlflow: one run holds the trainer's loss and the evaluation's metrics
    mlflow_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    client = MlflowClient()
    tracked = client.get_run(mlflow_id)
    assert tracked.info.run_name == run.run_id
    assert [m.step for m in client.get_metric_history(mlflow_id, "loss")] == [2, 4, 6, 8, 10, 12]
    for model in ("base", "candidate"):
        assert tracked.data.metrics[f"eval/{model}/eval_loss"] == pytest.approx(result.scores[model]["eval_loss"])
    assert len(client.search_runs([tracked.info.experiment_id])) == 1  # the evaluation made no run of its own

    # tensorboard: its own reader finds the train loss and the eval scalars in the run's logdir
    scalars = tensorboard_scalars(run_dir)
    assert [e.step for e in scalars["train/loss"]] == [2, 4, 6, 8, 10, 12]
    [candidate_loss] = scalars["eval/candidate/eval_loss"]
    assert candidate_loss.step == 12 and candidate_loss.value == pytest.approx(result.scores["candidate"]["eval_loss"])


def test_a_tracker_that_is_not_installed_fails_before_training_with_the_pip_command(workspace, two_drop_dataset, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    config = load_run_config(CONFIG, ["train.max_steps=2", "train.report_to=[tensorboard,wandb]"])
    with pytest.raises(Exception, match=r"wandb is not installed; pip install wandb"):
        train_adapter(config=config)
    assert not any(e.event == "begin" for d in workspace.runs_dir.iterdir() for e in RunDir(d).events())


def test_publish_writes_a_verified_version_and_moves_the_champion_only_on_promotion(workspace, two_drop_dataset, monkeypatch):
    from flows.evaluate import evaluate_adapter
    from flows.publish import publish_model
    from tasks import publish as publish_task
    from tests.conftest import verify_version

    config = load_run_config(CONFIG, ["train.max_steps=30", "eval.sample_size=8", "eval.max_new_tokens=16",
                                      "eval.primary_metric=eval_loss", "eval.min_improvement=0.5"])
    first = train_adapter(config=config)
    assert evaluate_adapter(run_id=first.run_id).decision.promote
    v1 = publish_model(run_id=first.run_id)
    assert v1.promoted and v1.champion == v1.version == "v0001"
    root = workspace.registry_dir / config.name
    assert verify_version(root / "v0001") == []
    card = (root / "v0001" / "README.md").read_text()
    assert two_drop_dataset in card and "eval_loss" in card and "sample-arithmetic" in card

    # a run no better than the champion is not promoted
    second = train_adapter(config=config)  # same config and data: no margin over the champion
    decision = evaluate_adapter(run_id=second.run_id).decision
    assert not decision.promote and "champion" in decision.reason

    # a publish that fails halfway leaves no visible version and the old champion
    def broken_card(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(publish_task, "model_card", broken_card)
        with pytest.raises(Exception, match="disk full"):
            publish_model(run_id=second.run_id)
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["CHAMPION", "v0001"]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]

    # published for the record, but the champion stays
    v2 = publish_model(run_id=second.run_id)
    assert (v2.version, v2.promoted, v2.champion) == ("v0002", False, "v0001")
    assert workspace.registry.champion(config.name) == "v0001"
    with pytest.raises(Exception, match="already published"):
        publish_model(run_id=second.run_id)

    # tampering is detected
    (root / "v0002" / "eval.json").write_text("{}")
    assert verify_version(root / "v0002") == ["eval.json"]


def test_bad_input_in_the_worker_fails_once_with_its_message(workspace, two_drop_dataset):
    from tasks.train import TrainingError

    config = load_run_config(CONFIG, ["model.load_in_4bit=true", "model.dtype=bfloat16", "train.max_steps=2"])
    with pytest.raises(TrainingError, match="load_in_4bit needs CUDA"):
        train_adapter(config=config, run_id="no-gpu")
    begins = [e for e in RunDir(workspace.runs_dir / "no-gpu").events() if e.event == "error"]
    assert len(begins) == 1  # not retried


def test_an_rslora_adapter_exports_a_lora_gguf_that_llama_cpp_scales_as_peft_does(workspace, two_drop_dataset):
    """rslora scales by alpha / sqrt(r), llama.cpp's LoRA by alpha / r: the LoRA GGUF says alpha * sqrt(r), and
    applied to the base's GGUF at load time it matches the merged HF model (it parted at KL 3.2 before)."""
    from flows.export import export_model

    config = load_run_config(CONFIG, ["train.max_steps=8", "lora.use_rslora=true", "export.quants=[f16]",
                                      "export.parity_prompts=2", "export.greedy_tokens=4"])
    run = train_adapter(config=config)
    adapter = json.loads((Path(run.adapter_dir) / "adapter_config.json").read_text())
    assert adapter["use_rslora"] and adapter["lora_alpha"] == config.lora.alpha  # the adapter is left as trained
    result = export_model(run_id=run.run_id)
    assert result.passed and set(result.files) == {"f16", "lora"}
    assert result.parity["lora"].passed and result.parity["lora"].kl < 1e-3
    assert result.parity["control_base_f16"].kl > 100 * result.parity["lora"].kl


def test_export_gguf_parity_control_and_publish_with_gguf(workspace, two_drop_dataset):
    import llama_cpp

    from flows.evaluate import evaluate_adapter
    from flows.export import export_model
    from flows.publish import publish_model
    from tasks.export.parity import check_thresholds
    from tests.conftest import verify_version

    config = load_run_config(CONFIG, ["train.max_steps=40", "eval.sample_size=8", "eval.max_new_tokens=16",
                                      "export.parity_prompts=4", "export.greedy_tokens=8"])
    run = train_adapter(config=config)
    result = export_model(run_id=run.run_id)
    parity = result.parity
    assert result.passed and set(result.files) == {"f16", "q8_0", "q4_k_m", "lora"}
    for kind in ("f16", "q8_0", "q4_k_m", "lora"):
        assert parity[kind].passed and parity[kind].token_ids_equal == 1.0
        assert not check_thresholds(parity[kind], config.export.thresholds[kind])
    assert parity["f16"].kl < 1e-3 and parity["f16"].greedy_match >= 0.9
    # the control (base without the adapter) is clearly worse than every export
    assert parity["control_base_f16"].kl > 100 * parity["q4_k_m"].kl
    assert check_thresholds(parity["control_base_f16"], config.export.thresholds["f16"])
    # ... which its KL alone shows: its greedy continuation (token by token: it parts at once) was not decoded
    assert parity["control_base_f16"].greedy_match is None
    # each file loads in its real consumer and generates
    llm = llama_cpp.Llama(result.files["q4_k_m"], n_ctx=256, verbose=False)
    assert llm.create_completion("What is 2 + 2?", max_tokens=4, temperature=0)["choices"][0]["text"] is not None
    llm.close()
    modelfile = (workspace.runs_dir / run.run_id / "Modelfile").read_text()
    assert "FROM ./gguf/tiny-sft-q4_k_m.gguf" in modelfile and 'PARAMETER stop "<|eot_id|>"' in modelfile

    evaluate_adapter(run_id=run.run_id)
    published = publish_model(run_id=run.run_id)
    version = workspace.registry_dir / config.name / published.version
    assert (version / "gguf" / "tiny-sft-q8_0.gguf").exists() and (version / "Modelfile").exists()
    assert verify_version(version) == []
    # the version's GGUF files are the run's (hard links: one copy of their bytes on disk)
    for gguf in Path(result.gguf_dir).iterdir():
        assert (version / "gguf" / gguf.name).stat().st_ino == gguf.stat().st_ino, gguf.name
    assert "tiny-sft-q4_k_m.gguf" in (version / "README.md").read_text()

    # use the result: chat through the CLI, and the OpenAI-compatible server with the official client
    env = {**os.environ, "SFTFLOW_HOME": str(workspace.root)}
    chat = subprocess.run([sys.executable, "-m", "sftflow", "chat", "--temperature", "0", "--max-tokens", "8"],
                          input="What is 2 + 2?\n", capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr[-2000:]
    assert "tiny-sft-q4_k_m.gguf" in chat.stderr

    import socket

    from openai import OpenAI

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "sftflow", "serve", "--port", str(port)], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
        deadline = time.monotonic() + 90
        while True:
            try:
                models = [m.id for m in client.models.list().data]
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        reply = client.chat.completions.create(model=models[0], messages=[{"role": "user", "content": "What is 2 + 2?"}],
                                               max_tokens=8, temperature=0)
        assert models == ["tiny-sft"] and reply.choices[0].message.content is not None
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        server.terminate()
        server.wait(30)


def test_a_checkpoint_written_only_in_part_is_not_resumed_from(tmp_path):
    from tasks.processes.trainer import last_complete_checkpoint

    checkpoints = tmp_path / "checkpoints"
    for step, state in [(10, '{"global_step": 10}'), (20, '{"global_step": 20}'), (30, '{"global_st'), (40, None)]:
        (checkpoints / f"checkpoint-{step}").mkdir(parents=True)
        (checkpoints / f"checkpoint-{step}" / "adapter_model.safetensors").write_bytes(b"weights")
        if state is not None:  # a kill while saving: trainer_state.json (written last) missing or cut short
            (checkpoints / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(checkpoints) == str(checkpoints / "checkpoint-20")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-10", "checkpoint-20"]
    assert last_complete_checkpoint(tmp_path / "none") is None
