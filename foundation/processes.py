"""The plumbing of the subprocesses that train, evaluate and convert models.

Models are loaded in subprocesses (the training process, the evaluation process, llama.cpp's
converters): GPU memory is released when they exit, a kill is survived, and Unsloth can be imported
before transformers. Each is started the same way: the project importable (PYTHONPATH), output
unbuffered, tokenizers single-threaded (they run beside data loader processes), killed with the
process that started it, its output in a log whose last lines go into the error when it fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from foundation.settings import PROJECT_DIR


def module_command(module: str, *args: str) -> list[str]:
    """`python -m module args` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def child_env(pythonpath: list[Path] | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child: the project (or `pythonpath`) first on PYTHONPATH."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(extra or {})}
    paths = [str(p) for p in (pythonpath or [PROJECT_DIR])]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, os.environ.get("PYTHONPATH")]))
    return env


def die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGKILL it when the process that started it dies, so a
    killed flow run leaves no orphan writing into the directory its retry resumes from."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def start(command: list[str], log: Path, env: dict[str, str], stdout=None, cwd: Path = PROJECT_DIR,
          stdin=None) -> subprocess.Popen:
    """Start a child that dies with this process; stderr (and stdout unless piped) go to `log`."""
    with open(log, "a") as fh:
        return subprocess.Popen(
            command, stdin=stdin, stdout=stdout or fh, stderr=fh, text=True, env=env, cwd=cwd,
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )


def run(command: list[str], log: Path, env: dict[str, str], cwd: Path = PROJECT_DIR) -> int:
    """Run a child to its end with its output in `log`; its exit status."""
    return start(command, log, env, cwd=cwd).wait()


def log_tail(log: Path, lines: int = 15) -> str:
    """The last lines of a child's log, for the error that says it failed."""
    try:
        return "".join(log.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except FileNotFoundError:
        return ""


# When a warm worker (tasks.processes.standby) was handed the job this process runs: the job's clock starts
# then, not at the process's start (its imports were paid before anyone waited for them).
_job_started_at: float | None = None


def mark_job_start(warm: bool) -> None:
    global _job_started_at
    _job_started_at = time.time() if warm else None


def runs_warm() -> bool:
    """Whether this process is a warm worker running a job it was handed."""
    return _job_started_at is not None


def job_age_s() -> float:
    """Seconds since this job started: since the process started (the kernel's start time, so the
    interpreter's own start counts), or since a warm worker was handed it."""
    if _job_started_at is not None:
        return time.time() - _job_started_at
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def fork_map(fn, *args_lists, workers: int) -> list:
    """`fn` over the argument lists on `workers` forked processes, the results in order (in this process when
    `workers` < 2 or the platform cannot fork). Fork, not spawn: a spawned process would spend seconds
    importing Prefect again before its first item; a forked one starts with this process's memory (what `fn`
    reads can be left in a module global) and gc.freeze keeps the children's collector off the parent's pages."""
    import gc
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    if workers < 2 or "fork" not in mp.get_all_start_methods():
        return list(map(fn, *args_lists))
    gc.freeze()
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            return list(pool.map(fn, *args_lists))
    finally:
        gc.unfreeze()
