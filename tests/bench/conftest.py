"""The bench scripts are files, not a package: tests load them by path."""

import importlib.util

from tests.conftest import ROOT


def load_bench(filename: str):
    spec = importlib.util.spec_from_file_location(f"bench_{filename.removesuffix('.py')}", ROOT / "bench" / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
