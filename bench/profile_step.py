"""Where a training step's time goes: torch.profiler around a few steps of the project's own worker.

bench/train_gpu.py --profile starts the worker through this module instead of
`python -m tasks.processes.trainer`; the training process runs unchanged, with one callback more:

    python bench/profile_step.py RUN_DIR/worker_spec.json OUT_PREFIX FIRST_STEP COUNT

- steps FIRST_STEP .. FIRST_STEP + COUNT - 1 are profiled without Python stacks (the cheapest
  profile, so the timings stay close to an unprofiled step): wall time per step against the time
  the GPU is busy (the union of kernel, memcpy and memset intervals), i.e. the GPU's idle gap; that
  gap split over the phases of a step (the host's position in Trainer's loop: logging, fetching and
  collating the batch, forward, backward, gradient clipping, optimizer, ...); host syncs and copies
  counted per step; the top CUDA and CPU ops;
- one more step (after an unprofiled one) runs under `torch.cuda.set_sync_debug_mode("warn")`, with
  the Python stack recorded at each warning: the code that made the host wait for the GPU, by call
  site (no profiler there: a Python-stack profile costs more than the step).

The phases come from the host's clock: "forward" is the time the host spent queueing the forward,
and the GPU's idle time inside a phase is time the GPU had nothing queued while the host was there.
Writes OUT_PREFIX.json and OUT_PREFIX.txt (a short table); the worker's stdout stays its events.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# host calls that wait for the GPU, or copy to/from it, counted per step
HOST_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync",
              "cudaMemcpy", "cudaMalloc", "cudaFree", "cudaHostAlloc", "cudaFreeHost", "cudaLaunchKernel",
              "cuLaunchKernel", "cudaLaunchKernelExC", "aten::item", "aten::_local_scalar_dense", "aten::nonzero")
# calls that block the host until the GPU catches up (their own duration is the time blocked)
BLOCKING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
PHASE_PREFIX = "sftflow.phase."


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _overlap(busy: list[tuple[float, float]], start: float, end: float) -> float:
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in busy if b > start and a < end)


def _device_time(avg) -> float:
    return getattr(avg, "self_device_time_total", None) or getattr(avg, "self_cuda_time_total", 0.0)


def summarize_timing(prof, steps: int, top: int = 15) -> dict:
    """Per-step figures of a profile without stacks (see the module docstring)."""
    from torch.autograd import DeviceType

    events = prof.events()
    host = [e for e in events if e.device_type == DeviceType.CPU]
    host_names = {e.name for e in host}
    # GPU work: kernels, memcpy, memset; not the GPU-side copies of record_function ranges (annotations)
    device = [e for e in events if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)
              and e.name not in host_names]
    phases = [e for e in host if e.name.startswith(PHASE_PREFIX)]
    if not phases:
        raise RuntimeError("no phase ranges were recorded")
    window = (min(e.time_range.start for e in phases), max(e.time_range.end for e in phases))
    wall_us = window[1] - window[0]
    busy = _merge([(e.time_range.start, e.time_range.end) for e in device])
    busy_us = _overlap(busy, *window)
    kernel_us = sum(e.time_range.end - e.time_range.start for e in device
                    if not e.name.startswith(("Memcpy", "Memset")))
    by_phase: dict[str, dict] = defaultdict(lambda: {"host_ms": 0.0, "gpu_busy_ms": 0.0, "gpu_idle_ms": 0.0})
    for e in phases:
        name = e.name[len(PHASE_PREFIX):]
        span = e.time_range.end - e.time_range.start
        used = _overlap(busy, e.time_range.start, e.time_range.end)
        by_phase[name]["host_ms"] += span / 1000 / steps
        by_phase[name]["gpu_busy_ms"] += used / 1000 / steps
        by_phase[name]["gpu_idle_ms"] += (span - used) / 1000 / steps
    counts = Counter(e.name for e in host if e.name in HOST_CALLS)
    copies, copy_us = Counter(), Counter()
    for e in device:
        if e.name.startswith(("Memcpy", "Memset")):
            copies[e.name.split(" (")[0]] += 1
            copy_us[e.name.split(" (")[0]] += e.time_range.end - e.time_range.start
    blocked = Counter()
    for e in host:
        if e.name in BLOCKING:
            blocked[e.name] += (e.time_range.end - e.time_range.start) / 1000 / steps
    averages = prof.key_averages()
    ops = [a for a in averages if a.key in host_names and not getattr(a, "is_user_annotation", False)
           and not a.key.startswith(PHASE_PREFIX)]  # host ops (their kernels' time), not the kernels' rows
    top_cuda = sorted((a for a in ops if _device_time(a) > 0), key=_device_time, reverse=True)[:top]
    top_cpu = sorted(ops, key=lambda a: a.self_cpu_time_total, reverse=True)[:top]
    kernels = Counter(), Counter()
    for e in device:  # by kernel name too: Triton kernels launched from Python belong to no host op
        kernels[0][e.name] += e.time_range.end - e.time_range.start
        kernels[1][e.name] += 1
    return {
        "steps": steps,
        "wall_ms_per_step": round(wall_us / 1000 / steps, 2),
        "gpu_busy_ms_per_step": round(busy_us / 1000 / steps, 2),
        "gpu_idle_ms_per_step": round((wall_us - busy_us) / 1000 / steps, 2),
        "gpu_busy_share": round(busy_us / wall_us, 4) if wall_us else None,
        "kernel_ms_per_step": round(kernel_us / 1000 / steps, 2),
        "phases": {k: {m: round(v, 2) for m, v in d.items()} for k, d in by_phase.items()},
        "host_calls_per_step": {k: round(counts[k] / steps, 1) for k in HOST_CALLS if counts[k]},
        "device_copies_per_step": {k: {"count": round(v / steps, 1), "ms": round(copy_us[k] / 1000 / steps, 2)}
                                   for k, v in sorted(copies.items())},
        "host_blocked_ms_per_step": {k: round(v, 2) for k, v in blocked.items()},
        "top_cuda_ops": [{"name": a.key[:90], "calls_per_step": round(a.count / steps, 1),
                          "self_cuda_ms_per_step": round(_device_time(a) / 1000 / steps, 2)} for a in top_cuda],
        "top_kernels": [{"name": name[:90], "calls_per_step": round(kernels[1][name] / steps, 1),
                         "ms_per_step": round(us / 1000 / steps, 2)} for name, us in kernels[0].most_common(top)],
        "top_cpu_ops": [{"name": a.key[:90], "calls_per_step": round(a.count / steps, 1),
                         "self_cpu_ms_per_step": round(a.self_cpu_time_total / 1000 / steps, 2)} for a in top_cpu],
    }


class SyncTracer:
    """The Python call sites of the CUDA calls that make the host wait (torch's sync debug mode warns at
    each one; the warning is caught here with the stack that raised it)."""

    def __init__(self):
        self.sites: Counter = Counter()
        self.context = None

    def show(self, message, category, filename, lineno, file=None, line=None) -> None:
        import traceback

        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "/torch/" not in f.filename and not f.filename.endswith("warnings.py")]
        where = " < ".join(f"{'/'.join(Path(f.filename).parts[-2:])}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))
        self.sites[where] += 1

    def start(self) -> None:
        import warnings

        import torch

        self.context = warnings.catch_warnings()
        self.context.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self.show  # restored by catch_warnings
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> list[dict]:
        import torch

        torch.cuda.set_sync_debug_mode("default")
        self.context.__exit__(None, None, None)
        return [{"site": site[:400], "syncs": n} for site, n in self.sites.most_common(15)]


def render_table(summary: dict) -> str:
    t = summary["timing"]
    lines = [f"profile of {t['steps']} steps (no stacks): wall {t['wall_ms_per_step']} ms/step, GPU busy "
             f"{t['gpu_busy_ms_per_step']} ms ({t['gpu_busy_share']:.1%}), idle {t['gpu_idle_ms_per_step']} ms, "
             f"kernels {t['kernel_ms_per_step']} ms",
             "", f"{'phase (host position)':<24}{'host ms':>10}{'GPU busy':>10}{'GPU idle':>10}"]
    for name, p in sorted(t["phases"].items(), key=lambda kv: -kv[1]["gpu_idle_ms"]):
        lines.append(f"{name:<24}{p['host_ms']:>10.1f}{p['gpu_busy_ms']:>10.1f}{p['gpu_idle_ms']:>10.1f}")
    lines += ["", "per step: " + ", ".join(f"{k} {v}" for k, v in t["host_calls_per_step"].items()),
              "device copies per step: " + ", ".join(f"{k} {v['count']} ({v['ms']} ms)"
                                                      for k, v in t["device_copies_per_step"].items()),
              "host blocked ms per step: " + ", ".join(f"{k} {v}" for k, v in t["host_blocked_ms_per_step"].items()),
              "", f"{'top ops by their kernels (self CUDA)':<92}{'calls':>8}{'ms/step':>10}"]
    lines += [f"{o['name']:<92}{o['calls_per_step']:>8}{o['self_cuda_ms_per_step']:>10}" for o in t["top_cuda_ops"]]
    lines += ["", f"{'top GPU kernels and copies':<92}{'calls':>8}{'ms/step':>10}"]
    lines += [f"{o['name']:<92}{o['calls_per_step']:>8}{o['ms_per_step']:>10}" for o in t["top_kernels"]]
    lines += ["", f"{'top CPU ops (self)':<92}{'calls':>8}{'ms/step':>10}"]
    lines += [f"{o['name']:<92}{o['calls_per_step']:>8}{o['self_cpu_ms_per_step']:>10}" for o in t["top_cpu_ops"]]
    lines += ["", "syncs by Python call site (one step, torch.cuda sync debug mode; innermost frame first):"]
    lines += [f"  {s['syncs']:>4}  {s['site']}" for s in summary.get("sync_sites", [])]
    return "\n".join(lines) + "\n"


class StepProfiler:
    """Profiles steps of a transformers Trainer from its callback hooks (see the module docstring)."""

    def __init__(self, first_step: int, count: int, out_prefix: Path):
        self.first, self.count, self.out_prefix = first_step, count, Path(out_prefix)
        self.sync_step = first_step + count + 1  # after one unprofiled step
        self.prof = None
        self.syncs = None
        self.phase = None
        self.summary: dict = {}

    # -- phases: a record_function range per host position, switched at each hook
    def enter(self, name: str) -> None:
        import torch

        if self.prof is None:
            return
        self.leave()
        self.phase = torch.autograd.profiler.record_function(PHASE_PREFIX + name)
        self.phase.__enter__()

    def leave(self) -> None:
        if self.phase is not None:
            self.phase.__exit__(None, None, None)
            self.phase = None

    def start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # nothing of earlier steps runs inside the window
        self.prof = profile(activities=activities, record_shapes=False)
        self.prof.__enter__()
        self.enter("log")  # the hook that starts it is on_step_end: logging comes next

    def stop(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()  # inside the last phase: the GPU's tail belongs to the window
        self.leave()
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        started = time.monotonic()
        self.summary["timing"] = summarize_timing(prof, self.count)
        self.summary["analysis_s"] = round(time.monotonic() - started, 1)
        self.write()

    def write(self) -> None:
        self.out_prefix.parent.mkdir(parents=True, exist_ok=True)
        self.out_prefix.with_suffix(".json").write_text(json.dumps(self.summary, indent=1))
        if "timing" in self.summary:
            self.out_prefix.with_suffix(".txt").write_text(render_table(self.summary))

    # -- trainer hooks
    def on_step_end(self, global_step: int) -> None:
        import torch

        if self.prof is not None and global_step == self.first + self.count - 1:
            self.stop()
        elif self.prof is not None:
            self.enter("log")
        if global_step == self.first - 1:
            self.start()
        if not torch.cuda.is_available():
            return
        if global_step == self.sync_step - 1:  # from here to the same hook of the next step
            self.syncs = SyncTracer()
            self.syncs.start()
        elif global_step == self.sync_step and self.syncs is not None:
            self.summary["sync_sites"] = self.syncs.stop()
            self.write()

    def install(self, trainer) -> None:
        """Add the callback and wrap the trainer's step methods to mark the phases between hooks."""
        from transformers import TrainerCallback

        profiler = self

        class Hooks(TrainerCallback):
            def on_log(self, args, state, control, **kwargs):
                profiler.enter("fetch_batch")  # then the loop fetches and collates the next batch

            def on_step_begin(self, args, state, control, **kwargs):
                profiler.enter("forward")

            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                profiler.enter("optimizer")

            def on_optimizer_step(self, args, state, control, **kwargs):
                profiler.enter("scheduler_zero_grad")

            def on_step_end(self, args, state, control, **kwargs):
                profiler.on_step_end(state.global_step)

        def wrap(name: str, before: str | None, after: str | None) -> None:
            inner = getattr(trainer, name, None)
            if inner is None:  # another transformers version: that phase merges into its neighbour
                return

            def wrapped(*args, **kwargs):
                if before:
                    profiler.enter(before)
                result = inner(*args, **kwargs)
                if after:
                    profiler.enter(after)
                return result

            setattr(trainer, name, wrapped)

        wrap("compute_loss", None, "backward")  # training_step: compute_loss, then backward
        wrap("training_step", None, "after_backward")  # the loss's checks, flos, token counts
        wrap("_clip_grad_norm", "clip_grad_norm", None)
        trainer.add_callback(Hooks())


def main(spec_path: str, out_prefix: str, first_step: int, count: int) -> None:
    from foundation.artifacts import ErrorEvent
    from foundation.errors import SftflowError
    from tasks.processes import trainer

    make_class = trainer.sft_trainer_class

    def profiled_trainer_class():
        cls = make_class()

        def build(*args, **kwargs):
            trainer = cls(*args, **kwargs)
            StepProfiler(first_step, count, Path(out_prefix)).install(trainer)
            return trainer

        return build

    trainer.sft_trainer_class = profiled_trainer_class  # the recipe looks it up when it builds its trainer
    try:
        trainer.main(spec_path)
    except SftflowError as exc:
        trainer.emit(ErrorEvent(message=str(exc)))
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
