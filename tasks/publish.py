"""Publish: the model registry and its champion pointer.

    registry/<model-name>/<version>/{adapter/, eval.json, manifest.json, ...}
    registry/<model-name>/CHAMPION      the version currently serving; replaced atomically
"""

from __future__ import annotations

from sftflow.atomic import read_json
from sftflow.workspace import Workspace


def champion_of(workspace: Workspace, name: str) -> dict | None:
    """The champion of a model name: {version, model_path, adapter_dir}, or None when there is none."""
    pointer = workspace.registry / name / "CHAMPION"
    if not pointer.exists():
        return None
    version_dir = workspace.registry / name / pointer.read_text().strip()
    manifest = read_json(version_dir / "manifest.json")
    return {"version": version_dir.name, "model_path": manifest["model_path"], "adapter_dir": str(version_dir / "adapter")}
