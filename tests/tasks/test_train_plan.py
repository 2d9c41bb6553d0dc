"""What a pipeline decides before it trains, and what a training process's exit means."""

from __future__ import annotations

import signal

from foundation.artifacts import EndEvent, SplitRows
from tasks.gpu_pool import ATTEMPTS, start_again
from tasks.train import TrainingError, WorkerDiedError, end_of_training, training_plan

ROWS = SplitRows(train=90, eval=10)


def plan(requested=None, published=None, force=False):
    return training_plan("m", "ds-2", ROWS, requested, published, "abcdef0123456789", force, "m-ds-2-abcdef01")


def test_the_current_version_is_trained_in_the_pipelines_run():
    trained = plan()
    assert not trained.skip and trained.run_id == "m-ds-2-abcdef01"
    assert (trained.dataset_version, trained.dataset_rows) == ("ds-2", ROWS)
    assert plan(requested="ds-2").run_id == "m-ds-2-abcdef01"


def test_a_version_no_longer_current_is_skipped_without_its_rows():
    stale = plan(requested="ds-1")
    assert stale.skip and "ds-1 is no longer current (ds-2 is)" in stale.reason
    assert stale.dataset_version == "ds-1" and stale.dataset_rows is None and stale.run_id is None


def test_a_version_trained_with_this_config_is_skipped_unless_forced():
    done = plan(published="v0003")
    assert done.skip and done.registry_version == "v0003" and "registry m/v0003" in done.reason
    assert "config hash abcdef012345" in done.reason
    assert not plan(published="v0003", force=True).skip


def test_a_crashed_training_run_is_started_again_up_to_the_limit():
    assert start_again(crashed=True, attempt=1) and not start_again(crashed=True, attempt=ATTEMPTS)
    assert not start_again(crashed=False, attempt=1)  # failed or cancelled: not a crash


def test_the_end_of_a_training_process():
    end = EndEvent(global_step=2, train_runtime=1.0, trained_tokens=10, non_pad_tokens=10, train_loss=1.0,
                   peak_mem_gib=0.1, peak_mem_gib_per_rank=[0.1], adapter_dir="/a")
    assert end_of_training(0, end, None, "") is None
    bad_input = end_of_training(2, None, "model.load_in_4bit needs CUDA", "")
    assert isinstance(bad_input, TrainingError) and "needs CUDA" in str(bad_input)
    killed = end_of_training(-signal.SIGKILL, None, None, "")
    assert isinstance(killed, WorkerDiedError) and "SIGKILL" in str(killed) and "resumes" in str(killed)
    crashed = end_of_training(1, None, None, "Traceback ...\nRuntimeError: boom\n")
    assert isinstance(crashed, WorkerDiedError) and "RuntimeError: boom" in str(crashed)
    assert isinstance(end_of_training(0, None, None, ""), WorkerDiedError)  # exited without its end event
