"""Train: prepare a run, launch the training process, follow its events, record the run.

`train_model` launches `python -m tasks.processes.trainer` and turns its `WorkerEvent` lines into
Prefect logs, a progress artifact and (for CLI runs) a progress bar on stderr. If the process dies (a
kill, an OOM), the task fails with `WorkerDiedError` and Prefect retries it: the new process resumes
from the last checkpoint in the run directory, so the run finishes with the same number of steps.

With `train.num_gpus` > 1 (or `auto` on a host with several GPUs) the process runs under
`python -m torch.distributed.run --standalone --nproc_per_node=N`: one DDP rank per GPU, rank 0 alone
reporting progress and writing checkpoints and the adapter. The global batch is per-device batch x
gradient accumulation x N. Tests run the same path on a machine without CUDA through
`SFTFLOW_CPU_RANKS=N`, honoured only there: N ranks on the CPU with torch's gloo backend.

The decision a pipeline takes before it trains (`training_plan`: train, or skip and why) is here too.
"""

from __future__ import annotations

import base64
import io
import os
import platform
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from importlib import metadata

import yaml
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from foundation import processes, warm
from foundation.atomic import write_bytes_atomic
from foundation.artifacts import (
    Batching,
    SplitRows,
    EndEvent,
    RunFigures,
    RunManifest,
    RunSummary,
    Tokenized,
    WorkerEvent,
    WorkerSpec,
    parse_event,
)
from foundation.errors import ConfigError, NotFoundError, SftflowError
from foundation.settings import settings
from foundation.stores.runs import RunDir
from foundation.workspace import Workspace
from schemas.config import RunConfig, TrainConfig, config_hash
from tasks.base_model import TINY_NAME, resolve_model
from tasks.engines import data_parallel_problem, pick_engine
from tasks.preflight import ResourceError, check_training_fits
from tasks.trackers import check_trackers_installed


class WorkerDiedError(RuntimeError):
    """The training subprocess exited abnormally; retrying resumes from the last checkpoint."""


class TrainingError(SftflowError):
    """The training subprocess rejected its input (a bad config or model); retrying will not help."""


# ---------------------------------------------------------------------------------------------
# Before training: the plan, the run directory, the ranks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingPlan:
    """What a pipeline run does about training: train in `run_id`, or skip for `reason`."""

    dataset_version: str
    dataset_rows: SplitRows | None = None  # of the current version (a stale request does not report them)
    run_id: str | None = None
    reason: str | None = None
    registry_version: str | None = None  # the version that already holds this training

    @property
    def skip(self) -> bool:
        return self.reason is not None


def training_plan(name: str, current: str, current_rows: SplitRows, requested: str | None,
                  already_published: str | None, digest: str, force: bool, run_id: str) -> TrainingPlan:
    """Skip a dataset version that is no longer current (the newer one has its own run) and one that was
    already trained with this config (unless `force`); otherwise train `current` in `run_id`."""
    if requested and requested != current:
        return TrainingPlan(requested, reason=f"dataset version {requested} is no longer current ({current} is): "
                                              "skipped, the newer version is trained by its own run")
    if already_published and not force:
        return TrainingPlan(
            current, current_rows, registry_version=already_published,
            reason=f"dataset version {current} was already trained with this config (config hash {digest[:12]}): "
                   f"registry {name}/{already_published}; nothing to do (force=True retrains)")
    return TrainingPlan(current, current_rows, run_id=run_id)


@task(cache_policy=NO_CACHE)
def plan_training(config: RunConfig, dataset_version: str | None, force: bool) -> TrainingPlan:
    """The plan for the current dataset version (or the requested one): train, or skip and why."""
    workspace = Workspace.from_env().ensure()
    current = workspace.datasets.current()
    if current is None:
        raise NotFoundError(f"no dataset version in {workspace.datasets_dir}: ingest a drop first "
                            "(sftflow ingest PATH, or pass drops=[...])")
    if dataset_version:
        workspace.datasets.find(dataset_version)  # a clear error for a name that does not exist
    digest = config_hash(config)
    return training_plan(config.name, current.name, current.manifest.rows, dataset_version,
                         workspace.registry.published_with(config.name, current.name, digest), digest, force,
                         pipeline_run_id(workspace, config, current.name, force))


def pipeline_run_id(workspace: Workspace, config: RunConfig, dataset_version: str, force: bool) -> str:
    """The run directory a pipeline trains in: one per dataset version and config.

    The same id comes back until that run has finished, so a pipeline run that dies (its process
    killed, its host lost) and is started again resumes the training from its last checkpoint
    instead of starting over. A finished run is reused (its adapter is evaluated, exported and
    published as if just trained) unless `force`, which starts a new attempt (`-r2`, `-r3`, ...).
    """
    return workspace.runs.attempt(f"{config.name}-{dataset_version}-{config_hash(config)[:8]}", force)


def new_run_id(config: RunConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")[:-3]
    return f"{config.name}-{stamp}-{config_hash(config)[:6]}"


# NVLink multicast must stay off on the lent multi-GPU machines (../shared/gpu/README.md); harmless elsewhere.
DATA_PARALLEL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def training_ranks(train: TrainConfig) -> int:
    """How many data-parallel ranks train: `train.num_gpus` checked against the visible CUDA GPUs.

    On a machine without CUDA, SFTFLOW_CPU_RANKS=N (tests only) runs N gloo ranks on the CPU instead.
    """
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cpu_ranks = settings().cpu_ranks
    if visible == 0 and cpu_ranks:
        return cpu_ranks
    if train.num_gpus == "auto":
        return max(1, visible)
    if train.num_gpus > 1 and train.num_gpus > visible:
        seen = f"{visible} visible CUDA GPU{'s' if visible != 1 else ''}" if visible else "no CUDA GPU"
        masked = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ResourceError(
            f"train.num_gpus={train.num_gpus}, but this worker sees {seen}"
            + (f" (CUDA_VISIBLE_DEVICES={masked})" if masked is not None else "")
            + f". Set train.num_gpus={max(1, visible)} (or auto for every visible GPU), or run on a worker with "
            f"{train.num_gpus} GPUs"
        )
    return train.num_gpus


@dataclass(frozen=True)
class PreparedRun:
    run_id: str
    dataset_version: str
    model_path: str  # the base model, local (a Hub id resolved to its snapshot)
    model_revision: str | None  # the Hub commit of that snapshot
    engine: str


@task(cache_policy=NO_CACHE)
def prepare_run(config: RunConfig, dataset_version: str | None, run_id: str | None) -> PreparedRun:
    """The run directory with its config, the dataset version, the engine and the base model (resolved)."""
    logger = get_run_logger()
    workspace = Workspace.from_env().ensure()
    dataset = workspace.datasets.find(dataset_version)
    run = workspace.runs.create(run_id or new_run_id(config))
    run.config_yaml.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    engine = pick_engine(config.train.engine, ranks=training_ranks(config.train))
    model = resolve_model(config.model, workspace, log=logger.info)
    logger.info("run %s: %s on dataset %s with the %s engine", run.run_id, model.path, dataset.name, engine)
    return PreparedRun(run.run_id, dataset.name, model.path, model.revision, engine)


# ---------------------------------------------------------------------------------------------
# The training process: launch, follow, classify its end
# ---------------------------------------------------------------------------------------------


def worker_command(spec, ranks: int, early_engine: str | None = None) -> list[str]:
    """The training process: itself (`early_engine`: started before its spec exists, see start_worker_early),
    or torchrun starting one per rank."""
    if ranks == 1:
        return processes.module_command("tasks.processes.trainer", str(spec),
                                        *(["--engine", early_engine] if early_engine else []))
    return processes.module_command("torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                                    "-m", "tasks.processes.trainer", str(spec))


def _retry_if_worker_died(task, task_run, state) -> bool:
    try:
        state.result()
    except WorkerDiedError:
        return True
    except BaseException:
        return False
    return False


LOSS_CURVE_VERSIONS = 20  # live versions of the loss-curve artifact a run publishes at most
LOSS_CURVE_EVERY = 2  # ... and never more often than every this many logged steps


def loss_curve_cadence(max_steps: int, logging_steps: int) -> int:
    """Logged steps between live versions of the loss curve: about LOSS_CURVE_VERSIONS in a run, so a
    long run does not fill the Prefect database with images, but at least every LOSS_CURVE_EVERY."""
    logs = max(1, max_steps // max(1, logging_steps))
    return max(LOSS_CURVE_EVERY, -(-logs // LOSS_CURVE_VERSIONS))


class EventFollower:
    """Relays the training process's events: Prefect logs, the progress artifact, the loss-curve artifact
    (a new version every few logged steps, so the dashboard's curve grows while the run trains), the
    progress bar on stderr, progress.jsonl; keeps the end event or the error."""

    def __init__(self, run: RunDir, logger, logging_steps: int = 1):
        self.run, self.logger, self.logging_steps = run, logger, logging_steps
        self.end: EndEvent | None = None
        self.error: str | None = None
        self.bar, self.max_steps = None, 0
        self.logs_since_curve, self.curve_every = 0, LOSS_CURVE_EVERY
        self.progress_id = create_progress_artifact(progress=0.0, description=f"Training {run.run_id}")

    def follow(self, lines, log, events) -> None:
        """Read the process's stdout to its end; a line that is no event (a library's print) goes to the log."""
        try:
            for line in lines:
                try:
                    event = parse_event(line)
                except ValueError:
                    log.write(line)
                    continue
                events.write(line if line.endswith("\n") else line + "\n")
                events.flush()
                self.on_event(event)
        finally:
            if self.bar is not None:
                self.bar.close()

    def on_event(self, event: WorkerEvent) -> None:
        if event.event == "begin":
            self.max_steps = event.max_steps
            self.curve_every = loss_curve_cadence(event.max_steps, self.logging_steps)
            self.bar = _progress_bar(event.max_steps, event.resumed_from_step)
            if event.resumed_from_step:
                self.logger.info("resuming from step %s of %s", event.resumed_from_step, event.max_steps)
        elif event.event == "log":
            self.logger.info("step %s/%s loss %.4f lr %.2e", event.step, self.max_steps, event.loss,
                             event.learning_rate or 0.0)
            update_progress_artifact(self.progress_id, 100.0 * event.step / max(1, self.max_steps))
            if self.bar is not None:
                self.bar.update(event.step - self.bar.n)
                self.bar.set_postfix(loss=f"{event.loss:.3f}")
            self.logs_since_curve += 1
            if self.logs_since_curve >= self.curve_every:
                self.logs_since_curve = 0
                try:
                    publish_loss_curve(self.run, self.max_steps, final=False)
                except Exception as exc:  # a live view: the training goes on without it (the final one is recorded)
                    self.logger.warning("live loss curve not published at step %s: %s", event.step, exc)
        elif event.event == "eval":
            self.logger.info("step %s eval loss %.4f", event.step, event.eval_loss)
        elif event.event == "checkpoint":
            self.logger.info("checkpoint at step %s", event.step)
        elif event.event == "end":
            self.end = event
        elif event.event == "error":
            self.error = event.message


def _progress_bar(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", file=sys.stderr, desc="training", dynamic_ncols=True,
                disable=not settings().progress)


def end_of_training(returncode: int, end: EndEvent | None, error: str | None, log_tail: str) -> Exception | None:
    """What the process's exit means: None (it finished), bad input (not retried), or a death (retried)."""
    if error is not None:
        return TrainingError(error)
    if returncode == 0 and end is not None:
        return None
    if returncode < 0 or returncode in (137, 143):  # killed by a signal: resume on retry
        name = signal.Signals(-returncode).name if returncode < 0 else str(returncode)
        return WorkerDiedError(f"training worker killed ({name}); the retry resumes from the last checkpoint")
    return WorkerDiedError(f"training worker exited with status {returncode}; last lines of worker.log:\n{log_tail}")


def check_can_train(model_path: str, config: RunConfig, engine: str, ranks: int, log) -> None:
    """Refuse, before anything starts, an engine that cannot run the ranks, a run that cannot fit, or a
    tracker that is not installed."""
    import torch

    if ranks > 1 and (problem := data_parallel_problem(engine)):
        raise ConfigError(f"the {engine} engine cannot train on {ranks} GPUs: {problem}. Set train.engine=hf, or "
                          "train.num_gpus=1")
    check_training_fits(model_path, config, cuda=torch.cuda.is_available(), log=log, engine=engine)
    check_trackers_installed(config.train.report_to)


def launch_environment(ranks: int, config: RunConfig, logger) -> dict[str, str]:
    if ranks == 1:
        return processes.child_env()
    t = config.train
    logger.info("data-parallel on %s ranks: global batch %s = %s per device x %s accumulation x %s ranks",
                ranks, t.batch_size * t.gradient_accumulation_steps * ranks, t.batch_size,
                t.gradient_accumulation_steps, ranks)
    return processes.child_env(extra=DATA_PARALLEL_ENV)


# Training processes started before their run's tokenization, by run id (start_worker_early), for train_model
# to take over. The engine's imports (Unsloth's: ~30 s on the GPU machine, every run) and the model's load then
# overlap the tokenization and the gates instead of following them.
_STARTED_EARLY: dict[str, subprocess.Popen | warm.WarmProcess] = {}


def start_training_process(run: RunDir, ranks: int, env: dict[str, str], engine: str,
                           early: bool = False) -> subprocess.Popen | warm.WarmProcess:
    """The run's training process: handed to a warm worker of the engine when one is waiting (one rank), else
    started; either way a warm worker is started for the next process of the engine (the evaluation, the next
    run), when warm workers are on (foundation.warm)."""
    command = worker_command(run.worker_spec, ranks, early_engine=engine if early else None)
    proc = _claim_warm(run, engine, command, env) if ranks == 1 else None
    if proc is None:
        proc = processes.start(command, run.worker_log, env, stdout=subprocess.PIPE)
    _ensure_warm(engine)
    return proc


def _claim_warm(run: RunDir, engine: str, command: list[str], env: dict[str, str]) -> warm.WarmProcess | None:
    """`command` (python -m MODULE ARGS) handed to a warm worker of the engine; None when none takes it."""
    return warm.claim(Workspace.from_env().root, engine, command[2], command[3:], run.worker_log, env,
                      pipe_stdout=True)


def _ensure_warm(engine: str) -> None:
    workspace = Workspace.from_env()
    warm.ensure(workspace.root, engine, processes.child_env(), workspace.warm_log, cuda=_cuda_available)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def claim_before_preparing(run_id: str, config: RunConfig) -> None:
    """Before the run is prepared (its engine picked, which imports torch, and its model resolved: ~5 s on the
    GPU machine), hand the training to a warm worker when one waits for the engine the run will most likely
    get (the configured one; unsloth for auto) and the model is a local directory: it loads the model meanwhile.
    start_worker_early keeps it only if the prepared run got that engine and model, on one GPU, and passes the
    resource gates; otherwise it is ended there. Hub ids and the tiny model are resolved by prepare_run alone."""
    engine = "unsloth" if config.train.engine == "auto" else config.train.engine
    path = Path(config.model.name).expanduser()
    if config.train.num_gpus not in (1, "auto") or config.model.name == TINY_NAME or not path.is_dir():
        return
    workspace = Workspace.from_env().ensure()
    if warm.address(workspace.root, engine, processes.child_env()) not in warm.listening():
        return
    run = workspace.runs.create(run_id)
    run.worker_go.unlink(missing_ok=True)  # an earlier attempt's: the process would train on stale rows at once
    write_worker_spec(run, str(path.resolve()), engine, config)
    if proc := _claim_warm(run, engine, worker_command(run.worker_spec, 1, early_engine=engine), processes.child_env()):
        _STARTED_EARLY[run_id] = proc
        _ensure_warm(engine)


def start_worker_early(run_id: str, model_path: str, engine: str, config: RunConfig) -> None:
    """Start the run's training process now, on one GPU (torchrun starts its ranks itself): it imports the
    engine's libraries and loads the model from worker_spec.json, written here, and trains once train_model
    writes worker.go (the gates passed). `discard_early_worker` ends it when the run stops first.

    A process claimed before the run was prepared (claim_before_preparing) is kept when it fits the run. A run
    the resource gates would refuse starts nothing here: train_model refuses it in its turn."""
    ranks = training_ranks(config.train)
    run = Workspace.from_env().runs.dir(run_id)
    try:
        check_can_train(model_path, config, engine, ranks, lambda *args: None)
    except SftflowError:
        discard_early_worker(run_id)
        return
    if claimed := _STARTED_EARLY.get(run_id):
        spec = WorkerSpec.read(run.worker_spec)
        if ranks == 1 and claimed.args[-1] == engine and spec.model_path == model_path and claimed.poll() is None:
            return
        discard_early_worker(run_id)
    if ranks != 1:
        return
    run.worker_go.unlink(missing_ok=True)  # an earlier attempt's: the process would train on stale rows at once
    write_worker_spec(run, model_path, engine, config)
    _STARTED_EARLY[run_id] = start_training_process(run, 1, processes.child_env(), engine, early=True)


def write_worker_spec(run: RunDir, model_path: str, engine: str, config: RunConfig) -> None:
    WorkerSpec(run_dir=str(run.root), model_path=model_path, engine=engine,
               config=config.model_dump(mode="json")).write(run.worker_spec)


def discard_early_worker(run_id: str) -> None:
    """End the process start_worker_early started for the run, if train_model did not take it over."""
    if (proc := _STARTED_EARLY.pop(run_id, None)) is not None:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _take_early_worker(run_id: str, engine: str, ranks: int) -> subprocess.Popen | warm.WarmProcess | None:
    proc = _STARTED_EARLY.get(run_id)
    if proc is None or proc.poll() is not None or ranks != 1 or proc.args[-1] != engine:
        discard_early_worker(run_id)  # gone, or started for another engine: train_model starts its own
        return None
    return _STARTED_EARLY.pop(run_id)


@task(retries=2, retry_delay_seconds=1, retry_condition_fn=_retry_if_worker_died, cache_policy=NO_CACHE)
def train_model(run_id: str, model_path: str, config: RunConfig, engine: str) -> EndEvent:
    """Run (or resume) training in a subprocess (the one started early for the run, when there is one);
    returns its end event.

    A config that cannot fit in the device's memory is refused first (ResourceError, not retried).
    """
    logger = get_run_logger()
    run = Workspace.from_env().runs.dir(run_id)
    ranks = training_ranks(config.train)
    try:
        check_can_train(model_path, config, engine, ranks, logger.info)
    except BaseException:
        discard_early_worker(run_id)
        raise
    early = _take_early_worker(run_id, engine, ranks)
    write_worker_spec(run, model_path, engine, config)
    follower = EventFollower(run, logger, config.train.logging_steps)
    env = launch_environment(ranks, config, logger)
    with open(run.worker_log, "a") as log, open(run.progress, "a") as events:
        if early is not None:
            write_bytes_atomic(run.worker_go, b"")  # the rows are there and the gates passed: it trains now
        proc = early or start_training_process(run, ranks, env, engine)
        run.worker_pid.write_text(str(proc.pid))
        try:
            follower.follow(proc.stdout, log, events)
        finally:
            returncode = proc.wait()
    if failure := end_of_training(returncode, follower.end, follower.error, processes.log_tail(run.worker_log)):
        raise failure
    update_progress_artifact(follower.progress_id, 100.0)
    return follower.end


# ---------------------------------------------------------------------------------------------
# After training: the record
# ---------------------------------------------------------------------------------------------


def loss_curve_png(events: list[WorkerEvent]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_step = {e.step: e.loss for e in events if e.event == "log"}  # a resumed run re-logs steps
    evals = {e.step: e.eval_loss for e in events if e.event == "eval"}
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    steps = sorted(by_step)
    ax.plot(steps, [by_step[s] for s in steps], label="train loss")
    if evals:
        ax.plot(sorted(evals), [evals[s] for s in sorted(evals)], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def training_stage(events: list[WorkerEvent], max_steps: int, final: bool) -> str:
    """Where a run is, as the loss curve's artifact says it: "step 25 of 60 (live)", "finished at step 60"."""
    logs = [e for e in events if e.event == "log"]
    if final:
        return f"finished at step {logs[-1].step}" if logs else "finished"
    return f"step {logs[-1].step} of {max_steps} (live)" if logs else "started (live)"


def loss_curve_markdown(run_id: str, events: list[WorkerEvent], png: bytes, max_steps: int, final: bool) -> str:
    """The loss-curve artifact: where the run is, the plot, and the command that shows the run."""
    logs = [e for e in events if e.event == "log"]
    loss = f", loss {logs[-1].loss:.4f}" if logs else ""
    return (f"# Loss curve: `{run_id}`\n\n{training_stage(events, max_steps, final)}{loss}\n\n"
            f"![loss curve](data:image/png;base64,{base64.b64encode(png).decode()})\n\n"
            f"The run, its loss and its files: `sftflow runs show {run_id}`\n")


def publish_loss_curve(run: RunDir, max_steps: int, final: bool) -> bytes:
    """A new version of the `loss-curve` artifact from the run's events so far; the plot. The description
    says where the run is too: the dashboard's page of the key shows the latest version's description."""
    events = run.events()
    png = loss_curve_png(events)
    create_markdown_artifact(key="loss-curve", markdown=loss_curve_markdown(run.run_id, events, png, max_steps, final),
                             description=f"Training loss of {run.run_id}: {training_stage(events, max_steps, final)}")
    return png


def library_versions() -> dict[str, str]:
    versions = {}
    for name in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "unsloth",
                 "prefect"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def hardware() -> dict:
    import torch

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def run_manifest(run: RunDir, config: RunConfig, dataset_dir: str, model: PreparedRun, tokenized: Tokenized,
                 end: EndEvent) -> RunManifest:
    """The reproducibility record of a finished run (pure but for the library and hardware lookups)."""
    losses = [e.loss for e in run.events() if e.event == "log"]
    return RunManifest(
        run_id=run.run_id, config=config.model_dump(mode="json"), config_hash=config_hash(config),
        dataset_version=os.path.basename(dataset_dir), dataset_dir=dataset_dir, model_path=model.model_path,
        model_revision=model.model_revision, seed=config.train.seed, engine=model.engine, libraries=library_versions(), hardware=hardware(),
        global_step=end.global_step, loss_first=losses[0] if losses else None,
        loss_last=losses[-1] if losses else None, trained_tokens=end.trained_tokens,
        train_runtime_s=end.train_runtime,
        tokens_per_s=round(end.trained_tokens / end.train_runtime, 1) if end.train_runtime else None,
        peak_mem_gib=end.peak_mem_gib, peak_mem_gib_per_rank=end.peak_mem_gib_per_rank,
        **{k: getattr(end, k) for k in Batching.model_fields},
        tokenized=tokenized, adapter_dir=end.adapter_dir,
    )


@task(cache_policy=NO_CACHE)
def record_run(prepared: PreparedRun, config: RunConfig, tokenized: Tokenized, end: EndEvent) -> RunManifest:
    """Write the reproducibility manifest and the loss curve; publish the curve as an artifact."""
    workspace = Workspace.from_env()
    run = workspace.runs.dir(prepared.run_id)
    png = publish_loss_curve(run, end.global_step, final=True)
    run.loss_png.write_bytes(png)
    dataset_dir = str(workspace.datasets.find(prepared.dataset_version).root)
    manifest = run_manifest(run, config, dataset_dir, prepared, tokenized, end)
    manifest.write(run.manifest_path)
    return manifest


def summarise_run(run_id: str) -> RunSummary:
    """What a finished run reports (from its manifest), wherever it trained."""
    run = Workspace.from_env().runs.finished(run_id)
    manifest = run.manifest()
    return RunSummary(run_id=run.run_id, run_dir=str(run.root), **{k: getattr(manifest, k) for k in RunFigures.model_fields},
                      truncation_rate=manifest.tokenized.train.truncation_rate,
                      trainable_share=manifest.tokenized.train.trainable_share)


def finished_summary(run_id: str) -> RunSummary | None:
    """The summary of a run that has already finished (a run that finished is never trained again)."""
    return summarise_run(run_id) if Workspace.from_env().runs.dir(run_id).finished else None
