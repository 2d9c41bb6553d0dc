"""What the `sftflow runs / models / datasets / quarantine` commands show: read from the workspace's files.

Each function takes the workspace (and the command's arguments) and returns (the `--json` object, the
human-readable text). They read the stores' files only: no Prefect, torch, transformers or GX is imported,
so the commands answer in well under a second. A name that is not there raises NotFoundError listing what is.
Text that came from a drop (file names, details, raw rows) is shown through `safe_text`: bounded, and with
control and formatting characters escaped, so a hostile row cannot move the cursor or hide text.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from foundation.artifacts import EndEvent, ErrorEvent, LogEvent, WorkerSpec, parse_event
from foundation.errors import NotFoundError, SftflowError, WorkspaceError
from foundation.stores.registry import ChampionMove, champion_history, read_champion_log
from foundation.stores.runs import RunDir
from foundation.workspace import Workspace

RAW_CHARS = 200  # the longest raw text shown per quarantined row (then "…")
FIELD_CHARS = 300  # the longest file name or details shown


# -- text from a drop, shown safely ------------------------------------------------------------------


def _escape(char: str) -> str:
    code = ord(char)
    if char == "\\":
        return "\\\\"
    if char == "\n":
        return "\\n"
    if char == "\t":
        return "\\t"
    if char == "\r":
        return "\\r"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _unsafe(char: str) -> bool:
    """Control (C0, DEL, C1), formatting (bidi overrides, zero-width), line/paragraph separators, unassigned."""
    return char == "\\" or unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")


def truncate(text: str, limit: int) -> tuple[str, bool]:
    return (text, False) if len(text) <= limit else (text[:limit], True)


def safe_text(text: str, limit: int = RAW_CHARS) -> str:
    """`text` cut to `limit` characters (then "…") with every control or formatting character escaped
    (\\x1b, \\n, \\u202e ...), on one line."""
    cut, more = truncate(text, limit)
    return "".join(_escape(c) if _unsafe(c) else c for c in cut) + ("…" if more else "")


def json_line(obj: dict) -> str:
    """One JSON object on one line, with formatting characters (bidi overrides, zero-width, line separators)
    written as \\u escapes too: the same JSON value, but nothing in it can hide text on a terminal."""
    import orjson

    def escape(char: str) -> str:
        units = char.encode("utf-16-be")
        return "".join(f"\\u{int.from_bytes(units[i:i + 2], 'big'):04x}" for i in range(0, len(units), 2))

    text = orjson.dumps(obj).decode()
    return "".join(escape(c) if ord(c) > 0x7F and _unsafe(c) else c for c in text)


def _names(things: list[str]) -> str:
    if not things:
        return "none"
    return ", ".join(things[:20]) + (f" (and {len(things) - 20} more)" if len(things) > 20 else "")


# -- runs --------------------------------------------------------------------------------------------


def _run_ids(workspace: Workspace) -> list[RunDir]:
    """Run directories, newest first (by modification time)."""
    root = workspace.runs_dir
    if not root.is_dir():
        return []
    found = [RunDir(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(found, key=lambda r: (r.root.stat().st_mtime, r.run_id), reverse=True)


def _pid_alive(path: Path) -> bool:
    try:
        pid = int(path.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


def _published_as(workspace: Workspace) -> dict[str, list[str]]:
    """run id -> the registry versions (NAME@VERSION) it was published as."""
    registry = workspace.registry
    published: dict[str, list[str]] = {}
    for name in registry.names():
        for version in registry.versions(name):
            try:
                published.setdefault(version.manifest().run_id, []).append(f"{name}@{version.version}")
            except SftflowError:
                continue  # an unreadable manifest: `sftflow models verify` reports it
    return published


def _events(run: RunDir) -> list:
    """The run's training events; a last line without its newline (a write in progress) is left out."""
    if not run.progress.is_file():
        return []
    text = run.progress.read_text(errors="replace")
    lines = text.split("\n")
    complete, torn = lines[:-1], lines[-1]
    events = []
    for number, line in enumerate(complete, start=1):
        if line.strip():
            try:
                events.append(parse_event(line, f"{run.progress}, line {number}"))
            except ValueError as exc:
                raise WorkspaceError(str(exc)) from None
    if torn.strip():
        try:
            events.append(parse_event(torn, str(run.progress)))
        except ValueError:
            pass
    return events


def run_summary(run: RunDir, published: dict[str, list[str]]) -> dict:
    """What a run directory holds: its status, engine, loss, speed, data, evaluation, exports and adapter."""
    summary: dict = {"run_id": run.run_id, "path": str(run.root), "status": None, "engine": None,
                     "loss_first": None, "loss_last": None, "tokens_per_s": None, "global_step": None,
                     "dataset_version": None, "eval": None, "exports": None, "adapter": None,
                     "published": published.get(run.run_id, [])}
    if run.finished:
        manifest = run.manifest()
        summary.update(status="trained", engine=manifest.engine, loss_first=manifest.loss_first,
                       loss_last=manifest.loss_last, tokens_per_s=manifest.tokens_per_s,
                       global_step=manifest.global_step, dataset_version=manifest.dataset_version,
                       adapter=manifest.adapter_dir)
    else:
        events = _events(run)
        losses = [e.loss for e in events if isinstance(e, LogEvent)]
        logs = [e for e in events if isinstance(e, LogEvent)]
        failed = [e for e in events if isinstance(e, ErrorEvent)]
        ended = any(isinstance(e, EndEvent) for e in events)
        if run.worker_spec.exists():
            summary["engine"] = WorkerSpec.read(run.worker_spec).engine
        summary.update(loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
                       global_step=logs[-1].step if logs else None,
                       tokens_per_s=(round(logs[-1].trained_tokens / logs[-1].elapsed_s, 1)
                                     if logs and logs[-1].elapsed_s > 0 else None))
        if failed and not ended:
            summary.update(status="failed", error=failed[-1].message)
        elif _pid_alive(run.worker_pid):
            summary["status"] = "training"
        else:
            summary["status"] = "unfinished"  # stopped before its manifest: `sftflow train` again resumes it
    report = run.eval_report()
    if report is not None:
        summary["status"] = "evaluated" if summary["status"] == "trained" else summary["status"]
        summary["eval"] = {"promote": report.decision.promote, "primary_metric": report.decision.primary_metric,
                           "reason": report.decision.reason,
                           "candidate": report.scores.get("candidate", {}).get(report.decision.primary_metric)}
    export = run.export_report()
    if export is not None:
        if export.passed and summary["status"] in ("trained", "evaluated"):
            summary["status"] = "exported"
        summary["exports"] = {"passed": export.passed, "quants": sorted(export.files or {}),
                              "gguf_dir": export.gguf_dir}
    if summary["published"] and summary["status"] in ("trained", "evaluated", "exported"):
        summary["status"] = "published"
    return summary


def _loss(summary: dict) -> str:
    first, last = summary["loss_first"], summary["loss_last"]
    return f"{first:.3f} -> {last:.3f}" if first is not None and last is not None else "-"


def _decision(summary: dict) -> str:
    if summary["eval"] is None:
        return "-"
    return "promote" if summary["eval"]["promote"] else "keep"


def runs_list(workspace: Workspace) -> tuple[dict, str]:
    published = _published_as(workspace)
    runs = []
    for run in _run_ids(workspace):
        try:
            runs.append(run_summary(run, published))
        except (SftflowError, OSError) as exc:  # one unreadable run does not hide the others
            runs.append({"run_id": run.run_id, "path": str(run.root), "status": "unreadable", "error": str(exc),
                         "engine": None, "loss_first": None, "loss_last": None, "tokens_per_s": None,
                         "dataset_version": None, "eval": None, "exports": None})
    lines = [f"{r['run_id']}  {r['status']:<10}  {r['engine'] or '-':<8}  loss {_loss(r):<15}  "
             f"{(str(r['tokens_per_s']) + ' tok/s') if r['tokens_per_s'] is not None else '-':<14}  "
             f"{r['dataset_version'] or '-'}  eval {_decision(r)}  "
             f"gguf {','.join(r['exports']['quants']) if r['exports'] else '-'}" for r in runs]
    return {"runs": runs}, "\n".join(lines) or f"no training runs in {workspace.runs_dir}"


def run_show(workspace: Workspace, run_id: str) -> tuple[dict, str]:
    runs = {r.run_id: r for r in _run_ids(workspace)}
    if run_id not in runs:
        raise NotFoundError(f"no training run {run_id!r} in {workspace.runs_dir}; runs: {_names(list(runs))} "
                            "(list them with: sftflow runs list)")
    r = run_summary(runs[run_id], _published_as(workspace))
    lines = [f"run {r['run_id']}  ({r['path']})", f"  status      {r['status']}" +
             (f": {safe_text(r['error'])}" if r.get("error") else ""),
             f"  engine      {r['engine'] or '-'}", f"  loss        {_loss(r)} (step {r['global_step'] or '-'})",
             f"  tokens/s    {r['tokens_per_s'] if r['tokens_per_s'] is not None else '-'}",
             f"  dataset     {r['dataset_version'] or '-'}"]
    if r["eval"]:
        e = r["eval"]
        lines.append(f"  eval        {_decision(r)} ({e['primary_metric']} {e['candidate']}): {e['reason']}")
    else:
        lines.append("  eval        - (not evaluated: sftflow evaluate --run " + r["run_id"] + ")")
    if r["exports"]:
        lines.append(f"  gguf        {', '.join(r['exports']['quants']) or '-'} "
                     f"({'passed' if r['exports']['passed'] else 'failed'} parity)")
    else:
        lines.append("  gguf        -")
    lines += [f"  adapter     {r['adapter'] or '-'}", f"  published   {', '.join(r['published']) or '-'}"]
    return r, "\n".join(lines)


# -- models ------------------------------------------------------------------------------------------


def _model_names(workspace: Workspace) -> list[str]:
    return workspace.registry.names()


def _model(workspace: Workspace, name: str) -> str:
    names = _model_names(workspace)
    if name not in names:
        raise NotFoundError(f"no model {name!r} in {workspace.registry_dir}; published: {_names(names)} "
                            "(publish one with: sftflow publish --run RUN_ID)")
    return name


def _version_name(workspace: Workspace, name: str, version: str) -> str:
    versions = [v.version for v in workspace.registry.versions(name)]
    if version not in versions:
        raise NotFoundError(f"no version {version!r} of {name}; versions: {_names(versions)} "
                            f"(list them with: sftflow models show {name})")
    return version


def split_spec(spec: str, need_version: bool) -> tuple[str, str | None]:
    name, at, version = spec.partition("@")
    if need_version and not version:
        raise NotFoundError(f"{spec!r} names no version; write NAME@VERSION, e.g. {name or 'NAME'}@v0001")
    if at and not version:
        raise NotFoundError(f"{spec!r} ends with '@'; write NAME or NAME@VERSION")
    return name, version or None


def _version_row(version, champion: str | None) -> dict:
    manifest = version.manifest()
    return {"version": version.version, "run_id": manifest.run_id, "dataset_version": manifest.dataset_version,
            "published_at": manifest.published_at, "promoted_at_publish": manifest.promoted,
            "champion": version.version == champion}


def models_list(workspace: Workspace) -> tuple[dict, str]:
    registry = workspace.registry
    models, lines = [], []
    for name in registry.names():
        champion = registry.champion(name)
        versions = [_version_row(v, champion) for v in registry.versions(name)]
        models.append({"name": name, "champion": champion, "versions": versions})
        lines.append(f"{name}  champion {champion or '-'}  versions {len(versions)}"
                     + (f" (newest {versions[-1]['version']})" if versions else ""))
    return {"models": models}, "\n".join(lines) or f"no published models in {workspace.registry_dir}"


def model_show(workspace: Workspace, spec: str) -> tuple[dict, str]:
    name, version = split_spec(spec, need_version=False)
    _model(workspace, name)
    registry = workspace.registry
    champion = registry.champion(name)
    versions = registry.versions(name)
    if version is None:
        if not versions:
            raise NotFoundError(f"model {name} has no complete version in {registry.model_dir(name)}")
        version = champion or versions[-1].version
    found = registry.version(name, _version_name(workspace, name, version))
    manifest = found.manifest()
    result = {"name": name, "path": str(found.root), **_version_row(found, champion),
              "champion_now": champion, "versions": [v.version for v in versions],
              "eval": None, "exports": None, "run": None,
              "champion_log": [m.dump() for m in read_champion_log(registry, name)][-10:]}
    if found.eval_path.is_file():
        from foundation.artifacts import EvalReport

        report = EvalReport.read(found.eval_path)
        result["eval"] = {"promote": report.decision.promote, "primary_metric": report.decision.primary_metric,
                          "reason": report.decision.reason, "scores": report.scores}
    gguf = sorted(p for p in manifest.files if p.startswith("gguf/") and p.endswith(".gguf"))
    result["exports"] = {"gguf": gguf}
    if found.run_manifest_path.is_file():
        run = found.run_manifest()
        result["run"] = {"engine": run.engine, "model_path": run.model_path, "loss_first": run.loss_first,
                         "loss_last": run.loss_last, "tokens_per_s": run.tokens_per_s,
                         "global_step": run.global_step}
    lines = [f"{name}@{found.version}  ({found.root})" + ("  [champion]" if result["champion"] else ""),
             f"  run         {result['run_id']}", f"  dataset     {result['dataset_version']}",
             f"  published   {result['published_at']}"]
    if result["run"]:
        r = result["run"]
        lines.append(f"  base        {r['model_path']} ({r['engine']}, loss {_loss(r)})")
    if result["eval"]:
        e = result["eval"]
        lines.append(f"  eval        {'promote' if e['promote'] else 'keep'} ({e['primary_metric']}): {e['reason']}")
    lines.append(f"  gguf        {', '.join(Path(g).name for g in gguf) or '-'}")
    lines.append(f"  versions    {', '.join(result['versions'])} (champion {champion or '-'})")
    for move in result["champion_log"]:
        lines.append(f"  {move['at']}  {move['action']:<8} {move['from'] or '-'} -> {move['to']}  by {move['user']}"
                     + (f": {safe_text(move['reason'])}" if move["reason"] else ""))
    return result, "\n".join(lines)


def _move_result(name: str, move: ChampionMove | None, champion: str, history: list[str]) -> dict:
    return {"name": name, "champion": champion, "changed": move is not None,
            "move": move.dump() if move else None, "history": history}


def model_promote(workspace: Workspace, spec: str, reason: str | None) -> tuple[dict, str]:
    from foundation.stores.registry import promote

    name, version = split_spec(spec, need_version=True)
    _model(workspace, name)
    _version_name(workspace, name, version)
    move = promote(workspace.registry, name, version, reason)
    result = _move_result(name, move, version, champion_history(workspace.registry, name))
    human = (f"{name}: champion {move.from_version or '-'} -> {move.to_version} (logged by {move.user})" if move
             else f"{name}: {version} is already the champion; nothing changed")
    return result, human


def model_rollback(workspace: Workspace, name: str, reason: str | None) -> tuple[dict, str]:
    from foundation.stores.registry import rollback

    _model(workspace, name)
    move = rollback(workspace.registry, name, reason)
    champion = workspace.registry.champion(name)
    result = _move_result(name, move, champion, champion_history(workspace.registry, name))
    if move is None:
        return result, f"{name}: {champion} is already the champion; nothing changed"
    human = f"{name}: champion {move.from_version or '-'} -> {move.to_version} (rolled back, logged by {move.user})"
    return result, human


# -- datasets ----------------------------------------------------------------------------------------


def datasets_list(workspace: Workspace) -> tuple[dict, str]:
    """The dataset versions, newest first, and the current one (the output of `sftflow datasets`)."""
    store = workspace.check_layout().datasets
    current = store.current()
    manifests = [v.manifest for v in store.versions()]
    versions = [{"version": m.version, "created_at": m.created_at, "rows": m.rows.dump(), "parent": m.parent,
                 "drops": [d.drop_id for d in m.drops]} for m in manifests]
    versions.sort(key=lambda v: (v["created_at"], len(v["drops"])), reverse=True)
    human = "\n".join(
        f"{'*' if current and v['version'] == current.name else ' '} {v['version']}  {v['created_at']}  "
        f"train {v['rows']['train']:>7}  eval {v['rows']['eval']:>6}  drops {len(v['drops'])}"
        for v in versions
    ) or f"no dataset versions in {store.root}"
    return {"current": current.name if current else None, "versions": versions}, human


def _dataset(workspace: Workspace, name: str):
    store = workspace.check_layout().datasets
    try:
        return store.find(name)
    except NotFoundError:
        names = sorted(v.name for v in store.versions())
        raise NotFoundError(f"no dataset version {name!r} in {store.root}; versions: {_names(names)} "
                            "(list them with: sftflow datasets list)") from None


def dataset_show(workspace: Workspace, name: str) -> tuple[dict, str]:
    version = _dataset(workspace, name)
    m = version.manifest
    current = workspace.datasets.current()
    result = {"version": m.version, "current": bool(current and current.name == m.version),
              "created_at": m.created_at, "parent": m.parent, "rows": m.rows.dump(), "eval_ratio": m.eval_ratio,
              "schema_version": m.schema_version, "content_hash": m.content_hash,
              "drops": [d.dump() for d in m.drops], "files": {k: f.dump() for k, f in m.files.items()},
              "path": str(version.root)}
    lines = [f"{m.version}{'  [current]' if result['current'] else ''}  ({version.root})",
             f"  created     {m.created_at}", f"  parent      {m.parent or '-'}",
             f"  rows        train {m.rows.train}  eval {m.rows.eval}  (eval ratio {m.eval_ratio})",
             f"  schema      {m.schema_version}", f"  drops       {len(m.drops)}"]
    lines += [f"    {d.drop_id}  in {d.rows_in}  accepted {d.accepted}  duplicates {d.duplicates}  "
              f"quarantined {d.quarantined}  ({d.ingested_at})" for d in m.drops]
    return result, "\n".join(lines)


def _ids_by_drop(version) -> dict[str, set[str]]:
    import pyarrow.parquet as pq

    from foundation.stores.datasets import SPLITS

    found: dict[str, set[str]] = {}
    for split in SPLITS:
        table = pq.read_table(version.path(split), columns=["id", "source_drop"])
        for row_id, drop_id in zip(table.column("id").to_pylist(), table.column("source_drop").to_pylist()):
            found.setdefault(drop_id, set()).add(row_id)
    return found


def dataset_diff(workspace: Workspace, a: str, b: str) -> tuple[dict, str]:
    """Rows (by row id) in B and not in A (added) and in A and not in B (removed), per drop."""
    old, new = _dataset(workspace, a), _dataset(workspace, b)
    before, after = _ids_by_drop(old), _ids_by_drop(new)
    drops = []
    for drop_id in sorted(set(before) | set(after)):
        was, now = before.get(drop_id, set()), after.get(drop_id, set())
        drops.append({"drop_id": drop_id, "added": len(now - was), "removed": len(was - now),
                      "kept": len(now & was), "rows_a": len(was), "rows_b": len(now)})
    all_before, all_after = set().union(*before.values()), set().union(*after.values())
    result = {"a": old.name, "b": new.name, "added": len(all_after - all_before),
              "removed": len(all_before - all_after), "kept": len(all_after & all_before),
              "rows_a": old.manifest.rows.train + old.manifest.rows.eval,
              "rows_b": new.manifest.rows.train + new.manifest.rows.eval, "drops": drops}
    lines = [f"{old.name} -> {new.name}: +{result['added']} -{result['removed']} rows "
             f"({result['rows_a']} -> {result['rows_b']})"]
    lines += [f"  {d['drop_id']}  +{d['added']}  -{d['removed']}  ({d['rows_a']} -> {d['rows_b']})"
              for d in drops if d["added"] or d["removed"]]
    return result, "\n".join(lines)


# -- quarantine --------------------------------------------------------------------------------------


def _drop_ids(workspace: Workspace) -> list[str]:
    root = workspace.drops_dir
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "report.json").is_file())


def quarantine(workspace: Workspace, drop_id: str, limit: int) -> tuple[dict, str]:
    """The reasons a drop's rows were quarantined (counts from its quarantine file) and the first `limit`
    rows of each: source file, row, details and the raw text, cut to RAW_CHARS."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if limit < 0:
        raise NotFoundError(f"--limit {limit}: give 0 or more rows per reason")
    drops = workspace.check_layout().drops
    report = drops.report(drop_id) if drop_id in _drop_ids(workspace) else None
    if report is None:
        raise NotFoundError(f"no ingested drop {drop_id!r} in {workspace.drops_dir}; drops: "
                            f"{_names(_drop_ids(workspace))}")
    path = drops.quarantine_path(drop_id)  # where the store keeps it; the report's path if the file is elsewhere
    if not path.is_file() and report.quarantine_path and Path(report.quarantine_path).is_file():
        path = Path(report.quarantine_path)
    result = {"drop_id": drop_id, "status": report.status, "rows_in": report.rows_in,
              "quarantined": report.quarantined, "path": str(path), "reasons": []}
    if not path.is_file():
        if report.quarantined:
            raise WorkspaceError(f"{path}: the quarantine file of drop {drop_id} is missing ({report.quarantined} "
                                 f"rows); ingest the drop again: sftflow ingest PATH --drop-id {drop_id}")
        return result, f"drop {drop_id}: no rows quarantined ({report.rows_in} rows in)"
    reasons_column = pq.read_table(path, columns=["reasons"]).column("reasons")
    counts = pc.value_counts(pc.list_flatten(reasons_column)).to_pylist() if len(reasons_column) else []
    counted = dict(sorted(((c["values"], c["counts"]) for c in counts), key=lambda item: (-item[1], item[0])))
    examples: dict[str, list[dict]] = {reason: [] for reason in counted}
    if limit:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                for reason in row["reasons"]:
                    if len(examples[reason]) < limit:
                        raw, cut = truncate(row["raw"], RAW_CHARS)
                        examples[reason].append({"source_file": row["source_file"], "source_row": row["source_row"],
                                                 "details": truncate(row["details"], FIELD_CHARS)[0], "raw": raw,
                                                 "raw_truncated": cut, "raw_chars": len(row["raw"])})
            if all(len(rows) >= limit for rows in examples.values()):
                break
    result["rows"] = len(reasons_column)
    result["reasons"] = [{"reason": reason, "count": count, "rows": examples[reason]}
                         for reason, count in counted.items()]
    lines = [f"drop {drop_id} ({report.status}): {len(reasons_column)} of {report.rows_in} rows quarantined  ({path})"]
    for item in result["reasons"]:
        lines.append(f"  {safe_text(item['reason'], 80)}  {item['count']}")
        for row in item["rows"]:
            lines.append(f"    {safe_text(row['source_file'], FIELD_CHARS)}:{row['source_row']}  "
                         f"{safe_text(row['details'], FIELD_CHARS)}")
            lines.append(f"      raw: {safe_text(row['raw'], RAW_CHARS)}" + ("…" if row["raw_truncated"] else ""))
    return result, "\n".join(lines)
