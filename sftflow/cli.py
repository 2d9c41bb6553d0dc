"""The `sftflow` command line.

Every command that produces something takes `--json` and then prints exactly one JSON object on
stdout; logs and progress go to stderr. Bad input exits with status 2 and a message that names the
fix; a drop rejected by its contract exits with status 1 (its report is still printed with --json).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import orjson
import typer

from sftflow.errors import DropRejectedError, SftflowError
from sftflow.workspace import Workspace, configure_prefect_env

app = typer.Typer(
    help="sftflow: raw instruction drops -> validated datasets -> QLoRA SFT -> evaluated, published models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

SAMPLE_DROPS = Path(__file__).resolve().parent.parent / "data" / "drops"

JsonOption = Annotated[bool, typer.Option("--json", help="Print one machine-readable JSON object on stdout.")]


def _emit(obj: dict, as_json: bool, human: str) -> None:
    if as_json:
        sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    else:
        sys.stdout.write(human + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def _flow_session() -> Iterator[Workspace]:
    """Prepare the workspace and Prefect's settings; keep anything a flow prints off stdout."""
    workspace = Workspace.from_env().ensure()
    configure_prefect_env(workspace)
    with contextlib.redirect_stdout(sys.stderr):
        yield workspace


def _fail(exc: SftflowError) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(1 if isinstance(exc, DropRejectedError) else 2)


def _ingest_summary(report: dict) -> str:
    rows = report["dataset_rows"]
    reasons = ", ".join(f"{k}={v}" for k, v in report.get("reasons", {}).items()) or "none"
    head = "already ingested (no-op)" if report.get("noop") else report["status"]
    return (
        f"drop {report['drop_id']}: {head}\n"
        f"  rows in {report['rows_in']} = accepted {report['accepted']} + duplicates {report['duplicates']} + "
        f"quarantined {report['quarantined']}" + (f" + held back {report['held_back']}" if report["held_back"] else "")
        + f"\n  reasons: {reasons}\n"
        f"  dataset {report['dataset_version']} (train {rows['train']}, eval {rows['eval']})"
    )


INGEST_KEYS = (
    "drop_id",
    "status",
    "noop",
    "rows_in",
    "accepted",
    "duplicates",
    "quarantined",
    "held_back",
    "reasons",
    "reject_rate",
    "dataset_version",
    "dataset_changed",
    "dataset_rows",
    "files",
    "quarantine_path",
)


@app.command()
def ingest(
    paths: Annotated[list[str], typer.Argument(help="Files or directories of a drop: local paths or fsspec URLs.")],
    drop_id: Annotated[
        Optional[str], typer.Option(help="Name of the drop (default: the first path's name + a content hash).")
    ] = None,
    format: Annotated[
        str, typer.Option("--format", help="auto|alpaca|sharegpt|openai|prompt_completion (auto: detect per file).")
    ] = "auto",
    eval_ratio: Annotated[Optional[float], typer.Option(help="Share of rows held out for eval (default 0.1).")] = None,
    max_reject_rate: Annotated[
        Optional[float], typer.Option(help="Fail the drop when more than this share of rows is quarantined.")
    ] = None,
    max_chars: Annotated[Optional[int], typer.Option(help="Longest conversation accepted, in characters.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Ingest a drop: read, validate (quarantining bad rows), dedup, split, write a dataset version."""
    try:
        with _flow_session():
            from pydantic import ValidationError

            from flows.ingest import ingest_drop
            from schemas.config import IngestConfig

            overrides = {"format": format, "eval_ratio": eval_ratio, "max_reject_rate": max_reject_rate,
                         "max_chars": max_chars}
            try:
                config = IngestConfig(**{k: v for k, v in overrides.items() if v is not None})
            except ValidationError as exc:
                raise SftflowError(_pydantic_message(exc)) from exc
            report = ingest_drop(paths=list(paths), drop_id=drop_id, config=config)
    except DropRejectedError as exc:
        if as_json:
            _emit({k: exc.report.get(k) for k in INGEST_KEYS} | {"error": exc.report["error"]}, True, "")
        _fail(exc)
    except SftflowError as exc:
        _fail(exc)
    _emit({k: report.get(k) for k in INGEST_KEYS}, as_json, _ingest_summary(report))


def _pydantic_message(exc: Exception) -> str:
    errors = getattr(exc, "errors", lambda: [])()
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors) or str(exc)


@app.command()
def datasets(as_json: JsonOption = False) -> None:
    """List the dataset versions in the workspace, newest first, and which one is current."""
    from tasks.format import DatasetVersion, current_version

    workspace = Workspace.from_env()
    try:
        current = current_version(workspace)
    except SftflowError as exc:
        _fail(exc)
    versions = []
    if workspace.datasets.is_dir():
        for path in workspace.datasets.iterdir():
            if (path / "manifest.json").exists() and not path.name.startswith("."):
                m = DatasetVersion(path).manifest
                versions.append({"version": m["version"], "created_at": m["created_at"], "rows": m["rows"],
                                 "parent": m["parent"], "drops": [d["drop_id"] for d in m["drops"]]})
    versions.sort(key=lambda v: (v["created_at"], len(v["drops"])), reverse=True)
    human = "\n".join(
        f"{'*' if current and v['version'] == current.name else ' '} {v['version']}  {v['created_at']}  "
        f"train {v['rows']['train']:>7}  eval {v['rows']['eval']:>6}  drops {len(v['drops'])}"
        for v in versions
    ) or f"no dataset versions in {workspace.datasets}"
    _emit({"current": current.name if current else None, "versions": versions}, as_json, human)


@app.command()
def demo(as_json: JsonOption = False) -> None:
    """Run the pipeline on the bundled sample drops (data/drops) with no server."""
    drops = sorted(p for p in SAMPLE_DROPS.iterdir() if p.is_dir())
    results = []
    try:
        with _flow_session():
            from flows.ingest import ingest_drop

            for drop in drops:
                results.append(ingest_drop(paths=[str(drop)], drop_id=f"sample-{drop.name}"))
    except SftflowError as exc:
        _fail(exc)
    final = results[-1]
    summary = {
        "drops": [{k: r.get(k) for k in INGEST_KEYS if k != "files"} for r in results],
        "dataset_version": final["dataset_version"],
        "dataset_rows": final["dataset_rows"],
        "workspace": str(Workspace.from_env().root),
    }
    human = "\n".join(_ingest_summary(r) for r in results) + (
        f"\n\nworkspace: {summary['workspace']}\nnext: sftflow datasets   (list dataset versions)"
    )
    _emit(summary, as_json, human)


def main() -> None:  # pragma: no cover - console entry point alias
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
