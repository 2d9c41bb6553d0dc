"""`sftflow serve`: the llama_cpp.server command for each address and option, and the API key rule: off
loopback only with a key, which reaches the server through its environment and is never printed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from foundation.errors import ConfigError
from tasks.serve import check_exposure, is_loopback, server_command, server_env

GGUF = Path("/ws/registry/tiny-sft/v3/gguf/tiny-sft-q4_k_m.gguf")


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_default_command_serves_on_loopback_on_the_cpu():
    command = server_command(GGUF, 8000)
    assert command[:3] == [sys.executable, "-m", "llama_cpp.server"]
    assert option(command, "--model") == str(GGUF) and option(command, "--host") == "127.0.0.1"
    assert option(command, "--port") == "8000" and option(command, "--n_ctx") == "0"
    assert option(command, "--n_gpu_layers") == "0" and option(command, "--model_alias") == "tiny-sft"


def test_host_context_and_gpu_layers_reach_the_server():
    command = server_command(GGUF, 9001, host="0.0.0.0", n_ctx=4096, n_gpu_layers=-1)
    assert option(command, "--host") == "0.0.0.0" and option(command, "--port") == "9001"
    assert option(command, "--n_ctx") == "4096" and option(command, "--n_gpu_layers") == "-1"
    assert "--api_key" not in command  # the key goes through the environment: never in the process list


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.0.0.53", True), ("::1", True),
                                                ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                                ("192.168.1.5", False), ("::", False), ("example.org", False)])
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback


def test_off_loopback_needs_an_api_key():
    check_exposure("127.0.0.1", None)
    check_exposure("0.0.0.0", "k3y")
    with pytest.raises(ConfigError, match="needs an API key: pass --api-key KEY or set SFTFLOW_SERVE_API_KEY"):
        check_exposure("0.0.0.0", None)


def test_the_key_is_the_servers_api_key_setting_and_a_stray_one_is_removed():
    from llama_cpp.server.settings import ServerSettings

    env = server_env({"PATH": "/bin", "api_key": "users-own"}, "s3cret")
    assert env["API_KEY"] == "s3cret" and "api_key" not in env and env["PATH"] == "/bin"
    assert "API_KEY" not in server_env({"API_KEY": "users-own"}, None)
    with pytest.MonkeyPatch.context() as mp:  # llama_cpp.server reads its api_key setting from API_KEY
        mp.setenv("API_KEY", env["API_KEY"])
        assert ServerSettings().api_key == "s3cret"


def run_serve(*args: str, env: dict | None = None):
    from sftflow.cli import app

    return CliRunner().invoke(app, ["serve", *args], env=env)


def test_serve_refuses_an_open_address_without_a_key_in_one_line(workspace, monkeypatch):
    monkeypatch.delenv("SFTFLOW_SERVE_API_KEY", raising=False)
    result = run_serve("--host", "0.0.0.0")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "--host 0.0.0.0 is reachable from other machines" in result.stderr


@pytest.mark.parametrize("how", ["option", "env"])
def test_with_a_key_serve_goes_on_and_never_prints_it(workspace, monkeypatch, how):
    """With a key the address is accepted and the command goes on to the model (none is published here);
    neither its output nor its error shows the key."""
    monkeypatch.delenv("SFTFLOW_SERVE_API_KEY", raising=False)
    args = ["--host", "0.0.0.0", "--model", "nope@v1"]
    result = (run_serve(*args, "--api-key", "s3cret-value") if how == "option"
              else run_serve(*args, env={"SFTFLOW_SERVE_API_KEY": "s3cret-value"}))
    assert result.exit_code == 2 and "no model 'nope'" in result.stderr
    assert "s3cret-value" not in result.output
