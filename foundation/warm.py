"""Warm workers: a process that has already imported an engine's libraries, waiting to be handed a job.

Each training and evaluation process imports its engine first, and Unsloth's import alone is 27-37 s on
the GPU machine (bench/RESULTS.md), paid by every process: nothing on disk caches it. A warm worker pays
it ahead. Whoever starts a training or evaluation process on a machine with a CUDA GPU also starts one
warm worker for the same engine (`ensure`), which imports the engine and then waits; the next command
that needs that engine (the evaluation after a training, the next `sftflow train`) hands it its job
instead of starting a process (`claim`), and starts the next warm worker.

A warm worker (`python -m tasks.processes.standby`, detached: its own session, its parent init) listens
on an abstract Unix socket whose name is derived from the workspace, the engine, the interpreter, the
environment and the code (`address`), so a command only ever claims a worker that imported under the
environment the job would have had (the same CUDA_VISIBLE_DEVICES, HF_* and UNSLOTH_* variables, the same
PYTHONPATH) and the same project files and library versions (`code_fingerprint`);
variables that differ between flow runs without changing any import (PREFECT_*, the shell's PWD, ...)
are left out of the name. It serves one job and exits; one that nobody claims exits after
$SFTFLOW_WARM_WORKER_IDLE_S seconds (unset: 600 on a machine with a CUDA GPU, 0 elsewhere; 0: none are
started and every job starts its own process, as before).

The claim hands the job over in one message: the module and its arguments, the environment and working
directory, and the job's stdout and stderr as file descriptors (SCM_RIGHTS). The worker makes them its
own fds 1 and 2, takes the environment and runs the module as `python -m` would; the claimant reads its
stdout and gets its exit status over the socket (`WarmProcess`, a stand-in for `subprocess.Popen`). The
claimant's end of the socket is the leash: when the claimant dies, the worker exits (as a child started
with `processes.start` dies with its parent). A worker still importing when it is claimed answers once
its imports are done, which is still sooner than a new process would. A claim that no worker answers
(none running, another command claimed it first, its imports failed) returns None and the caller starts
a process as before. Both ends check that the other runs as the same user (`same_user`, SO_PEERCRED): an
abstract socket has no file permissions.

Standard library and foundation only: the claimant side runs in flow processes that never import torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from foundation import settings as settings_module

IDLE_SECONDS = 600.0  # a warm worker's wait for a claim, on a CUDA machine, unless SFTFLOW_WARM_WORKER_IDLE_S says
CLAIM_TIMEOUT_SECONDS = 300.0  # the longest a claim waits for a worker still importing; then a new process
MESSAGE_LIMIT = 1 << 20
NAME_PREFIX = "sftflow-warm-"
# Variables that differ between commands (or flow runs) of one machine without changing what a process
# imports or how: left out of a worker's address, still handed to the job. TORCHINDUCTOR_CACHE_DIR: torch
# writes its default into the environment of a process the first time Inductor looks for its cache (a flow
# process after its first training), and reads it when it compiles, in the job.
VOLATILE_PREFIXES = ("PREFECT_", "SFTFLOW_WARM_", "OLDPWD", "PWD", "SHLVL", "_", "TERM", "COLUMNS", "LINES",
                     "SSH_", "XDG_SESSION", "LS_COLORS", "TORCHINDUCTOR_CACHE_DIR")


def idle_seconds(cuda: Callable[[], bool]) -> float:
    """How long a new warm worker waits for a claim: the setting, else IDLE_SECONDS with a CUDA GPU and 0
    without (`cuda` is asked only then: it imports torch)."""
    configured = settings_module.settings().warm_worker_idle_s
    if configured is not None:
        return configured
    return IDLE_SECONDS if cuda() else 0.0


def _stable_env(env: dict[str, str]) -> list[tuple[str, str]]:
    return sorted((k, v) for k, v in env.items() if not k.startswith(VOLATILE_PREFIXES))


# The project's packages a job imports, and the libraries a warm worker imports ahead: a worker that imported
# other versions of them (a checkout changed, a library upgraded, while it waited) must not run the job.
PACKAGES = ("foundation", "schemas", "tasks", "flows", "sftflow")
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "unsloth",
             "unsloth_zoo")


def code_fingerprint(root: Path = settings_module.PROJECT_DIR) -> list:
    """Every .py file of the project's packages under `root` (path, mtime, size) and the libraries' versions:
    what a warm worker imported must be what the job would import (a few ms to read)."""
    files = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            stat = path.stat()
            files.append((path.relative_to(root).as_posix(), stat.st_mtime_ns, stat.st_size))
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return [files, versions]


def address(workspace_root: Path, engine: str, env: dict[str, str]) -> str:
    """The abstract socket name of the warm worker that can run a job for `engine` with `env` and this code."""
    key = json.dumps([str(workspace_root), engine, sys.executable, _stable_env(env), code_fingerprint()])
    return "\0" + NAME_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:32]


def same_user(conn: socket.socket) -> bool:
    """Whether the process at the other end of a Unix socket runs as this process's user. An abstract socket
    has no file permissions: any local user can connect to a worker's name, or take it first. A job hands over
    its environment (tokens included) and runs code: both ends check who the other is."""
    try:
        _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except OSError:
        return False
    return uid == os.getuid()


def listening(prefix: str = NAME_PREFIX) -> list[str]:
    """The abstract socket names of the warm workers listening on this machine (from /proc/net/unix)."""
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return []
    names = set()
    for line in lines:
        fields = line.split()
        # Num RefCount Protocol Flags Type St Inode Path; St 01 = listening; abstract names start with @
        if len(fields) >= 8 and fields[5] == "01" and fields[7].startswith("@" + prefix):
            names.add("\0" + fields[7][1:])
    return sorted(names)


class WarmProcess:
    """A job running in a claimed warm worker, with the part of `subprocess.Popen` the callers use: pid,
    args, stdout (piped jobs), poll, wait, kill. Its exit status comes over the socket; a worker that
    dies without sending one (killed, out of memory) reads as killed by SIGKILL."""

    def __init__(self, conn: socket.socket, pid: int, args: list[str], stdout):
        self._conn, self.pid, self.args, self.stdout = conn, pid, args, stdout
        self.returncode: int | None = None

    def _receive(self, timeout: float | None) -> int | None:
        if self.returncode is not None:
            return self.returncode
        ready, _, _ = select.select([self._conn], [], [], timeout)
        if not ready:
            return None
        try:
            message = self._conn.recv(MESSAGE_LIMIT)
        except OSError:
            message = b""
        self.returncode = int(json.loads(message)["exit"]) if message else -signal.SIGKILL
        self._conn.close()
        return self.returncode

    def poll(self) -> int | None:
        return self._receive(0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._receive(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return code

    def kill(self) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def claim(workspace_root: Path, engine: str, module: str, args: list[str], log: Path, env: dict[str, str],
          pipe_stdout: bool = False, cwd: Path | None = None) -> WarmProcess | None:
    """Hand `python -m module args` to the warm worker for `engine` and `env`; None when none takes it.

    Its stderr (and its stdout unless `pipe_stdout`) are appended to `log`, as with `processes.start`."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(address(workspace_root, engine, env))
    except OSError:  # none listening (or its backlog is full): start a process
        conn.close()
        return None
    if not same_user(conn):  # another user's process holds the name: it gets nothing
        conn.close()
        return None
    read_end, write_end = os.pipe() if pipe_stdout else (None, None)
    try:
        with open(log, "a") as log_file:
            job = {"module": module, "args": args, "env": env, "cwd": str(cwd or os.getcwd())}
            fds = [write_end if pipe_stdout else log_file.fileno(), log_file.fileno()]
            socket.send_fds(conn, [json.dumps(job).encode()], fds)
        if write_end is not None:
            os.close(write_end)
            write_end = None
        ready, _, _ = select.select([conn], [], [], CLAIM_TIMEOUT_SECONDS)
        reply = conn.recv(MESSAGE_LIMIT) if ready else b""
        if not reply:  # another command claimed it first, its imports failed, or it hung importing
            raise ConnectionError("no answer")
        pid = int(json.loads(reply)["pid"])
    except (OSError, ValueError, KeyError):
        conn.close()
        for fd in (read_end, write_end):
            if fd is not None:
                os.close(fd)
        return None
    stdout = os.fdopen(read_end, "r") if read_end is not None else None
    return WarmProcess(conn, pid, [sys.executable, "-m", module, *args], stdout)


def ensure(workspace_root: Path, engine: str, env: dict[str, str], log: Path, cuda: Callable[[], bool]) -> None:
    """Start a warm worker for `engine` and `env` unless they are turned off; one already listening at its
    address makes the new one exit at once (the address is taken), so calling this twice starts one."""
    idle = idle_seconds(cuda)
    if idle <= 0:
        return
    name = address(workspace_root, engine, env)
    if name in listening():
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "tasks.processes.standby", "--engine", engine, "--workspace",
             str(workspace_root), "--address", name[1:], "--idle-seconds", str(idle)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, start_new_session=True,
            cwd=settings_module.PROJECT_DIR,
        )
    launcher.wait()  # it forks the worker and exits at once: the worker's parent is init, not this process


def ask(name: str, request: dict) -> dict | None:
    """One request to the worker at `name` (not a job); its answer, or None when it gives none."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(name)
        if not same_user(conn):
            return None
        conn.send(json.dumps(request).encode())
        ready, _, _ = select.select([conn], [], [], 5.0)
        reply = conn.recv(MESSAGE_LIMIT) if ready else b""
        return json.loads(reply) if reply else None
    except (OSError, ValueError):
        return None
    finally:
        conn.close()


def workers(workspace_root: Path) -> list[dict]:
    """The warm workers of a workspace waiting for a claim: each one's pid, engine and seconds left."""
    found = (ask(name, {"describe": True}) for name in listening())
    return [w for w in found if w and w.get("workspace") == str(workspace_root)]


def stop_all(workspace_root: Path) -> int:
    """Ask the warm workers of a workspace to exit (`sftflow down`, tests); how many said they would."""
    answers = (ask(name, {"stop": str(workspace_root)}) for name in listening())
    return sum(1 for a in answers if a and a.get("stopping"))
