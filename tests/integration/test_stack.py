"""The whole event chain on a real Prefect server, started by `sftflow up` on a free loopback port.

A sample drop copied into the landing zone is announced by the watcher (sftflow.drop.landed), the
ingest deployment writes a dataset version (sftflow.dataset.updated), the pipeline deployment trains
on the gpu pool (hf engine on CPU here), evaluates, exports and publishes a new champion. A second
copy of the same rows starts no training. The dashboard is then opened in headless Chromium.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, SAMPLE_DROPS, all_pages, free_port, pid_alive, proc_stat

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

SFTFLOW = str(Path(sys.executable).parent / "sftflow")
CHAIN = ("ingest_drop", "sft_pipeline", "train_adapter", "evaluate_adapter", "export_model", "publish_model")


def stack_env(home: Path, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return env | {"SFTFLOW_HOME": str(home), "SFTFLOW_CACHE": str(cache)}


def cli(env: dict, *args: str, timeout: int = 300) -> dict:
    done = subprocess.run([SFTFLOW, *args, "--json"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"sftflow {' '.join(args)} failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


class Api:
    """A few reads through Prefect's client, pointed at the stack's server."""

    def __init__(self, api_url: str):
        self.api_url = api_url

    def flow_runs(self) -> list[dict]:
        from prefect.client.schemas.sorting import FlowRunSort

        with self._client() as client:
            flows = {f.id: f.name for f in client.read_flows()}
            return [{"id": str(r.id), "flow": flows[r.flow_id], "state": r.state_type.value if r.state_type else None,
                     "pool": r.work_pool_name, "parent_task_run_id": r.parent_task_run_id,
                     "parameters": r.parameters, "deployment_id": r.deployment_id}
                    # every run, page by page, oldest first (runs created meanwhile land on the last page)
                    for r in all_pages(lambda offset: client.read_flow_runs(
                        sort=FlowRunSort.EXPECTED_START_TIME_ASC, offset=offset))]

    def flow_run_state(self, flow_run_id: str) -> str | None:
        """One flow run's state type (what a test polls often: reading every run each time loads the server)."""
        with self._client() as client:
            state = client.read_flow_run(flow_run_id).state_type
            return state.value if state else None

    @contextlib.contextmanager
    def _client(self):
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.api_url}), get_client(sync_client=True) as client:
            yield client

    def run_deployment(self, name: str, parameters: dict | None = None) -> str:
        with self._client() as client:
            deployment = client.read_deployment_by_name(name)
            return str(client.create_flow_run_from_deployment(deployment.id, parameters=parameters).id)

    def latest_artifact_id(self, key: str) -> str:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
        from prefect.client.schemas.sorting import ArtifactSort

        with self._client() as client:
            [newest] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                             sort=ArtifactSort.CREATED_DESC, limit=1)
            return str(newest.id)

    def deployment_crons(self, name: str) -> list[str]:
        with self._client() as client:
            return [s.schedule.cron for s in client.read_deployment_by_name(name).schedules]

    def wait_for(self, predicate, what: str, timeout: float, stack_home: Path) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = self.flow_runs()
            failed = [r for r in runs if r["state"] in ("FAILED", "CRASHED", "CANCELLED")]
            if failed:
                logs = "\n".join(p.read_text()[-4000:] for p in sorted((stack_home / "stack" / "logs").glob("*.log")))
                pytest.fail(f"flow runs failed while waiting for {what}: {failed}\n{logs}")
            if predicate(runs):
                return runs
            time.sleep(3)
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}: {self.flow_runs()}")


def completed(runs: list[dict], flow: str) -> list[dict]:
    return [r for r in runs if r["flow"] == flow and r["state"] == "COMPLETED"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_cache):
    home = tmp_path_factory.mktemp("stack") / "home"
    env = stack_env(home, model_cache.parent.parent)
    port = free_port()
    state = cli(env, "up", "--port", str(port), "--quiet-seconds", "2", timeout=400)
    try:
        yield {"env": env, "home": home, "state": state, "api": Api(state["api_url"])}
    finally:
        cli(env, "down")


def loss_curve_pages(dashboard: str, home: Path, profile: Path, timeout: float = 1200) -> list[tuple[str, int]]:
    """The loss-curve artifact's page, opened in Chromium again and again from before the run trains: the
    first live version seen, then the next version (live or final) that shows a later step, as (what the
    page says, that step), each with a screenshot beside the stack's home."""
    import re

    from tests.integration.browser import Browser

    browser = Browser(profile)
    pages: list[tuple[str, int]] = []
    try:
        deadline = time.monotonic() + timeout
        while len(pages) < 2 and time.monotonic() < deadline:
            browser.goto(f"{dashboard}/artifacts/key/loss-curve")
            shown = None
            for _ in range(15):  # the single-page app renders the key's latest description
                time.sleep(0.2)
                if shown := re.search(r"Training loss of \S+: (?:step (\d+) of \d+ \(live\)|finished at step (\d+))",
                                      browser.text()):
                    break
            if not shown:
                continue
            step = int(shown[1] or shown[2])
            if not pages and shown[1] or pages and step > pages[-1][1]:
                browser.screenshot(home / f"dashboard-loss-curve-{len(pages) + 1}.png")
                pages.append((shown[0], step))
            elif not pages:
                break  # the run finished before a live version was seen
    finally:
        browser.close()
    return pages


def test_a_landed_drop_runs_the_chain_to_a_new_champion_and_a_repeat_trains_nothing(stack, tmp_path):
    home, api = stack["home"], stack["api"]
    status = cli(stack["env"], "status")
    assert status["api_healthy"] and all(p["alive"] for p in status["processes"].values())
    assert set(status["work_pools"]) >= {"cpu", "gpu"} and status["work_pools"]["gpu"]["concurrency_limit"] == 1

    shutil.copytree(SAMPLE_DROPS / "arithmetic", home / "landing" / "arithmetic-2026-11")
    # the dashboard's loss curve is live: opened while the run trains, then again, it shows a later step
    pages = loss_curve_pages(stack["state"]["dashboard_url"], home, tmp_path / "chromium")
    assert len(pages) == 2 and "(live)" in pages[0][0] and pages[0][1] < pages[1][1], pages
    shots = [(home / f"dashboard-loss-curve-{i}.png").read_bytes() for i in (1, 2)]
    assert shots[0] != shots[1] and all(len(shot) > 20_000 for shot in shots)
    runs = api.wait_for(lambda rs: completed(rs, "sft_pipeline"), "the pipeline to complete", 1500, home)
    for flow in CHAIN:
        assert len(completed(runs, flow)) == 1, (flow, runs)
    # every stage that loads a model ran on the gpu pool; the data, the pipeline (and the publish it runs in its
    # own process) on the cpu pool
    for flow in ("train_adapter", "evaluate_adapter", "export_model"):
        assert completed(runs, flow)[0]["pool"] == "gpu", flow
    assert completed(runs, "ingest_drop")[0]["pool"] == completed(runs, "sft_pipeline")[0]["pool"] == "cpu"
    assert completed(runs, "ingest_drop")[0]["parameters"]["drop_id"] == "arithmetic-2026-11"
    pipeline = completed(runs, "sft_pipeline")[0]
    assert pipeline["parameters"]["dataset_version"].startswith("ds-")
    champion = home / "registry" / "tiny-sft" / "CHAMPION"
    assert champion.read_text().strip() == "v0001"
    from tests.conftest import verify_version

    assert verify_version(home / "registry" / "tiny-sft" / "v0001") == []

    # The same rows again, as a new drop through `sftflow drop`: ingested (all duplicates), no training.
    landed = cli(stack["env"], "drop", str(SAMPLE_DROPS / "arithmetic"), "--drop-id", "arithmetic-again")
    assert landed["announced"]
    runs = api.wait_for(lambda rs: len(completed(rs, "ingest_drop")) == 2, "the second ingest", 300, home)
    report = json.loads((home / "drops" / "arithmetic-again" / "report.json").read_text())
    assert report["accepted"] == 0 and report["duplicates"] + report["quarantined"] == report["rows_in"]
    time.sleep(15)  # room for a wrongly triggered pipeline to show up
    runs = api.flow_runs()
    assert len([r for r in runs if r["flow"] == "train_adapter"]) == 1
    assert len([r for r in runs if r["flow"] == "sft_pipeline" and r["state"] != "SCHEDULED"]) == 1  # not the cron's
    stack["pipeline_run_id"] = pipeline["id"]

    # The scheduled retrain: a weekly cron, and a run now skips (same dataset version, same config).
    retrain_id = api.run_deployment("sft_pipeline/retrain")
    assert api.deployment_crons("sft_pipeline/retrain") == ["0 3 * * 1"]
    runs = api.wait_for(lambda rs: any(r["id"] == retrain_id and r["state"] == "COMPLETED" for r in rs),
                        "the retrain run", 300, home)
    assert len([r for r in runs if r["flow"] == "train_adapter"]) == 1


def test_the_dashboard_shows_the_pipeline_subflows_and_artifacts(stack, tmp_path):
    from tests.integration.browser import Browser

    if "pipeline_run_id" not in stack:
        pytest.fail("the event-chain test did not finish; the dashboard has no pipeline run to show")
    dashboard, run_id, home = stack["state"]["dashboard_url"], stack["pipeline_run_id"], stack["home"]
    browser = Browser(tmp_path / "chromium")
    try:
        browser.goto(f"{dashboard}/runs/flow-run/{run_id}")
        browser.wait_for_text("sft_pipeline", "Completed", "Subflow Runs", timeout=120)
        browser.screenshot(home / "dashboard-pipeline.png")  # the run's graph: the four stages
        browser.click("Subflow Runs")
        browser.wait_for_text("train_adapter", "evaluate_adapter", "export_model", "publish_model")
        browser.screenshot(home / "dashboard-pipeline-subflows.png")
        browser.click("Artifacts")
        browser.wait_for_text("pipeline-summary")
        # the stages' artifacts: the drop's counts and quarantine, the loss plot, the evaluation table
        for key, content in [("drop-arithmetic-2026-11-counts", "counts and quarantine reasons"),
                             ("drop-arithmetic-2026-11-quarantine", "quarantined examples and their reasons"),
                             ("loss-curve", "finished at step"), ("evaluation", "base vs candidate vs champion"),
                             ("evaluation-samples", "every sampled eval row"),
                             ("published-model", "Registry version of run"),
                             ("gguf-parity", "GGUF parity against the merged HF model")]:
            browser.goto(f"{dashboard}/artifacts/key/{key}")
            browser.wait_for_text(key, content)
            if key == "evaluation":
                browser.screenshot(home / "dashboard-artifacts.png")
        # the latest versions themselves: the samples table's columns, the published model's commands
        api = stack["api"]
        browser.goto(f"{dashboard}/artifacts/artifact/{api.latest_artifact_id('evaluation-samples')}")
        browser.wait_for_text("prompt", "reference", "base", "candidate")
        browser.screenshot(home / "dashboard-evaluation-samples.png")
        browser.goto(f"{dashboard}/artifacts/artifact/{api.latest_artifact_id('published-model')}")
        browser.wait_for_text("sftflow chat --model tiny-sft@v0001", "sftflow serve --model tiny-sft@v0001")
    finally:
        browser.close()
    for name in ("dashboard-pipeline.png", "dashboard-pipeline-subflows.png", "dashboard-artifacts.png",
                 "dashboard-evaluation-samples.png"):
        assert (home / name).stat().st_size > 20_000  # a rendered page, not a blank one


def test_eight_concurrent_drops_account_for_every_row_once(stack, tmp_path):
    """Issue 6, item 4: overlapping drops landed at once go through the watcher and the triggers."""
    home, api = stack["home"], stack["api"]
    lines = (SAMPLE_DROPS / "json-extraction" / "rows.jsonl").read_text().splitlines()
    before = len(completed(api.flow_runs(), "ingest_drop"))
    from foundation.workspace import Workspace

    store = Workspace(home).datasets

    def rows_of(version) -> int:
        return version.manifest.rows.train + version.manifest.rows.eval

    rows_before = rows_of(store.current())
    staged = []
    for i in range(8):  # rows 10*i .. 10*i+29: each drop overlaps the next two
        drop = tmp_path / f"burst-{i}"
        drop.mkdir()
        (drop / "rows.jsonl").write_text("\n".join(lines[10 * i: 10 * i + 30]) + "\n")
        (drop / "_SUCCESS").touch()
        staged.append(drop)
    for drop in staged:  # land them all at once: a rename each, as an upstream job would
        drop.rename(home / "landing" / drop.name)
    api.wait_for(lambda rs: len(completed(rs, "ingest_drop")) == before + 8, "eight ingests", 900, home)

    reports = [json.loads((home / "drops" / f"burst-{i}" / "report.json").read_text()) for i in range(8)]
    assert all(r["status"] == "ingested" and not r.get("noop") for r in reports)
    for r in reports:  # every row of every drop: accepted once, a duplicate, or quarantined with a reason
        assert r["rows_in"] == r["accepted"] + r["duplicates"] + r["quarantined"]
    # every non-blank line of every drop is a row (the sample file has a blank line, which is no row)
    assert sum(r["rows_in"] for r in reports) == sum(len([x for x in lines[10 * i: 10 * i + 30] if x.strip()])
                                                     for i in range(8))
    current = store.current()
    assert rows_of(current) - rows_before == sum(r["accepted"] for r in reports)
    # one clean chain of versions: each adds exactly one drop to its parent, none twice
    chain, version = [], current
    while version is not None:
        chain.append(version)
        version = store.parent_of(version)
    drop_ids = [d.drop_id for d in current.manifest.drops]
    assert len(drop_ids) == len(set(drop_ids)) == len(chain)
    assert sorted(d for d in drop_ids if d.startswith("burst-")) == sorted(
        f"burst-{i}" for i, r in enumerate(reports) if r["accepted"] > 0)
    assert len([r for r in api.flow_runs() if r["flow"] == "ingest_drop"]) == before + 8


def _wait_checkpoint(run_dir: Path, step: int, pipeline_state, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not (run_dir / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").exists():
        assert pipeline_state() not in ("FAILED", "CRASHED", "CANCELLED", "COMPLETED"), "the pipeline ended early"
        assert time.monotonic() < deadline, f"training never wrote checkpoint {step}"
        time.sleep(0.3)


def _kill_and_wait(kill: list[int], gone: list[int]) -> None:
    """SIGKILL `kill`, then wait until those and `gone` have all died."""
    for pid in kill:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive := [p for p in kill + gone if pid_alive(p)]:
        assert time.monotonic() < deadline, f"still alive: {alive}"
        time.sleep(0.1)


def test_killed_training_flow_runs_are_started_again_and_resume(stack):
    """Issue 6, item 1: training on the gpu pool loses its process twice, and the pipeline still finishes.

    1. The process of the train_adapter flow run is killed (SIGKILL): its worker reports the flow run
       Crashed at once; the pipeline starts the train deployment again with the same run id; the new
       flow run resumes from the last checkpoint.
    2. Then the whole gpu worker goes (worker, flow run process and trainer killed at once, as when its
       host is lost): nobody reports anything, so the heartbeat automation marks the flow run Crashed
       after SILENT_SECONDS; `sftflow up` restarts the worker, the pipeline's third attempt resumes
       again and finishes with the configured number of steps.
    (Last in this module: it leaves Crashed flow runs behind, which the others would take for failures.)
    """
    from sftflow.stack import SILENT_SECONDS

    home, api = stack["home"], stack["api"]
    steps = 60
    overrides = [f"train.max_steps={steps}", "train.save_steps=10", "train.logging_steps=5", "eval.sample_size=8",
                 "export.quants=[f16]", "export.parity_prompts=4"]
    from schemas.config import config_hash, load_run_config

    # The run directory this pipeline trains in (one per dataset version and config); the pipelines the
    # concurrent drops started may still be training theirs.
    version = (home / "datasets" / "CURRENT").read_text().strip()
    digest = config_hash(load_run_config(ROOT / "flows" / "configs" / "tiny_cpu.yaml", overrides))
    run_dir = home / "runs" / f"tiny-sft-{version}-{digest[:8]}"
    assert not run_dir.exists()
    runs_before = {p.name for p in (home / "runs").iterdir()}
    pipeline_id = api.run_deployment("sft_pipeline/pipeline", {"overrides": overrides})

    def pipeline_state() -> str | None:
        return api.flow_run_state(pipeline_id)

    # queued behind the pipelines the concurrent drops started
    _wait_checkpoint(run_dir, 10, pipeline_state, 1500)

    # 1. the flow run's process: the parent of the trainer, with the flow run's id in its environment
    trainer = int((run_dir / "worker.pid").read_text())
    flow_process = int(proc_stat(trainer)[1])
    environ = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{flow_process}/environ").read_bytes().split(b"\0")
                   if b"=" in kv)
    first_crash = environ[b"PREFECT__FLOW_RUN_ID"].decode()
    _kill_and_wait([flow_process], gone=[trainer])  # the trainer dies with the flow run's process
    killed_at = {"flow_run_process": max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*"))}

    # 2. the whole worker, once the second attempt has trained past step 30
    _wait_checkpoint(run_dir, 30, pipeline_state, 600)
    trainer = int((run_dir / "worker.pid").read_text())
    flow_process = int(proc_stat(trainer)[1])
    worker = stack["state"]["processes"]["worker-gpu"]["pid"]
    assert int(proc_stat(flow_process)[1]) == worker, "the flow run was not started by the gpu worker"
    _kill_and_wait([worker, flow_process, trainer], gone=[])
    killed_at["gpu_worker"] = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*"))
    lost_at = time.monotonic()
    restarted = cli(stack["env"], "up")
    assert restarted["restarted"] == ["worker-gpu"]
    stack["state"] = restarted

    deadline = time.monotonic() + 1200
    while (state := pipeline_state()) != "COMPLETED":
        assert state not in ("FAILED", "CRASHED", "CANCELLED"), (state, api.flow_runs())
        assert time.monotonic() < deadline, "the pipeline did not finish after the kills"
        time.sleep(3)
    trains = {r["id"]: r["state"] for r in api.flow_runs()
              if r["flow"] == "train_adapter" and r["parameters"].get("run_id") == run_dir.name}
    assert sorted(trains.values()) == ["COMPLETED", "CRASHED", "CRASHED"], trains
    assert trains[first_crash] == "CRASHED"
    events = [json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines()]
    begins = [e["resumed_from_step"] for e in events if e["event"] == "begin"]
    assert begins[0] == 0 and begins[1] >= 10 and begins[2] >= 30, begins
    assert json.loads((run_dir / "manifest.json").read_text())["global_step"] == steps
    assert [p for p in (home / "runs").iterdir() if p.name not in runs_before and p.name.endswith(digest[:8])] == [run_dir]
    print(json.dumps({"training_flow_killed": {"killed_at_step": killed_at, "resumed_from_steps": begins[1:],
                                               "global_step": steps, "silent_limit_s": SILENT_SECONDS,
                                               "host_loss_to_finish_s": round(time.monotonic() - lost_at)}}))
