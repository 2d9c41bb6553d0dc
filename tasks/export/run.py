"""The export of a training run, as named steps, and its Prefect task.

    plan      the quants (f16 always first), the pre-flight (disk, memory), llama.cpp's tools
    merge     the adapter merged into its base in 16-bit; the fp32 reference and the parity prompts
    convert   f16 GGUF, each quant from it, the base's f16 GGUF (the control), the LoRA GGUF; and
    check     parity of every GGUF against the reference as soon as it is written, and of the control
              (which must fail)
    finish    the Modelfile and export.json; gguf/ appears only when every check passed
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from foundation.artifacts import ExportReport, Parity, RunManifest
from foundation.atomic import staged_dir, write_bytes_atomic
from foundation.settings import settings
from foundation.stores.datasets import DatasetVersion
from foundation.stores.runs import RunDir
from foundation.workspace import Workspace
from schemas.config import ExportConfig, RunConfig
from schemas.quants import in_export_order, smallest
from tasks.export import ExportError
from tasks.export.convert import (
    CONVERT_HF,
    convert_lora_to_gguf,
    convert_to_gguf,
    export_device,
    gguf_model_name,
    merge_adapter,
    quantize,
)
from tasks.engines.chat_format import chat_format, stop_tokens
from tasks.export.modelfile import ollama_modelfile
from tasks.export.parity import (
    HfReference, check_thresholds, control_parity, gguf_adds_bos, parity, parity_prompts,
)
from tasks.export.tools import LLAMA_CPP_PYTHON, ToolAhead, llama_cpp_tools
from tasks.preflight import check_export_fits, export_fits_beside_evaluation


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
    tokenizer: object = None  # the merged model's, once merged

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


def merge(job: ExportJob) -> HfReference:
    """The merged 16-bit model on disk, its tokenizer (`job.tokenizer`), and the fp32 reference side of parity
    (on the GPU when there is one: the merge and the reference's forward passes are the export's torch work).
    The reference is the merged model as saved, upcast in memory (the values reading it back in fp32 gives)."""
    import torch
    from transformers import AutoTokenizer

    device = export_device()
    t = time.monotonic()
    merged = merge_adapter(job.source.model_path, job.source.adapter_dir, job.run.merged_dir, job.config.merge_dtype,
                           device)
    job.timed("merge_s", t)
    job.tokenizer = tokenizer = AutoTokenizer.from_pretrained(job.run.merged_dir)
    model = merged.to(torch.float32).eval()
    prompts = parity_prompts(job.source.eval_split, tokenizer, job.config.parity_prompts, seed=0)
    return HfReference(model, tokenizer, prompts, job.config.greedy_tokens)


def parity_slots(job: ExportJob, checks: int) -> tuple[int, int]:
    """(checks at once, llama.cpp threads each): a share of at least 4 cores each, as many as the RAM holds
    the largest GGUF (the f16) for; one check on every core on a small machine."""
    import psutil

    from tasks.preflight import read_shape

    cores = os.cpu_count() or 1
    shape = read_shape(job.source.model_path)
    f16_bytes = shape.params * 2 if shape else 1
    fit = max(1, int(psutil.virtual_memory().available * 0.5) // f16_bytes)
    workers = max(1, min(checks, cores // 4, fit))
    return workers, max(1, cores // workers)


def convert_and_check(job: ExportJob, out: Path, log) -> tuple[dict[str, Path], dict[str, Parity], list[str]]:
    """Every GGUF into `out` (by kind: the quants, then lora), each checked against the HF model as soon as it
    is written, and the control (the base's f16 GGUF, beside the run; it must fail).

    The base's f16 (the control) and the LoRA GGUF need no merge: their converters (separate processes, mostly
    single-threaded) start first and run while the adapter is merged. The merged f16's converter starts then
    too, imports its libraries and waits (`ToolAhead`); it converts once the merge is saved, each quant is
    made from it in turn (llama.cpp's quantiser, all cores), and each file's parity check starts once the
    file and the HF side are there, beside all of that (`parity_slots`)."""
    tool_log = job.run.export_log
    model_name = gguf_model_name(job.source.config.model.name)
    control = job.run.control_gguf
    kinds = [*job.quants, *(["lora"] if job.config.lora_gguf else []), "control_base_f16"]
    workers, threads = parity_slots(job, len(kinds))
    checked: dict[str, Future] = {}
    reference: Future = Future()  # the HF side, once the merge is done

    def timed(key: str, make):
        t = time.monotonic()
        result = make()
        job.timed(key, t)
        return result

    def check(kind: str, gguf: Path, lora: Path | None = None) -> Parity:
        hf = reference.result()
        return timed(f"parity_{kind}_s", lambda: parity(gguf, hf, lora=lora, threads=threads))

    def check_control() -> Parity:  # its greedy part only when KL and top-1 leave the verdict open
        hf = reference.result()
        return timed("parity_control_base_f16_s", lambda: control_parity(
            control, hf, job.config.thresholds["f16"], threads=threads))

    def control_and_its_check() -> Path:
        made = timed("convert_control_s", lambda: convert_to_gguf(
            job.tools, Path(job.source.model_path), control, tool_log, model_name))
        # the base without the adapter must be clearly worse, or the check proves nothing
        checked["control_base_f16"] = checks.submit(check_control)
        return made

    def lora_and_its_check() -> Path:
        made = timed("convert_lora_s", lambda: convert_lora_to_gguf(
            job.tools, job.source.model_path, job.source.adapter_dir, out / f"{job.name}-lora-f16.gguf", tool_log))
        made_control.result()  # the LoRA is checked on the base's f16 GGUF, applied at load time
        checked["lora"] = checks.submit(check, "lora", control, made)
        return made

    try:
        with (ThreadPoolExecutor(max_workers=workers) as checks, ThreadPoolExecutor(max_workers=2) as converters,
              ToolAhead(job.tools, CONVERT_HF, tool_log) as merged_converter):
            made_control = converters.submit(control_and_its_check)
            made_lora = converters.submit(lora_and_its_check) if job.config.lora_gguf else None
            try:
                reference.set_result(merge(job))
            except BaseException as exc:  # the checks waiting for it end with the same error
                reference.set_exception(exc)
                raise
            merged = time.monotonic()
            files = {"f16": timed("convert_s", lambda: convert_to_gguf(
                job.tools, job.run.merged_dir, out / f"{job.name}-f16.gguf", tool_log, model_name, merged_converter))}
            checked["f16"] = checks.submit(check, "f16", files["f16"])
            for quant in job.quants[1:]:
                files[quant] = timed(f"quantize_{quant}_s",
                                     lambda q=quant: quantize(files["f16"], out / f"{job.name}-{q}.gguf", q))
                checked[quant] = checks.submit(check, quant, files[quant])
            made_control.result()
            if made_lora is not None:
                files["lora"] = made_lora.result()
        results = {kind: future.result() for kind, future in checked.items()}
    finally:
        control.unlink(missing_ok=True)
    job.timed("after_merge_s", merged)
    failures: list[str] = []
    for kind, result in results.items():
        if kind == "control_base_f16":
            continue
        missed = check_thresholds(result, job.config.thresholds.get(kind, {}))
        results[kind] = result.model_copy(update={"passed": not missed})
        failures += [f"{kind}: {m}" for m in missed]
        log(f"parity {kind}: {results[kind].dump()}")
    if not check_thresholds(results["control_base_f16"], job.config.thresholds["f16"]):
        failures.append("control: the base model without the adapter passes the f16 thresholds, so parity "
                        "cannot tell the adapter apart; tighten export.thresholds")
    return files, {k: results[k] for k in kinds}, failures


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
    with staged_dir(run.gguf_dir) as tmp:
        files, results, failures = convert_and_check(job, tmp, log)
        if failures:
            ExportReport(passed=False, parity=results, failures=failures, timings=job.timings).write(run.export_path)
            raise ExportError("GGUF parity failed: " + "; ".join(failures))
    return finish(job, files, results, job.tokenizer)


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


def export_beside_evaluation(run_id: str, log) -> bool:
    """Whether the pipeline runs this run's export while its evaluation runs (they read the same finished run
    and write different files; the evaluation is mostly GPU work, the export mostly CPU work): as
    SFTFLOW_EXPORT_BESIDE_EVAL says, by default when the GPU's free memory holds both."""
    chosen = settings().export_beside_eval
    if chosen is not None:
        log(f"export {'beside' if chosen else 'after'} the evaluation: SFTFLOW_EXPORT_BESIDE_EVAL={int(chosen)}")
        return chosen
    manifest = Workspace.from_env().runs.finished(run_id).manifest()
    fits, why = export_fits_beside_evaluation(manifest.model_path, RunConfig.model_validate(manifest.config))
    log(f"export {'beside' if fits else 'after'} the evaluation: {why}")
    return fits


def export_of(run_id: str) -> ExportReport:
    """The export a run holds (written by export_gguf wherever it ran)."""
    report = Workspace.from_env().runs.finished(run_id).export_report()
    if report is None or not report.passed:
        raise ExportError(f"run {run_id} has no passed export; export it: sftflow export --run {run_id}")
    return report
