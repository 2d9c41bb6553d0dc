"""Train: run the training subprocess, relay its progress, record the run.

`train_model` launches `python -m tasks.engines.worker` and turns its JSON-line events into Prefect
logs, a progress artifact and (for CLI runs) a progress bar on stderr. If the worker dies (a kill,
an OOM), the task fails with `WorkerDiedError` and Prefect retries it: the new worker resumes from
the last checkpoint in the run directory, so the run finishes with the same number of steps.

With `train.num_gpus` > 1 (or `auto` on a host with several GPUs) the worker runs under
`python -m torch.distributed.run --standalone --nproc_per_node=N`: one DDP rank per GPU, rank 0 alone
reporting progress and writing checkpoints and the adapter. The global batch is per-device batch x
gradient accumulation x N. Tests run the same path on a machine without CUDA through
`SFTFLOW_CPU_RANKS=N`, honoured only there: N ranks on the CPU with torch's gloo backend.
"""

from __future__ import annotations

import base64
import io
import json
import os
import platform
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from schemas.config import RunConfig, TrainConfig, config_hash
from foundation.atomic import write_json_atomic
from foundation.errors import ConfigError, SftflowError
from tasks.engines import data_parallel_problem
from tasks.preflight import ResourceError, check_training_fits

ROOT = Path(__file__).resolve().parent.parent


class WorkerDiedError(RuntimeError):
    """The training subprocess exited abnormally; retrying resumes from the last checkpoint."""


class TrainingError(SftflowError):
    """The training subprocess rejected its input (a bad config or model); retrying will not help."""


def _retry_if_worker_died(task, task_run, state) -> bool:
    try:
        state.result()
    except WorkerDiedError:
        return True
    except BaseException:
        return False
    return False


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGKILL it when the process that started it dies, so a
    killed flow run leaves no orphan trainer writing into the run directory its retry resumes from."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


# NVLink multicast must stay off on the lent multi-GPU machines (../shared/gpu/README.md); harmless elsewhere.
DATA_PARALLEL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def training_ranks(train: TrainConfig) -> int:
    """How many data-parallel ranks train: `train.num_gpus` checked against the visible CUDA GPUs.

    On a machine without CUDA, SFTFLOW_CPU_RANKS=N (tests only) runs N gloo ranks on the CPU instead.
    """
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cpu_ranks = os.environ.get("SFTFLOW_CPU_RANKS")
    if visible == 0 and cpu_ranks:
        return int(cpu_ranks)
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


def worker_command(spec: Path, ranks: int) -> list[str]:
    """The training subprocess: the worker itself, or torchrun starting one worker per rank."""
    if ranks == 1:
        return [sys.executable, "-m", "tasks.engines.worker", str(spec)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            "-m", "tasks.engines.worker", str(spec)]


def read_events(run_dir: Path) -> list[dict]:
    path = run_dir / "progress.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _progress_bar(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", file=sys.stderr, desc="training", dynamic_ncols=True,
                disable=os.environ.get("SFTFLOW_PROGRESS", "1") == "0")


@task(retries=2, retry_delay_seconds=1, retry_condition_fn=_retry_if_worker_died, cache_policy=NO_CACHE)
def train_model(run_dir: Path, model_path: str, config: RunConfig, engine: str) -> dict:
    """Run (or resume) training in a subprocess; returns the worker's final event.

    A config that cannot fit in the device's memory is refused first (ResourceError, not retried).
    """
    import torch

    logger = get_run_logger()
    ranks = training_ranks(config.train)
    if ranks > 1 and (problem := data_parallel_problem(engine)):
        raise ConfigError(f"the {engine} engine cannot train on {ranks} GPUs: {problem}. Set train.engine=hf, or "
                          "train.num_gpus=1")
    check_training_fits(model_path, config, cuda=torch.cuda.is_available(), log=logger.info, engine=engine)
    spec = run_dir / "worker_spec.json"
    write_json_atomic(spec, {"run_dir": str(run_dir), "model_path": model_path, "engine": engine,
                             "config": config.model_dump(mode="json")})
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if ranks > 1:
        env.update(DATA_PARALLEL_ENV)
        t = config.train
        logger.info("data-parallel on %s ranks: global batch %s = %s per device x %s accumulation x %s ranks",
                    ranks, t.batch_size * t.gradient_accumulation_steps * ranks, t.batch_size,
                    t.gradient_accumulation_steps, ranks)
    progress_id = create_progress_artifact(progress=0.0, description=f"Training {run_dir.name}")
    with open(run_dir / "worker.log", "a") as log, open(run_dir / "progress.jsonl", "a") as events:
        proc = subprocess.Popen(
            worker_command(spec, ranks),
            stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=ROOT,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        (run_dir / "worker.pid").write_text(str(proc.pid))
        end, error, bar, max_steps = None, None, None, 0
        try:
            for line in proc.stdout:
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    log.write(line)  # a library printed to stdout
                    continue
                events.write(json.dumps(event) + "\n")
                events.flush()
                kind = event["event"]
                if kind == "begin":
                    max_steps = event["max_steps"]
                    bar = _progress_bar(max_steps, event["resumed_from_step"])
                    if event["resumed_from_step"]:
                        logger.info("resuming from step %s of %s", event["resumed_from_step"], max_steps)
                elif kind == "log":
                    logger.info("step %s/%s loss %.4f lr %.2e", event["step"], max_steps, event["loss"],
                                event["learning_rate"] or 0.0)
                    update_progress_artifact(progress_id, 100.0 * event["step"] / max(1, max_steps))
                    if bar is not None:
                        bar.update(event["step"] - bar.n)
                        bar.set_postfix(loss=f"{event['loss']:.3f}")
                elif kind == "eval":
                    logger.info("step %s eval loss %.4f", event["step"], event["eval_loss"])
                elif kind == "checkpoint":
                    logger.info("checkpoint at step %s", event["step"])
                elif kind == "end":
                    end = event
                elif kind == "error":
                    error = event["message"]
        finally:
            if bar is not None:
                bar.close()
            returncode = proc.wait()
    if error is not None:
        raise TrainingError(error)
    if returncode != 0 or end is None:
        tail = "".join((run_dir / "worker.log").read_text().splitlines(keepends=True)[-15:])
        if returncode < 0 or returncode in (137, 143):  # killed by a signal: resume on retry
            name = signal.Signals(-returncode).name if returncode < 0 else str(returncode)
            raise WorkerDiedError(f"training worker killed ({name}); the retry resumes from the last checkpoint")
        raise WorkerDiedError(f"training worker exited with status {returncode}; last lines of worker.log:\n{tail}")
    update_progress_artifact(progress_id, 100.0)
    return end


def loss_curve_png(events: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_step = {e["step"]: e["loss"] for e in events if e["event"] == "log"}  # a resumed run re-logs steps
    evals = {e["step"]: e["eval_loss"] for e in events if e["event"] == "eval"}
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


BATCH_KEYS = ("world_size", "per_device_batch_size", "gradient_accumulation_steps", "global_batch_size")


def batch_fields(end: dict) -> dict:
    """How the run batched (from the worker's end event): comparable across GPU counts by global_batch_size."""
    return {key: end.get(key) for key in BATCH_KEYS}


@task(cache_policy=NO_CACHE)
def record_run(run_dir: Path, config: RunConfig, dataset_dir: str, model_path: str, engine: str, tokenized: dict,
               end: dict) -> dict:
    """Write the reproducibility manifest and the loss curve; publish the curve as an artifact."""
    events = read_events(run_dir)
    losses = [e["loss"] for e in events if e["event"] == "log"]
    png = loss_curve_png(events)
    (run_dir / "loss.png").write_bytes(png)
    create_markdown_artifact(
        key="loss-curve",
        markdown=f"# Loss curve: `{run_dir.name}`\n\n![loss curve](data:image/png;base64,{base64.b64encode(png).decode()})\n",
        description=f"Training loss of {run_dir.name}",
    )
    manifest = {
        "run_id": run_dir.name,
        "config": config.model_dump(mode="json"),
        "config_hash": config_hash(config),
        "dataset_version": Path(dataset_dir).name,
        "dataset_dir": dataset_dir,
        "model_path": model_path,
        "seed": config.train.seed,
        "engine": engine,
        "libraries": library_versions(),
        "hardware": hardware(),
        "global_step": end["global_step"],
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "trained_tokens": end["trained_tokens"],
        "train_runtime_s": end["train_runtime"],
        "tokens_per_s": round(end["trained_tokens"] / end["train_runtime"], 1) if end["train_runtime"] else None,
        "peak_mem_gib": end["peak_mem_gib"],
        "peak_mem_gib_per_rank": end.get("peak_mem_gib_per_rank"),
        **batch_fields(end),
        "tokenized": {k: {kk: vv for kk, vv in v.items() if kk != "example_markdown"} if isinstance(v, dict) else v
                      for k, v in tokenized.items()},
        "adapter_dir": end["adapter_dir"],
    }
    write_json_atomic(run_dir / "manifest.json", manifest)
    return manifest
