"""The Ollama Modelfile of an export: its TEMPLATE and stop tokens are the model's own.

The TEMPLATE (Go's text/template, as Ollama renders it over `.System` and `.Messages`) is built from the
`ChatFormat` read off the model's chat template, so Ollama prompts the model in the format it was trained
on, whatever its family. BOS is written by the template only when llama.cpp will not add it itself.
"""

from __future__ import annotations

from tasks.engines.chat_format import ChatFormat


def _literal(text: str) -> str:
    """Text for a Go template: `{{` would open an action, so it is written as an action printing it."""
    return text.replace("{{", '{{ "{{" }}')


def _system_and_first_turns(fmt: ChatFormat) -> str:
    """What precedes the messages: the system prompt in its own turn, or the preamble without one."""
    if fmt.system != "turn":
        return _literal(fmt.preamble)
    return (f"{{{{ if .System }}}}{_literal(fmt.system_prefix)}{{{{ .System }}}}{_literal(fmt.system_suffix)}"
            f"{{{{ else }}}}{_literal(fmt.preamble)}{{{{ end }}}}")


def _user_turn(fmt: ChatFormat) -> str:
    """A user turn; a system prompt that lives inside a user turn goes into the first or the last one, and one
    the template refuses is folded into the first (as sftflow trained it)."""
    content = "{{ .Content }}"
    if fmt.system in ("first_user", "folded"):
        separator = fmt.system_suffix if fmt.system == "first_user" else "\n\n"
        content = f"{{{{ if and $.System (eq $i $first) }}}}{{{{ $.System }}}}{_literal(separator)}{{{{ end }}}}{content}"
    elif fmt.system == "last_user":
        content = f"{{{{ if and $.System (eq $i $last) }}}}{{{{ $.System }}}}{_literal(fmt.system_suffix)}{{{{ end }}}}{content}"
    return f"{_literal(fmt.user_prefix)}{content}{_literal(fmt.user_suffix)}"


def ollama_template(fmt: ChatFormat, write_bos: bool) -> str:
    """A Go template rendering `.System` and `.Messages` (roles user and assistant) as the model's template does,
    ending with the generation prompt."""
    indexes = ("{{ $first := -1 }}{{ $last := -1 }}"
               '{{ range $i, $m := .Messages }}{{ if eq $m.Role "user" }}'
               "{{ if eq $first -1 }}{{ $first = $i }}{{ end }}{{ $last = $i }}{{ end }}{{ end }}")
    turns = ('{{ range $i, $m := .Messages }}{{ if eq $m.Role "user" }}' + _user_turn(fmt)
             + '{{ else if eq $m.Role "assistant" }}' + _literal(fmt.assistant_history_prefix) + "{{ .Content }}"
             + _literal(fmt.assistant_suffix) + "{{ end }}{{ end }}")
    bos = _literal(fmt.bos) if write_bos else ""
    return indexes + bos + _system_and_first_turns(fmt) + turns + _literal(fmt.assistant_prefix)


def ollama_modelfile(gguf_name: str, fmt: ChatFormat, stop_tokens: list[str], write_bos: bool,
                     system: str | None = None) -> str:
    """An Ollama Modelfile for the GGUF: the model's own TEMPLATE and stop tokens."""
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{ollama_template(fmt, write_bos)}"""']
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"
