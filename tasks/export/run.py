"""The export of a training run, as named steps, and its Prefect task.

    plan      the quants (f16 always first), the pre-flight (disk, memory), llama.cpp's tools
    merge     the adapter merged into its base in 16-bit; the fp32 reference and the parity prompts
    convert   f16 GGUF, each quant from it, the base's f16 GGUF (the control), the LoRA GGUF
    check     parity of every GGUF against the reference, and of the control (which must fail)
    finish    the Modelfile and export.json; gguf/ appears only when every check passed
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from foundation.artifacts import ExportReport, Parity, RunManifest
from foundation.atomic import staged_dir, write_bytes_atomic
from foundation.stores.datasets import DatasetVersion
from foundation.stores.runs import RunDir
from foundation.workspace import Workspace
from schemas.config import ExportConfig, RunConfig
from schemas.quants import in_export_order, smallest
from tasks.export import ExportError
from tasks.export.convert import (
    convert_lora_to_gguf,
    convert_to_gguf,
    export_device,
    gguf_model_name,
    merge_adapter,
    quantize,
)
from tasks.engines.chat_format import chat_format, stop_tokens
from tasks.export.modelfile import ollama_modelfile
from tasks.export.parity import HfReference, check_thresholds, gguf_adds_bos, parity, parity_prompts
from tasks.export.tools import LLAMA_CPP_PYTHON, llama_cpp_tools
from tasks.preflight import check_export_fits


@dataclass(frozen=True)
class ExportSource:
    """What an export reads: the base model, the adapter, the eval split (parity prompts), the config."""

    name: str
    model_path: str
    adapter_dir: str
    eval_split: Path
    config: RunConfig

    @classmethod
    def of(cls, manifest: RunManifest) -> "ExportSource":
        return cls(manifest.name, manifest.model_path, manifest.adapter_dir,
                   DatasetVersion(Path(manifest.dataset_dir)).path("eval"), RunConfig.model_validate(manifest.config))


@dataclass
class ExportJob:
    """What the steps of one export share."""

    run: RunDir
    source: ExportSource
    quants: list[str]
    tools: Path | None = None
    started: float = field(default_factory=time.monotonic)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def config(self) -> ExportConfig:
        return self.source.config.export

    def timed(self, key: str, since: float) -> None:
        self.timings[key] = round(time.monotonic() - since, 2)


def plan(run: RunDir, source: ExportSource, workspace: Workspace, quants: list[str] | None, log) -> ExportJob:
    """Refuse before anything is downloaded, loaded or written when the files or models cannot fit."""
    job = ExportJob(run, source, in_export_order(quants or source.config.export.quants))
    check_export_fits(run.root, source.model_path, source.config, job.quants, log=log)
    job.tools = llama_cpp_tools(workspace)
    job.timed("tools_s", job.started)
    return job


def merge(job: ExportJob) -> tuple[object, HfReference]:
    """The merged 16-bit model on disk; its tokenizer and the fp32 reference side of parity (on the GPU when
    there is one: the merge and the reference's forward passes are the export's torch work)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = export_device()
    t = time.monotonic()
    merged = merge_adapter(job.source.model_path, job.source.adapter_dir, job.run.merged_dir, job.config.merge_dtype,
                           device)
    job.timed("merge_s", t)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, device_map=device).eval()
    prompts = parity_prompts(job.source.eval_split, tokenizer, job.config.parity_prompts, seed=0)
    return tokenizer, HfReference(model, tokenizer, prompts, job.config.greedy_tokens)


def convert(job: ExportJob, out: Path) -> dict[str, Path]:
    """Every GGUF into `out` (by kind: the quants, then lora), and the control beside the run.

    The three conversions (merged f16, the base's f16 control, the LoRA) are separate converter processes,
    mostly single-threaded, and run side by side; the quantiser (all cores) runs on the f16 once it is there."""
    log = job.run.export_log
    model_name = gguf_model_name(job.source.config.model.name)

    def timed(key: str, make):
        t = time.monotonic()
        result = make()
        job.timed(key, t)
        return result

    with ThreadPoolExecutor(max_workers=3) as pool:
        f16 = pool.submit(timed, "convert_s", lambda: convert_to_gguf(
            job.tools, job.run.merged_dir, out / f"{job.name}-f16.gguf", log, model_name))
        control = pool.submit(timed, "convert_control_s", lambda: convert_to_gguf(
            job.tools, Path(job.source.model_path), job.run.control_gguf, log, model_name))
        lora = pool.submit(timed, "convert_lora_s", lambda: convert_lora_to_gguf(
            job.tools, job.source.model_path, job.source.adapter_dir, out / f"{job.name}-lora-f16.gguf", log)
        ) if job.config.lora_gguf else None
        files = {"f16": f16.result()}
        for quant in job.quants[1:]:
            files[quant] = timed(f"quantize_{quant}_s",
                                 lambda q=quant: quantize(files["f16"], out / f"{job.name}-{q}.gguf", q))
        control.result()
        if lora is not None:
            files["lora"] = lora.result()
    return files


def check(job: ExportJob, files: dict[str, Path], reference: HfReference, log) -> tuple[dict, list[str]]:
    """Parity of every GGUF (the LoRA on the base's f16 GGUF) and of the control; the misses."""
    t = time.monotonic()
    results: dict[str, Parity] = {}
    failures: list[str] = []
    control = job.run.control_gguf
    for kind, path in files.items():
        if kind == "lora":  # the base GGUF with the adapter applied at load time
            result = parity(control, reference, lora=path)
        else:
            result = parity(path, reference)
        missed = check_thresholds(result, job.config.thresholds.get(kind, {}))
        results[kind] = result.model_copy(update={"passed": not missed})
        failures += [f"{kind}: {m}" for m in missed]
        log(f"parity {kind}: {results[kind].dump()}")
    # the control: the base without the adapter must be clearly worse, or the check proves nothing
    results["control_base_f16"] = parity(control, reference)
    control.unlink()
    if not check_thresholds(results["control_base_f16"], job.config.thresholds["f16"]):
        failures.append("control: the base model without the adapter passes the f16 thresholds, so parity "
                        "cannot tell the adapter apart; tighten export.thresholds")
    job.timed("parity_s", t)
    return results, failures


def finish(job: ExportJob, files: dict[str, Path], results: dict[str, Parity], tokenizer) -> ExportReport:
    target = job.run.gguf_dir
    served = smallest(job.quants)
    fmt = chat_format(tokenizer)
    modelfile = ollama_modelfile(f"gguf/{job.name}-{served}.gguf", fmt, stop_tokens(tokenizer),
                                 write_bos=not gguf_adds_bos(target / files[served].name))
    write_bytes_atomic(job.run.modelfile, modelfile.encode())
    report = ExportReport(
        run_id=job.run.run_id, passed=True, gguf_dir=str(target), modelfile=str(job.run.modelfile),
        files={k: str(target / v.name) for k, v in files.items()},
        bytes={k: (target / v.name).stat().st_size for k, v in files.items()},
        parity=results, timings={**job.timings, "total_s": round(time.monotonic() - job.started, 2)},
        merged_dir=str(job.run.merged_dir), llama_cpp_python=LLAMA_CPP_PYTHON,
    )
    report.write(job.run.export_path)
    return report


def export_run(run: RunDir, source: ExportSource, workspace: Workspace, quants: list[str] | None = None,
               log=print) -> ExportReport:
    """Merge, convert, quantize, check parity; gguf/ appears only when every check passed."""
    job = plan(run, source, workspace, quants, log)
    tokenizer, reference = merge(job)
    with staged_dir(run.gguf_dir) as tmp:
        files = convert(job, tmp)
        results, failures = check(job, files, reference, log)
        if failures:
            ExportReport(passed=False, parity=results, failures=failures, timings=job.timings).write(run.export_path)
            raise ExportError("GGUF parity failed: " + "; ".join(failures))
    return finish(job, files, results, tokenizer)


@task(cache_policy=NO_CACHE)
def export_gguf(run_id: str, quants: list[str] | None) -> ExportReport:
    """Export a finished run's adapter to GGUF files, each checked against the HF model."""
    logger = get_run_logger()
    workspace = Workspace.from_env().ensure()
    run = workspace.runs.finished(run_id)
    report = export_run(run, ExportSource.of(run.manifest()), workspace, quants, log=logger.info)
    create_table_artifact(
        key="gguf-parity",
        table=[{"gguf": kind, **result.dump()} for kind, result in report.parity.items()],
        description=f"{run_id}: GGUF parity against the merged HF model (control: base without adapter)",
    )
    return report


def export_of(run_id: str) -> ExportReport:
    """The export a run holds (written by export_gguf wherever it ran)."""
    report = Workspace.from_env().runs.finished(run_id).export_report()
    if report is None or not report.passed:
        raise ExportError(f"run {run_id} has no passed export; export it: sftflow export --run {run_id}")
    return report
