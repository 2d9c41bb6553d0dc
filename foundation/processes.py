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


def start(command: list[str], log: Path, env: dict[str, str], stdout=None, cwd: Path = PROJECT_DIR) -> subprocess.Popen:
    """Start a child that dies with this process; stderr (and stdout unless piped) go to `log`."""
    with open(log, "a") as fh:
        return subprocess.Popen(
            command, stdout=stdout or fh, stderr=fh, text=True, env=env, cwd=cwd,
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
