"""Use a published model: pick a registry version's GGUF, chat with it, serve it over HTTP.

`sftflow chat` talks to the GGUF through llama_cpp (the chat template stored in the GGUF renders
the conversation, its end-of-turn token stops generation); `sftflow serve` runs llama-cpp-python's
OpenAI-compatible server on loopback over the same file.
"""

from __future__ import annotations

import sys
from pathlib import Path

from foundation.errors import NotFoundError
from foundation.workspace import Workspace
from schemas.quants import QUANTS


def published_gguf(workspace: Workspace, spec: str | None) -> Path:
    """NAME[@VERSION] -> its GGUF of fewest bits per weight (q4_k_m, else q8_0, else f16). NAME defaults to
    the only model; VERSION to the champion, else the newest version.

    The file is handed out only once it checks against the version's manifest: inside the version directory,
    and its sha256 the published one (remembered by inode and timestamps, so a multi-GB GGUF is hashed once).
    """
    version = workspace.check_layout().registry.resolve(spec)
    files = version.manifest().files
    for quant in sorted(QUANTS, key=lambda q: q.bits_per_weight):
        for path in sorted(files):
            if path.startswith("gguf/") and path.endswith(f"-{quant.name}.gguf") and "-lora-" not in path:
                return version.verified(path)
    name = version.root.parent.name
    raise NotFoundError(f"{name}@{version.version} has no GGUF files; export the run before publishing (sftflow export)")


def load_chat_model(gguf: Path, n_ctx: int = 0):  # 0: the context length the model was trained with
    import llama_cpp

    return llama_cpp.Llama(str(gguf), n_ctx=n_ctx, verbose=False)  # chat format: the GGUF's own template


def server_command(gguf: Path, port: int, n_ctx: int = 0) -> list[str]:
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "--n_ctx", str(n_ctx), "--model_alias", gguf.parent.parent.parent.name]
