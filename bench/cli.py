"""Benchmark how fast the `sftflow` CLI answers: `--help`, every `COMMAND --help`, and commands that fail on
their arguments (issue 16: help under 0.5 s, an argument error under 1 s).

Run from the repository root:

    .venv/bin/python bench/cli.py
    .venv/bin/python bench/cli.py --runs 5 --root /tmp/sftflow-before     # another checkout, e.g. the commit before
    .venv/bin/python bench/cli.py --ingest                                # also: ingest 100 and 10,000 rows

Options: --runs N (default 5; each case's figure is the median of N runs), --root DIR (the checkout whose
`sftflow` package runs, via PYTHONPATH; default: this one), --only NAME[,NAME...] (only these cases, e.g.
help,evaluate_unknown_run), --ingest (add the `ingest` cases, which start Prefect: tens of seconds each).

What it does: each case runs `python -m sftflow ARGS` in a subprocess of this Python, with SFTFLOW_HOME and
PREFECT_HOME in a fresh temporary directory and PREFECT_API_URL and SFTFLOW_LOCAL_API_IDLE_S removed (so
`ingest` uses the workspace's local Prefect API, or, in a checkout before it, a temporary server of its own,
as on a machine without `sftflow up`). Wall time is measured around the subprocess. The
failing cases must exit with status 2; a case that does not is reported with its status and stderr. The
temporary directory is removed at the end.

The `help` and `evaluate --run nope` cases also run once under `python -X importtime`; their ten largest
imports (cumulative microseconds, as importtime reports them) are in `top_imports`.

With --ingest: `ingest_first` ingests a 100-row alpaca.jsonl into a new workspace (starting its local API);
`ingest_again` ingests another 100-row file into that workspace (N times, each a new file; the local API
found and reused); `ingest_10k` then ingests a 10,000-row file into it (N times, each a new file). Each
ingest is split by the log's timestamps into `start_s` (process start to "Beginning flow run": interpreter,
imports, checks, finding or starting the local API, creating the flow run), `flow_s` (to the flow's
"Finished in state") and `stop_s` (the rest: logs and events sent, the report, the interpreter's exit). A
checkout that starts a temporary server per command also has `server_s`, the part of `start_s` from
"Starting temporary server" to "Beginning flow run", and its `stop_s` includes stopping that server. The
workspace's local API is stopped (`sftflow down`) at the end.

Output: exactly one JSON line on stdout, {"bench": "cli", "cases": {name: median_s}, "max_help_s": ...,
"failures": [...], ...}; progress goes to stderr. The exit status is 1 when a case exited wrongly.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["ingest", "train", "evaluate", "export", "publish", "chat", "serve", "datasets", "demo", "pipeline",
            "drop", "watch", "up", "status", "down", "config validate", "config import", "models verify"]
FAILING = {  # case name: arguments; each must exit 2 with its one-line error
    "train_missing_config": ["train", "--config", "missing.yaml"],
    "train_bad_config": ["train", "--config", "{tmp}/bad.yaml"],
    "train_unknown_dataset": ["train", "--config", str(ROOT / "flows/configs/tiny_cpu.yaml"), "--dataset", "nope"],
    "pipeline_missing_config": ["pipeline", "--config", "missing.yaml"],
    "evaluate_unknown_run": ["evaluate", "--run", "nope"],
    "export_unknown_run": ["export", "--run", "nope"],
    "publish_unknown_run": ["publish", "--run", "nope"],
    "chat_unknown_model": ["chat", "--model", "nope@v9"],
    "serve_open_host_without_key": ["serve", "--host", "0.0.0.0"],
    "ingest_missing_path": ["ingest", "missing/path"],
}
LOG_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d\.\d+) \|")


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def environment(root: Path, tmp: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(root), "SFTFLOW_HOME": str(tmp / "home"),
           "PREFECT_HOME": str(tmp / "prefect"), "SFTFLOW_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)
    env.pop("SFTFLOW_LOCAL_API_IDLE_S", None)
    return env


def run_once(args: list[str], env: dict[str, str], cwd: Path, importtime: bool = False) -> tuple[float, subprocess.CompletedProcess]:
    command = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "sftflow", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return time.perf_counter() - t0, proc


def top_imports(stderr: str, n: int = 10) -> list[list]:
    """The n largest cumulative import times, [module, microseconds], from `-X importtime`'s report."""
    rows = []
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, cumulative, name = line.split("|")
            rows.append([name.strip(), int(cumulative)])
    return sorted(rows, key=lambda r: -r[1])[:n]


def write_drop(path: Path, rows: int, salt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"instruction": f"What is {i} plus {salt}? (ticket {salt}-{i})",
                                "output": f"The answer to {i} plus {salt} is a number."}) + "\n")


def log_seconds(line: str) -> float | None:
    m = LOG_TIME.match(line)
    return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3)) if m else None


def ingest_breakdown(path: Path, env: dict[str, str], cwd: Path) -> dict:
    """One `sftflow ingest`, its wall time and the phases read from its log's timestamps (local time)."""
    start = datetime.now()
    wall, proc = run_once(["ingest", str(path), "--json"], env, cwd)
    if proc.returncode != 0:
        return {"wall_s": round(wall, 3), "exit": proc.returncode, "stderr": proc.stderr[-2000:]}
    t_start = start.hour * 3600 + start.minute * 60 + start.second + start.microsecond / 1e6
    marks = {"start": t_start}
    for line in proc.stderr.splitlines():
        t = log_seconds(line)
        if t is None:
            continue
        if "Starting temporary server" in line:
            marks.setdefault("server", t)
        elif "Beginning flow run" in line:
            marks.setdefault("flow", t)
        elif "Flow run" in line and "Finished in state" in line:
            marks["finished"] = t
    report = json.loads(proc.stdout)
    out = {"wall_s": round(wall, 3), "rows_in": report["rows_in"], "accepted": report["accepted"]}
    if {"flow", "finished"} <= marks.keys():
        out |= {"start_s": round(marks["flow"] - t_start, 3), "flow_s": round(marks["finished"] - marks["flow"], 3),
                "stop_s": round(t_start + wall - marks["finished"], 3)}
    if {"server", "flow"} <= marks.keys():
        out["server_s"] = round(marks["flow"] - marks["server"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    try:
        return bench(argv, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench(argv: list[str] | None, tmp: Path) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--ingest", action="store_true")
    parser.add_argument("--only", help="comma list of case names to run (default: all)")
    args = parser.parse_args(argv)
    (tmp / "bad.yaml").write_text("name: x\nnonsense: 1\n")
    env = environment(args.root.resolve(), tmp)

    cases = {"help": ["--help"]} | {f"{c.replace(' ', '_')}_help": [*c.split(), "--help"] for c in COMMANDS}
    cases |= {name: [a.format(tmp=tmp) for a in argv_] for name, argv_ in FAILING.items()}
    if args.only:
        cases = {name: case for name, case in cases.items() if name in args.only.split(",")}
    medians, failures = {}, []
    for name, case_args in cases.items():
        times = []
        for _ in range(args.runs):
            wall, proc = run_once(case_args, env, tmp)
            times.append(wall)
            expected = 2 if name in FAILING else 0
            if proc.returncode != expected:
                failures.append({"case": name, "exit": proc.returncode, "stderr": proc.stderr[-1000:]})
                break
        medians[name] = round(statistics.median(times), 3)
        log(f"{name:<28} {medians[name]:7.3f} s  (runs: {', '.join(f'{t:.2f}' for t in times)})")

    top = {}
    for name in [n for n in ("help", "evaluate_unknown_run") if n in cases]:
        _, proc = run_once(cases[name], env, tmp, importtime=True)
        top[name] = top_imports(proc.stderr)

    helps = [v for k, v in medians.items() if k.endswith("help")]
    result = {"bench": "cli", "root": str(args.root), "runs": args.runs, "cases": medians,
              "max_help_s": max(helps, default=None), "max_failing_s": max((medians[k] for k in FAILING if k in medians), default=None),
              "top_imports": top, "failures": failures}

    if args.ingest:
        ingests = {"first": [], "again": [], "10k": []}
        plan = [("first", 100)] + [("again", 100)] * args.runs + [("10k", 10_000)] * args.runs
        try:
            for i, (kind, rows) in enumerate(plan):
                drop = tmp / "drops" / f"rows-{i}" / "alpaca.jsonl"
                write_drop(drop, rows, str(i))
                ingests[kind].append(ingest_breakdown(drop.parent, env, tmp))
                log(f"ingest_{kind:<21} {ingests[kind][-1]}")
        finally:
            run_once(["down"], env, tmp)  # the workspace's local API, if this checkout started one
        for kind, runs in ingests.items():
            ok = [r for r in runs if "exit" not in r]
            failures += [{"case": f"ingest_{kind}"} | r for r in runs if "exit" in r]
            if ok:
                result[f"ingest_{kind}"] = {key: round(statistics.median(r[key] for r in ok), 3)
                                            for key in ok[0] if all(key in r for r in ok)}

    print(json.dumps(result), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
