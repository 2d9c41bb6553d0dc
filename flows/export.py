"""Flow `export_model`: a training run -> merged 16-bit model, GGUF files, parity report, Modelfile.

Run it:
    sftflow export --run RUN_ID [--quant f16,q8_0,q4_k_m] --json
Needs the `llama_cpp` bindings (installed by `make`); the converter scripts come from the pinned
llama-cpp-python sdist (downloaded from PyPI once, sha256-checked, cached under the model cache).
"""

from __future__ import annotations

from prefect import flow

from foundation.artifacts import ExportReport
from tasks.export.run import export_gguf


@flow(name="export_model")
def export_model(run_id: str, quants: list[str] | None = None) -> ExportReport:
    """Merge the adapter, write GGUF files and check each against the HF model."""
    return export_gguf(run_id, quants)
