"""The whole `sft_pipeline` on one GPU: stage timings, the GPU's busy share, what was published.

Run on the GPU machine (see ../shared/gpu/README.md), from the project root:

    source .gpu/on-device.sh && source bench/gpu_env.sh
    python bench/pipeline_gpu.py --data .gpu/alpaca_en_demo.json --out $OUT [--copies 10] [--steps N]

It builds a random-weight Llama-3.2-1B-shaped model on the GPU (bench/train_gpu.py's builder: real
shape, SentencePiece tokenizer trained on the data, Llama-3 chat template), lands the Alpaca demo
file x --copies as a drop (bench/startup_gpu.py's: each copy's instructions marked, so deduplication
keeps them) and runs the flow `sft_pipeline` in this process on Prefect's embedded API with
flows/configs/llama3_2_1b_qlora.yaml (one epoch unless --steps) and the unsloth engine: ingest ->
train -> evaluate -> export -> publish. A sampler reads the GPU's utilisation every 0.5 s
(nvidia-smi) for the whole run.

Random weights have near-uniform next-token distributions, so the export's greedy-match and top-1
checks would compare coin flips; the run makes every GGUF of the shipped config (f16, q8_0, q4_k_m,
the LoRA GGUF) and keeps KL limits (the check that reads the conversion) with the greedy and top-1
limits waived, and promotes on eval loss. Everything else is the shipped config (evaluation: 256
sampled prompts, 128 new tokens).

Prints one JSON line (also OUT/pipeline_gpu.json): wall time, per-stage times from the Prefect API,
GPU busy share (samples at >= 10% utilisation) and mean utilisation overall and per stage, the
training figures, the evaluation, the parity table and the registry version's files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import get_args

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OVERRIDES = [
    "train.engine=unsloth",
    "eval.primary_metric=eval_loss",
    'export.thresholds={"f16": {"max_kl": 0.001}, "q8_0": {"max_kl": 0.01}, "q4_k_m": {"max_kl": 0.5}, '
    '"lora": {"max_kl": 0.001}}',
]
TRAINING = "train_adapter"


class GpuSampler(threading.Thread):
    """nvidia-smi utilisation samples (time, percent) until stopped."""

    def __init__(self, period_ms: int = 500):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", f"-lms={period_ms}"],
            stdout=subprocess.PIPE, text=True)

    def run(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append((time.time(), float(line.split(",")[0])))
            except ValueError:
                continue

    def stop(self) -> None:
        self.proc.terminate()

    def share(self, start: float, end: float) -> dict:
        window = [u for t, u in self.samples if start <= t <= end]
        if not window:
            return {"samples": 0, "busy_share": None, "mean_util": None}
        return {"samples": len(window), "busy_share": round(sum(u >= 10 for u in window) / len(window), 3),
                "mean_util": round(sum(window) / len(window), 1)}


def stage_times(pipeline_run_id) -> list[dict]:
    """Start/end of the pipeline run and of each subflow, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    # filtered by the server (a read returns at most 200 runs, in random id order by default)
    pipeline = FlowRunFilter(id=FlowRunFilterId(any_=[pipeline_run_id]))
    children = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[pipeline_run_id]))
    with get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        stages = client.read_flow_runs(flow_run_filter=pipeline) + client.read_flow_runs(flow_run_filter=children)
    return sorted(({"flow": flows[r.flow_id], "start": r.start_time.timestamp(), "end": r.end_time.timestamp(),
                    "seconds": round((r.end_time - r.start_time).total_seconds(), 1), "state": r.state_name}
                   for r in stages if r.start_time and r.end_time), key=lambda s: s["start"])


def main() -> None:
    from schemas.config import ExportConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="The Alpaca demo file (a JSON array).")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, help="Training steps (train.max_steps; default: one epoch).")
    parser.add_argument("--copies", type=int, default=10, help="Copies of the Alpaca demo in the drop.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sftflow-pipeline-bench"))
    parser.add_argument("--merge-dtype", choices=get_args(ExportConfig.model_fields["merge_dtype"].annotation),
                        help="export.merge_dtype (default: the shipped config's, bfloat16; the bench merged in float32 "
                             "until session 25).")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    os.environ["SFTFLOW_HOME"] = str(args.work / "home")
    os.environ["SFTFLOW_PROGRESS"] = "0"

    from bench.startup_gpu import write_drop
    from bench.train_gpu import build_model
    from foundation.workspace import Workspace
    from sftflow.stack import configure_prefect_env

    workspace = Workspace.from_env().ensure()
    configure_prefect_env(workspace)
    sampler = GpuSampler()
    sampler.start()
    t0 = time.time()
    model_dir = build_model("1b", args.work, args.data)
    t_model = time.time()
    drop = args.work / "drops" / "alpaca-demo"
    rows = write_drop(args.data, args.copies, drop)

    from flows.pipeline import sft_pipeline

    overrides = [f"model.name={model_dir}", *([f"train.max_steps={args.steps}"] if args.steps else []), *OVERRIDES,
                 *([f"export.merge_dtype={args.merge_dtype}"] if args.merge_dtype else [])]
    state = sft_pipeline(drops=[str(drop)], config=str(ROOT / "flows/configs/llama3_2_1b_qlora.yaml"),
                         overrides=overrides, return_state=True)
    t_end = time.time()
    result = state.result(raise_on_failure=False)
    summary = result.dump() if hasattr(result, "dump") else result  # a PipelineSummary, or the exception
    sampler.stop()
    time.sleep(1)
    stages = stage_times(state.state_details.flow_run_id)
    for stage in stages:
        stage.update(sampler.share(stage["start"], stage["end"]))
    published = (summary or {}).get("published") if isinstance(summary, dict) else None
    files = {}
    if published:
        files = json.loads((Path(published["path"]) / "manifest.json").read_text())["files"]
    wall = t_end - t_model
    training = sum(s["seconds"] for s in stages if s["flow"] == TRAINING)
    result = {
        "bench": "pipeline_gpu", "state": state.name, "rows": rows, "model_build_s": round(t_model - t0, 1),
        "pipeline_wall_s": round(wall, 1), "gpu_whole_pipeline": sampler.share(t_model, t_end),
        "training_s": round(training, 1), "other_stages_share": round(1 - training / wall, 3),
        "stages": [{k: v for k, v in s.items() if k not in ("start", "end")} for s in stages],
        "overrides": overrides,
        "training": summary.get("training") if isinstance(summary, dict) else None,
        "evaluation": summary.get("evaluation") if isinstance(summary, dict) else None,
        "parity": (summary.get("gguf") or {}).get("parity") if isinstance(summary, dict) else None,
        "published": published,
        "published_files": {k: v["bytes"] for k, v in files.items()},
        "error": None if isinstance(summary, dict) else repr(summary),
    }
    run_id = ((summary or {}).get("training") or {}).get("run_id") if isinstance(summary, dict) else None
    if run_id:  # where the evaluation's and the export's time went
        run = workspace.runs.dir(run_id)
        if run.eval_scores.exists():
            result["evaluation_timings"] = {m: s.get("timings") for m, s in
                                            json.loads(run.eval_scores.read_text())["models"].items()}
        if run.export_path.exists():
            result["export_timings"] = json.loads(run.export_path.read_text()).get("timings")
        end = next((e for e in run.events() if e.event == "end"), None)
        result["training_startup"] = end.startup if end else None
    line = json.dumps(result)
    print(line)
    (args.out / "pipeline_gpu.json").write_text(line + "\n")


if __name__ == "__main__":
    main()
