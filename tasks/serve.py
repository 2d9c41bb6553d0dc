"""Use a published model: pick a registry version, chat with its GGUF, serve it over HTTP.

`sftflow chat` talks to the GGUF through llama_cpp (the chat template stored in the GGUF renders
the conversation, its end-of-turn token stops generation); `sftflow serve` runs llama-cpp-python's
OpenAI-compatible server on loopback over the same file.
"""

from __future__ import annotations

from pathlib import Path

from foundation.atomic import read_json
from foundation.errors import SftflowError
from foundation.workspace import Workspace

PREFERRED_QUANTS = ("q4_k_m", "q8_0", "f16")


def published_gguf(workspace: Workspace, spec: str | None) -> Path:
    """NAME[@VERSION] -> its GGUF (q4_k_m, else q8_0, else f16). NAME defaults to the only model;
    VERSION to the champion, else the newest version."""
    names = sorted(p.name for p in workspace.registry_dir.glob("*") if p.is_dir() and not p.name.startswith("."))
    name, _, version = (spec or "").partition("@")
    if not name:
        if len(names) != 1:
            raise SftflowError(f"{len(names)} models in {workspace.registry_dir} ({', '.join(names) or 'none'}); "
                               "choose one with --model NAME[@VERSION] (publish one with: sftflow publish --run RUN_ID)")
        name = names[0]
    root = workspace.registry_dir / name
    if name not in names:
        raise SftflowError(f"no model {name!r} in {workspace.registry_dir}; published: {', '.join(names) or 'none'}")
    if not version:
        pointer = root / "CHAMPION"
        versions = sorted(p.parent.name for p in root.glob("v*/manifest.json"))
        version = pointer.read_text().strip() if pointer.exists() else (versions[-1] if versions else "")
    version_dir = root / version
    if not (version_dir / "manifest.json").exists() or "/" in version:
        raise SftflowError(f"no version {version!r} of {name}; list them with: ls {root}")
    files = read_json(version_dir / "manifest.json")["files"]
    for quant in PREFERRED_QUANTS:
        for path in files:
            if path.startswith("gguf/") and path.endswith(f"-{quant}.gguf") and "-lora-" not in path:
                return version_dir / path
    raise SftflowError(f"{name}@{version} has no GGUF files; export the run before publishing (sftflow export)")


def load_chat_model(gguf: Path, n_ctx: int = 0):  # 0: the context length the model was trained with
    import llama_cpp

    return llama_cpp.Llama(str(gguf), n_ctx=n_ctx, verbose=False)  # chat format: the GGUF's own template


def server_command(gguf: Path, port: int, n_ctx: int = 0) -> list[str]:
    import sys

    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "--n_ctx", str(n_ctx), "--model_alias", gguf.parent.parent.parent.name]
