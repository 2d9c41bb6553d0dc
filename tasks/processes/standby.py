"""A warm worker: `python -m tasks.processes.standby --engine E --workspace W --address A --idle-seconds S`.

Started by `foundation.warm.ensure` (which says why and how it is claimed). It detaches (forks, the
launcher exits: its parent is then init, so a training job's `exit_with_parent` watches a parent that
never changes), takes its address (an abstract Unix socket: a second worker for the same address finds
it taken and exits), imports the engine's libraries and the jobs' (`preload`), then waits for one
request at a time:

- `{"describe": true}`: its pid, engine, workspace and seconds left; it goes on waiting;
- `{"stop": WORKSPACE}`: it exits if it belongs to that workspace;
- a job `{"module", "args", "env", "cwd"}` with two file descriptors (the job's stdout and stderr): it
  stops listening (one job per worker: the job leaves the process's memory as it found it), answers
  with its pid, and runs the module as `python -m` would, with the job's environment, working directory
  and fds 1 and 2; then sends `{"exit": status}` and exits with it. When the claimant's end of the
  socket closes first (the claimant died), the job is ended at once (exit status 3).

A connection from another user's process is closed unanswered (foundation.warm.same_user). With no request
for `--idle-seconds` it exits.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import socket
import sys
import threading
import time
import traceback

from foundation import processes
from foundation.warm import MESSAGE_LIMIT, same_user


def detach() -> None:
    """Fork: the launcher (this process) exits at once, the child carries on with init as its parent."""
    if os.fork() > 0:
        os._exit(0)


def preload(engine: str) -> None:
    """What a job imports first: the engine (Unsloth patches transformers and trl as it is imported), then
    trl's trainer, datasets and pyarrow. Not the job modules themselves: `runpy` runs a module as __main__
    afresh, and one already imported would be a second copy of it."""
    from tasks.engines import load_engine

    load_engine(engine)
    import datasets  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    from trl import SFTConfig, SFTTrainer  # noqa: F401


def exit_status(exc: SystemExit) -> int:
    """The status `python` exits with for a SystemExit, which prints a non-integer code to stderr."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def end_with_claimant(conn: socket.socket) -> None:
    """Exit (status 3) when the claimant's end of the socket closes: it died, nobody would read the job."""

    def watch() -> None:
        try:
            while conn.recv(MESSAGE_LIMIT):
                pass
        except OSError:
            pass
        os._exit(3)

    threading.Thread(target=watch, name="end-with-claimant", daemon=True).start()


def run_job(conn: socket.socket, job: dict, fds: list[int]) -> None:
    """Become the job's process (see the module docstring); never returns."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in fds:
        os.close(fd)
    os.environ.clear()
    os.environ.update(job["env"])
    os.chdir(job["cwd"])
    processes.mark_job_start(warm=True)
    try:
        conn.send(json.dumps({"pid": os.getpid()}).encode())
    except OSError:  # the claimant gave up waiting while this worker was importing: it started its own process
        os._exit(3)
    end_with_claimant(conn)
    sys.argv = [job["module"], *job["args"]]
    try:
        runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
        status = 0
    except SystemExit as exc:
        status = exit_status(exc)
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        conn.send(json.dumps({"exit": status}).encode())
    finally:
        os._exit(status)


def serve(listener: socket.socket, engine: str, workspace: str, idle_seconds: float) -> None:
    """Answer requests until a job comes (then run it), a stop for this workspace, or the idle timeout."""
    deadline = time.monotonic() + idle_seconds
    while (left := deadline - time.monotonic()) > 0:
        listener.settimeout(left)
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            return
        if not same_user(conn):  # another user's process: no job, no answer
            conn.close()
            continue
        conn.settimeout(5.0)
        try:
            message, fds, _, _ = socket.recv_fds(conn, MESSAGE_LIMIT, 2)
            request = json.loads(message)
        except (OSError, ValueError):
            conn.close()
            continue
        conn.settimeout(None)
        if "module" in request and len(fds) == 2:
            listener.close()
            run_job(conn, request, fds)
        for fd in fds:
            os.close(fd)
        stopping = request.get("stop") == workspace
        if "stop" in request:
            answer = {"stopping": stopping}
        else:
            answer = {"pid": os.getpid(), "engine": engine, "workspace": workspace,
                      "idle_left_s": round(deadline - time.monotonic(), 1)}
        try:
            conn.send(json.dumps(answer).encode())
        except OSError:  # asked while this worker was importing, and gave up waiting
            pass
        conn.close()
        if stopping:
            return


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks.processes.standby")
    parser.add_argument("--engine", required=True)
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--address", required=True, help="the abstract socket's name, without its leading NUL")
    parser.add_argument("--idle-seconds", type=float, required=True)
    args = parser.parse_args(argv)
    detach()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        listener.bind("\0" + args.address)
    except OSError:  # a worker for this address is already there
        return
    listener.listen(8)
    started = time.monotonic()
    try:
        preload(args.engine)
    except BaseException:  # claims queued meanwhile see the socket close and start their own process
        traceback.print_exc()
        return
    print(f"warm worker {os.getpid()} for the {args.engine} engine ready after {time.monotonic() - started:.1f} s "
          f"(waits {args.idle_seconds:.0f} s)", file=sys.stderr, flush=True)
    serve(listener, args.engine, args.workspace, args.idle_seconds)


if __name__ == "__main__":
    main(sys.argv[1:])
