"""The README's command reference lists every command and sub-command the CLI has, with an example each."""

from __future__ import annotations

import re

import typer.main

from sftflow.cli import app
from tests.conftest import ROOT


def command_names() -> set[str]:
    """Every command a user can run: the top-level ones, each group's sub-commands, and a group that runs on
    its own (`datasets`)."""
    names = set()
    for name, command in typer.main.get_command(app).commands.items():
        subs = getattr(command, "commands", {})
        if not subs or command.invoke_without_command:
            names.add(name)
        names.update(f"{name} {sub}" for sub in subs)
    return names


def test_the_command_reference_lists_every_command():
    readme = (ROOT / "README.md").read_text()
    reference = readme.split("## Command reference", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in reference.splitlines() if line.startswith("| `")]
    examples = "\n".join(row.split("|", 2)[2] for row in rows)
    missing = [name for name in sorted(command_names()) if not re.search(rf"sftflow {name}(?![\w-])", examples)]
    assert not missing, f"README's command reference has no example of {missing}"
