"""Base model: resolve `model.name` to something loadable, and build the tiny local model.

The tiny model is what tests and the demo train: a 4-layer Llama (dims multiples of 256, so the
GGUF k-quantisers accept every tensor) with a SentencePiece tokenizer trained on text the project
ships (the sample drops plus a generated corpus) and a Llama-3-style chat template, pretrained on
CPU for about a minute so its logits are not uniform. It is built once per workspace, from a seed,
and cached under `$SFTFLOW_HOME/cache/models/`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

from schemas.config import ModelConfig
from foundation.atomic import exclusive_lock, staged_dir
from foundation.errors import ConfigError
from foundation.workspace import Workspace

TINY_NAME = "tiny"
DATA_DIR = Path(__file__).resolve().parent.parent / "data"

# Llama-3 special tokens and chat template, so that the tiny model exercises the same rendering,
# masking and stop-token paths as a real Llama 3 (tool turns render with their own role name).
SPECIAL_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
BOS, EOS_TEXT, PAD, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|eot_id|>"
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if tools %}{{ '<|start_header_id|>system<|end_header_id|>\\n\\nTools: ' + (tools | tojson) + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

TINY_ARCH = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
TINY_VOCAB = 1024
TINY_RECIPE = {"seed": 1234, "steps": 160, "batch": 16, "seq": 128, "lr": 3e-3, "version": 2}

_WORDS = (
    "the a of to and in is that for it with as was on be by at this are from or have an they which one you were "
    "all there would their we been has when who will more no if out so said what up its about into than them can "
    "only other new some could time these two may then do first any now such like over even most made after also "
    "many before must through back years where much way well down should because each just those people how too "
    "little state good very make world still own see work long get here between both life being under never day "
    "same another know while last might great old year off come since against go came right used take three"
).split()
_TOPICS = ["river", "market", "garden", "library", "station", "kitchen", "harbour", "forest", "museum", "bakery"]


def _general_corpus(rng: random.Random, lines: int) -> list[str]:
    """Plain sentences and numbers: language-like text that is not any of the sample tasks."""
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 16))]
        words.insert(rng.randrange(len(words)), rng.choice(_TOPICS))
        sentence = " ".join(words).capitalize() + "."
        if rng.random() < 0.3:
            sentence += f" It was {rng.randint(0, 9999)} {rng.choice(['m', 'kg', 'km', 'minutes', 'people'])}."
        out.append(sentence)
    return out


def _drop_texts() -> list[str]:
    """Every string of the shipped sample drops, so their words tokenize compactly."""
    texts: list[str] = []

    def walk(value) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for path in sorted((DATA_DIR / "drops").rglob("*")):
        if path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                try:
                    walk(json.loads(line))
                except json.JSONDecodeError:
                    continue
        elif path.suffix == ".json":
            walk(json.loads(path.read_text()))
        elif path.suffix == ".csv":
            texts += path.read_text().splitlines()
    return texts


def tiny_model_key() -> str:
    material = json.dumps(
        {"arch": TINY_ARCH, "vocab": TINY_VOCAB, "recipe": TINY_RECIPE, "template": CHAT_TEMPLATE,
         "drops": hashlib.sha256("\n".join(_drop_texts()).encode()).hexdigest()},
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:12]


def train_tokenizer(corpus: list[str], out_dir: Path, vocab_size: int = TINY_VOCAB) -> None:
    """A SentencePiece BPE tokenizer with the Llama-3 special tokens and chat template, in `out_dir`."""
    import sentencepiece as spm

    corpus_file = out_dir / "corpus.txt"
    corpus_file.write_text("\n".join(corpus))
    spm.SentencePieceTrainer.train(
        input=str(corpus_file),
        model_prefix=str(out_dir / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,  # any UTF-8 text encodes, no <unk>
        split_digits=True,  # numbers tokenize digit by digit: arithmetic stays learnable
        # no space prefix, no whitespace folding: text round-trips exactly, and HF and llama.cpp (told
        # by add_prefix_space=false below, which the GGUF converter copies) tokenize alike
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        control_symbols=SPECIAL_TOKENS,  # control, as in Llama 3: never produced from plain text,
        # and typed CONTROL in GGUF so llama.cpp parses them as special tokens too
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        bos_piece=BOS,
        eos_piece=EOS_TEXT,
        pad_piece=PAD,
        num_threads=1,  # deterministic
        minloglevel=2,
    )
    corpus_file.unlink()
    (out_dir / "tokenizer.vocab").unlink()
    (out_dir / "tokenizer.model").rename(out_dir / "tokenizer.model")
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "add_bos_token": False,  # the chat template writes the BOS token itself
                "add_eos_token": False,
                "legacy": False,
                "add_prefix_space": False,
                "bos_token": BOS,
                "eos_token": EOT,
                "pad_token": PAD,
                "unk_token": "<unk>",
                "additional_special_tokens": SPECIAL_TOKENS,
                "chat_template": CHAT_TEMPLATE,
                "model_max_length": TINY_ARCH["max_position_embeddings"],
            },
            indent=2,
        )
    )


def _pretraining_text(rng: random.Random, tokenizer, lines: list[str]) -> list[str]:
    """Generic sentences, half of them as chat turns, so the template and <|eot_id|> are familiar."""
    texts = []
    for i in range(0, len(lines) - 3, 3):
        if rng.random() < 0.5:
            messages = [{"role": "user", "content": lines[i]}, {"role": "assistant", "content": f"{lines[i + 1]} {lines[i + 2]}"}]
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        else:
            texts.append(f"{BOS}{lines[i]} {lines[i + 1]} {lines[i + 2]}")
    return texts


def build_tiny_model(target: Path, log=print) -> Path:
    """Build tokenizer + model and pretrain briefly; writes `target` whole (temp dir + rename)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    rng = random.Random(TINY_RECIPE["seed"])
    started = time.monotonic()
    with staged_dir(target) as tmp:
        general = _general_corpus(rng, 6000)
        train_tokenizer(_drop_texts() + general, tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=[tokenizer.convert_tokens_to_ids(EOT), tokenizer.convert_tokens_to_ids(EOS_TEXT)],
            pad_token_id=tokenizer.pad_token_id,
            **TINY_ARCH,
        )
        torch.manual_seed(TINY_RECIPE["seed"])
        model = LlamaForCausalLM(config)

        ids = tokenizer(_pretraining_text(rng, tokenizer, general), add_special_tokens=False).input_ids
        stream = torch.tensor([t for seq in ids for t in seq], dtype=torch.long)
        seq, batch, steps = TINY_RECIPE["seq"], TINY_RECIPE["batch"], TINY_RECIPE["steps"]
        windows = stream[: (len(stream) // seq) * seq].view(-1, seq)
        optimizer = torch.optim.AdamW(model.parameters(), lr=TINY_RECIPE["lr"], weight_decay=0.01)
        generator = torch.Generator().manual_seed(TINY_RECIPE["seed"])
        model.train()
        for step in range(steps):
            lr = TINY_RECIPE["lr"] * 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in optimizer.param_groups:
                group["lr"] = lr
            rows = windows[torch.randint(len(windows), (batch,), generator=generator)]
            loss = model(input_ids=rows, labels=rows).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 50 == 0 or step == steps - 1:
                log(f"tiny model pretraining: step {step + 1}/{steps} loss {loss.item():.3f}")
        model.eval()
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        )
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "sftflow_tiny.json").write_text(
            json.dumps({"key": target.name, "recipe": TINY_RECIPE, "final_loss": round(loss.item(), 4),
                        "build_s": round(time.monotonic() - started, 1)}, indent=2)
        )
    return target


def tiny_model_dir(workspace: Workspace, log=print) -> Path:
    """The cached tiny model, built on first use (one builder at a time)."""
    models = workspace.models_cache
    target = models / f"tiny-llama-{tiny_model_key()}"
    with exclusive_lock(models / ".tiny.lock"):
        if not (target / "sftflow_tiny.json").exists():
            log(f"building the tiny local model in {target} (once per workspace, ~1 minute)")
            build_tiny_model(target, log)
    return target


@dataclass(frozen=True)
class ResolvedModel:
    """`model.name` made local: a directory `from_pretrained` loads, and the Hub commit it came from."""

    path: str
    revision: str | None = None  # None for a local directory or the tiny model


# What a training run needs of a Hub repository: weights (safetensors only), configs, tokenizer, template.
SNAPSHOT_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt", "*.tiktoken"]


def check_model_dir(path: Path, model: ModelConfig) -> None:
    """A model directory holds a config, safetensors weights (pickled .bin files can run code when loaded)
    and, unless `model.trust_remote_code` is set, no custom modelling code."""
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.name {model.name}: no config.json there; point it at a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(
            f"model.name {model.name}: no *.safetensors weights; only safetensors are loaded (convert .bin "
            "weights with `save_pretrained(safe_serialization=True)`)"
        )
    config = json.loads((path / "config.json").read_text())
    tokenizer_config = path / "tokenizer_config.json"
    code = [f"auto_map in {name}" for name, cfg in (
        ("config.json", config),
        ("tokenizer_config.json", json.loads(tokenizer_config.read_text()) if tokenizer_config.is_file() else {}),
    ) if cfg.get("auto_map")]
    code += sorted(p.name for p in path.glob("*.py"))
    if code and not model.trust_remote_code:
        raise ConfigError(
            f"model.name {model.name}: the model ships its own code ({', '.join(code)}); review it and set "
            "model.trust_remote_code=true to allow it"
        )


def hub_snapshot(model: ModelConfig) -> ResolvedModel:
    """A Hub id resolved to a local snapshot through huggingface_hub (its cache, HF_HOME, HF_TOKEN and
    HF_HUB_OFFLINE as the user set them); every way it can fail is a ConfigError that names the fix."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    name, at = model.name, f"@{model.revision}" if model.revision else ""
    patterns = SNAPSHOT_FILES + (["*.py"] if model.trust_remote_code else [])
    try:
        # offline, a pinned commit would still be looked up on the Hub unless told to stay in the cache
        path = Path(snapshot_download(name, revision=model.revision, allow_patterns=patterns,
                                      local_files_only=constants.HF_HUB_OFFLINE))
    except GatedRepoError as exc:
        raise ConfigError(f"model.name {name}: a gated model; accept its licence at https://huggingface.co/{name} and "
                          "set HF_TOKEN to a token of that account, or point model.name at a local directory") from exc
    except RevisionNotFoundError as exc:
        raise ConfigError(f"model.revision {model.revision}: no such branch, tag or commit of {name}") from exc
    except RepositoryNotFoundError as exc:
        raise ConfigError(f"model.name {name}: no such model on the Hub (a private one needs HF_TOKEN); check the "
                          "id, or point model.name at a local directory") from exc
    except LocalEntryNotFoundError as exc:
        raise ConfigError(f"model.name {name}{at}: not in the Hugging Face cache ({_hf_home()}) and the Hub cannot "
                          "be reached (or HF_HUB_OFFLINE is set); download it where there is network "
                          f"(huggingface-cli download {name}), or point model.name at a local directory") from exc
    except (HfHubHTTPError, OSError) as exc:
        raise ConfigError(f"model.name {name}{at}: the Hub could not be reached ({str(exc).splitlines()[0][:200]}); "
                          "retry, or point model.name at a local directory") from exc
    check_model_dir(path, model)
    return ResolvedModel(str(path), path.name)


def _hf_home() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def resolve_model(model: ModelConfig, workspace: Workspace, log=print) -> ResolvedModel:
    """`model.name` as a local directory, once, at the start of a run: the tiny model, a local directory
    (checked), or a Hub id (resolved to a snapshot of its cache, downloaded when it is not there)."""
    for warning in model.warnings():
        log(f"warning: {warning}")
    if model.name == TINY_NAME:
        return ResolvedModel(str(tiny_model_dir(workspace, log)))
    path = Path(model.name).expanduser()
    if path.exists():
        check_model_dir(path, model)
        return ResolvedModel(str(path.resolve()))
    if model.name.startswith((".", "/", "~")) or not HUB_ID.fullmatch(model.name) or ".." in model.name:
        raise ConfigError(f"model.name {model.name}: no such directory, and not a Hub id (org/name)")
    log(f"resolving {model.name}{'@' + model.revision if model.revision else ''} on the Hugging Face Hub")
    return hub_snapshot(model)
