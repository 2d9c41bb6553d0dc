"""`sftflow up / status / down`: a local Prefect stack for the dashboard and the event chain.

`up` starts, each as its own process group with its log under $SFTFLOW_HOME/stack/logs/:

    server      prefect server start on loopback (SQLite under $SFTFLOW_HOME/prefect, or the
                PostgreSQL URL given with --database-url)
    worker-cpu  prefect worker start --pool cpu     (ingest, evaluate, export, publish, pipeline)
    worker-gpu  prefect worker start --pool gpu     (training; the pool runs one flow at a time)
    watcher     sftflow watch                       (announces complete drops in the landing zone)

after creating the `cpu` and `gpu` process work pools, deploying prefect.yaml and creating the
automation that marks a flow run Crashed when its heartbeats stop (its process or host is gone
without a word: a worker's host lost, an OOM kill of the whole group), so that a waiting pipeline
starts its training again instead of waiting for ever. What it started is
recorded in stack/state.json; `down` stops exactly those processes (each is checked to still be the
one started, by a stack id in its environment, before it is signalled), nothing else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from foundation import settings, warm
from foundation.artifacts import StackProcess, StackState
from foundation.errors import SftflowError
from foundation.workspace import Workspace
from sftflow import local_api

BIN = Path(sys.executable).parent
POOLS = {"cpu": None, "gpu": 1}  # name -> concurrency limit
HEARTBEAT_SECONDS = 30  # flow runs of the workers send a heartbeat this often (Prefect's minimum)
SILENT_SECONDS = 90  # ... and are marked Crashed when none came for this long
ZOMBIE_AUTOMATION = "sftflow: crash flow runs that stopped sending heartbeats"


class StackError(SftflowError):
    """The local stack cannot be started or reached."""


_WARNED_UNREADABLE: set[str] = set()


def read_state(workspace: Workspace) -> StackState | None:
    """What `up` recorded in stack/state.json; None when there is none, or when it cannot be read (cut
    short, edited by hand, another version's): then every command goes on as with no stack, and one
    warning line on stderr names the file and the fix."""
    path = workspace.stack_state
    if not path.exists():
        return None
    try:
        return StackState.read(path)
    except (SftflowError, OSError) as exc:
        if str(path) not in _WARNED_UNREADABLE:
            _WARNED_UNREADABLE.add(str(path))
            cause = exc.__cause__ if exc.__cause__ is not None else exc  # pydantic's ValidationError: what is wrong
            reason = cause.errors()[0]["msg"] if hasattr(cause, "errors") else getattr(exc, "strerror", None) or exc
            print(f"warning: {path} cannot be read ({str(reason).splitlines()[0][:200]}); going on as if no stack "
                  f"was started: stop the old stack's processes by hand if any run, then delete it (rm {path})",
                  file=sys.stderr)
        return None


def is_ours(proc: StackProcess, stack_id: str) -> bool:
    """Is this pid still the process we started? (its environment carries our stack id)"""
    try:
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return f"{settings.STACK_ID}={stack_id}".encode() in environ.split(b"\0")


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def active_api_url(workspace: Workspace) -> str | None:
    """The API URL of this workspace's running stack, if `sftflow up` started one that still runs."""
    state = read_state(workspace)
    if not state:
        return None
    server = state.processes.get("server")
    if server and is_ours(server, state.stack_id):
        return state.api_url
    return None


# Where Prefect and sftflow read a database URL (and its password) from. Only the server reads the database:
# the workers, the watcher and the setup commands talk to its API, and a URL with a password must not sit
# in the environment of every flow run they start.
DATABASE_PREFIXES = ("PREFECT_API_DATABASE_", "PREFECT_SERVER_DATABASE_")


def _is_database_var(name: str) -> bool:
    return name == settings.DATABASE_URL or name.startswith(DATABASE_PREFIXES)


def stack_env(workspace: Workspace, api_url: str, stack_id: str) -> dict[str, str]:
    """The environment of what `up` starts but the server (workers, watcher, setup commands): this process's
    own, without any database URL, and with the stack's API, workspace and stack id."""
    env = {k: v for k, v in os.environ.items() if not _is_database_var(k)}
    env.update({
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(workspace.prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "GX_ANALYTICS_ENABLED": "false",
        settings.HOME: str(workspace.root),
        settings.PROJECT_DIR_VAR: str(settings.PROJECT_DIR),
        settings.PROGRESS: "0",  # workers log progress events; no progress bar in their logs
        settings.STACK_ID: stack_id,
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS),
    })
    return env


def server_env(env: dict[str, str], database_url: str | None) -> dict[str, str]:
    """The server's environment: the stack's, with the database settings of this process's environment and
    `database_url` (--database-url / $SFTFLOW_DATABASE_URL) as Prefect's connection URL."""
    server = env | {k: v for k, v in os.environ.items() if _is_database_var(k) and k != settings.DATABASE_URL}
    if database_url:
        server["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    return server


def _spawn(name: str, command: list[str], env: dict, logs: Path) -> StackProcess:
    log = logs / f"{name}.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen(command, cwd=settings.PROJECT_DIR, env=env, stdin=subprocess.DEVNULL, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return StackProcess(pid=proc.pid, command=command, log=str(log))


def _run(command: list[str], env: dict, what: str, logs: Path) -> None:
    """Run a setup command to completion; its output goes to stack/logs/setup.log."""
    with open(logs / "setup.log", "ab") as fh:
        fh.write(f"\n$ {' '.join(command)}\n".encode())
        fh.flush()
        done = subprocess.run(command, cwd=settings.PROJECT_DIR, env=env, stdin=subprocess.DEVNULL, stdout=fh,
                              stderr=subprocess.STDOUT, timeout=600)
    if done.returncode != 0:
        raise StackError(f"{what} failed (exit {done.returncode}); see {logs / 'setup.log'}")


def _wait_healthy(api_url: str, server: StackProcess, stack_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if healthy(api_url):
            return
        if not is_ours(server, stack_id):
            raise StackError(f"the Prefect server exited during start-up; see {server.log}")
        time.sleep(0.5)
    raise StackError(f"the Prefect server did not answer at {api_url}/health within {timeout:.0f} s; see {server.log}")


def ensure_zombie_automation(api_url: str) -> None:
    """Create (once per database) the automation of Prefect's "detect zombie flows" recipe: a flow run
    whose heartbeat is followed by neither another heartbeat nor a final state within SILENT_SECONDS
    is set to Crashed."""
    from datetime import timedelta

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    from prefect.settings import PREFECT_API_URL, temporary_settings

    automation = AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description="A flow run that stopped sending heartbeats has lost its process; mark it Crashed so "
                    "that whatever waits on it (a pipeline's training stage) can start it again.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=SILENT_SECONDS),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {SILENT_SECONDS} s: the flow run's process is gone")],
    )
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        if not client.read_automations_by_name(ZOMBIE_AUTOMATION):
            client.create_automation(automation)


def up(workspace: Workspace, port: int = 4200, host: str = "127.0.0.1", database_url: str | None = None,
       watch: bool = True, quiet_seconds: float = 30.0, interval: float = 5.0, log=print) -> dict:
    """Start server, pools, deployments, workers and watcher; returns the state (also in stack/state.json)."""
    workspace.ensure()
    if (running := read_state(workspace)) and any(is_ours(p, running.stack_id) for p in running.processes.values()):
        return restart_stopped(workspace, running, log)
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise StackError(f"--host {host}: the stack listens on loopback only; put a reverse proxy with "
                         "authentication in front of it to share it")
    if local_api.stop(workspace):  # two servers must not share the workspace's SQLite database
        log("stopped the workspace's local Prefect API (the stack's server takes its place)")
    logs = workspace.stack_logs
    logs.mkdir(parents=True, exist_ok=True)
    stack_id = uuid.uuid4().hex
    api_url = f"http://{host}:{port}/api"
    env = stack_env(workspace, api_url, stack_id)
    prefect = str(BIN / "prefect")
    state = StackState(stack_id=stack_id, api_url=api_url, dashboard_url=f"http://{host}:{port}",
                       workspace=str(workspace.root), database="postgresql" if database_url else "sqlite",
                       started_at=time.time(), processes={})

    def save() -> None:
        state.write(workspace.stack_state)

    try:
        log(f"starting the Prefect server on {host}:{port}")
        state.processes["server"] = _spawn("server", [prefect, "server", "start", "--host", host, "--port",
                                                         str(port)], server_env(env, database_url), logs)
        save()
        _wait_healthy(api_url, state.processes["server"], stack_id, timeout=180)
        for pool, limit in POOLS.items():
            _run([prefect, "work-pool", "create", pool, "--type", "process", "--overwrite"], env,
                 f"creating work pool {pool}", logs)
            if limit:
                _run([prefect, "work-pool", "set-concurrency-limit", pool, str(limit)], env,
                     f"limiting work pool {pool}", logs)
        log("deploying prefect.yaml")
        _run([prefect, "--no-prompt", "deploy", "--all"], env, "prefect deploy --all", logs)
        ensure_zombie_automation(api_url)
        for pool in POOLS:
            state.processes[f"worker-{pool}"] = _spawn(
                f"worker-{pool}", [prefect, "worker", "start", "--pool", pool, "--name", f"sftflow-{pool}"], env, logs)
        if watch:
            state.processes["watcher"] = _spawn(
                "watcher", [str(BIN / "sftflow"), "watch", "--interval", str(interval), "--quiet-seconds",
                            str(quiet_seconds)], env, logs)
        save()
    except BaseException:
        down(workspace)
        raise
    return state.dump()


def restart_stopped(workspace: Workspace, state: StackState, log=print) -> dict:
    """`up` on a running stack: start again the workers and the watcher that have stopped (killed, or
    their host rebooted); the server's flow runs that were lost with them are marked Crashed by the
    heartbeat automation and started again by whatever waits on them."""
    stack_id = state.stack_id
    stopped = [name for name, proc in state.processes.items() if not is_ours(proc, stack_id)]
    if not stopped:
        raise StackError(f"a stack started from this workspace is running ({state.dashboard_url}); "
                         "`sftflow status` shows it, `sftflow down` stops it")
    if "server" in stopped:
        raise StackError(f"the Prefect server of the stack at {state.dashboard_url} has stopped: "
                         "`sftflow down`, then `sftflow up` (the database keeps every run)")
    env = stack_env(workspace, state.api_url, stack_id)  # the server (not restarted here) alone reads the database
    for name in stopped:
        state.processes[name] = _spawn(name, state.processes[name].command, env, workspace.stack_logs)
        log(f"restarted {name} (it had stopped)")
    state.write(workspace.stack_state)
    return state.dump() | {"restarted": stopped}


def status(workspace: Workspace) -> dict:
    state = read_state(workspace)
    waiting = warm.workers(workspace.root)
    warm_view = {"warm_workers": waiting} if waiting else {}
    if not state:
        result = {"running": False, "message": f"no stack was started from {workspace.root} (sftflow up starts one)"}
        if local := local_api.running(workspace):
            result |= {"local_api": {"dashboard_url": local.dashboard_url, "api_url": local.api_url, "pid": local.pid,
                                     "idle_seconds": local.idle_seconds, "log": local.log}} | _server_view(local.api_url)
            result["message"] += (f"\nlocal Prefect API (commands share it): dashboard {local.dashboard_url}  pid "
                                  f"{local.pid}, stops after {local.idle_seconds / 60:g} min without a request")
        for w in waiting:
            result["message"] += (f"\nwarm worker (the {w['engine']} engine imported, for the next training or "
                                  f"evaluation): pid {w['pid']}, leaves in {w['idle_left_s']:.0f} s unless claimed")
        return result | warm_view
    processes = {name: {**proc.dump(), "alive": is_ours(proc, state.stack_id)} for name, proc in state.processes.items()}
    result = {"running": any(p["alive"] for p in processes.values()), "dashboard_url": state.dashboard_url,
              "api_url": state.api_url, "database": state.database, "processes": processes,
              "api_healthy": healthy(state.api_url)}
    if result["api_healthy"]:
        result |= _server_view(state.api_url)
    return result | warm_view


def _server_view(api_url: str) -> dict:
    """Pools, their workers and the latest flow runs, read from the server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        pools = {}
        for pool in client.read_work_pools():
            workers = client.read_workers_for_work_pool(pool.name)
            pools[pool.name] = {"status": str(pool.status.value if pool.status else "unknown"),
                                "concurrency_limit": pool.concurrency_limit,
                                "workers": [{"name": w.name, "status": str(w.status.value)} for w in workers]}
        runs = client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=30)
        flows = {f.id: f.name for f in client.read_flows()}
    view = [{"flow": flows.get(r.flow_id, "?"), "name": r.name, "state": r.state_name,
             "expected_start": r.expected_start_time.isoformat() if r.expected_start_time else None} for r in runs]
    scheduled = [r for r in view if r["state"] == "Scheduled"]
    return {"work_pools": pools, "latest_flow_runs": [r for r in view if r["state"] != "Scheduled"][:10],
            "next_scheduled": scheduled[-1] if scheduled else None}


def down(workspace: Workspace, grace_seconds: float = 20.0) -> dict:
    """Stop what `up` started (watcher, workers, then the server), by pid and stack id only, and the
    workspace's local API and its warm workers."""
    stopped = ["local-api"] if local_api.stop(workspace) else []
    stopped += ["warm-worker"] * warm.stop_all(workspace.root)
    state = read_state(workspace)
    if not state:
        return {"stopped": stopped, "message": f"no stack was started from {workspace.root}"
                + ("; stopped the local Prefect API" if stopped else "")}
    order = [n for n in ("watcher", "worker-gpu", "worker-cpu", "server") if n in state.processes]
    for name in order:
        proc = state.processes[name]
        if not is_ours(proc, state.stack_id):
            continue
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and is_ours(proc, state.stack_id):
            _reap(proc.pid)
            time.sleep(0.2)
        if is_ours(proc, state.stack_id):
            os.killpg(proc.pid, signal.SIGKILL)
        _reap(proc.pid)
        stopped.append(name)
    workspace.stack_state.unlink(missing_ok=True)
    return {"stopped": stopped}


def _reap(pid: int) -> None:
    """Collect a child we started in this process (tests run up and down in one process)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def configure_prefect_env(workspace: Workspace) -> None:
    """Point Prefect at the workspace before it is imported.

    With no PREFECT_API_URL set, flows report to the server `sftflow up` runs for this workspace, else
    to the workspace's local API (sftflow/local_api.py, started on first use), else (turned off, or it
    cannot start) to Prefect's temporary server; all keep their SQLite database under PREFECT_HOME,
    under the workspace, which keeps the source tree clean. Values the user already set win.
    """
    if "PREFECT_API_URL" not in os.environ:
        if api_url := active_api_url(workspace) or local_api.api_url_for_command(workspace):
            os.environ["PREFECT_API_URL"] = api_url
    os.environ.setdefault("PREFECT_HOME", str(workspace.prefect_home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
    # the embedded server's start-up waits 20 s by default, too little on a loaded 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
