"""Use a published model: pick a registry version's GGUF, chat with it, serve it over HTTP.

`sftflow chat` talks to the GGUF through llama_cpp (the chat template stored in the GGUF renders
the conversation, its end-of-turn token stops generation); `sftflow serve` runs llama-cpp-python's
OpenAI-compatible server over the same file: on loopback by default, and on any other address only
with an API key, which the server then requires of every request (401 without it).
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

from foundation.errors import ConfigError, NotFoundError
from foundation.workspace import Workspace
from schemas.quants import QUANTS

# llama_cpp.server's settings are pydantic-settings without a prefix: its api_key setting is read from API_KEY
SERVER_API_KEY_VAR = "API_KEY"


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


def is_loopback(host: str) -> bool:
    """Does an address to listen on reach this machine only (127.0.0.0/8, ::1, localhost)?"""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve to any interface
        return False


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse to serve on an address other machines can reach without an API key."""
    if not is_loopback(host) and not api_key:
        raise ConfigError(f"--host {host} is reachable from other machines, so serving there needs an API key: pass "
                          "--api-key KEY or set SFTFLOW_SERVE_API_KEY (clients send it as 'Authorization: Bearer "
                          "KEY'), or serve on loopback (--host 127.0.0.1)")


def server_command(gguf: Path, port: int, host: str = "127.0.0.1", n_ctx: int = 0, n_gpu_layers: int = 0) -> list[str]:
    """llama_cpp.server over the GGUF. The API key is not an argument: it goes through `server_env`, so it
    never shows in the process list."""
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", host, "--port", str(port),
            "--n_ctx", str(n_ctx), "--n_gpu_layers", str(n_gpu_layers), "--model_alias", gguf.parent.parent.parent.name]


def server_env(environ: dict[str, str], api_key: str | None) -> dict[str, str]:
    """The server's environment: the given one with its api_key setting (API_KEY) set to the key, or removed
    when there is none (an unrelated API_KEY of the user's would otherwise lock or open the server)."""
    env = {k: v for k, v in environ.items() if k.upper() != SERVER_API_KEY_VAR}
    if api_key:
        env[SERVER_API_KEY_VAR] = api_key
    return env
