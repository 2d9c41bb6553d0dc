"""Benchmark `sftflow ingest` on a synthetic mixed-format drop, against a plain-pyarrow floor.

Run from the repository root:

    .venv/bin/python bench/ingest.py --rows 200000
    .venv/bin/python bench/ingest.py --rows 100000,1000000          # several sizes + memory growth
    .venv/bin/python bench/ingest.py --rows 20000 --workdir /tmp/b --keep

Options: --rows N[,N...] (default 200000), --workdir DIR (default: a fresh mkdtemp under /tmp),
--seed S (default 0), --keep (keep the generated drops and workspaces; by default the bulky data
of each size is deleted once it is measured, logs are kept).

What it does, for each size N:

1. Generates a drop of N rows under WORKDIR/n<N>/drop, split about evenly over five files:
   alpaca.jsonl, openai.jsonl, sharegpt.json (one JSON array), prompt_completion.csv and
   alpaca.parquet. Text is random words from a fixed vocabulary (seeded); user turns are about
   100-300 characters, assistant turns about 100-500, and every user turn ends with a unique
   "(ticket <i>)" so every row is distinct (duplicates == 0 is expected). Exactly one row in
   100 (global index i % 100 == 99) is bad: in the two .jsonl files bad rows alternate between a
   truncated (malformed) JSON line and an empty assistant output; in the other files they are
   empty outputs. Files are written in chunks of CHUNK_ROWS rows, so memory stays flat at 1M rows.

   The floor needs files that a plain pyarrow reader accepts, and pyarrow.json fails on a
   malformed line. So the generator writes a second, clean copy (WORKDIR/n<N>/clean) holding
   exactly the good rows (every bad row, malformed or empty, is left out). The floor therefore
   processes N - bad rows: the same rows sftflow is expected to accept.

2. Runs `sftflow ingest <drop> --drop-id bench-<N> --json` with SFTFLOW_HOME set to a fresh
   directory (PREFECT_API_URL / PREFECT_HOME are removed from its environment so it always uses its
   own embedded Prefect server). Wall time is measured around the subprocess; peak RSS is polled
   every 50 ms with psutil, for the main process alone and for the main process plus all its
   descendants (the embedded Prefect server is one). The tree figure sums RSS, so pages shared
   between processes are counted more than once: it is an upper bound. `pipeline_s` is read from
   the flow's own log timestamps ("Beginning flow run" .. "Flow run ... Finished in state"), which
   leaves out the ~10 s server start-up. `task_s` gives, per task, the time from the previous
   task's (or the flow's) start marker to the task's "Finished in state" line: an approximation,
   Prefect does not log task starts at INFO.
   The counts must reconcile: rows_in == accepted + duplicates + quarantined (+ held_back, 0 when
   ingested) and rows_in == N; `matches_generated` also checks quarantined == bad rows generated
   and duplicates == 0.

3. Runs the floor in a separate subprocess of the same Python (this script with --_floor), so its
   RSS is measured the same way: pyarrow.json.read_json for the .jsonl files, pyarrow.csv.read_csv
   for the .csv, pyarrow.parquet.read_table for the .parquet, json.load + pa.Table.from_pylist for
   the .json array; each table is written to Parquet (zstd). Its wall time includes interpreter
   start-up and the pyarrow import (well under a second); `work_s` is the read+write time alone.

rows_per_s for sftflow divides N (rows_in) by wall_s / pipeline_s; for the floor it divides the
good rows it processed by its wall_s.

Output: exactly one JSON line per size on stdout, then, when more than one size ran, one
{"bench": "ingest-memory", ...} line with peak RSS of the largest size over the smallest.
Everything else (progress, the CLI's stderr on failure) goes to stderr. The exit status is 1 when
an ingest failed or its counts did not reconcile.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import psutil

ROOT = Path(__file__).resolve().parent.parent
CHUNK_ROWS = 10_000
POLL_S = 0.05
BAD_EVERY = 100  # row i is bad when i % BAD_EVERY == BAD_EVERY - 1: exactly 1% of rows

FILES = ("alpaca.jsonl", "openai.jsonl", "sharegpt.json", "prompt_completion.csv", "alpaca.parquet")

# A fixed vocabulary. A few entries carry commas, quotes, apostrophes and non-ASCII letters, so the
# CSV writer has to quote fields and the readers see multi-byte UTF-8, as in real drops.
VOCAB = (
    "the a an of to and in is it that for on with as was at by be this are from or have not but "
    "what all were when we there can which their if do will each about how up out them then she many "
    "some so these would other into has more her two like him see time could no make than first been "
    "its who now people my made over did down only way find use may water long little very after "
    "words called just where most know get through back much before go good new write our used me man "
    "too any day same right look think also around another came come work three word must because does "
    "part even place well such here take why things help put years different away again off went old "
    "number great tell men say small every found still between name should home big give air line set "
    "own under read last never us left end along while might next sound below saw something thought "
    "both few those always looks show large often together asked house don't world going want school "
    "important until form food keep children feet land side without boy once animals life enough took "
    "sometimes four head above kind began almost live page got earth need far hand high year mother "
    "light parts country father let night following picture being study second eyes soon times story "
    "boys since white days ever paper hard near sentence better best across during today others sure "
    "means knew it's try told young miles sun ways thing whole hear example heard several change "
    "answer room sea against top turned learn point city play toward five using himself usually "
    "function variable return value list string error config server request response database query "
    "model token dataset training batch gradient loss layer vector matrix python script install "
    "however, therefore, for example, in fact, moreover, \"quoted\" 'single' café naïve résumé "
    "coöperate straße jalapeño déjà vu"
).split()
AVG_WORD_CHARS = sum(len(w) + 1 for w in VOCAB) / len(VOCAB)


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    """Random words totalling roughly lo..hi characters (word count from the mean word length)."""
    k = max(1, round(rng.randint(lo, hi) / AVG_WORD_CHARS))
    text = " ".join(rng.choices(VOCAB, k=k))
    return text[0].upper() + text[1:] + "."


def conversation(rng: random.Random, i: int) -> tuple[str, str, str, str | None]:
    """(instruction, input, assistant, system-or-None) for global row i; unique by its ticket number."""
    user_len = rng.randint(100, 300)
    split = rng.randint(user_len // 2, user_len) if rng.random() < 0.5 else user_len
    instruction = sentence(rng, split - 20, split - 10) + f" (ticket {i})"
    extra = sentence(rng, user_len - split, user_len - split) if user_len - split > 20 else ""
    assistant = sentence(rng, 100, 250)
    if rng.random() < 0.3:  # a second paragraph now and then: assistant text up to ~500 chars
        assistant += "\n\n" + sentence(rng, 50, 250)
    system = sentence(rng, 30, 80) if rng.random() < 0.4 else None
    return instruction, extra, assistant, system


def kind_of(i: int, in_jsonl: bool) -> str:
    """'good', 'empty' (empty assistant output) or 'malformed' (a truncated JSON line, .jsonl only)."""
    if i % BAD_EVERY != BAD_EVERY - 1:
        return "good"
    if in_jsonl and (i // BAD_EVERY) % 2 == 0:
        return "malformed"
    return "empty"


def record_for(file: str, rng: random.Random, i: int, kind: str) -> dict:
    """The record of row i in the shape of `file`'s format; an 'empty' row has an empty assistant turn."""
    instruction, extra, assistant, system = conversation(rng, i)
    if kind == "empty":
        assistant = ""
    user = f"{instruction}\n{extra}" if extra else instruction
    if file.startswith("alpaca"):
        return {"instruction": instruction, "input": extra, "output": assistant}
    if file == "openai.jsonl":
        head = [{"role": "system", "content": system}] if system else []
        return {"messages": head + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}
    if file == "sharegpt.json":
        head = [{"from": "system", "value": system}] if system else []
        return {"conversations": head + [{"from": "human", "value": user}, {"from": "gpt", "value": assistant}]}
    # CSV: pyarrow's CSV reader (the floor) rejects newlines inside values by default; keep one line.
    return {"prompt": user.replace("\n", " "), "completion": assistant.replace("\n", " ")}


class DropFile:
    """Writes one file of the drop and its clean copy, chunk by chunk."""

    def __init__(self, name: str, drop_dir: Path, clean_dir: Path):
        self.name = name
        self.paths = (drop_dir / name, clean_dir / name)
        self.first = [True, True]  # JSON array: no comma before the first element
        if name.endswith(".parquet"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            self.schema = pa.schema([("instruction", pa.string()), ("input", pa.string()), ("output", pa.string())])
            self.writers = [pq.ParquetWriter(p, self.schema) for p in self.paths]
        elif name.endswith(".csv"):
            self.handles = [open(p, "w", newline="", encoding="utf-8") for p in self.paths]
            self.csv = [csv.writer(h) for h in self.handles]
            for w in self.csv:
                w.writerow(["prompt", "completion"])
        else:
            self.handles = [open(p, "wb") for p in self.paths]
            if name.endswith(".json"):
                for h in self.handles:
                    h.write(b"[\n")

    def write_chunk(self, rows: list[tuple[dict, str]]) -> None:
        """rows: (record, kind). Every row goes to the drop; only good rows to the clean copy."""
        for target in (0, 1):
            chosen = rows if target == 0 else [r for r in rows if r[1] == "good"]
            if self.name.endswith(".parquet"):
                import pyarrow as pa

                cols = {k: [rec[k] for rec, _ in chosen] for k in self.schema.names}
                self.writers[target].write_table(pa.Table.from_pydict(cols, schema=self.schema))
            elif self.name.endswith(".csv"):
                self.csv[target].writerows((rec["prompt"], rec["completion"]) for rec, _ in chosen)
            elif self.name.endswith(".jsonl"):
                self.handles[target].write(b"".join(_jsonl_line(rec, kind) for rec, kind in chosen))
            else:  # JSON array, one element per line
                parts = [orjson.dumps(rec) for rec, _ in chosen]
                if parts:
                    sep = b"" if self.first[target] else b",\n"
                    self.handles[target].write(sep + b",\n".join(parts))
                    self.first[target] = False

    def close(self) -> None:
        if self.name.endswith(".parquet"):
            for w in self.writers:
                w.close()
            return
        for h in self.handles:
            if self.name.endswith(".json"):
                h.write(b"\n]\n")
            h.close()


def _jsonl_line(rec: dict, kind: str) -> bytes:
    text = orjson.dumps(rec).decode()
    if kind == "malformed":
        text = text[: len(text) // 2]  # cut on a character, so the line is still valid UTF-8
    return text.encode() + b"\n"


def generate(n: int, drop_dir: Path, clean_dir: Path, seed: int) -> dict:
    """Write the drop and its clean copy; returns the counts the ingest report should match."""
    drop_dir.mkdir(parents=True)
    clean_dir.mkdir(parents=True)
    rng = random.Random(seed)
    counts = {"rows": n, "good": 0, "malformed": 0, "empty": 0, "per_file": {}}
    start = 0
    for f_index, name in enumerate(FILES):
        size = n // len(FILES) + (1 if f_index < n % len(FILES) else 0)
        out = DropFile(name, drop_dir, clean_dir)
        try:
            for chunk_start in range(start, start + size, CHUNK_ROWS):
                rows = []
                for i in range(chunk_start, min(chunk_start + CHUNK_ROWS, start + size)):
                    kind = kind_of(i, name.endswith(".jsonl"))
                    counts[kind] += 1
                    rows.append((record_for(name, rng, i, kind), kind))
                out.write_chunk(rows)
        finally:
            out.close()
        counts["per_file"][name] = size
        start += size
    counts["bad"] = counts["malformed"] + counts["empty"]
    return counts


# ---------------------------------------------------------------------------------------------
# Measuring a subprocess: wall time and peak RSS of the process and of its whole tree
# ---------------------------------------------------------------------------------------------


def _rss(proc: psutil.Process) -> int:
    try:
        return proc.memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0


def run_measured(cmd: list[str], env: dict, stdout_path: Path, stderr_path: Path) -> dict:
    """Run cmd to completion, polling RSS every POLL_S; stdout/stderr go to files (no pipe deadlock)."""
    peak = {"main": 0, "tree": 0}
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        try:
            ps = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            ps = None
        while proc.poll() is None:
            if ps is not None:
                main = _rss(ps)
                try:
                    children = ps.children(recursive=True)
                except (psutil.NoSuchProcess, psutil.ZombieProcess):
                    children = []
                tree = main + sum(_rss(c) for c in children)
                peak["main"] = max(peak["main"], main)
                peak["tree"] = max(peak["tree"], tree)
            time.sleep(POLL_S)
        wall = time.perf_counter() - t0
    return {"rc": proc.returncode, "wall_s": wall, "peak_main": peak["main"], "peak_tree": peak["tree"]}


def mib(n_bytes: int) -> float:
    return round(n_bytes / 2**20, 1)


# ---------------------------------------------------------------------------------------------
# Reading the flow's log: its own start/finish timestamps
# ---------------------------------------------------------------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;]*m")
STAMP = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) ")
TASK_DONE = re.compile(r"Task run '(.+?)-[0-9a-f]+' - Finished in state")


def flow_timing(stderr_text: str) -> tuple[float | None, dict[str, float]]:
    """(pipeline_s, {task: s}) from `HH:MM:SS.mmm | ...` log lines; None when the markers are missing."""
    begin = prev = end = None
    tasks: dict[str, float] = {}
    last_t = None
    for raw in stderr_text.splitlines():
        line = ANSI.sub("", raw)
        m = STAMP.match(line)
        if not m:
            continue
        h, mi, s, ms = map(int, m.groups())
        t = h * 3600 + mi * 60 + s + ms / 1000
        if last_t is not None and t < last_t - 12 * 3600:  # the run crossed midnight
            t += 24 * 3600
        last_t = t
        if begin is None and "Beginning flow run" in line:
            begin = prev = t
        elif begin is not None and (done := TASK_DONE.search(line)):
            tasks[done.group(1)] = round(tasks.get(done.group(1), 0.0) + t - prev, 3)
            prev = t
        elif begin is not None and "Flow run" in line and "Finished in state" in line:
            end = t
    pipeline = round(end - begin, 3) if begin is not None and end is not None else None
    return pipeline, tasks


# ---------------------------------------------------------------------------------------------
# The two measurements
# ---------------------------------------------------------------------------------------------


def sftflow_cli() -> str:
    beside = Path(sys.executable).parent / "sftflow"
    return str(beside) if beside.exists() else (shutil.which("sftflow") or "sftflow")


def check_counts(report: dict, gen: dict) -> dict:
    counts = {k: report.get(k) for k in ("status", "rows_in", "accepted", "duplicates", "quarantined", "held_back", "reasons")}
    try:
        total = report["accepted"] + report["duplicates"] + report["quarantined"] + (report.get("held_back") or 0)
        counts["reconciled"] = report["rows_in"] == total and report["rows_in"] == gen["rows"]
        counts["matches_generated"] = (
            report["quarantined"] == gen["bad"] and report["duplicates"] == 0 and report["accepted"] == gen["good"]
        )
    except (KeyError, TypeError):
        counts["reconciled"] = counts["matches_generated"] = False
    counts["expected"] = {"rows": gen["rows"], "good": gen["good"], "bad": gen["bad"],
                          "malformed_json": gen["malformed"], "empty_output": gen["empty"]}
    return counts


def measure_sftflow(n: int, drop_dir: Path, home: Path, logs: Path, gen: dict) -> dict:
    env = dict(os.environ, SFTFLOW_HOME=str(home))
    for key in ("PREFECT_API_URL", "PREFECT_HOME"):  # always a fresh embedded server under SFTFLOW_HOME
        env.pop(key, None)
    cmd = [sftflow_cli(), "ingest", str(drop_dir), "--drop-id", f"bench-{n}", "--json"]
    log(f"[{n}] $ SFTFLOW_HOME={home} {' '.join(cmd)}")
    run = run_measured(cmd, env, logs / "sftflow.stdout", logs / "sftflow.stderr")
    stderr_text = (logs / "sftflow.stderr").read_text(errors="replace")
    stdout_text = (logs / "sftflow.stdout").read_text(errors="replace").strip()
    pipeline_s, task_s = flow_timing(stderr_text)
    result = {
        "wall_s": round(run["wall_s"], 3),
        "pipeline_s": pipeline_s,
        "rows_per_s_wall": round(n / run["wall_s"], 1),
        "rows_per_s_pipeline": round(n / pipeline_s, 1) if pipeline_s else None,
        "peak_rss_mib_main": mib(run["peak_main"]),
        "peak_rss_mib_tree": mib(run["peak_tree"]),
        "task_s": task_s,
    }
    try:
        report = json.loads(stdout_text.splitlines()[-1]) if stdout_text else None
    except json.JSONDecodeError:
        report = None
    result["counts"] = check_counts(report or {}, gen)
    if run["rc"] != 0 or report is None:
        result["error"] = {"rc": run["rc"], "stderr_tail": stderr_text[-3000:], "stdout": stdout_text[-1000:]}
        log(f"[{n}] sftflow ingest failed (rc {run['rc']}); stderr tail:\n{stderr_text[-3000:]}")
    return result


def floor_worker(src: Path, out: Path) -> None:
    """The floor itself (runs in a subprocess): read every clean file with pyarrow, write it as Parquet."""
    t0 = time.perf_counter()
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    rows = 0
    for name in FILES:
        path = src / name
        if name.endswith(".jsonl"):
            table = pjson.read_json(path)
        elif name.endswith(".csv"):
            table = pcsv.read_csv(path)
        elif name.endswith(".parquet"):
            table = pq.read_table(path)
        else:
            with open(path, "rb") as fh:
                table = pa.Table.from_pylist(json.load(fh))
        pq.write_table(table, out / f"{name}.parquet", compression="zstd")
        rows += table.num_rows
        del table
    print(json.dumps({"rows": rows, "work_s": round(time.perf_counter() - t0, 3)}))


def measure_floor(n: int, clean_dir: Path, out_dir: Path, logs: Path, gen: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_floor", str(clean_dir), str(out_dir)]
    log(f"[{n}] floor: pyarrow read + Parquet write of {clean_dir}")
    run = run_measured(cmd, dict(os.environ), logs / "floor.stdout", logs / "floor.stderr")
    if run["rc"] != 0:
        tail = (logs / "floor.stderr").read_text(errors="replace")[-3000:]
        log(f"[{n}] floor failed (rc {run['rc']}):\n{tail}")
        return {"wall_s": round(run["wall_s"], 3), "rows_per_s": None, "peak_rss_mib": mib(run["peak_main"]),
                "error": {"rc": run["rc"], "stderr_tail": tail}}
    done = json.loads((logs / "floor.stdout").read_text().strip().splitlines()[-1])
    if done["rows"] != gen["good"]:
        log(f"[{n}] warning: floor read {done['rows']} rows, expected {gen['good']} good rows")
    return {
        "wall_s": round(run["wall_s"], 3),
        "work_s": done["work_s"],
        "rows": done["rows"],
        "rows_per_s": round(done["rows"] / run["wall_s"], 1),
        # the floor is one process; the tree peak equals it unless pyarrow spawned helpers
        "peak_rss_mib": mib(run["peak_tree"]),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a and b else None


def bench_size(n: int, workdir: Path, seed: int, keep: bool) -> dict:
    base = workdir / f"n{n}"
    if base.exists():
        shutil.rmtree(base)
    logs = base / "logs"
    logs.mkdir(parents=True)
    drop_dir, clean_dir = base / "drop", base / "clean"
    t0 = time.perf_counter()
    gen = generate(n, drop_dir, clean_dir, seed)
    size_mib = sum(p.stat().st_size for p in drop_dir.iterdir()) / 2**20
    log(f"[{n}] generated {n} rows ({gen['bad']} bad: {gen['malformed']} malformed, {gen['empty']} empty; "
        f"{size_mib:.0f} MiB) in {time.perf_counter() - t0:.1f}s under {base}")

    sft = measure_sftflow(n, drop_dir, base / "sftflow-home", logs, gen)
    log(f"[{n}] sftflow: wall {sft['wall_s']}s, pipeline {sft['pipeline_s']}s, tasks {sft['task_s']}, "
        f"peak RSS main {sft['peak_rss_mib_main']} MiB / tree {sft['peak_rss_mib_tree']} MiB")
    floor = measure_floor(n, clean_dir, base / "floor-out", logs, gen)
    log(f"[{n}] floor: wall {floor['wall_s']}s, peak RSS {floor['peak_rss_mib']} MiB")

    if not keep:  # the data is GBs at 1M rows; the logs stay
        for d in (drop_dir, clean_dir, base / "sftflow-home", base / "floor-out"):
            shutil.rmtree(d, ignore_errors=True)
    return {
        "bench": "ingest",
        "rows": n,
        "sftflow": sft,
        "floor": floor,
        "ratio_pipeline_vs_floor": ratio(sft["rows_per_s_pipeline"], floor["rows_per_s"]),
        "ratio_wall_vs_floor": ratio(sft["rows_per_s_wall"], floor["rows_per_s"]),
    }


def parse_rows(text: str) -> list[int]:
    sizes = [int(float(part.replace("_", ""))) for part in text.split(",") if part.strip()]
    if not sizes or any(s < len(FILES) for s in sizes):
        raise argparse.ArgumentTypeError(f"--rows takes positive counts of at least {len(FILES)}, e.g. 200000 or 1e5,1e6")
    return sizes


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_floor"]:  # internal: the floor's own subprocess
        floor_worker(Path(argv[1]), Path(argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=parse_rows, default=[200_000], help="row count, or a comma list of counts")
    parser.add_argument("--workdir", type=Path, default=None, help="where drops, workspaces and logs go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep generated drops, workspaces and floor output")
    args = parser.parse_args(argv)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="sftflow-bench-", dir="/tmp"))).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"workdir: {workdir}")

    results, ok = [], True
    for n in args.rows:
        result = bench_size(n, workdir, args.seed, args.keep)
        ok &= "error" not in result["sftflow"] and bool(result["sftflow"]["counts"]["reconciled"])
        results.append(result)
        print(json.dumps(result), flush=True)

    if len(results) > 1:
        by_rows = sorted(results, key=lambda r: r["rows"])
        small, large = by_rows[0]["sftflow"], by_rows[-1]["sftflow"]
        print(json.dumps({
            "bench": "ingest-memory",
            "rows_smallest": by_rows[0]["rows"],
            "rows_largest": by_rows[-1]["rows"],
            "rss_growth_main": ratio(large["peak_rss_mib_main"], small["peak_rss_mib_main"]),
            "rss_growth_tree": ratio(large["peak_rss_mib_tree"], small["peak_rss_mib_tree"]),
            "rss_growth_floor": ratio(by_rows[-1]["floor"]["peak_rss_mib"], by_rows[0]["floor"]["peak_rss_mib"]),
        }), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
