"""The Modelfile's TEMPLATE, rendered by Go's text/template (Ollama's engine), prompts the model exactly as
its own chat template does: for a system prompt in its own turn, inside the last user turn, refused (folded
into the first user turn), and a template that adds a default system prompt."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from transformers import AutoTokenizer

from tasks.engines.chat_format import chat_format, render, stop_tokens
from tasks.export.modelfile import ollama_modelfile, ollama_template
from tests.conftest import ROOT

H, E = "<|start_header_id|>", "<|eot_id|>"  # special tokens of the tiny model's vocabulary
TEMPLATES = {
    "own turn": None,  # the tiny model's own Llama-3-style template
    "in the last user turn": (  # Mistral's placement
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
        "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
        "{% set users = msgs | selectattr('role', 'equalto', 'user') | list %}"
        "{% for m in msgs %}{% if m['role'] == 'user' %}{{ '" + H + "user: ' }}"
        "{% if sys and m == users[-1] %}{{ sys + '\\n\\n' }}{% endif %}{{ m['content'] + '" + E + "' }}"
        "{% else %}{{ '" + H + "' + m['content'] + '" + E + "' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '" + H + "' }}{% endif %}"
    ),
    "refused": (  # Gemma 2's: no system role
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for m in messages %}{{ '" + H + "' + m['role'] + '\\n' + m['content'] + '" + E + "' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '" + H + "assistant\\n' }}{% endif %}"
    ),
    "with a default": (  # Qwen2.5's: a system prompt of its own when the conversation brings none
        "{% if messages[0]['role'] != 'system' %}{{ '" + H + "system\\nYou are helpful." + E + "' }}{% endif %}"
        "{% for m in messages %}{{ '" + H + "' + m['role'] + '\\n' + m['content'] + '" + E + "' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '" + H + "assistant\\n' }}{% endif %}"
    ),
}
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
     {"role": "assistant", "content": "5"}, {"role": "user", "content": "And {{ 4 + 4 }}?"}],
]


@pytest.fixture(scope="module")
def go() -> str:
    found = shutil.which("go")
    if found is None:
        pytest.fail("Go is missing: `make test` installs it with scripts/ensure_go.sh")
    return found


def go_render(go: str, template: str, messages: list[dict]) -> str:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    done = subprocess.run([go, "run", str(ROOT / "tests" / "ollama" / "render.go")], capture_output=True, text=True,
                          input=json.dumps({"template": template, "system": system, "messages": messages}),
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("system", list(TEMPLATES))
def test_ollama_prompts_the_model_as_its_own_template_does(tiny_model, go, system):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    if TEMPLATES[system]:
        tokenizer.chat_template = TEMPLATES[system]
    fmt = chat_format(tokenizer)
    expected_place = {"own turn": "turn", "in the last user turn": "last_user", "refused": "folded",
                      "with a default": "turn"}
    assert fmt.system == expected_place[system] and fmt.end_of_turn == E
    template = ollama_template(fmt, write_bos=True)
    for messages in CONVERSATIONS:
        assert go_render(go, template, messages) == render(tokenizer, messages, generation_prompt=True), messages


def test_the_modelfile_names_the_models_stop_tokens_and_leaves_bos_to_llama_cpp_when_it_adds_it(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    fmt = chat_format(tokenizer)
    modelfile = ollama_modelfile("gguf/m-q4_k_m.gguf", fmt, stop_tokens(tokenizer), write_bos=False)
    assert modelfile.startswith("FROM ./gguf/m-q4_k_m.gguf\nTEMPLATE \"\"\"")
    assert 'PARAMETER stop "<|eot_id|>"' in modelfile and "<|begin_of_text|>" not in modelfile
    assert "<|begin_of_text|>" in ollama_template(fmt, write_bos=True)
