"""Every `SFTFLOW_*` environment variable, read here and nowhere else.

| variable | meaning | default |
|---|---|---|
| SFTFLOW_HOME | the workspace: datasets, drops, runs, registry, caches, Prefect's database | ./.sftflow |
| SFTFLOW_CACHE | model caches (the tiny model, llama.cpp's converter), shared between workspaces | $SFTFLOW_HOME/cache |
| SFTFLOW_SDIST_CACHE | where the pinned llama-cpp-python sdist is kept (the Makefile builds its wheel from it) | ~/.cache/sftflow/sdist |
| SFTFLOW_PROJECT_DIR | the checkout the stack's workers run flows from (prefect.yaml's pull step) | this checkout |
| SFTFLOW_PROGRESS | 0: no progress bar on stderr while training (workers log events instead) | 1 |
| SFTFLOW_DATABASE_URL | PostgreSQL URL for the stack's Prefect server (`sftflow up --database-url`) | SQLite in the workspace |
| SFTFLOW_SERVE_API_KEY | the API key `sftflow serve` requires of clients (`--api-key`); needed off loopback | unset |
| SFTFLOW_STACK_ID | set by `sftflow up` in the environment of what it starts, so `down` stops only those | unset |
| SFTFLOW_LOCAL_API_IDLE_S | seconds the workspace's local Prefect API waits without a request before it stops; 0: start none (each command runs a temporary one) | 600 |
| SFTFLOW_WARM_WORKER_IDLE_S | seconds a warm worker (the engine's libraries imported ahead, foundation/warm.py) waits for a job before it exits; 0: start none | 600 with a CUDA GPU, else 0 |
| SFTFLOW_EXPORT_BESIDE_EVAL | `sftflow pipeline`: run the export while the evaluation runs (both in this process's machine); auto: when a CUDA GPU's free memory holds both (tasks/preflight.py), 1: always, 0: never | auto |
| SFTFLOW_LOCAL_API_ID | set in the local Prefect API's environment, so a command adopts or stops only its own | unset |
| SFTFLOW_CPU_RANKS | tests only, on a machine without CUDA: train with N data-parallel gloo ranks on the CPU | unset |

Tests and benches read variables of their own, never product code: SFTFLOW_TEST_CACHE (keep the tiny
model between test sessions), SFTFLOW_RECORD_GOLDEN (record the CLI's output shapes),
SFTFLOW_BENCH_TRAIN (bench/train_gpu.py's training recipe).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent

HOME = "SFTFLOW_HOME"
CACHE = "SFTFLOW_CACHE"
SDIST_CACHE = "SFTFLOW_SDIST_CACHE"
PROJECT_DIR_VAR = "SFTFLOW_PROJECT_DIR"
PROGRESS = "SFTFLOW_PROGRESS"
DATABASE_URL = "SFTFLOW_DATABASE_URL"
STACK_ID = "SFTFLOW_STACK_ID"
LOCAL_API_IDLE = "SFTFLOW_LOCAL_API_IDLE_S"
LOCAL_API_ID = "SFTFLOW_LOCAL_API_ID"
WARM_WORKER_IDLE = "SFTFLOW_WARM_WORKER_IDLE_S"
EXPORT_BESIDE_EVAL = "SFTFLOW_EXPORT_BESIDE_EVAL"
SERVE_API_KEY = "SFTFLOW_SERVE_API_KEY"
CPU_RANKS = "SFTFLOW_CPU_RANKS"


@dataclass(frozen=True)
class Settings:
    """The SFTFLOW_* variables of one environment (the process's own by default), parsed."""

    home: Path
    cache: Path | None
    sdist_cache: Path
    project_dir: Path
    progress: bool
    database_url: str | None
    stack_id: str | None
    local_api_idle_s: float
    cpu_ranks: int | None
    warm_worker_idle_s: float | None = None  # None: the default, which depends on the machine (foundation.warm)
    export_beside_eval: bool | None = None  # None: auto (tasks.preflight.export_fits_beside_evaluation)
    serve_api_key: str | None = field(default=None, repr=False)  # a secret: never in a repr or a log

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        cpu_ranks = env.get(CPU_RANKS)
        return cls(
            home=Path(env.get(HOME, ".sftflow")).absolute(),
            cache=Path(env[CACHE]).absolute() if env.get(CACHE) else None,
            sdist_cache=Path(env.get(SDIST_CACHE) or Path.home() / ".cache" / "sftflow" / "sdist"),
            project_dir=Path(env.get(PROJECT_DIR_VAR) or PROJECT_DIR),
            progress=env.get(PROGRESS, "1") != "0",
            database_url=env.get(DATABASE_URL) or None,
            stack_id=env.get(STACK_ID) or None,
            local_api_idle_s=float(env.get(LOCAL_API_IDLE) or 600),
            cpu_ranks=int(cpu_ranks) if cpu_ranks else None,
            warm_worker_idle_s=float(env[WARM_WORKER_IDLE]) if env.get(WARM_WORKER_IDLE) else None,
            serve_api_key=env.get(SERVE_API_KEY) or None,
            export_beside_eval=_auto_flag(env, EXPORT_BESIDE_EVAL),
        )


def _auto_flag(env, name: str) -> bool | None:
    """auto (or unset): None; 1: True; 0: False; anything else a one-line error naming the variable."""
    value = env.get(name, "auto").strip().lower() or "auto"
    if value not in ("auto", "1", "0"):
        from foundation.errors import ConfigError

        raise ConfigError(f"{name}={env[name]!r}: use auto, 1 or 0")
    return None if value == "auto" else value == "1"


def settings() -> Settings:
    """The settings of this process's environment, read now (tests change the environment between calls)."""
    return Settings.from_env()
