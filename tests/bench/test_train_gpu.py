"""bench/train_gpu.py's CPU-side parts: the --gpus list and the scaling line (the runs need GPUs)."""

from __future__ import annotations


import pytest

from tests.bench.conftest import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("train_gpu.py")


def test_gpu_counts_start_at_the_one_gpu_baseline(bench):
    assert bench.parse_gpus("2,1") == [1, 2] and bench.parse_gpus(None) == []
    with pytest.raises(SystemExit, match="starting with 1"):
        bench.parse_gpus("2,4")


def test_scaling_efficiency_and_loss_difference(bench):
    one = {"trained_tokens_per_s": 10_000.0, "loss_last5_mean": 2.0, "global_batch_size": 16,
           "peak_gib_per_gpu": [7.4]}
    two = {"trained_tokens_per_s": 18_000.0, "loss_last5_mean": 2.02, "global_batch_size": 16,
           "peak_gib_per_gpu": [7.5, 7.5]}
    line = bench.scaling_summary("8b", "sftflow-unsloth-packed", {1: one, 2: two})
    assert line["bench"] == "train_gpu_scaling" and line["shape"] == "8b"
    assert line["efficiency"] == 0.9  # 18,000 / (2 x 10,000)
    assert line["loss_rel_diff"] == 0.01 and line["same_global_batch"]
    failed = bench.scaling_summary("8b", "sftflow-unsloth-packed", {1: one, 2: {"error": "NCCL timeout"}})
    assert "efficiency" not in failed and "NCCL timeout" in failed["error"]


def test_the_bench_data_is_tokenized_as_the_pipeline_tokenizes_it(bench, tiny_model, tmp_path):
    """build_tokenized (the rows every recipe trains on) runs on the CPU with the tiny model: the Alpaca
    rows through sftflow's own normalisation and gates, every row with trained tokens."""
    import json

    import pyarrow.parquet as pq

    from tests.conftest import shared_dataset

    data = tmp_path / "alpaca.json"
    rows = json.loads(shared_dataset("alpaca_en_demo.json").read_text())[:40]
    data.write_text(json.dumps(rows))
    out = bench.build_tokenized(tiny_model, data, 2, tmp_path / "work")
    table = pq.read_table(out / "train.parquet")
    stats = json.loads((out / "stats.json").read_text())
    assert table.num_rows == stats["rows"] == 2 * len(rows)
    assert all(any(label != -100 for label in labels) for labels in table.column("labels").to_pylist())
