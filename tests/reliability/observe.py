"""What a reader of a workspace sees, as plain data: the crash tests compare it before and after a kill.

Each function reads only what a reader would (pointers, manifests, the files they list), so a
partial write that a reader could trip over shows up here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq

TMP_PREFIX = ".tmp-"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def _remote_versions(remote: Path, name: str) -> dict:
    """Versions of an fsspec remote that a reader would take (manifest.json present): do they verify?"""
    from tests.conftest import verify_version

    root = remote / name
    return {v.name: verify_version(v) for v in sorted(root.glob("v*")) if (v / "manifest.json").exists()}


def registry(home: Path, name: str = "tiny-sft") -> dict:
    """Visible versions (every entry not hidden), whether each verifies, and the champion pointer."""
    from tests.conftest import verify_version

    root = home / "registry" / name
    visible = [e for e in _entries(root) if not e.startswith(".")]
    versions = {}
    for entry in visible:
        if entry == "CHAMPION":
            continue
        manifest = root / entry / "manifest.json"
        versions[entry] = {"manifest": manifest.exists(),
                           "mismatched": verify_version(root / entry) if manifest.exists() else None,
                           "run_id": json.loads(manifest.read_text())["run_id"] if manifest.exists() else None}
    champion = (root / "CHAMPION").read_text().strip() if (root / "CHAMPION").exists() else None
    return {
        "visible": visible,
        "versions": versions,
        "champion": champion,
        "tmp": [e for e in _entries(root) if e.startswith(TMP_PREFIX)],
        "remote": _remote_versions(home / "remote", name),
    }


def _version_state(root: Path) -> dict:
    """A dataset version as a reader sees it: manifest, file hashes, row counts and row ids."""
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        return {"manifest": False}
    manifest = json.loads(manifest_path.read_text())
    files_ok = all((root / f).exists() and _sha256(root / f) == meta["sha256"] for f, meta in manifest["files"].items())
    rows, ids = {}, []
    for split in ("train", "eval"):
        table = pq.read_table(root / f"{split}.parquet")
        rows[split] = table.num_rows
        ids += table.column("id").to_pylist()
    return {"manifest": True, "files_ok": files_ok, "rows": rows, "rows_match": rows == manifest["rows"],
            "ids_sha256": hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest(),
            "drops": [d["drop_id"] for d in manifest["drops"]]}


def _drop_state(root: Path) -> dict:
    report_path = root / "report.json"
    if not report_path.exists():
        return {"report": False, "entries": _entries(root)}
    report = json.loads(report_path.read_text())
    quarantine = pq.read_table(root / "quarantine.parquet")
    duplicates = pq.read_table(root / "duplicates.parquet").num_rows if (root / "duplicates.parquet").exists() else 0
    return {
        "report": True,
        "status": report["status"],
        "counts": {k: report[k] for k in ("rows_in", "accepted", "duplicates", "quarantined", "held_back")},
        "quarantine_rows": quarantine.num_rows,
        "quarantine_keys": sorted(f"{f}:{r}" for f, r in zip(quarantine.column("source_file").to_pylist(),
                                                               quarantine.column("source_row").to_pylist())),
        "duplicate_rows": duplicates,
        "dataset_version": report["dataset_version"],
    }


def datasets(home: Path) -> dict:
    """The current dataset version, every visible version, and every drop's report."""
    root = home / "datasets"
    current = (root / "CURRENT").read_text().strip() if (root / "CURRENT").exists() else None
    visible = [e for e in _entries(root) if not e.startswith(".")]
    return {
        "current": current,
        "versions": {e: _version_state(root / e) for e in visible if e != "CURRENT"},
        "drops": {e: _drop_state(home / "drops" / e) for e in _entries(home / "drops") if not e.startswith(".")},
        "tmp": [e for e in _entries(root) if e.startswith(TMP_PREFIX)],
    }
