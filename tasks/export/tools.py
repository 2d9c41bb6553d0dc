"""llama.cpp's converter scripts (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`, their `conversion/`
package and `gguf-py`), from the pinned llama-cpp-python sdist on PyPI, checked against its sha256 and
extracted once into the model cache.

`python -m tasks.export.tools` fetches, verifies and extracts them (`make` does, at install time).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

from foundation import processes
from foundation.atomic import sha256_of, staged_dir
from foundation.settings import settings
from foundation.workspace import Workspace
from tasks.export import ExportError

LLAMA_CPP_PYTHON = "0.3.36"
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
TOOL_MEMBERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")


def fetch_sdist(target_dir: Path) -> Path:
    """The pinned sdist from PyPI (pip's own client), verified by sha256."""
    target_dir.mkdir(parents=True, exist_ok=True)
    sdist = target_dir / SDIST
    if not sdist.exists():
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(target_dir),
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
            capture_output=True, text=True,
        )
        if done.returncode != 0 or not sdist.exists():
            raise ExportError(f"could not download llama-cpp-python {LLAMA_CPP_PYTHON} from PyPI: {done.stderr[-500:]}")
    if sha256_of(sdist) != SDIST_SHA256:
        sdist.unlink()
        raise ExportError(f"{sdist}: sha256 does not match the pinned {SDIST_SHA256}; refusing to use it")
    return sdist


def llama_cpp_tools(workspace: Workspace) -> Path:
    """The converter scripts and gguf-py of the pinned sdist, extracted once into the model cache."""
    tools = workspace.cache / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    if (tools / "convert_hf_to_gguf.py").exists():
        return tools
    # the sdist cache is shared with the Makefile, which builds the llama_cpp wheel from this very file
    sdist = fetch_sdist(settings().sdist_cache)
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    with staged_dir(tools) as tmp, tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            name = member.name.removeprefix(prefix)
            if member.name.startswith(prefix) and name.startswith(TOOL_MEMBERS) and member.isfile():
                member.name = name
                archive.extract(member, tmp, filter="data")
    return tools


def _env(tools: Path) -> dict[str, str]:
    return processes.child_env(pythonpath=[tools / "gguf-py", tools])


def _check(script: str, returncode: int, log: Path) -> None:
    if returncode != 0:
        raise ExportError(f"{script} failed (exit {returncode}):\n{processes.log_tail(log, 10)}")


def run_tool(tools: Path, script: str, args: list[str], log: Path) -> None:
    """Run one of llama.cpp's scripts with its own gguf-py; ExportError with the log's tail if it fails."""
    _check(script, processes.run([sys.executable, str(tools / script), *args], log, _env(tools), cwd=tools), log)


# A script started ahead imports its module (torch, transformers, gguf: seconds), then waits for its arguments
# on stdin and runs its main(); an empty stdin ends it unrun.
_AHEAD = """import json, sys
import {module} as tool
from transformers import AutoConfig  # the converter reads the model's config with it: imported ahead too
line = sys.stdin.readline()
if not line:
    sys.exit(0)
sys.argv = [{script!r}, *json.loads(line)]
tool.main()
"""


class ToolAhead:
    """One of llama.cpp's scripts that has a main() (`convert_hf_to_gguf.py`), started before its input is
    ready so that its imports are paid while the caller makes that input: `run(args)` runs it then, as
    `run_tool` would; leaving the `with` block without running it ends it."""

    def __init__(self, tools: Path, script: str, log: Path):
        self.script, self.log = script, log
        code = _AHEAD.format(module=Path(script).stem, script=str(tools / script))
        self.process = processes.start([sys.executable, "-c", code], log, _env(tools), cwd=tools,
                                       stdin=subprocess.PIPE)

    def run(self, args: list[str]) -> None:
        try:
            self.process.stdin.write(json.dumps(args) + "\n")
            self.process.stdin.close()
        except BrokenPipeError:  # it ended early (an import failed): its exit status and log say why
            pass
        _check(self.script, self.process.wait(), self.log)

    def __enter__(self) -> "ToolAhead":
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


if __name__ == "__main__":  # fetch, verify and extract the tools (make does this)
    print(llama_cpp_tools(Workspace.from_env().ensure()))
