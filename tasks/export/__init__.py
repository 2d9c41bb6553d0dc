"""Export: merge the adapter into a 16-bit base, make GGUF files with llama.cpp's own tools, check parity.

    tools       the converter scripts and gguf-py of the pinned llama-cpp-python sdist (PyPI, sha256-checked)
    convert     merge the adapter, convert to GGUF (f16, the LoRA), quantise (the quants of schemas.quants)
    parity      load each GGUF back with llama_cpp and compare it with the merged HF model
    modelfile   the Ollama Modelfile
    run         the export of a training run as named steps, and its Prefect task `export_gguf`

The quantiser is llama.cpp's, through the `llama_cpp` bindings built from the same sdist, so converter,
gguf-py and runtime are one version. Every GGUF is compared with the HF model on eval prompts: token
ids, mean KL and top-1 agreement of next-token distributions, greedy continuations.
"""

from foundation.errors import SftflowError


class ExportError(SftflowError):
    """An export step failed or a GGUF missed its parity thresholds; the message says which."""
