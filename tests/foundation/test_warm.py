"""A warm worker's address: what decides which jobs it may run (foundation.warm.address)."""

from __future__ import annotations

import os
from pathlib import Path

from foundation import warm

ENV = {"PATH": "/usr/bin", "PYTHONPATH": "/project", "CUDA_VISIBLE_DEVICES": "0", "PREFECT_API_URL": "http://a"}


def test_the_address_follows_the_environment_but_not_its_volatile_variables():
    root = Path("/ws")
    base = warm.address(root, "unsloth", ENV)
    assert warm.address(root, "unsloth", {**ENV, "PREFECT_API_URL": "http://b", "PWD": "/x", "SHLVL": "3",
                                          "TORCHINDUCTOR_CACHE_DIR": "/tmp/t"}) == base
    for changed in ({"CUDA_VISIBLE_DEVICES": "1"}, {"HF_HOME": "/h"}, {"PYTHONPATH": "/other"}):
        assert warm.address(root, "unsloth", {**ENV, **changed}) != base
    assert warm.address(root, "hf", ENV) != base
    assert warm.address(Path("/another"), "unsloth", ENV) != base
    assert base.startswith("\0" + warm.NAME_PREFIX)


def test_the_address_follows_the_code(tmp_path, monkeypatch):
    for package in warm.PACKAGES:
        (tmp_path / package / "sub").mkdir(parents=True)
        (tmp_path / package / "sub" / "m.py").write_text("X = 1\n")
    before = warm.code_fingerprint(tmp_path)
    assert warm.code_fingerprint(tmp_path) == before
    module = tmp_path / "tasks" / "sub" / "m.py"
    module.write_text("X = 22\n")  # a checkout changed while a worker waited
    os.utime(module, ns=(module.stat().st_atime_ns, module.stat().st_mtime_ns + 1_000_000))
    after = warm.code_fingerprint(tmp_path)
    assert after != before
    assert "transformers" in before[1] and before[1]["transformers"]  # the library versions are in it
    monkeypatch.setattr(warm, "code_fingerprint", lambda: before)
    first = warm.address(Path("/ws"), "hf", ENV)
    monkeypatch.setattr(warm, "code_fingerprint", lambda: after)
    assert warm.address(Path("/ws"), "hf", ENV) != first
