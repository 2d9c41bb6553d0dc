"""`sftflow serve`'s server for real: llama_cpp.server started with the command and environment `sftflow serve`
builds, over the tiny model's GGUF, on loopback. With an API key every request needs it (401 without it or
with another), and the key is nowhere on the server's command line."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tasks.serve import server_command, server_env
from tests.conftest import free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny_gguf(tiny_model, llama_tools, tmp_path):
    """The tiny model as an f16 GGUF, where a registry version keeps it (<name>/<version>/gguf/)."""
    from tasks.export.convert import convert_to_gguf

    gguf = tmp_path / "tiny-sft" / "v0001" / "gguf" / "tiny-sft-f16.gguf"
    gguf.parent.mkdir(parents=True)
    return convert_to_gguf(llama_tools, tiny_model, gguf, tmp_path / "convert.log", "tiny-sft")


def status(url: str, key: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_served_model_with_a_key_refuses_requests_without_it(tiny_gguf, tmp_path):
    port, key = free_port(), "k3y-for-the-test"
    command = server_command(tiny_gguf, port, host="127.0.0.1", n_ctx=256, n_gpu_layers=0)
    env = server_env({**os.environ, "API_KEY": "a-stray-one"}, key)
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/v1/models"
        deadline = time.monotonic() + 120
        while True:
            try:
                answered = status(url, key)
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "the server did not answer within 120 s"
                time.sleep(0.5)
        assert answered == 200
        assert status(url) == 401 and status(url, "a-stray-one") == 401
        cmdline = open(f"/proc/{server.pid}/cmdline", "rb").read().decode()
        assert key not in cmdline and "--host\x00127.0.0.1" in cmdline and "--n_ctx\x00256" in cmdline
    finally:
        server.terminate()
        server.wait(timeout=30)
