"""The Ollama Modelfile of an export."""

from __future__ import annotations


def ollama_modelfile(gguf_name: str, stop_tokens: list[str], system: str | None = None) -> str:
    """An Ollama Modelfile whose TEMPLATE renders the Llama-3 chat format the model was trained on."""
    template = (
        "<|begin_of_text|>{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"
