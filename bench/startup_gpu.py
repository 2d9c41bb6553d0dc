"""Start-up and whole-run rate of `sftflow train` on one GPU, as a user runs it (issue 17).

Run on the GPU machine (see ../shared/gpu/README.md), from the project root:

    source .gpu/on-device.sh && source bench/gpu_env.sh
    python bench/startup_gpu.py --data .gpu/alpaca_en_demo.json --out $OUT [--copies 10] [--steps 20,20,200]

It builds the random-weight Llama-3.2-1B-shaped model of bench/train_gpu.py (cached under --work), writes a
drop of the Alpaca demo x --copies (each copy's instructions marked, so that deduplication keeps them), runs
`python -m sftflow ingest` on it, then `python -m sftflow train --config flows/configs/llama3_2_1b_qlora.yaml
model.name=MODEL train.max_steps=STEPS --json` once per entry of --steps, in a row: the first pays what later runs
of the machine find ready (the warm worker the first one started, the tokenized rows, Triton's and Inductor's
caches). For each run:

- `first_step_s`: from launching the command to the end of the first optimizer step (the worker's
  `startup.first_step_at`, wall clock), and the worker's own phases from its process start or its claim
  (imports, model, data, trainer, first step), whether it ran in a warm worker (`warm`), and when the worker
  process started or was claimed relative to the command (`worker_start_s`: the CLI's imports, Prefect);
- `steady_tokens_per_s`: trained tokens/s between the second logged step and the last one (the worker's
  clock), `whole_run_tokens_per_s`: trained tokens over the command's wall time, and their ratio.

Prints one JSON line (also OUT/startup_gpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "flows/configs/llama3_2_1b_qlora.yaml"


def write_drop(data: Path, copies: int, drop: Path) -> int:
    """The Alpaca rows x copies as a .jsonl drop; copy k > 0 marks its instructions with (k)."""
    drop.mkdir(parents=True, exist_ok=True)
    rows = json.loads(data.read_text())
    with open(drop / "rows.jsonl", "w") as out:
        for k in range(copies):
            for r in rows:
                out.write(json.dumps({**r, "instruction": r["instruction"] + (f" ({k})" if k else "")}) + "\n")
    return copies * len(rows)


def sftflow(args: list[str], env: dict, log: Path) -> tuple[dict, float, float]:
    """Run `python -m sftflow ARGS --json`: its JSON, the launch time (epoch) and its wall seconds."""
    started = time.time()
    with open(log, "a") as err:
        done = subprocess.run([sys.executable, "-m", "sftflow", *args, "--json"], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=err, text=True)
    wall = time.time() - started
    if done.returncode != 0:
        raise SystemExit(f"sftflow {' '.join(args)} exited {done.returncode}; see {log}")
    return json.loads(done.stdout.strip().splitlines()[-1]), started, wall


def rates(events: list[dict]) -> dict:
    logs = [e for e in events if e["event"] == "log"]
    end = next(e for e in events if e["event"] == "end")
    if len(logs) < 3:
        return {"end": end}
    a, b = logs[1], logs[-1]
    return {"end": end, "steady_tokens_per_s": round((b["trained_tokens"] - a["trained_tokens"])
                                                     / (b["elapsed_s"] - a["elapsed_s"]), 1),
            "steady_window_steps": [a["step"], b["step"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="The Alpaca demo file (a JSON array).")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sftflow-startup-bench"))
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--steps", default="20,20", help="train.max_steps of each run, comma-separated")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="More config overrides.")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)

    from bench.train_gpu import build_model

    model_dir = build_model("1b", args.work, args.data)
    home = args.work / "home"
    env = {**os.environ, "SFTFLOW_HOME": str(home), "SFTFLOW_PROGRESS": "0"}
    env.pop("PREFECT_API_URL", None)
    log = args.out / "startup_gpu.log"
    rows = write_drop(args.data, args.copies, args.work / "drop")
    ingest, _, ingest_wall = sftflow(["ingest", str(args.work / "drop")], env, log)
    runs = []
    result = {"bench": "startup_gpu", "rows": rows, "ingest": {"wall_s": round(ingest_wall, 1),
                                                               "accepted": ingest.get("accepted")},
              "steps": args.steps, "overrides": args.overrides, "runs": runs}
    for steps in [int(n) for n in args.steps.split(",")]:
        summary, started, wall = sftflow(["train", "--config", str(CONFIG), f"model.name={model_dir}",
                                          f"train.max_steps={steps}", *args.overrides], env, log)
        run_dir = home / "runs" / summary["run_id"]
        events = [json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines() if line.strip()]
        measured = rates(events)
        startup = measured["end"].get("startup", {})
        whole = summary["trained_tokens"] / wall
        runs.append({
            "run_id": summary["run_id"], "command_wall_s": round(wall, 1), "warm": startup.get("warm"),
            "first_step_s": round(startup["first_step_at"] - started, 2) if "first_step_at" in startup else None,
            "worker_start_s": (round(startup["first_step_at"] - startup["first_step_s"] - started, 2)
                               if "first_step_at" in startup else None),
            # the train task wrote worker.go: the rows tokenized (or reused) and gated, seconds from the command
            "rows_ready_s": round((run_dir / "worker.go").stat().st_mtime - started, 2)
            if (run_dir / "worker.go").exists() else None,
            "worker_phases_s": {k: v for k, v in startup.items() if k != "first_step_at"},
            "train_runtime_s": measured["end"]["train_runtime"], "global_step": measured["end"]["global_step"],
            "trained_tokens": summary["trained_tokens"], "steady_tokens_per_s": measured.get("steady_tokens_per_s"),
            "steady_window_steps": measured.get("steady_window_steps"),
            "whole_run_tokens_per_s": round(whole, 1),
            "whole_vs_steady": round(whole / measured["steady_tokens_per_s"], 3)
            if measured.get("steady_tokens_per_s") else None,
            "loss_first_last": [summary.get("loss_first"), summary.get("loss_last")],
        })
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
        (args.out / "startup_gpu.json").write_text(json.dumps(result) + "\n")  # what a cut-off call still returns
    subprocess.run([sys.executable, "-m", "sftflow", "down"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # the workspace's local Prefect API and warm worker
    line = json.dumps(result)
    print(line)
    (args.out / "startup_gpu.json").write_text(line + "\n")


if __name__ == "__main__":
    main()
