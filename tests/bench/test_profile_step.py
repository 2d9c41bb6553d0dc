"""bench/profile_step.py's analysis, on the CPU: busy intervals, and phases that account for the wall time of
profiled steps (the GPU runs need a GPU; on the CPU the GPU is never busy)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.bench.conftest import load_bench


@pytest.fixture(scope="module")
def profile_step():
    return load_bench("profile_step.py")


def test_busy_intervals_merge_and_overlap_a_window(profile_step):
    busy = profile_step._merge([(5.0, 7.0), (0.0, 2.0), (1.0, 3.0), (6.0, 9.0)])
    assert busy == [(0.0, 3.0), (5.0, 9.0)]
    assert profile_step._overlap(busy, 2.0, 6.0) == 2.0  # 2..3 and 5..6
    assert profile_step._overlap(busy, 3.0, 5.0) == 0.0


def test_phases_account_for_the_profiled_steps(profile_step, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    profiler = profile_step.StepProfiler(0, 3, tmp_path / "profile_cpu")
    profiler.start()
    for _ in range(3):
        profiler.enter("forward")
        loss = model(torch.randn(32, 64)).square().mean()
        profiler.enter("backward")
        loss.backward()
        profiler.enter("optimizer")
        optimizer.step()
        optimizer.zero_grad()
        profiler.enter("log")
        loss.item()
    profiler.stop()

    timing = json.loads((tmp_path / "profile_cpu.json").read_text())["timing"]
    assert timing["steps"] == 3
    assert set(timing["phases"]) == {"log", "forward", "backward", "optimizer"}
    wall = timing["wall_ms_per_step"]
    assert wall > 0
    assert sum(p["host_ms"] for p in timing["phases"].values()) == pytest.approx(wall, rel=0.05, abs=0.5)
    assert timing["gpu_busy_ms_per_step"] == 0.0 and timing["gpu_idle_ms_per_step"] == wall  # no GPU here
    assert timing["host_calls_per_step"]["aten::item"] == 1.0  # the one loss.item() a step
    assert any(op["name"] == "aten::addmm" for op in timing["top_cpu_ops"])
    table = (tmp_path / "profile_cpu.txt").read_text()
    assert "backward" in table and "top CPU ops" in table
