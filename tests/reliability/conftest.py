"""Fixtures of the fault tests: a Prefect API shared with their helper processes, and the crash loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="session")
def prefect_api_url(tmp_path_factory):
    """The URL of a temporary Prefect API (SQLite) for this process and the helpers it starts.

    When a test harness of another test directory is already running in this session, it is reused
    (one server per session); otherwise one is started here.
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value() and not os.environ.get("PREFECT_API_URL"):
        yield PREFECT_API_URL.value()
        return
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def run_crash_loop(spec: dict, tmp_path: Path, api_url: str, timeout: int = 400) -> dict:
    """Run tests/reliability/crashloop.py on `spec` in a fresh process; returns its results."""
    spec = {**spec, "out": str(tmp_path / "crashloop.json")}
    spec_file = tmp_path / "crashloop-spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "PREFECT_API_URL": api_url, "SFTFLOW_PROGRESS": "0", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "tests.reliability.crashloop", str(spec_file)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(Path(spec["out"]).read_text())


@pytest.fixture(scope="session")
def mini_model(tmp_path_factory):
    """A small random Llama with the tiny model's tokenizer and chat template, safetensors only.

    Built in seconds (the pretrained tiny model takes minutes on a busy 2-core machine); enough for
    the tests that refuse or load a model but never judge its outputs.
    """
    import random

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tasks.base_model import EOS_TEXT, EOT, _drop_texts, _general_corpus, train_tokenizer

    target = tmp_path_factory.mktemp("mini-model")
    train_tokenizer(_drop_texts() + _general_corpus(random.Random(0), 2000), target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=[tokenizer.convert_tokens_to_ids(EOT), tokenizer.convert_tokens_to_ids(EOS_TEXT)])
    LlamaForCausalLM(config).save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target
