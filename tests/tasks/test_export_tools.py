"""A llama.cpp script started ahead (`ToolAhead`): it imports while its input is made, runs on its arguments
as `run_tool` would, fails with its log's tail, and leaves no process behind when it is not needed."""

from __future__ import annotations

import time

import pytest

from tasks.export import ExportError
from tasks.export.tools import ToolAhead

SCRIPT = '''import sys, time
from pathlib import Path

STARTED = time.time()  # when the module was imported


def main():
    out = Path(sys.argv[1])
    if out.name == "fail":
        print("no such model directory", file=sys.stderr)
        sys.exit(3)
    out.write_text(f"{STARTED} {time.time()} {' '.join(sys.argv[2:])}")
'''


@pytest.fixture
def tools(tmp_path):
    (tmp_path / "tools" / "gguf-py").mkdir(parents=True)
    (tmp_path / "tools" / "fake_convert.py").write_text(SCRIPT)
    return tmp_path / "tools"


def test_it_imports_ahead_then_runs_main_on_the_arguments(tools, tmp_path):
    out, log = tmp_path / "out.txt", tmp_path / "tool.log"
    with ToolAhead(tools, "fake_convert.py", log) as ahead:
        time.sleep(1.0)  # the caller makes the input meanwhile
        asked = time.time()
        ahead.run([str(out), "--outtype", "f16"])
    imported, ran, args = out.read_text().split(" ", 2)
    assert args == "--outtype f16"
    assert float(imported) < asked <= float(ran)  # imported before it was asked to run
    assert ahead.process.returncode == 0


def test_a_failing_tool_raises_with_its_log_tail(tools, tmp_path):
    with ToolAhead(tools, "fake_convert.py", tmp_path / "tool.log") as ahead:
        with pytest.raises(ExportError, match=r"fake_convert.py failed \(exit 3\):\n.*no such model directory"):
            ahead.run([str(tmp_path / "fail")])


def test_one_never_run_leaves_no_process(tools, tmp_path):
    with ToolAhead(tools, "fake_convert.py", tmp_path / "tool.log") as ahead:
        pass
    assert ahead.process.poll() is not None


def test_one_whose_import_failed_raises_when_run(tmp_path):
    (tmp_path / "tools" / "gguf-py").mkdir(parents=True)
    (tmp_path / "tools" / "broken.py").write_text("import no_such_module_here\n")
    with ToolAhead(tmp_path / "tools", "broken.py", tmp_path / "tool.log") as ahead:
        ahead.process.wait()
        with pytest.raises(ExportError, match="(?s)broken.py failed.*No module named 'no_such_module_here'"):
            ahead.run(["x"])
