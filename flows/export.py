"""Flow `export_model`: a training run -> merged 16-bit model, GGUF files, parity report, Modelfile.

Run it:
    sftflow export --run RUN_ID [--quant f16,q8_0,q4_k_m] --json
Needs the `llama_cpp` bindings (installed by `make`); the converter scripts come from the pinned
llama-cpp-python sdist (downloaded from PyPI once, sha256-checked, cached under the model cache).
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.evaluate import run_dir_of
from foundation.workspace import Workspace
from tasks.export import export_run


@task(cache_policy=NO_CACHE)
def export_gguf(run_id: str, quants: list[str] | None) -> dict:
    logger = get_run_logger()
    workspace = Workspace.from_env().ensure()
    summary = export_run(run_dir_of(workspace, run_id), workspace, quants, log=logger.info)
    create_table_artifact(
        key="gguf-parity",
        table=[{"gguf": kind, **result} for kind, result in summary["parity"].items()],
        description=f"{run_id}: GGUF parity against the merged HF model (control: base without adapter)",
    )
    return summary


@flow(name="export_model")
def export_model(run_id: str, quants: list[str] | None = None) -> dict:
    """Merge the adapter, write GGUF files and check each against the HF model."""
    return export_gguf(run_id, quants)
