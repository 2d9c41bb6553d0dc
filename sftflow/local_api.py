"""The workspace's local Prefect API: one server that flow-running commands share, so that each does not
start (~3 s) and stop (~2 s) a temporary one of its own.

The first command that runs a flow with no PREFECT_API_URL set and no `sftflow up` stack running starts

    python -m sftflow.local_api --port PORT --idle-seconds S --state $SFTFLOW_HOME/prefect/local-api.json

as a detached process (its own session; log in $SFTFLOW_HOME/prefect/local-api.log): Prefect's server, API
and dashboard, on a free loopback port, with the workspace's SQLite database. It records itself in
prefect/local-api.json; later commands find it there, check that it is the one recorded (it answers
IDENTITY_PATH with its id, which is also in its environment) and use it. It stops by itself once no
request has come for S seconds ($SFTFLOW_LOCAL_API_IDLE_S, default 600; 0 starts none and every command
runs Prefect's temporary server as before). `sftflow status` shows it, `sftflow down` and `sftflow up`
stop it (a stack's server uses the same database).

Starting is serialised by an fcntl lock on prefect/local-api.lock: two commands at once start one server.
A state file whose server does not answer as itself (dead, hung, its port taken by another process) is
replaced. A server that cannot be started is a one-line note on stderr, and the command goes on with the
temporary server.

This module's client side imports only the standard library and foundation (no Prefect): a command that
finds a running server talks to its URL without loading Prefect's server code.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from foundation import settings
from foundation.artifacts import LocalApiState
from foundation.errors import SftflowError
from foundation.workspace import Workspace

IDENTITY_PATH = "/sftflow-local-api"
START_TIMEOUT_SECONDS = 120.0  # a first start migrates the database; slow on a loaded 2-core machine
STOP_GRACE_SECONDS = 10.0
# Requests to loopback never go through an HTTP proxy of the environment.
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class LocalApiError(SftflowError):
    """The local Prefect API could not be started."""


def api_url_for_command(workspace: Workspace) -> str | None:
    """The URL of this workspace's local API, started now if none answers; None when it is turned off
    ($SFTFLOW_LOCAL_API_IDLE_S=0) or cannot be started (then the command runs Prefect's temporary server)."""
    idle_seconds = settings.settings().local_api_idle_s
    if idle_seconds <= 0:
        return None
    try:
        with _start_lock(workspace):
            state = read_state(workspace)
            if state and answers(state):
                return state.api_url
            if state:  # dead, hung, or its port now belongs to another process
                _stop_process(state)
                workspace.local_api_state.unlink(missing_ok=True)
            return _start(workspace, idle_seconds).api_url
    except (LocalApiError, OSError) as exc:
        print(f"note: the local Prefect API did not start ({exc}); this command runs a temporary Prefect "
              f"server instead", file=sys.stderr)
        return None


def running(workspace: Workspace) -> LocalApiState | None:
    """The local API recorded for this workspace, if it answers as itself."""
    state = read_state(workspace)
    return state if state and answers(state) else None


def stop(workspace: Workspace) -> LocalApiState | None:
    """Stop this workspace's local API (by pid, when it is ours); returns what was stopped."""
    if not workspace.prefect_home.exists():
        return None
    with _start_lock(workspace):
        state = read_state(workspace)
        stopped = _stop_process(state) if state else False
        workspace.local_api_state.unlink(missing_ok=True)
    return state if stopped else None


def read_state(workspace: Workspace) -> LocalApiState | None:
    """prefect/local-api.json, or None when it is missing or unreadable (then it is replaced)."""
    try:
        return LocalApiState.read(workspace.local_api_state)
    except (SftflowError, OSError):
        return None


def answers(state: LocalApiState, timeout: float = 2.0) -> bool:
    """Does the server at the recorded port answer with the recorded id?"""
    try:
        with _LOOPBACK.open(f"{state.dashboard_url}{IDENTITY_PATH}", timeout=timeout) as response:
            return json.loads(response.read()).get("local_api_id") == state.local_api_id
    except (urllib.error.URLError, OSError, ValueError, AttributeError):
        return False


def is_ours(state: LocalApiState) -> bool:
    """Is the recorded pid still the server we started? (its environment carries the recorded id)"""
    try:
        environ = Path(f"/proc/{state.pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{settings.LOCAL_API_ID}={state.local_api_id}".encode() in environ.split(b"\0")


@contextlib.contextmanager
def _start_lock(workspace: Workspace) -> Iterator[None]:
    workspace.prefect_home.mkdir(parents=True, exist_ok=True)
    with open(workspace.prefect_home / "local-api.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(workspace: Workspace, idle_seconds: float) -> LocalApiState:
    local_api_id = uuid.uuid4().hex
    port = _free_port()
    env = {"PREFECT_HOME": str(workspace.prefect_home)} | {
        k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # it serves commands and runs nothing on a schedule (a stack's deployments may be in the database)
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        settings.LOCAL_API_ID: local_api_id,
    }
    log = workspace.local_api_log
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "sftflow.local_api", "--port", str(port), "--idle-seconds",
                                 str(idle_seconds), "--state", str(workspace.local_api_state)], cwd=settings.PROJECT_DIR, env=env, stdin=subprocess.DEVNULL,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    state = LocalApiState(local_api_id=local_api_id, pid=proc.pid, port=port, idle_seconds=idle_seconds,
                          log=str(log), started_at=time.time())
    state.write(workspace.local_api_state)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if answers(state, timeout=1.0):
            return state
        if proc.poll() is not None:
            workspace.local_api_state.unlink(missing_ok=True)
            raise LocalApiError(f"it exited with status {proc.returncode}; see {log}")
        time.sleep(0.1)
    _stop_process(state)
    workspace.local_api_state.unlink(missing_ok=True)
    raise LocalApiError(f"it did not answer within {START_TIMEOUT_SECONDS:.0f} s; see {log}")


def _stop_process(state: LocalApiState) -> bool:
    """SIGTERM the server's process group if it is ours, SIGKILL it after the grace period."""
    if not is_ours(state):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < deadline and is_ours(state):
            _reap(state.pid)
            time.sleep(0.1)
        if is_ours(state):
            os.killpg(state.pid, signal.SIGKILL)
    _reap(state.pid)
    return True


def _reap(pid: int) -> None:
    """Collect the server if this process started it (a test that starts and stops one in-process)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


# The server side: run as `python -m sftflow.local_api` by _start, never imported by a command.

class IdleWatch:
    """ASGI middleware: answers IDENTITY_PATH with the server's id, and keeps the time of the last request
    (an open request or websocket counts as activity until it ends) for `stop_when_idle`."""

    def __init__(self, app, local_api_id: str):
        self.app = app
        self.identity = json.dumps({"local_api_id": local_api_id, "pid": os.getpid()}).encode()
        self.last_request = time.monotonic()
        self.open_requests = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        self.open_requests += 1
        self.last_request = time.monotonic()
        try:
            if scope["type"] == "http" and scope["path"] == IDENTITY_PATH:
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": self.identity})
            else:
                await self.app(scope, receive, send)
        finally:
            self.open_requests -= 1
            self.last_request = time.monotonic()

    def idle_seconds(self) -> float:
        return 0.0 if self.open_requests else time.monotonic() - self.last_request

    async def stop_when_idle(self, server, idle_seconds: float) -> None:
        import asyncio

        while not server.started:  # the idle time counts from when it answers (migrations come first)
            await asyncio.sleep(0.1)
        self.last_request = time.monotonic()
        while not server.should_exit:
            await asyncio.sleep(min(max(idle_seconds / 4, 0.2), 10.0))
            if self.idle_seconds() >= idle_seconds:
                print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} no request for {idle_seconds:g} s: stopping", flush=True)
                server.should_exit = True


def serve(port: int, idle_seconds: float, state_path: Path) -> None:
    import asyncio

    import uvicorn
    from prefect.server.api.server import create_app

    local_api_id = os.environ[settings.LOCAL_API_ID]
    watch = IdleWatch(create_app(final=True), local_api_id)
    server = uvicorn.Server(uvicorn.Config(watch, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} local Prefect API pid {os.getpid()} on http://127.0.0.1:{port}, "
          f"stops after {idle_seconds:g} s without a request", flush=True)

    async def main() -> None:
        watcher = asyncio.create_task(watch.stop_when_idle(server, idle_seconds))
        try:
            await server.serve()
        finally:
            watcher.cancel()

    try:
        asyncio.run(main())
    finally:
        with contextlib.suppress(OSError, ValueError):  # gone, or replaced by a newer server's
            if json.loads(state_path.read_bytes()).get("local_api_id") == local_api_id:
                state_path.unlink()
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} stopped", flush=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The workspace's local Prefect API (started by sftflow commands).")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--idle-seconds", type=float, required=True)
    parser.add_argument("--state", type=Path, required=True, help="the state file to remove when it stops")
    args = parser.parse_args()
    serve(args.port, args.idle_seconds, args.state)
