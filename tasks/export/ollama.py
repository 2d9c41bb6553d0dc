"""Hand an export to Ollama: `ollama create NAME -f Modelfile` over the run's Modelfile and GGUF.

The Modelfile names its GGUF relative to its own directory (`FROM ./gguf/...`), so the command runs
there. Where `ollama` is not on PATH nothing runs, and the exact command to run is reported instead.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

from foundation.errors import ConfigError, SftflowError

# Ollama's model names: [host/][namespace/]model[:tag], each part letters, digits, '_', '-' and '.'
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*){0,2}(:[A-Za-z0-9][A-Za-z0-9._-]*)?")


class OllamaError(SftflowError):
    """`ollama create` failed; the message has its last line of output and the command to retry."""


def check_model_name(name: str) -> None:
    if not MODEL_NAME.fullmatch(name) or len(name) > 200:
        raise ConfigError(f"--ollama {name!r}: not an Ollama model name; use letters, digits, '.', '_' and '-', "
                          "optionally a namespace/ and a :tag (e.g. my-model:q4)")


def create_command(name: str, modelfile: Path) -> str:
    """The command a user runs to create the model: in the Modelfile's directory."""
    return f"cd {shlex.quote(str(modelfile.parent))} && ollama create {shlex.quote(name)} -f {modelfile.name}"


def create_model(name: str, modelfile: Path, timeout_s: float = 3600) -> dict:
    """Run `ollama create` when ollama is on PATH; else report the command. Returns {name, modelfile, created,
    command} (and the reason when nothing ran); raises OllamaError when ollama ran and failed."""
    result = {"name": name, "modelfile": str(modelfile), "command": create_command(name, modelfile)}
    executable = shutil.which("ollama")
    if executable is None:
        return result | {"created": False, "reason": "ollama is not on PATH"}
    try:
        proc = subprocess.run([executable, "create", name, "-f", str(modelfile)], cwd=modelfile.parent,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise OllamaError(f"ollama create {name} did not finish in {timeout_s:.0f} s; run it yourself: "
                          f"{result['command']}") from exc
    if proc.returncode != 0:
        last = next((line for line in reversed((proc.stderr + proc.stdout).splitlines()) if line.strip()), "")
        raise OllamaError(f"ollama create {name} failed (exit status {proc.returncode}: {last.strip()[:300]}); is the "
                          f"Ollama server running (ollama serve)? Then run: {result['command']}")
    return result | {"created": True}
