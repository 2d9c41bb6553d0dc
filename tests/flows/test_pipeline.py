"""The parent flow `sft_pipeline` in-process (no server): stages as subflows, and when it trains nothing."""

from __future__ import annotations

import pytest

from flows.ingest import ingest_drop
from flows.pipeline import sft_pipeline
from foundation.errors import SftflowError
from tests.conftest import ROOT, SAMPLE_DROPS, logs_and_artifacts, subflow_runs

pytestmark = pytest.mark.slow

CONFIG = str(ROOT / "flows" / "configs" / "tiny_cpu.yaml")
QUICK = ["train.max_steps=30", "train.save_steps=30", "eval.primary_metric=eval_loss", "eval.sample_size=8",
         "export.quants=[f16]", "export.parity_prompts=4"]


def _subflows(flow_run_id) -> list[str]:
    return sorted(name for name, _ in subflow_runs(flow_run_id))


def _overlap(flow_run_id, first: str, second: str) -> bool:
    """Whether the subflow runs `first` and `second` of a flow run (one each) ran at the same time."""
    runs = subflow_runs(flow_run_id)
    [a] = [run for name, run in runs if name == first]
    [b] = [run for name, run in runs if name == second]
    return a.start_time < b.end_time and b.start_time < a.end_time


def test_pipeline_runs_every_stage_as_a_subflow_then_skips_what_it_already_did(workspace, tiny_model,
                                                                                  monkeypatch):
    # the export beside the evaluation (on a GPU machine the default when memory holds both; forced here)
    monkeypatch.setenv("SFTFLOW_EXPORT_BESIDE_EVAL", "1")
    state = sft_pipeline(drops=[str(SAMPLE_DROPS / "arithmetic")], config=CONFIG, overrides=QUICK,
                         return_state=True)
    summary = state.result()
    assert summary.status == "published", summary
    assert summary.drops[0].accepted > 0 and summary.dataset_version.startswith("ds-")
    assert summary.training.global_step == 30
    from schemas.config import config_hash, load_run_config

    digest = config_hash(load_run_config(CONFIG, QUICK))
    assert summary.training.run_id == f"tiny-sft-{summary.dataset_version}-{digest[:8]}"
    assert summary.evaluation.decision.promote
    assert summary.gguf.parity["f16"].passed
    assert summary.published.version == "v0001" and summary.published.promoted
    assert (workspace.registry_dir / "tiny-sft" / "CHAMPION").read_text().strip() == "v0001"
    assert _subflows(state.state_details.flow_run_id) == sorted(
        ["ingest_drop", "train_adapter", "evaluate_adapter", "export_model", "publish_model"])
    assert _overlap(state.state_details.flow_run_id, "evaluate_adapter", "export_model")
    # the dashboard's summary artifact tells what the terminal prints
    from tasks.report import pipeline_text

    _, artifacts = logs_and_artifacts(state.state_details.flow_run_id)
    [artifact] = [a for a in artifacts if a.key == "pipeline-summary"
                  and a.flow_run_id == state.state_details.flow_run_id]
    text = pipeline_text(summary)
    assert text in artifact.data and "published tiny-sft v0001 (champion)" in text
    assert f"rows in {summary.drops[0].rows_in} = accepted {summary.drops[0].accepted}" in text

    # no artifact links where a browser cannot follow; one that names a workspace path names the command too
    naming_paths = set()
    for artifact in artifacts:
        text = f"{artifact.data} {artifact.description}"
        assert "file://" not in text, (artifact.key, text[:500])
        if str(workspace.root) in text:
            naming_paths.add(artifact.key)
            assert "sftflow " in text, (artifact.key, text[:500])
    assert {"published-model", "pipeline-summary"} <= naming_paths
    [published] = [a for a in artifacts if a.key == "published-model"]
    for command in ("sftflow models show tiny-sft@v0001", "sftflow chat --model tiny-sft@v0001",
                    "sftflow serve --model tiny-sft@v0001", f"sftflow runs show {summary.training.run_id}"):
        assert command in published.data

    # Same dataset version, same config: nothing to train, with the reason.
    again = sft_pipeline(drops=[str(SAMPLE_DROPS / "arithmetic")], config=CONFIG, overrides=QUICK)
    assert again.status == "skipped" and "already trained with this config" in again.reason
    assert again.drops[0].noop and again.training is None and "training" not in again.dump()
    assert len(list(workspace.runs_dir.iterdir())) == 1

    # A trigger for a version that is no longer current is skipped too.
    older = summary.dataset_version
    assert ingest_drop(paths=[str(SAMPLE_DROPS / "unit-conversions")]).dataset_version != older
    stale = sft_pipeline(config=CONFIG, overrides=QUICK, dataset_version=older)
    assert stale.status == "skipped" and "no longer current" in stale.reason


def test_pipeline_without_any_dataset_says_what_to_do(workspace):
    with pytest.raises(SftflowError, match="ingest a drop first"):
        sft_pipeline(config=CONFIG)


def test_the_pipeline_trains_in_one_run_directory_per_dataset_version_and_config(workspace):
    from tasks.train import pipeline_run_id
    from schemas.config import config_hash, load_run_config

    config = load_run_config(CONFIG, QUICK)
    base = f"tiny-sft-ds-0123-{config_hash(config)[:8]}"
    assert pipeline_run_id(workspace, config, "ds-0123", force=False) == base
    (workspace.runs_dir / base / "checkpoints").mkdir(parents=True)  # killed mid-run: the next run resumes it
    assert pipeline_run_id(workspace, config, "ds-0123", force=True) == base
    (workspace.runs_dir / base / "manifest.json").write_text("{}")  # finished: reused, or a new attempt when forced
    assert pipeline_run_id(workspace, config, "ds-0123", force=False) == base
    assert pipeline_run_id(workspace, config, "ds-0123", force=True) == f"{base}-r2"
    (workspace.runs_dir / f"{base}-r2").mkdir()
    assert pipeline_run_id(workspace, config, "ds-0123", force=True) == f"{base}-r2"
    assert pipeline_run_id(workspace, config, "ds-0124", force=False) != base  # another version, another run
    assert pipeline_run_id(workspace, load_run_config(CONFIG, ["train.max_steps=31"]), "ds-0123", False) != base
