"""Kill -9 a real process at every file-system mutation of one pipeline step, one kill per process.

    python -m tests.reliability.crashloop SPEC.json      (the tests in this directory run it)

SPEC: {"action": "publish" | "ingest", "args": {...}, "pristine": DIR, "work": DIR, "watch": [SUBDIR, ...],
"observe": "module:function", "out": FILE}.

The helper imports everything once, then for k = 1, 2, ... it copies the pristine workspace to
`work/k`, forks a child that arms an audit hook and runs the action (the real Prefect flow) with
SFTFLOW_HOME=`work/k`; the hook SIGKILLs the child just before its k-th mutation (open for writing,
rename/replace, mkdir, unlink, rmdir, and every open/batch/close of a Parquet writer, which writes
from C++ and so raises no audit event of its own) of a path under one of the watched subdirectories. After the
kill, `observe(workspace)` records what a reader would see; then a second, unarmed child re-runs the
action on the same workspace (recovery) and `observe` runs again. The loop ends at the first k the
child survives: by then every mutation of an uninterrupted run has been a kill point.

The flow's own code runs, in its order, but without Prefect's orchestration: each task is called as
its plain function, and logging, artifacts and events go to no-ops (a flow run costs ~1.3 s of API
round trips, which would make a few hundred kill points take minutes). One more child runs the
real flow, orchestrated, on a fresh copy: the test checks it gives the same result and files.

Forking (not spawning) keeps each kill point well under a second. It is safe because this helper
has one thread and has not talked to the Prefect API when it forks; the orchestrated child opens
its own client.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

MUTATIONS = {"open", "os.rename", "os.mkdir", "os.remove", "os.rmdir", "os.truncate", "os.link", "os.symlink",
             "parquet.write"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _is_mutation(event: str, args: tuple) -> list[str]:
    """The paths an audited call mutates; [] when it does not mutate anything."""
    if event not in MUTATIONS:
        return []
    if event == "open":
        path, mode, flags = args
        if isinstance(mode, str):
            if not any(c in mode for c in "wax+"):
                return []
        elif not (flags or 0) & WRITE_FLAGS:
            return []
        return [path] if isinstance(path, (str, bytes, os.PathLike)) else []
    if event in ("os.rename", "os.link", "os.symlink"):
        return [args[0], args[1]]
    if event == "os.mkdir" and os.path.isdir(args[0]):  # mkdir(exist_ok=True) of an existing directory
        return []
    return [args[0]]


def _audit_parquet_writes() -> None:
    """Raise an audit event at each step of pyarrow's ParquetWriter (its writes bypass Python's io)."""
    import pyarrow.parquet as pq

    def audited(method):
        def call(self, *args, **kwargs):
            sys.audit("parquet.write", self.sftflow_path)
            return method(self, *args, **kwargs)

        return call

    init = pq.ParquetWriter.__init__

    def __init__(self, where, *args, **kwargs):
        self.sftflow_path = os.fspath(where) if isinstance(where, (str, os.PathLike)) else "<stream>"
        sys.audit("parquet.write", self.sftflow_path)
        init(self, where, *args, **kwargs)

    pq.ParquetWriter.__init__ = __init__
    for name in ("write_table", "write_batch", "close"):
        setattr(pq.ParquetWriter, name, audited(getattr(pq.ParquetWriter, name)))


def arm(roots: list[Path], kill_at: int, trace: list | None = None) -> None:
    """SIGKILL this process just before its `kill_at`-th mutation under `roots` (0: never; trace them)."""
    prefixes = [str(r) + os.sep for r in roots]
    count = 0

    def hook(event: str, args: tuple) -> None:
        nonlocal count
        paths = _is_mutation(event, args)
        if not paths:
            return
        paths = [os.fsdecode(p) if isinstance(p, (bytes, os.PathLike)) else p for p in paths]
        if not any(os.path.abspath(p).startswith(tuple(prefixes)) for p in paths if isinstance(p, str)):
            return
        count += 1
        if trace is not None:
            trace.append(f"{event} {' -> '.join(str(p) for p in paths)}")
        if count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)


PLAIN_MODULES = ("flows.ingest", "flows.publish", "tasks.ingest.stage", "tasks.validate", "tasks.format",
                 "tasks.report", "tasks.publish")


def _without_orchestration() -> None:
    """Call every task and flow of the data and publish paths as its plain function, without the API."""
    import logging

    from prefect import Flow, Task

    logger = logging.getLogger("sftflow.crashloop")
    for name in PLAIN_MODULES:
        module = importlib.import_module(name)
        for attr, value in list(vars(module).items()):
            if isinstance(value, (Task, Flow)):
                setattr(module, attr, value.fn)
            elif attr == "get_run_logger":
                setattr(module, attr, lambda: logger)
            elif attr.startswith("create_") and attr.endswith("_artifact") or attr == "emit_event":
                setattr(module, attr, lambda *a, **k: None)


def _run_child(action, args: dict, home: Path, roots: list[Path], kill_at: int, result_file: Path,
               orchestrated: bool = False) -> int:
    """Fork; the child runs the action (armed) and writes its outcome; returns the wait status."""
    pid = os.fork()
    if pid == 0:  # the child
        code, trace = 0, []
        try:
            os.environ["SFTFLOW_HOME"] = str(home)
            if not orchestrated:
                _without_orchestration()
            _audit_parquet_writes()
            arm(roots, kill_at, trace)
            outcome = {"result": action(**args), "trace": trace}
        except BaseException as exc:  # the outcome is data for the test, which asserts on it
            outcome = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(), "trace": trace}
            code = 1
        result_file.write_text(json.dumps(outcome, default=str))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def _publish(run_id: str) -> dict:
    import flows.publish

    return flows.publish.publish_model(run_id=run_id).dump()


def _ingest(paths: list[str], drop_id: str) -> dict:
    import flows.ingest

    report = flows.ingest.ingest_drop(paths=paths, drop_id=drop_id).model_dump(mode="json")
    return {k: report[k] for k in ("status", "noop", "rows_in", "accepted", "duplicates", "quarantined",
                                   "dataset_version", "dataset_changed", "dataset_rows", "reasons")}


ACTIONS = {"publish": _publish, "ingest": _ingest}


def _orchestrated_run(spec: dict, action, observe) -> dict:
    """The action through the real, orchestrated flow on a fresh copy of the pristine workspace."""
    home = Path(spec["work"]) / "orchestrated"
    _copy_workspace(spec, home)
    status = _run_child(action, spec["args"], home, [], 0, home.with_suffix(".json"), orchestrated=True)
    outcome = json.loads(home.with_suffix(".json").read_text())
    outcome["status"], outcome["observed"] = status, observe(home)
    return outcome


def _copy_workspace(spec: dict, home: Path) -> None:
    shutil.copytree(spec["pristine"], home, symlinks=True)
    for templated in spec.get("templated", []):  # paths inside the workspace copy, e.g. a remote
        path = home / templated
        path.write_text(path.read_text().replace("{HOME}", str(home)))


def crash_loop(spec: dict) -> dict:
    action = ACTIONS[spec["action"]]
    module, name = spec["observe"].split(":")
    observe = getattr(importlib.import_module(module), name)
    work = Path(spec["work"])
    for name in PLAIN_MODULES:  # import the heavy, thread-free parts once, before forking
        importlib.import_module(name)
    if spec["action"] == "ingest":
        from tasks.validate import default_validator

        default_validator()
    if threading.active_count() != 1:
        raise RuntimeError(f"the helper has {threading.active_count()} threads; forking it would not be safe")
    kills, started = [], time.monotonic()
    for k in range(1, spec.get("max_kills", 500) + 1):
        home = work / f"k{k:03d}"
        _copy_workspace(spec, home)
        roots = [home / sub for sub in spec["watch"]]
        status = _run_child(action, spec["args"], home, roots, k, work / f"k{k:03d}.killed.json")
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            outcome = json.loads((work / f"k{k:03d}.killed.json").read_text())
            outcome["observed"] = observe(home)
            shutil.rmtree(home)
            return {"kills": kills, "survived_at": k, "uninterrupted": outcome,
                    "orchestrated": _orchestrated_run(spec, action, observe),
                    "seconds": round(time.monotonic() - started, 1)}
        after_kill = observe(home)
        status = _run_child(action, spec["args"], home, roots, 0, work / f"k{k:03d}.recovered.json")
        recovered = json.loads((work / f"k{k:03d}.recovered.json").read_text())
        kills.append({"k": k, "after_kill": after_kill, "recovery": recovered, "recovery_status": status,
                      "after_recovery": observe(home)})
        shutil.rmtree(home)  # keep the disk use of the loop bounded
    raise RuntimeError(f"still killed after {spec.get('max_kills', 500)} mutations")


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    Path(spec["out"]).write_text(json.dumps(crash_loop(spec), default=str))
