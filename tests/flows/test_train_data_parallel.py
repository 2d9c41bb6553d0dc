"""Data-parallel training (`train.num_gpus`): the launcher, the rank checks, and a real DDP run.

There is no GPU here, so the DDP run uses the CPU path the train task keeps for tests:
SFTFLOW_CPU_RANKS=2 (honoured only without CUDA) starts the same torchrun launch with two gloo ranks.
"""

from __future__ import annotations

import json
import os
import signal

import psutil
import pytest
import torch
from safetensors.torch import load_file

from flows.train import train_adapter
from schemas.config import load_run_config
from foundation.errors import ConfigError
from tasks.preflight import ResourceError
from foundation.stores.runs import RunDir
from tasks.train import training_ranks, worker_command
from tests.conftest import ROOT
from tests.flows.conftest import train_until_checkpoint

CONFIG = ROOT / "flows" / "configs" / "tiny_cpu.yaml"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU ranks path exists only without CUDA")


@no_cuda
def test_more_gpus_than_visible_is_refused_with_the_fix(monkeypatch):
    monkeypatch.delenv("SFTFLOW_CPU_RANKS", raising=False)
    config = load_run_config(CONFIG, ["train.num_gpus=2"])
    with pytest.raises(ResourceError, match=r"train.num_gpus=2, but this worker sees no CUDA GPU.*train.num_gpus=1"):
        training_ranks(config.train)
    assert training_ranks(load_run_config(CONFIG, ["train.num_gpus=auto"]).train) == 1
    assert training_ranks(config.train.model_copy(update={"num_gpus": 1})) == 1
    monkeypatch.setenv("SFTFLOW_CPU_RANKS", "2")
    assert training_ranks(load_run_config(CONFIG).train) == 2


def test_several_ranks_run_under_torchrun(tmp_path):
    spec = tmp_path / "worker_spec.json"
    assert worker_command(spec, 1)[1:] == ["-m", "tasks.processes.trainer", str(spec)]
    assert worker_command(spec, 2)[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                           "-m", "tasks.processes.trainer", str(spec)]


def test_an_engine_that_cannot_run_ranks_is_refused_or_replaced(monkeypatch):
    from importlib import metadata

    import tasks.engines as engines

    real_version = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "2024.1" if name == "unsloth" else real_version(name))
    assert engines.data_parallel_problem("hf") is None
    assert "older than" in engines.data_parallel_problem("unsloth")
    monkeypatch.setattr(engines, "cuda_available", lambda: True)
    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name: object())
    assert engines.pick_engine("auto", ranks=1) == "unsloth"
    assert engines.pick_engine("auto", ranks=2) == "hf"  # falls back to the engine that can
    with pytest.raises(ConfigError, match="train.engine=unsloth cannot train on 2 GPUs: unsloth 2024.1 is older"):
        engines.pick_engine("unsloth", ranks=2)


# ------------------------------------------------------------------------------- a real DDP run


def _steps(events: list) -> dict[int, float]:
    return {e.step: e.loss for e in events if e.event == "log"}


@pytest.mark.slow
@no_cuda
def test_two_ranks_train_what_one_rank_trains_with_the_same_global_batch(workspace, arithmetic_dataset, monkeypatch):
    overrides = ["train.max_steps=8", "train.save_steps=4", "train.logging_steps=1", "train.batch_size=4",
                 "train.warmup_steps=0", "train.report_to=[]"]
    one = train_adapter(config=load_run_config(CONFIG, overrides + ["train.gradient_accumulation_steps=2"]),
                        run_id="one-rank")
    monkeypatch.setenv("SFTFLOW_CPU_RANKS", "2")
    two = train_adapter(config=load_run_config(CONFIG, overrides), run_id="two-ranks")

    # the global batch is reported, and the same for both: 1 x 4 x 2 and 2 x 4 x 1
    assert (one.world_size, one.gradient_accumulation_steps, one.global_batch_size) == (1, 2, 8)
    assert (two.world_size, two.gradient_accumulation_steps, two.global_batch_size) == (2, 1, 8)
    run_dir = workspace.runs_dir / "two-ranks"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["global_batch_size"] == 8 and manifest["world_size"] == 2
    assert len(manifest["peak_mem_gib_per_rank"]) == 2 and all(p > 0 for p in manifest["peak_mem_gib_per_rank"])
    events = RunDir(run_dir).events()
    begin = [e for e in events if e.event == "begin"]
    assert len(begin) == 1 and begin[0].world_size == 2 and begin[0].global_batch_size == 8

    # rank 0 alone reported: one begin, one end, each step logged once
    logged = [e.step for e in events if e.event == "log"]
    assert logged == list(range(1, 9)) and sum(e.event == "end" for e in events) == 1
    assert two.global_step == 8 and two.loss_last < two.loss_first

    # the same rows in every step: tokens summed over the ranks equal one rank's, and the losses match
    assert two.trained_tokens == one.trained_tokens > 0
    ones, twos = _steps(RunDir(workspace.runs_dir / "one-rank").events()), _steps(events)
    assert ones.keys() == twos.keys() and all(abs(twos[s] - ones[s]) <= 1e-4 * ones[s] for s in ones), (ones, twos)

    # one adapter and one set of checkpoints, written by rank 0 (each rank adds only its RNG state)
    checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*"))
    assert [p.name for p in checkpoints] == ["checkpoint-4", "checkpoint-8"]
    for checkpoint in checkpoints:
        assert (checkpoint / "adapter_model.safetensors").exists()
        assert sorted(p.name for p in checkpoint.glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert not list(run_dir.glob(".tmp-*"))
    a = load_file(os.path.join(one.adapter_dir, "adapter_model.safetensors"))
    b = load_file(os.path.join(two.adapter_dir, "adapter_model.safetensors"))
    # the same adapter: DDP's averaged gradient is the accumulated one (LoRA's initial weights are seeded).
    # Compared as the weight update each module applies (B @ A), not element by element: Adam divides each
    # gradient by its own running size, so an element whose gradient is ~0 moves by up to the learning rate
    # on float noise alone (summation order differs between all-reduce and accumulation), while the update
    # as a whole agrees to ~1e-5.
    assert a.keys() == b.keys()
    for name in (k for k in a if "lora_A" in k):
        up = name.replace("lora_A", "lora_B")
        delta_one, delta_two = a[up] @ a[name], b[up] @ b[name]
        assert (delta_one - delta_two).norm() <= 1e-3 * delta_one.norm(), name


@pytest.mark.slow
@no_cuda
def test_a_killed_rank_is_resumed_on_two_ranks(workspace, arithmetic_dataset, monkeypatch):
    monkeypatch.setenv("SFTFLOW_CPU_RANKS", "2")
    config = load_run_config(CONFIG, ["train.max_steps=24", "train.save_steps=4", "train.logging_steps=2",
                                      "train.batch_size=4", "train.report_to=[]"])
    run_dir = workspace.runs_dir / "killed"
    runner, result = train_until_checkpoint(config, run_dir, 8)
    launcher = psutil.Process(int((run_dir / "worker.pid").read_text()))
    ranks = launcher.children()
    assert len(ranks) == 2
    os.kill(ranks[1].pid, signal.SIGKILL)  # one rank dies (an OOM kill): torchrun stops the other, the task retries
    runner.join(600)

    assert result["summary"].global_step == 24 and result["summary"].world_size == 2
    begins = [e for e in RunDir(run_dir).events() if e.event == "begin"]
    assert len(begins) == 2 and begins[1].resumed_from_step >= 8 and begins[1].world_size == 2
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in [launcher, *ranks])
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert not list(run_dir.glob(".tmp-*"))
