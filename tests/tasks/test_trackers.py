"""Experiment trackers: the check before training, the eval scalars, the live loss curve's cadence."""

from __future__ import annotations

import importlib.util

import pytest

from foundation.errors import ConfigError
from tasks.train import loss_curve_cadence, loss_curve_markdown
from tasks.trackers import check_trackers_installed, eval_scalars


def test_a_tracker_that_is_not_installed_is_refused_with_the_pip_command(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "mlflow") else find_spec(name, *a))
    with pytest.raises(ConfigError) as refused:
        check_trackers_installed(["tensorboard", "wandb", "mlflow"])
    message = str(refused.value)
    assert "\n" not in message and "wandb, mlflow is not installed; pip install wandb mlflow" in message
    check_trackers_installed(["tensorboard"])
    check_trackers_installed([])


def test_eval_scalars_name_the_model_and_leave_out_missing_values():
    scores = {"base": {"eval_loss": 2.5, "chrf": None}, "candidate": {"eval_loss": 1, "chrf": 40.0}}
    assert eval_scalars(scores) == {"eval/base/eval_loss": 2.5, "eval/candidate/eval_loss": 1.0,
                                    "eval/candidate/chrf": 40.0}


def test_the_loss_curve_is_published_about_twenty_times_a_run_and_at_most_every_second_log():
    assert loss_curve_cadence(60, 2) == 2  # 30 logs: every 2
    assert loss_curve_cadence(60, 5) == 2
    assert loss_curve_cadence(1000, 1) == 50  # 1000 logs: 20 versions
    assert loss_curve_cadence(1001, 1) == 51
    assert loss_curve_cadence(3, 10) == 2


def test_the_loss_curve_markdown_says_where_the_run_is():
    from foundation.artifacts import LogEvent

    logs = [LogEvent(step=s, loss=3.0 / s, trained_tokens=10 * s, elapsed_s=s) for s in (2, 4)]
    live = loss_curve_markdown("r1", logs, b"png", 60, final=False)
    assert "step 4 of 60 (live), loss 0.7500" in live and "data:image/png;base64,cG5n" in live
    assert "`sftflow runs show r1`" in live
    assert "finished at step 4" in loss_curve_markdown("r1", logs, b"png", 4, final=True)


def test_a_resumed_training_logs_into_the_tracker_runs_of_its_first_attempt(tmp_path):
    from foundation.stores.runs import RunDir
    from tasks.trackers import start_tracker_runs, tracker_ids

    run = RunDir(tmp_path / "run-1")
    run.root.mkdir()
    assert start_tracker_runs(run, ["tensorboard"]) == {} and not run.trackers.exists()
    first = start_tracker_runs(run, ["tensorboard", "wandb"])
    assert first == {"WANDB_RUN_ID": tracker_ids(run)["wandb"], "WANDB_RESUME": "allow"}
    assert start_tracker_runs(run, ["tensorboard", "wandb"]) == first  # the retry resumes the same wandb run
