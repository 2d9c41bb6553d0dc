"""Report: the drop report (counts that reconcile, reasons), its files, and its Prefect artifacts.

Every input row ends in exactly one place — accepted into the dataset, dropped as a duplicate, or
quarantined — and `rows_in == accepted + duplicates + quarantined` is checked here for every drop.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import orjson
import pyarrow.parquet as pq
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from schemas.tables import QUARANTINE_SCHEMA
from foundation import staging
from foundation.atomic import staged_dir, write_bytes_atomic


class CountMismatchError(RuntimeError):
    """Rows were lost or double-counted: a bug, never bad input."""


def check_counts(report: dict) -> None:
    """rows_in == accepted + duplicates + quarantined (+ held_back: valid rows of a rejected drop)."""
    total = report["accepted"] + report["duplicates"] + report["quarantined"] + report["held_back"]
    if report["rows_in"] != total:
        raise CountMismatchError(
            f"drop {report['drop_id']}: rows_in {report['rows_in']} != accepted {report['accepted']} + duplicates "
            f"{report['duplicates']} + quarantined {report['quarantined']} + held back {report['held_back']} ({total})"
        )


def merge_quarantine(paths: list[str], target: Path) -> tuple[int, dict[str, int]]:
    """Concatenate quarantine tables into one file; returns (rows, count per reason)."""
    reasons: Counter = Counter()
    rows = 0
    with pq.ParquetWriter(target, QUARANTINE_SCHEMA, compression="zstd") as writer:
        for path in paths:
            if not Path(path).exists():
                continue
            for batch in staging.iter_batches(path):
                writer.write_batch(batch)
                rows += batch.num_rows
                for row_reasons in batch.column("reasons").to_pylist():
                    reasons.update(row_reasons)
    return rows, dict(sorted(reasons.items()))


def quarantine_examples(path: Path, limit: int) -> list[dict]:
    if limit == 0 or not path.exists():
        return []
    table = pq.ParquetFile(path)
    for batch in table.iter_batches(batch_size=limit):
        return batch.to_pylist()
    return []


def _cell(text: str, width: int = 160) -> str:
    text = text if len(text) <= width else text[: width - 1] + "…"
    return text.replace("|", "\\|").replace("\n", " ").replace("`", "'")


def quarantine_markdown(report: dict, examples: list[dict]) -> str:
    lines = [
        f"# Drop `{report['drop_id']}`: {report['status']}",
        "",
        f"{report['rows_in']} rows in = {report['accepted']} accepted + {report['duplicates']} duplicates + "
        f"{report['quarantined']} quarantined (reject rate {report['reject_rate']:.1%}, limit "
        f"{report['max_reject_rate']:.0%}). Dataset version: `{report['dataset_version']}`.",
        "",
    ]
    if report.get("error"):
        lines += [f"**{report['error']}**", ""]
    if examples:
        lines += ["## Quarantined examples", "", "| file | row | reasons | details | raw |", "|---|---|---|---|---|"]
        for ex in examples:
            lines.append(
                f"| {_cell(Path(ex['source_file']).name)} | {ex['source_row']} | {', '.join(ex['reasons'])} | "
                f"{_cell(ex['details'])} | `{_cell(ex['raw'], 120)}` |"
            )
        lines += ["", f"All quarantined rows: `{report['quarantine_path']}`"]
    else:
        lines.append("No rows were quarantined.")
    return "\n".join(lines)


@task(cache_policy=NO_CACHE)
def write_drop_report(report: dict, quarantine_parts: list[str], duplicates_path: str | None, drop_dir: Path,
                      examples: int) -> dict:
    """Write `drops/<id>/` whole (quarantine, duplicates, report.json last) and publish artifacts."""
    with staged_dir(drop_dir) as tmp:
        quarantined, reasons = merge_quarantine(quarantine_parts, tmp / "quarantine.parquet")
        if duplicates_path and Path(duplicates_path).exists():
            shutil.copyfile(duplicates_path, tmp / "duplicates.parquet")
        if quarantined != report["quarantined"]:
            raise CountMismatchError(f"drop {report['drop_id']}: {quarantined} quarantine rows on disk, "
                                     f"{report['quarantined']} counted")
        report = {**report, "reasons": reasons, "quarantine_path": str(drop_dir / "quarantine.parquet")}
        check_counts(report)
        write_bytes_atomic(tmp / "report.json", orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    publish_drop_artifacts(report, quarantine_examples(drop_dir / "quarantine.parquet", examples))
    return report


def publish_drop_artifacts(report: dict, examples: list[dict]) -> None:
    key = "drop-" + "".join(c if c.isalnum() else "-" for c in report["drop_id"].lower())[:90]
    counts = [
        {"what": "rows_in", "count": report["rows_in"]},
        {"what": "accepted", "count": report["accepted"]},
        {"what": "duplicates", "count": report["duplicates"]},
        {"what": "quarantined", "count": report["quarantined"]},
        *({"what": f"reason: {reason}", "count": n} for reason, n in report["reasons"].items()),
    ]
    create_table_artifact(
        key=f"{key}-counts",
        table=counts,
        description=f"Drop {report['drop_id']} ({report['status']}): counts and quarantine reasons",
    )
    create_markdown_artifact(
        key=f"{key}-quarantine",
        markdown=quarantine_markdown(report, examples),
        description=f"Drop {report['drop_id']}: quarantined examples and their reasons",
    )
