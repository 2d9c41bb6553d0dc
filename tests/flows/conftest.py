import pytest


@pytest.fixture(scope="session", autouse=True)
def prefect_api(tmp_path_factory):
    """One temporary Prefect API (SQLite) for every flow test of the session."""
    import os

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def arithmetic_dataset(workspace, tiny_model) -> str:
    """The sample arithmetic drop ingested into the test's workspace: the dataset version's name."""
    from flows.ingest import ingest_drop
    from tests.conftest import SAMPLE_DROPS

    return ingest_drop(paths=[str(SAMPLE_DROPS / "arithmetic")], drop_id="sample-arithmetic").dataset_version


@pytest.fixture
def two_drop_dataset(workspace, tiny_model) -> str:
    """The sample arithmetic and unit-conversion drops ingested one after the other: the second (current)
    dataset version's name."""
    from flows.ingest import ingest_drop
    from tests.conftest import SAMPLE_DROPS

    for name in ("arithmetic", "unit-conversions"):
        report = ingest_drop(paths=[str(SAMPLE_DROPS / name)], drop_id=f"sample-{name}")
    return report.dataset_version


def train_until_checkpoint(config, run_dir, step: int, timeout: float = 300):
    """Start `train_adapter` (run id = run_dir's name) in a thread and return once it has saved a
    checkpoint at `step` or later: (the thread, the dict its summary lands in, as "summary")."""
    import threading
    import time

    from flows.train import train_adapter
    from foundation.stores.runs import RunDir

    result: dict = {}  # its "summary", once the run has finished
    runner = threading.Thread(target=lambda: result.update(summary=train_adapter(config=config, run_id=run_dir.name)))
    runner.start()
    deadline = time.monotonic() + timeout
    while not any(e.event == "checkpoint" and e.step >= step for e in RunDir(run_dir).events()):
        if time.monotonic() > deadline:
            pytest.fail(f"no checkpoint at step {step} or later within {timeout:.0f} s")
        time.sleep(0.05)
    return runner, result
