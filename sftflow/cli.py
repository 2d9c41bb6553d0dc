"""The `sftflow` command line.

Every command that produces something takes `--json` and then prints exactly one JSON object on
stdout; logs and progress go to stderr. Bad input exits with status 2 and a message that names the
fix; a drop rejected by its contract exits with status 1 (its report is still printed with --json).
Status 3: `sftflow drop` landed the drop but the Prefect server did not take its announcement (the
watcher announces it once the server answers), or `sftflow watch --once` left drops unannounced.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from schemas.quants import NAMES as QUANT_NAMES

# Only typer, the standard library and tiny modules at import time: `--help` and a command that fails on
# its arguments answer in a fraction of a second. Everything else (pydantic models, Prefect, the stages)
# is imported inside the command that needs it (bench/cli.py measures it; tests/test_cli_speed_contract.py
# checks which modules a failing command imports).
if TYPE_CHECKING:
    from foundation.artifacts import Artifact, DropReport, PipelineSummary, PublishResult
    from foundation.errors import SftflowError
    from foundation.workspace import Workspace

# tasks.ingest.formats.FORMAT_NAMES, spelt out for the help text (that module imports pydantic);
# tests/test_cli_speed_contract.py checks that the two agree.
FORMAT_NAMES = ("preference", "openai", "sharegpt", "alpaca", "prompt_completion", "text")

app = typer.Typer(
    help="sftflow: raw instruction drops -> validated datasets -> QLoRA SFT -> evaluated, published models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

SAMPLE_DROPS = Path(__file__).resolve().parent.parent / "data" / "drops"
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "flows" / "configs" / "tiny_cpu.yaml"

JsonOption = Annotated[bool, typer.Option("--json", help="Print one machine-readable JSON object on stdout.")]


def _emit(obj: dict | Artifact, as_json: bool, human: str) -> None:
    import orjson

    from foundation.artifacts import Artifact

    if isinstance(obj, Artifact):
        obj = obj.dump()
    if as_json:
        sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    else:
        sys.stdout.write(human + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def _flow_session() -> Iterator[Workspace]:
    """Prepare the workspace and Prefect's settings; keep anything a flow prints off stdout."""
    import atexit
    import gc

    from foundation.workspace import Workspace
    from sftflow.stack import configure_prefect_env

    # Registered before Prefect is imported, so it runs after Prefect's exit handlers (logs and events sent):
    # freezing the heap spares the interpreter's final collection of everything a flow imported (~1-2 s).
    atexit.register(gc.freeze)
    workspace = Workspace.from_env().ensure()
    configure_prefect_env(workspace)
    with contextlib.redirect_stdout(sys.stderr):
        yield workspace


def _fail(exc: SftflowError) -> None:
    from foundation.errors import DropRejectedError

    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(1 if isinstance(exc, DropRejectedError) else 2)


NOT_ANNOUNCED = 3  # exit status: the drop landed, its announcement did not reach the server


def _check_drop_sources(paths: list[str], drop_id: str | None) -> None:
    """The drop arguments' cheap checks, before the workspace and Prefect start (else a typo costs a
    flow run and its traceback): no http(s) URL, a valid --drop-id, and local paths and hf:// datasets
    that exist and hold data files. Other fsspec URLs are listed by the flow itself."""
    from foundation.errors import DropError
    from tasks.ingest.discovery import HF_SCHEME, check_drop_id, list_drop_files

    for path in paths:
        if path.lower().startswith(("http:/", "https:/")):
            raise DropError(f"{path}: an http(s) URL is not a drop source and sftflow never downloads; download "
                            "it first (e.g. curl -LO URL) and pass the local file or directory")
    if drop_id is not None:
        check_drop_id(drop_id)
    local = [p for p in paths if p.startswith(HF_SCHEME) or "://" not in p]
    if local:
        list_drop_files(local)


def _check_finished_run(run_id: str) -> None:
    """A run that evaluate, export and publish can start from, checked before Prefect starts (else a typo
    costs a temporary server and a flow run's traceback): the flows' own first check (RunStore.finished)."""
    from foundation.workspace import Workspace

    Workspace.from_env().check_layout().runs.finished(run_id)


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
        str, typer.Option("--format", help=f"{'|'.join(('auto', *FORMAT_NAMES))} (auto: detect per file).")
    ] = "auto",
    eval_ratio: Annotated[Optional[float], typer.Option(help="Share of rows held out for eval (default 0.1).")] = None,
    max_reject_rate: Annotated[
        Optional[float], typer.Option(help="Fail the drop when more than this share of rows is quarantined.")
    ] = None,
    max_chars: Annotated[Optional[int], typer.Option(help="Longest conversation accepted, in characters.")] = None,
    map_file: Annotated[Optional[str], typer.Option(
        "--map", metavar="FILE",
        help="A descriptor mapping the drop's columns, turn keys and roles: a drop.yaml, a LLaMA-Factory "
             "dataset_info.json or an Axolotl config (its datasets:). Default: the drop's own drop.yaml or "
             "dataset_info.json, if it has one.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Ingest a drop: read, validate (quarantining bad rows), dedup, split, write a dataset version."""
    from foundation.errors import DropRejectedError, SftflowError
    from tasks.ingest.formats import check_format

    try:
        _check_drop_sources(list(paths), drop_id)
        check_format(format)  # before the workspace and Prefect start: a ConfigError naming the choices
        from tasks.ingest.descriptor import check_descriptor

        check_descriptor(list(paths), map_file)  # likewise: a ConfigError naming the file and the key
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
            report = ingest_drop(paths=list(paths), drop_id=drop_id, config=config, descriptor=map_file)
    except DropRejectedError as exc:
        if as_json:
            _emit(_ingest_keys(exc.report) | {"error": exc.report.error}, True, "")
        _fail(exc)
    except SftflowError as exc:
        _fail(exc)
    from tasks.report import drop_text

    _emit(_ingest_keys(report), as_json, drop_text(report))


def _ingest_keys(report: DropReport) -> dict:
    """The report's INGEST_KEYS, each present (null when the report has no value for it), and the
    descriptor that mapped the drop when it had one."""
    fields = report.model_dump(mode="json")
    mapped = {"descriptor": fields["descriptor"]} if fields.get("descriptor") else {}
    return {k: fields[k] for k in INGEST_KEYS} | mapped


def _pydantic_message(exc: Exception) -> str:
    errors = getattr(exc, "errors", lambda: [])()
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors) or str(exc)


OverridesArgument = Annotated[Optional[list[str]], typer.Argument(
    metavar="[KEY=VALUE]...", help="Dotted key=value overrides, the same as --set (e.g. train.max_steps=20).")]
SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="KEY=VALUE", help="A dotted key=value override of the config (repeatable), e.g. --set train.max_steps=20.")]


def _overrides(positional: list[str] | None, options: list[str] | None) -> list[str]:
    """The overrides of a command that takes both forms: the positional ones, then the --set ones (a key given
    twice takes the last value)."""
    return [*(positional or []), *(options or [])]


config_app = typer.Typer(help="Run configs: check them before a run.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("validate")
def config_validate(
    file: Annotated[Path, typer.Argument(help="A run config YAML (e.g. flows/configs/tiny_cpu.yaml).")],
    overrides: OverridesArgument = None,
    override: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Validate a run config (with overrides) and report every error at once."""
    from foundation.errors import SftflowError
    from schemas.config import config_hash, load_run_config

    try:
        config = load_run_config(file, _overrides(overrides, override))
    except SftflowError as exc:
        _fail(exc)
    for warning in config.warnings():  # on stderr: the --json object on stdout keeps its shape
        typer.echo(f"warning: {warning}", err=True)
    resolved = config.model_dump(mode="json")
    _emit({"valid": True, "config_hash": config_hash(config), "config": resolved}, as_json,
          f"{file}: valid (config hash {config_hash(config)})")


@config_app.command("import")
def config_import(
    tool: Annotated[str, typer.Argument(help="The tool the config is for: axolotl or llamafactory.")],
    file: Annotated[Path, typer.Argument(help="Its training config YAML.")],
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Directory to write the run config and drops/<dataset>/drop.yaml into (default: ./<file stem>-sftflow).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite files of an earlier import.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Translate an Axolotl or LLaMA-Factory config into a run config and one drop descriptor per dataset;
    list what was mapped and what has no equivalent, and print the commands to ingest and train."""
    from foundation.errors import SftflowError
    from sftflow.config_import import import_config, report_text

    try:
        result = import_config(tool, file, out, force=force)
    except SftflowError as exc:
        _fail(exc)
    _emit(result.dump(), as_json, report_text(result))


@app.command()
def train(
    config_file: Annotated[Path, typer.Option("--config", help="Run config YAML, e.g. flows/configs/tiny_cpu.yaml.")],
    overrides: OverridesArgument = None,
    override: SetOption = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="Dataset version (default: the current one).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Resolve the model, tokenize the dataset and run the mask, EOS and memory gates, then print "
        "the memory estimate, optimizer steps, tokens and estimated time; start nothing.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Fine-tune a LoRA adapter on a dataset version (flow train_adapter; training runs in a subprocess)."""
    from foundation.errors import SftflowError
    from foundation.workspace import Workspace
    from schemas.config import load_run_config

    try:
        config = load_run_config(config_file, _overrides(overrides, override))
        # the flow's first check (prepare_run), before Prefect starts: an unknown --dataset, or none ingested yet
        Workspace.from_env().check_layout().datasets.find(dataset)
        if dry_run:
            from tasks.dry_run import dry_run as dry_run_training, dry_run_text

            with _flow_session():  # Prefect's settings under the workspace (the gates import it); no flow runs
                report = dry_run_training(config, dataset, log=lambda m: typer.echo(m, err=True))
            _emit(report, as_json, dry_run_text(report))
            return
        with _flow_session():
            from flows.train import train_adapter

            summary = train_adapter(config=config, dataset_version=dataset)
    except SftflowError as exc:
        _fail(exc)
    human = (
        f"run {summary.run_id} ({summary.engine} engine, dataset {summary.dataset_version})\n"
        f"  loss {summary.loss_first:.4f} -> {summary.loss_last:.4f} over {summary.global_step} steps, "
        f"{summary.trained_tokens} trained tokens at {summary.tokens_per_s} tokens/s, "
        f"peak memory {summary.peak_mem_gib:.2f} GiB\n"
        f"  adapter: {summary.adapter_dir}"
    )
    _emit(summary, as_json, human)


@app.command()
def evaluate(
    run: Annotated[str, typer.Option("--run", help="Run id (a directory under $SFTFLOW_HOME/runs).")],
    as_json: JsonOption = False,
) -> None:
    """Score base, candidate and champion on the held-out split; decide promotion (flow evaluate_adapter)."""
    from foundation.errors import SftflowError

    try:
        _check_finished_run(run)
        with _flow_session():
            from flows.evaluate import evaluate_adapter

            result = evaluate_adapter(run_id=run)
    except SftflowError as exc:
        _fail(exc)
    from schemas.metrics import NAMES as metrics

    rows = [f"  {'model':<10}" + "".join(f"{m:>12}" for m in metrics)]
    for model, scores in result.scores.items():
        rows.append(f"  {model:<10}" + "".join(f"{'-' if scores[m] is None else scores[m]:>12}" for m in metrics))
    decision = result.decision
    human = "\n".join([f"run {run}: {'PROMOTE' if decision.promote else 'do not promote'}", *rows,
                       f"  {decision.reason}"])
    _emit(result, as_json, human)


@app.command()
def export(
    run: Annotated[str, typer.Option("--run", help="Run id of a finished training run.")],
    quant: Annotated[Optional[str], typer.Option(
        "--quant", help=f"Comma list of {','.join(QUANT_NAMES)} (default: the config's).")] = None,
    ollama: Annotated[Optional[str], typer.Option(
        "--ollama", metavar="NAME", help="Then create Ollama model NAME from the export's Modelfile (ollama create "
        "NAME -f Modelfile) when ollama is on PATH; else print the command to run.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Merge the adapter, write GGUF files with llama.cpp's tools, check each against the HF model."""
    from foundation.errors import ConfigError, SftflowError

    quants = [q.strip() for q in quant.split(",")] if quant else None
    if quants and not set(quants) <= set(QUANT_NAMES):
        _fail(ConfigError(f"--quant {quant}: choose from {', '.join(QUANT_NAMES)}"))
    try:
        if ollama is not None:
            from tasks.export.ollama import check_model_name

            check_model_name(ollama)
        _check_finished_run(run)
        with _flow_session():
            from flows.export import export_model

            result = export_model(run_id=run, quants=quants)
    except SftflowError as exc:
        _fail(exc)
    lines = [f"exported {run}: {result.gguf_dir}"]
    for kind, p in result.parity.items():
        lines.append(f"  {kind:<17} KL {p.kl:.2e}  top-1 {p.top1:.3f}  greedy {p.greedy_text()}  "
                     f"ids {'equal' if p.token_ids_equal == 1 else 'DIFFER'}")
    if ollama is None:
        _emit(result, as_json, "\n".join(lines))
        return
    from tasks.export.ollama import OllamaError, create_model

    try:
        created = create_model(ollama, Path(result.modelfile))
    except OllamaError as exc:
        if as_json:
            _emit(result.dump() | {"ollama": {"name": ollama, "created": False, "error": str(exc)}}, True, "")
        _fail(exc)
    lines.append(f"ollama: created {ollama} (ollama run {ollama})" if created["created"] else
                 f"ollama: {created['reason']}; create the model with:\n  {created['command']}")
    _emit(result.dump() | {"ollama": created}, as_json, "\n".join(lines))


@app.command()
def publish(
    run: Annotated[str, typer.Option("--run", help="Run id of an evaluated training run.")],
    as_json: JsonOption = False,
) -> None:
    """Publish an evaluated run to the registry; it becomes the champion if evaluation said promote."""
    from foundation.errors import SftflowError

    try:
        _check_finished_run(run)
        with _flow_session():
            from flows.publish import publish_model

            result = publish_model(run_id=run)
    except SftflowError as exc:
        _fail(exc)
    state = "champion" if result.promoted else f"not promoted (champion: {result.champion or 'none'})"
    _emit(result, as_json, f"published {result.name} {result.version}: {state}\n  {result.path}")


@app.command()
def chat(
    model: Annotated[Optional[str], typer.Option("--model", help="NAME[@VERSION] (default: the champion).")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.95,
    max_tokens: Annotated[int, typer.Option(help="Longest reply in tokens.")] = 256,
    system: Annotated[Optional[str], typer.Option(help="A system message for the conversation.")] = None,
) -> None:
    """Chat with a published model's GGUF (one line per turn; an empty line or EOF ends)."""
    from foundation.errors import SftflowError
    from foundation.workspace import Workspace
    from tasks.serve import load_chat_model, published_gguf

    try:
        gguf = published_gguf(Workspace.from_env(), model)
    except SftflowError as exc:
        _fail(exc)
    typer.echo(f"chatting with {gguf} (empty line to end)", err=True)
    llm = load_chat_model(gguf)
    messages = [{"role": "system", "content": system}] if system else []
    for line in sys.stdin:
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.rstrip("\n")})
        reply = llm.create_chat_completion(messages, temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        text = reply["choices"][0]["message"]["content"]
        messages.append({"role": "assistant", "content": text})
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


@app.command()
def serve(
    model: Annotated[Optional[str], typer.Option("--model", help="NAME[@VERSION] (default: the champion).")] = None,
    host: Annotated[str, typer.Option(
        help="Address to listen on. Anything but loopback (127.0.0.1, ::1, localhost) needs an API key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    n_ctx: Annotated[int, typer.Option("--n-ctx", min=0, help="Context length in tokens (0: the model's own).")] = 0,
    n_gpu_layers: Annotated[int, typer.Option(
        "--n-gpu-layers", min=-1, help="Layers offloaded to the GPU (-1: all; 0: none, CPU only).")] = 0,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", help="Require this key of every request (Authorization: Bearer KEY); default "
        "$SFTFLOW_SERVE_API_KEY. Never printed.")] = None,
) -> None:
    """Serve a published model's GGUF as an OpenAI-compatible chat API (llama-cpp-python's server), on
    loopback unless --host says otherwise (and then only with an API key)."""
    from foundation.errors import SftflowError
    from foundation.settings import settings
    from foundation.workspace import Workspace
    from tasks.serve import check_exposure, published_gguf, server_command, server_env

    api_key = api_key or settings().serve_api_key
    try:
        check_exposure(host, api_key)
        gguf = published_gguf(Workspace.from_env(), model)
    except SftflowError as exc:
        _fail(exc)
    command = server_command(gguf, port, host=host, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers)
    address = f"[{host}]" if ":" in host else host
    typer.echo(f"serving {gguf} at http://{address}:{port}/v1 (OpenAI-compatible; "
               f"{'API key required' if api_key else 'no API key'}; Ctrl-C stops)", err=True)
    os.execve(command[0], command, server_env(dict(os.environ), api_key))


models_app = typer.Typer(help="Published models in the registry ($SFTFLOW_HOME/registry).", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("verify")
def models_verify(
    model: Annotated[Optional[str], typer.Argument(
        metavar="NAME[@VERSION]", help="A published model (default: the only one); VERSION defaults to the "
        "champion, else the newest.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Check every file of a published version against its manifest: its sha256, and that it lies inside the
    version directory (ok / mismatch / missing / outside / unlisted); exit 2 when any fails."""
    from foundation.errors import SftflowError
    from foundation.workspace import Workspace

    try:
        version = Workspace.from_env().check_layout().registry.resolve(model)
        checks = version.verify()
    except SftflowError as exc:
        _fail(exc)
    name, failed = version.root.parent.name, [c for c in checks if not c.ok]
    result = {"name": name, "version": version.version, "path": str(version.root), "ok": not failed,
              "files": [c.dump() for c in checks]}
    human = "\n".join([f"{name}@{version.version} ({version.root})",
                       *(f"  {c.status:<9} {c.path}" + (f"  ({c.detail})" if c.detail else "") for c in checks)])
    _emit(result, as_json, human)
    if failed:
        more = f" (and {len(failed) - 1} more above)" if len(failed) > 1 else ""
        typer.echo(f"error: {failed[0].detail}{more}", err=True)
        raise typer.Exit(2)


def _inspect(reader: str, *args, as_json: bool) -> None:
    """Print what `sftflow.inspect_commands.<reader>(workspace, *args)` read from the workspace's files."""
    from foundation.errors import SftflowError
    from foundation.workspace import Workspace
    from sftflow import inspect_commands

    try:
        result, human = getattr(inspect_commands, reader)(Workspace.from_env().check_layout(), *args)
    except SftflowError as exc:
        _fail(exc)
    _emit(result, False, inspect_commands.json_line(result) if as_json else human)


datasets_app = typer.Typer(help="Dataset versions: list them (the default), show one, compare two.")
app.add_typer(datasets_app, name="datasets")


@datasets_app.callback(invoke_without_command=True)
def datasets(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List the dataset versions in the workspace, newest first, and which one is current."""
    if ctx.invoked_subcommand is None:
        _inspect("datasets_list", as_json=as_json)


@datasets_app.command("list")
def datasets_list(as_json: JsonOption = False) -> None:
    """List the dataset versions in the workspace, newest first, and which one is current (* marks it)."""
    _inspect("datasets_list", as_json=as_json)


@datasets_app.command("show")
def datasets_show(version: Annotated[str, typer.Argument(help="A dataset version (ds-...).")],
                  as_json: JsonOption = False) -> None:
    """A dataset version's manifest: rows per split, the drops it holds, its parent, when it was created."""
    _inspect("dataset_show", version, as_json=as_json)


@datasets_app.command("diff")
def datasets_diff(a: Annotated[str, typer.Argument(help="The older dataset version.")],
                  b: Annotated[str, typer.Argument(help="The newer dataset version.")],
                  as_json: JsonOption = False) -> None:
    """Rows added and removed from A to B (by row id), per drop."""
    _inspect("dataset_diff", a, b, as_json=as_json)


runs_app = typer.Typer(help="Training runs ($SFTFLOW_HOME/runs): what each one holds.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")


@runs_app.command("list")
def runs_list(as_json: JsonOption = False) -> None:
    """Every run, newest first: status, engine, loss (first -> last), tokens/s, dataset, eval decision, GGUFs."""
    _inspect("runs_list", as_json=as_json)


@runs_app.command("show")
def runs_show(run: Annotated[str, typer.Argument(help="A run id (sftflow runs list).")],
              as_json: JsonOption = False) -> None:
    """One run: status, engine, loss, tokens/s, dataset version, eval decision, exports, adapter, publishes."""
    _inspect("run_show", run, as_json=as_json)


@models_app.command("list")
def models_list(as_json: JsonOption = False) -> None:
    """Every published model: its versions and its champion."""
    _inspect("models_list", as_json=as_json)


@models_app.command("show")
def models_show(model: Annotated[str, typer.Argument(
        metavar="NAME[@VERSION]", help="A published model; VERSION defaults to the champion, else the newest.")],
        as_json: JsonOption = False) -> None:
    """A published version: its run, dataset, evaluation, GGUFs, and the model's champion moves."""
    _inspect("model_show", model, as_json=as_json)


ReasonOption = Annotated[Optional[str], typer.Option("--reason", help="Why (recorded in the registry's log).")]


@models_app.command("promote")
def models_promote(model: Annotated[str, typer.Argument(metavar="NAME@VERSION", help="The version to promote.")],
                   reason: ReasonOption = None, as_json: JsonOption = False) -> None:
    """Make a version the champion (it must check against its manifest); logs who, when, from -> to and why."""
    _inspect("model_promote", model, reason, as_json=as_json)


@models_app.command("rollback")
def models_rollback(name: Annotated[str, typer.Argument(help="A published model.")],
                    reason: ReasonOption = None, as_json: JsonOption = False) -> None:
    """Move the champion back to the previous one; logs who, when, from -> to and why."""
    _inspect("model_rollback", name, reason, as_json=as_json)


@app.command("quarantine")
def quarantine(
    drop_id: Annotated[str, typer.Argument(metavar="DROP", help="An ingested drop's id.")],
    limit: Annotated[int, typer.Option("--limit", help="Rows shown per reason.")] = 3,
    as_json: JsonOption = False,
) -> None:
    """Why a drop's rows were quarantined: each reason with its count and its first rows (raw text escaped)."""
    _inspect("quarantine", drop_id, limit, as_json=as_json)


def _print_version(value: bool) -> None:
    if value:
        from importlib import metadata

        try:
            typer.echo(metadata.version("sftflow"))
        except metadata.PackageNotFoundError:
            typer.echo("unknown")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="Print sftflow's version and exit.")] = False) -> None:
    pass


def _chat_hint(published: PublishResult | None) -> str:
    if not published:
        return "sftflow chat   (talks to the champion, if there is one)"
    return (f"sftflow chat --model {published.name}@{published.version}   (the GGUF through llama.cpp)\n"
            f"  or with peft: PeftModel.from_pretrained(base, '{published.path}/adapter')")


def _pipeline_summary(result: PipelineSummary, workspace: Workspace) -> str:
    from tasks.report import pipeline_text

    return (f"{pipeline_text(result)}\n\nworkspace: {workspace.root}\n"
            f"chat with it: {_chat_hint(result.published)}")


@app.command()
def demo(as_json: JsonOption = False) -> None:
    """Run the whole pipeline (flow sft_pipeline) on the bundled sample drops with the tiny local model
    and no server: ingest every drop in data/drops, fine-tune a LoRA adapter (flows/configs/tiny_cpu.yaml),
    evaluate it against the base (and the champion), export GGUF files with parity checks, publish."""
    from foundation.errors import SftflowError

    drops = sorted(str(p) for p in SAMPLE_DROPS.iterdir() if p.is_dir())
    try:
        with _flow_session() as workspace:
            from flows.pipeline import sft_pipeline

            result = sft_pipeline(drops=drops, config=str(DEMO_CONFIG))
    except SftflowError as exc:
        _fail(exc)
    output = result.dump() | {"workspace": str(workspace.root), "chat": _chat_hint(result.published)}
    _emit(output, as_json, _pipeline_summary(result, workspace))


@app.command()
def pipeline(
    drops: Annotated[Optional[list[str]], typer.Argument(help="Drops to ingest first (paths or fsspec URLs).")] = None,
    config_file: Annotated[Path, typer.Option("--config", help="Run config YAML.")] = DEMO_CONFIG,
    override: SetOption = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="Dataset version (default: the current one).")] = None,
    force: Annotated[bool, typer.Option(help="Train even if this dataset version was trained with this config.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Run flow sft_pipeline: ingest the given drops, then train, evaluate, export and publish if promoted."""
    from foundation.errors import SftflowError

    from schemas.config import load_run_config

    try:
        _check_drop_sources(list(drops or []), None)
        overrides = _redacted_overrides(override or [])
        load_run_config(config_file.absolute(), overrides)  # the flow's first check, before Prefect starts
        with _flow_session() as workspace:
            from flows.pipeline import sft_pipeline

            result = sft_pipeline(drops=list(drops or []), config=str(config_file.absolute()),
                                  overrides=overrides, dataset_version=dataset, force=force)
    except SftflowError as exc:
        _fail(exc)
    _emit(result, as_json, _pipeline_summary(result, workspace))


def _redacted_overrides(overrides: list[str]) -> list[str]:
    """Overrides as the flow run's parameters may record them: a URL's credentials replaced by *** (this
    process remembers the real URL, and publishing uses it: foundation.credentials)."""
    from foundation.credentials import redact_url, remember_url

    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        remember_url(value)
        out.append(f"{key}{sep}{redact_url(value)}" if sep else item)
    return out


@app.command()
def drop(
    path: Annotated[Path, typer.Argument(help="A drop: a directory of data files, or one file.")],
    drop_id: Annotated[Optional[str], typer.Option(help="Name in the landing zone (default: the path's name).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Copy a drop into the landing zone ($SFTFLOW_HOME/landing) and announce it (sftflow.drop.landed).

    Exit status 3 when the drop landed but the server did not take the announcement: the watcher
    announces it once the server answers."""
    from foundation.errors import ConfigError, SftflowError

    undelivered = None
    source = str(path).replace(":/", "://", 1) if str(path).startswith(("http:/", "https:/", "hf:/")) else str(path)
    try:
        if source.startswith("hf://"):
            raise ConfigError(f"{source}: sftflow drop copies local files; ingest a dataset of the Hugging Face "
                              "cache directly: sftflow ingest hf://datasets/ORG/NAME")
        _check_drop_sources([source], drop_id)
        with _flow_session() as workspace:
            from tasks.landing import DeliveryError, announce, land_drop

            landed = land_drop(workspace, path, drop_id)
            try:
                record = announce(workspace, landed) if os.environ.get("PREFECT_API_URL") else None
            except DeliveryError as exc:
                record, undelivered = None, exc
    except SftflowError as exc:
        _fail(exc)
    result = {"drop_id": landed.drop_id, "path": str(landed.path), "files": len(landed.files),
              "announced": record is not None, "event_id": str(landed.event_id)}
    if undelivered is not None:
        if as_json:
            _emit(result | {"error": str(undelivered)}, True, "")
        typer.echo(f"error: drop {landed.drop_id} landed in {landed.path} but was not announced: {undelivered}; "
                   "the watcher (`sftflow up` starts it) announces it once the server answers, or announce it "
                   "then with: sftflow watch --once", err=True)
        raise typer.Exit(NOT_ANNOUNCED)
    if record is not None:
        human = f"landed {landed.drop_id} in {landed.path} and announced it (event {landed.event_id})"
    elif os.environ.get("PREFECT_API_URL"):
        human = f"{landed.drop_id} was landed and announced before: nothing to do"
    else:
        human = (f"landed {landed.drop_id} in {landed.path}; no Prefect server runs for this workspace, so it was not "
                 "announced: `sftflow up` starts the stack and its watcher announces it, or ingest it directly "
                 f"with: sftflow ingest {landed.path}")
    _emit(result, as_json, human)


@app.command()
def watch(
    interval: Annotated[float, typer.Option(help="Seconds between scans of the landing zone.")] = 5.0,
    quiet_seconds: Annotated[float, typer.Option(help="A drop without _SUCCESS is complete once unchanged this long.")] = 30.0,
    once: Annotated[bool, typer.Option("--once", help="Scan once, print what was announced, and exit.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Announce each new, complete drop in the landing zone once (event sftflow.drop.landed -> ingest).

    A bad entry is refused (its reason under landing/.refused/) and the watch goes on; while the server
    cannot be reached, drops wait and are tried again after a growing pause (up to a minute). With
    --once, exit status 3 when some complete drop could not be announced."""
    from foundation.errors import SftflowError

    with _flow_session() as workspace:
        from tasks.landing import watch_landing

        if not os.environ.get("PREFECT_API_URL"):
            _fail(SftflowError("no Prefect server to announce drops to: start the stack with `sftflow up` "
                               "(it runs the watcher), or set PREFECT_API_URL"))
        typer.echo(f"watching {workspace.landing_dir} every {interval:g} s (quiet period {quiet_seconds:g} s)", err=True)
        result = watch_landing(workspace, interval, quiet_seconds, once=once, log=lambda m: typer.echo(m, err=True))
    _emit(result, as_json, f"announced {len(result['announced'])}, waiting {len(result['waiting'])}, "
                           f"refused {len(result['refused'])}, not announced {len(result['pending'])}")
    if result["pending"]:
        typer.echo(f"error: {len(result['pending'])} drop(s) not announced ({result['delivery_error']}); run "
                   "`sftflow watch --once` again once the server answers (`sftflow status` shows it)", err=True)
        raise typer.Exit(NOT_ANNOUNCED)


@app.command()
def up(
    port: Annotated[int, typer.Option(help="Loopback port of the Prefect server and dashboard.")] = 4200,
    database_url: Annotated[Optional[str], typer.Option(
        help="PostgreSQL URL for the server (postgresql+asyncpg://...; default $SFTFLOW_DATABASE_URL, else SQLite "
             "under the workspace).")] = None,
    watch: Annotated[bool, typer.Option(help="Also start the landing-zone watcher.")] = True,
    quiet_seconds: Annotated[float, typer.Option(help="The watcher's quiet period for drops without _SUCCESS.")] = 30.0,
    as_json: JsonOption = False,
) -> None:
    """Start a local Prefect server, the cpu and gpu pools with a worker each, the deployments and the watcher."""
    from foundation.errors import SftflowError
    from foundation.settings import settings
    from foundation.workspace import Workspace
    from sftflow.stack import up as stack_up

    workspace = Workspace.from_env()
    try:
        state = stack_up(workspace, port=port, database_url=database_url or settings().database_url, watch=watch, quiet_seconds=quiet_seconds,
                         log=lambda m: typer.echo(m, err=True))
    except SftflowError as exc:
        _fail(exc)
    human = (f"dashboard: {state['dashboard_url']}\n"
             f"  API {state['api_url']} ({state['database']}); workers on pools cpu and gpu"
             f"{'; watcher on ' + str(workspace.landing_dir) if watch else ''}\n"
             f"  logs: {workspace.stack_logs}\n"
             f"  drop data in with: sftflow drop PATH      stop with: sftflow down")
    _emit(state, as_json, human)


@app.command()
def status(as_json: JsonOption = False) -> None:
    """Show the local stack: processes, server health, pools and workers, latest flow runs."""
    from foundation.workspace import Workspace
    from sftflow.stack import status as stack_status

    result = stack_status(Workspace.from_env())
    if "processes" not in result:
        _emit(result, as_json, result["message"])
        return
    lines = [f"dashboard {result['dashboard_url']}  API {'healthy' if result['api_healthy'] else 'DOWN'}"]
    lines += [f"  {name:<11} pid {p['pid']:<8} {'running' if p['alive'] else 'stopped'}  {p['log']}"
              for name, p in result["processes"].items()]
    for pool, info in result.get("work_pools", {}).items():
        workers = ", ".join(f"{w['name']} ({w['status']})" for w in info["workers"]) or "no workers"
        lines.append(f"  pool {pool:<6} {info['status']:<10} {workers}")
    lines += [f"  {r['flow']:<18} {r['name']:<28} {r['state']}" for r in result.get("latest_flow_runs", [])]
    if nxt := result.get("next_scheduled"):
        lines.append(f"  next scheduled: {nxt['flow']} at {nxt['expected_start']}")
    _emit(result, as_json, "\n".join(lines))


@app.command()
def down(as_json: JsonOption = False) -> None:
    """Stop what `sftflow up` started from this workspace (by pid; nothing else)."""
    from foundation.workspace import Workspace
    from sftflow.stack import down as stack_down

    result = stack_down(Workspace.from_env())
    _emit(result, as_json, result.get("message") or f"stopped: {', '.join(result['stopped']) or 'nothing was running'}")
