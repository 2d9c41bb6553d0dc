"""Tiny random-weight models of real model families, with the families' real tokenizers and chat templates.

`family_model("qwen3", cache)` is a cached model directory that loads like the real checkpoint: the
family's own transformers class (tiny dims, seeded random weights, tied or untied embeddings as the real
config has them), the real vocabulary, special tokens and chat template. Nothing comes from the Hub:
vocabularies and templates come from the pinned llama-cpp-python sdist (`make` downloads and checks it),
which ships llama.cpp's vocabulary-only GGUF files (`models/ggml-vocab-*.gguf`, written by llama.cpp
from the real tokenizers) and real chat templates (`models/templates/*.jinja`).

A vocabulary becomes a transformers tokenizer once per vocabulary file (cached separately, so families
that share one convert it once). transformers can read a tokenizer out of a GGUF, but not faithfully
for these files: its Llama-3 reader splits text with GPT-2's regex (numbers, contractions and some
scripts tokenize differently), its Phi-3 reader drops spaces, its Llama readers set eos to the bos
token, and it cannot read the Gemma 4 file at all. So `vocab_tokenizer` rebuilds each tokenizer's
pipeline as the real `tokenizer.json` has it, filled from the GGUF; `tests/test_families.py` checks
every rebuilt tokenizer against the encodings llama.cpp recorded from the real tokenizer next to each
vocabulary (`ggml-vocab-*.gguf.inp`/`.out`).

Family facts that the sdist cannot show (special-token choices, generation stop ids, config shapes)
are from the families' published `tokenizer_config.json`, `generation_config.json` and `config.json`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from foundation.atomic import exclusive_lock, staged_dir
from foundation.settings import settings
from tasks.export.tools import LLAMA_CPP_PYTHON, SDIST, SDIST_SHA256, fetch_sdist

SDIST_MODELS = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/models/"
SEED = 1234
RECIPE_VERSION = 1  # bump when the build below changes in a way the rows do not show

# the regex Llama 3's tokenizer.json splits text with (transformers' TikTokenConverter default, llama.cpp's LLAMA3)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PLACEHOLDER = re.compile(r"\[PAD\d+\]")  # llama.cpp's filler up to the embedding's size, not a real token

# token types as llama.cpp writes them (gguf.TokenType; the same numbers as SentencePiece's piece types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6


@dataclass(frozen=True)
class Vocab:
    """A vocabulary file of the sdist and the pipeline of the real tokenizer llama.cpp wrote it from."""

    file: str
    source: str  # the tokenizer llama.cpp made it from (convert_hf_to_gguf_update.py)
    pipeline: str  # "llama3-bpe" | "qwen2-bpe" | "spm" | "gemma4-bpe": how its tokenizer.json is built
    # added tokens whose flags differ from the GGUF's type: {token: {"special": ..., "rstrip": ...}}
    added_flags: dict[str, dict[str, bool]] = field(default_factory=dict)


_PHI3_RSTRIP = {"special": True, "rstrip": True}
VOCABS = {v.file: v for v in (
    Vocab("ggml-vocab-llama-bpe.gguf", "meta-llama/Meta-Llama-3-8B", "llama3-bpe"),
    Vocab("ggml-vocab-qwen2.gguf", "Qwen/Qwen1.5-7B", "qwen2-bpe"),
    Vocab("ggml-vocab-llama-spm.gguf", "meta-llama/Llama-2-7b-hf", "spm"),
    # Phi-3's added tokens strip the whitespace after them (its tokenizer_config, as transformers' own
    # GGUF reader copies it); </s> is an ordinary added token there, not a special one
    Vocab("ggml-vocab-phi-3.gguf", "microsoft/Phi-3-mini-4k-instruct", "spm", {
        "</s>": {"special": False, "rstrip": True},
        **{t: _PHI3_RSTRIP for t in ("<|assistant|>", "<|system|>", "<|end|>", "<|user|>")},
        **{f"<|placeholder{i}|>": _PHI3_RSTRIP for i in range(1, 7)},
    }),
    Vocab("ggml-vocab-gemma-4.gguf", "google/gemma-4-26B-A4B-it", "gemma4-bpe"),
)}


@dataclass(frozen=True)
class Family:
    """One model family: its architecture class, tiny config, real vocabulary and template, and what the
    real instruct checkpoint's tokenizer and generation config say about its special tokens."""

    name: str
    model_class: str  # transformers class, as config.json's `architectures` names it
    config_class: str
    config: dict  # tiny dims plus the real config's structural choices (tying, rope, head_dim, bias)
    vocab: str  # a VOCABS key
    template: str  # a file under the sdist's models/templates/
    tokenizer_class: str  # as the real tokenizer_config.json names it
    bos: str | None  # the tokenizer's special tokens, as the real tokenizer_config sets them
    eos: str
    pad: str | None  # None: the real tokenizer has no pad token (the project picks one)
    add_bos_token: bool  # whether tokenizer(text) prepends bos
    stop_tokens: tuple[str, ...]  # generation_config.eos_token_id of the real checkpoint
    end_of_turn: str  # the token that closes an assistant turn in the template
    note: str  # one line on the end-of-turn token and what stands in for the real thing
    accepts_system: bool = True  # False: the template raises on a system message
    keeps_system: bool = True  # False: a system message vanishes from a chat that ends with an assistant turn
    prefix_stable: bool = True  # False: some rendered prefix of a chat is not a prefix of the whole rendering
    renamed_tokens: dict[int, str] = field(default_factory=dict)  # ids the family's tokenizer names differently
    added_tokens: tuple[tuple[str, bool], ...] = ()  # (content, special) the family appends to the vocabulary
    vocab_size: int | None = None  # the real embedding's rows when padded past the tokenizer; None: len(tokenizer)

    @property
    def key(self) -> str:
        material = {"family": asdict(self), "vocab": asdict(VOCABS[self.vocab]), "sdist": SDIST_SHA256,
                    "seed": SEED, "recipe": RECIPE_VERSION}
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:12]


TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096}

# Llama 3.1/3.2 renamed three of Llama 3's reserved tokens (the vocabulary file is Llama 3's); the other
# reserved tokens keep Llama 3's numbering, which nothing reads
LLAMA31_TOKENS = {128004: "<|finetune_right_pad_id|>", 128008: "<|eom_id|>", 128010: "<|python_tag|>"}
# the tokens Qwen2.5 appends after Qwen1.5's <|im_end|> (151646-151664), and the four Qwen3 adds after them
QWEN25_TOKENS = (
    *((t, True) for t in ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                          "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                          "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")),
    *((t, False) for t in ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                           "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")),
)
QWEN3_TOKENS = (*QWEN25_TOKENS, *((t, False) for t in ("<tool_response>", "</tool_response>", "<think>", "</think>")))

FAMILIES = {f.name: f for f in (
    Family(
        "llama3", "LlamaForCausalLM", "LlamaConfig",
        {**TINY, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,  # Llama 3.2 1B/3B tie; 3.1 8B does not
         "max_position_embeddings": 131072,
         "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
        "ggml-vocab-llama-bpe.gguf", "meta-llama-Llama-3.2-3B-Instruct.jinja", "PreTrainedTokenizerFast",
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, add_bos_token=True,
        stop_tokens=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), end_of_turn="<|eot_id|>",
        note="turns end with <|eot_id|>, which the Instruct tokenizer calls eos; no pad token "
             "(the project takes <|finetune_right_pad_id|>); the template writes today's date into the system turn",
        renamed_tokens=LLAMA31_TOKENS,
    ),
    Family(
        "qwen2.5", "Qwen2ForCausalLM", "Qwen2Config",
        # 7B unties (0.5B-3B tie); Qwen2ForCausalLM always has q/k/v biases
        {**TINY, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
         "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
        "ggml-vocab-qwen2.gguf", "Qwen-Qwen2.5-7B-Instruct.jinja", "Qwen2Tokenizer",
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", add_bos_token=False,
        stop_tokens=("<|im_end|>", "<|endoftext|>"), end_of_turn="<|im_end|>",
        note="turns end with <|im_end|> (eos); pad <|endoftext|>; no bos; a default system prompt when none is given",
        added_tokens=QWEN25_TOKENS, vocab_size=152064,
    ),
    Family(
        "qwen3", "Qwen3ForCausalLM", "Qwen3Config",
        {**TINY, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,  # 0.6B-4B tie
         "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
        "ggml-vocab-qwen2.gguf", "Qwen-Qwen3-0.6B.jinja", "Qwen2Tokenizer",
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", add_bos_token=False,
        stop_tokens=("<|im_end|>", "<|endoftext|>"), end_of_turn="<|im_end|>",
        note="turns end with <|im_end|> (eos); pad <|endoftext|>; the assistant turn after the last user turn "
             "gets an empty <think></think> block and earlier ones none, so a chat's rendering changes as it grows",
        prefix_stable=False, added_tokens=QWEN3_TOKENS, vocab_size=151936,
    ),
    Family(
        "gemma", "Gemma4ForCausalLM", "Gemma4TextConfig",
        {**TINY, "head_dim": 32, "global_head_dim": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
         "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 512,
         "final_logit_softcapping": 30.0, "hidden_size_per_layer_input": 0},  # no per-layer embeddings (31B, 26B)
        "ggml-vocab-gemma-4.gguf", "google-gemma-4-31B-it.jinja", "GemmaTokenizer",
        bos="<bos>", eos="<eos>", pad="<pad>", add_bos_token=True,
        stop_tokens=("<eos>", "<turn|>", "<|tool_response>"), end_of_turn="<turn|>",  # llama.cpp's gemma4 EOG set
        note="Gemma 4 (the only Gemma vocabulary in the sdist): turns end with <turn|>, eos is <eos>, pad <pad>; "
             "the generation prompt adds an empty thought channel that rendered history lacks",
        prefix_stable=False,
    ),
    Family(
        "mistral", "MistralForCausalLM", "MistralConfig",
        {**TINY, "head_dim": 32, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "sliding_window": None,
         "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},  # Nemo: head_dim != hidden/heads
        "ggml-vocab-llama-spm.gguf", "mistralai-Mistral-Nemo-Instruct-2407.jinja", "LlamaTokenizer",
        bos="<s>", eos="</s>", pad=None, add_bos_token=True,
        stop_tokens=("</s>",), end_of_turn="</s>",
        note="assistant turns end with eos </s>, no pad; vocabulary is Llama 2's SPM (the sdist has neither "
             "Mistral's SPM nor Nemo's Tekken), so [INST] is text as in Mistral v0.1/v0.2; the template folds the "
             "system message into the last user turn (and drops it when the chat ends with the assistant)",
        keeps_system=False, prefix_stable=False,
    ),
    Family(
        "phi3.5", "Phi3ForCausalLM", "Phi3Config",
        {**TINY, "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
         "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
         "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                             "short_factor": [1.0 + 0.05 * i for i in range(8)],
                             "long_factor": [1.0 + 4.0 * i for i in range(8)]}},
        "ggml-vocab-phi-3.gguf", "microsoft-Phi-3.5-mini-instruct.jinja", "LlamaTokenizer",
        bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", add_bos_token=False,
        stop_tokens=("<|end|>", "<|assistant|>", "<|endoftext|>"), end_of_turn="<|end|>",
        note="turns end with <|end|>; eos and pad are <|endoftext|>, which the template appends after the last turn",
        prefix_stable=False, vocab_size=32064,
    ),
)}


# ---------------------------------------------------------------------------------------------
# The sdist's files
# ---------------------------------------------------------------------------------------------

def sdist_path() -> Path:
    """The pinned llama-cpp-python sdist (`make` downloads and verifies it)."""
    return settings().sdist_cache / SDIST


def read_sdist_models(names: list[str]) -> dict[str, bytes]:
    """Files under the sdist's llama.cpp `models/` directory, by their path below it (the sdist checked
    against its pinned sha256 first)."""
    wanted = {SDIST_MODELS + name: name for name in names}
    found: dict[str, bytes] = {}
    with tarfile.open(fetch_sdist(settings().sdist_cache)) as archive:
        for member in archive:
            if member.name in wanted:
                found[wanted[member.name]] = archive.extractfile(member).read()
                if len(found) == len(wanted):
                    break
    missing = sorted(set(names) - set(found))
    if missing:
        raise FileNotFoundError(f"{sdist_path()} has no models/{', models/'.join(missing)}")
    return found


def vocab_tests(vocab: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer tests for a vocabulary: texts and the real tokenizer's ids for them
    (`tokenizer.encode(text, add_special_tokens=False)`, recorded by convert_hf_to_gguf_update.py)."""
    files = read_sdist_models([f"{vocab}.inp", f"{vocab}.out"])
    texts = files[f"{vocab}.inp"].decode().split("\n__ggml_vocab_test__\n")[:-1]
    ids = files[f"{vocab}.out"].decode().split("\n")[: len(texts)]
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, ids)]


# ---------------------------------------------------------------------------------------------
# Vocabulary -> tokenizer
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GgufVocab:
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str] | None


def read_gguf_vocab(path: Path) -> GgufVocab:
    """The tokenizer arrays of a vocabulary GGUF, without llama.cpp's trailing [PAD<n>] fillers."""
    import gguf

    fields = gguf.GGUFReader(path).fields

    def values(key: str):
        return fields[key].contents() if key in fields else None

    tokens, types = values("tokenizer.ggml.tokens"), values("tokenizer.ggml.token_type")
    real = len(tokens)
    while real and PLACEHOLDER.fullmatch(tokens[real - 1]):
        real -= 1
    scores = values("tokenizer.ggml.scores")
    return GgufVocab(tokens[:real], types[:real], scores[:real] if scores else None, values("tokenizer.ggml.merges"))


def _backend(vocab: Vocab, data: GgufVocab):
    """The `tokenizers` pipeline of the vocabulary's real tokenizer.json, filled from the GGUF's arrays."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import GemmaTokenizer, Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    ids = {token: i for i, token in enumerate(data.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in data.merges] if data.merges else None
    if vocab.pipeline == "qwen2-bpe":
        return Qwen2Tokenizer(vocab=ids, merges=merges).backend_tokenizer
    if vocab.pipeline == "gemma4-bpe":
        return GemmaTokenizer(vocab=ids, merges=merges).backend_tokenizer
    if vocab.pipeline == "llama3-bpe":
        backend = Tokenizer(BPE(ids, merges, ignore_merges=True))  # whole words in the vocabulary skip merging
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        backend.decoder = decoders.ByteLevel()
        return backend
    if vocab.pipeline == "spm":
        # SentencePiece BPE as its slow->fast conversion writes it (legacy: a space before every piece of
        # text, after special tokens too, as llama.cpp does); the merges come from the pieces' scores.
        # (transformers' own LlamaTokenizer pipeline differs: a text starting with a space loses a piece.)
        pieces = data.tokens[: _spm_pieces(data)]
        spm_ids = {token: i for i, token in enumerate(pieces)}
        backend = Tokenizer(BPE(spm_ids, generate_merges(spm_ids, list(zip(pieces, data.scores))),
                                unk_token=pieces[0], fuse_unk=True, byte_fallback=True))  # unk is piece 0
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
        return backend
    raise ValueError(f"{vocab.file}: unknown pipeline {vocab.pipeline!r}")


def _spm_pieces(data: GgufVocab) -> int:
    """How many entries are SentencePiece pieces: everything up to the last normal or byte piece (later
    entries are tokens the Hugging Face tokenizer added)."""
    return max(i for i, t in enumerate(data.types) if t in (NORMAL, BYTE)) + 1


def _added_tokens(vocab: Vocab, data: GgufVocab):
    """The GGUF's control, unknown and user-defined tokens as transformers added tokens."""
    from tokenizers import AddedToken

    added = []
    for token, kind in zip(data.tokens, data.types):
        if kind in (CONTROL, UNKNOWN, USER_DEFINED):
            flags = {"special": kind != USER_DEFINED or vocab.pipeline == "gemma4-bpe",
                     **vocab.added_flags.get(token, {})}
            added.append(AddedToken(token, normalized=False, **flags))
    return added


def sentencepiece_model(data: GgufVocab) -> bytes:
    """A SentencePiece `tokenizer.model` of the GGUF's pieces (llama.cpp's Phi-3 converter reads only this)."""
    from sentencepiece import sentencepiece_model_pb2 as spm

    model = spm.ModelProto()
    trainer, normalizer = model.trainer_spec, model.normalizer_spec
    trainer.model_type, trainer.vocab_size, trainer.byte_fallback = spm.TrainerSpec.BPE, _spm_pieces(data), True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
    normalizer.name, normalizer.add_dummy_prefix, normalizer.escape_whitespaces = "identity", True, True
    normalizer.remove_extra_whitespaces = False
    piece_types = {0: UNKNOWN, 1: CONTROL, 2: CONTROL}  # how SentencePiece types unk, bos and eos
    for i in range(_spm_pieces(data)):
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = data.tokens[i], data.scores[i], piece_types.get(i, data.types[i])
    return model.SerializeToString()


def vocab_tokenizer(vocab: str, cache: Path, log=print) -> Path:
    """The vocabulary's real tokenizer, converted once and cached: tokenizer.json with the GGUF's special
    tokens, plus tokenizer.model for SentencePiece vocabularies. Family choices (bos/eos/pad, renamed and
    appended tokens, template) are applied by `family_model`."""
    row = VOCABS[vocab]
    key = hashlib.sha256(json.dumps({"vocab": asdict(row), "sdist": SDIST_SHA256, "recipe": RECIPE_VERSION},
                                    sort_keys=True).encode()).hexdigest()[:12]
    target = cache / "models" / "families" / "tokenizers" / f"{vocab.removesuffix('.gguf')}-{key}"
    with exclusive_lock(target.with_name(f".{target.name}.lock")):
        if (target / "build.json").exists():
            return target
        log(f"converting {vocab} into a tokenizer in {target}")
        started = time.monotonic()
        with tempfile.TemporaryDirectory() as scratch, staged_dir(target) as tmp:
            gguf_file = Path(scratch) / vocab
            gguf_file.write_bytes(read_sdist_models([vocab])[vocab])
            data = read_gguf_vocab(gguf_file)
            backend = _backend(row, data)
            backend.add_special_tokens(_added_tokens(row, data))  # at their ids: they are in the vocabulary
            backend.save(str(tmp / "tokenizer.json"))
            if row.pipeline == "spm":
                (tmp / "tokenizer.model").write_bytes(sentencepiece_model(data))
            (tmp / "build.json").write_text(json.dumps(
                {"vocab": vocab, "source": row.source, "tokens": len(data.tokens),
                 "convert_s": round(time.monotonic() - started, 1)}, indent=2))
    return target


# ---------------------------------------------------------------------------------------------
# Family model
# ---------------------------------------------------------------------------------------------

def rename_tokens(tokenizer_json: dict, names: dict[int, str]) -> dict:
    """A tokenizer.json with the tokens at `names`' ids renamed (in the model's vocabulary and added tokens)."""
    vocab = tokenizer_json["model"]["vocab"]
    by_id = {i: token for token, i in vocab.items()}
    for i, name in names.items():
        vocab[name] = vocab.pop(by_id[i])
    for added in tokenizer_json["added_tokens"]:
        added["content"] = names.get(added["id"], added["content"])
    return tokenizer_json


def family_tokenizer(family: Family, cache: Path, log=print):
    """The family's tokenizer: the vocabulary's, with the family's token names, special tokens and template."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    base = vocab_tokenizer(family.vocab, cache, log)
    backend = Tokenizer.from_str(json.dumps(rename_tokens(json.loads((base / "tokenizer.json").read_text()),
                                                          family.renamed_tokens)))
    first_added = backend.get_vocab_size()
    backend.add_tokens([AddedToken(t, normalized=False, special=special) for t, special in family.added_tokens])
    specials = {"bos_token": family.bos, "eos_token": family.eos, "pad_token": family.pad}
    if VOCABS[family.vocab].pipeline == "spm":
        specials["unk_token"] = "<unk>"
    if VOCABS[family.vocab].pipeline == "gemma4-bpe":
        # the added tokens (<|turn>, <turn|>, <|channel>, ...) must be named special: llama.cpp's Gemma 4
        # converter types a token CONTROL (or, for its visible few, USER_DEFINED) only then
        specials.update(unk_token="<unk>", mask_token="<mask>", extra_special_tokens=[
            t.content for t in backend.get_added_tokens_decoder().values()
            if t.special and t.content not in ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, add_bos_token=family.add_bos_token,
                                        add_eos_token=False, clean_up_tokenization_spaces=False,
                                        model_max_length=family.config["max_position_embeddings"], **specials)
    appended = [tokenizer.convert_tokens_to_ids(t) for t, _ in family.added_tokens]
    if appended != list(range(first_added, first_added + len(appended))):
        raise AssertionError(f"{family.name}: appended tokens got ids {appended}, not from {first_added} on")
    template = f"templates/{family.template}"
    tokenizer.chat_template = read_sdist_models([template])[template].decode()
    return tokenizer, base


def build_family_model(family: Family, target: Path, cache: Path, log=print) -> Path:
    """Tokenizer, tiny random model and generation config of `family`, written whole into `target`."""
    import shutil

    import torch
    import transformers
    from transformers import GenerationConfig

    started = time.monotonic()
    tokenizer, base = family_tokenizer(family, cache, log)
    tokenizer_s = time.monotonic() - started

    ids = {name: tokenizer.convert_tokens_to_ids(t) if t else None
           for name, t in (("bos", family.bos), ("eos", family.eos), ("pad", family.pad))}
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in family.stop_tokens]
    config = getattr(transformers, family.config_class)(
        vocab_size=family.vocab_size or len(tokenizer), bos_token_id=ids["bos"], eos_token_id=stop_ids,
        pad_token_id=ids["pad"], **copy.deepcopy(family.config))  # configs rewrite their rope dicts in place
    torch.manual_seed(SEED)
    model = getattr(transformers, family.model_class)(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=ids["bos"], eos_token_id=stop_ids, pad_token_id=ids["pad"])

    with staged_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        config_file = tmp / "tokenizer_config.json"
        tokenizer_config = json.loads(config_file.read_text())
        # as the real file has them; tokenizer.json's pipeline is what loads either way
        tokenizer_config.update(tokenizer_class=family.tokenizer_class, add_bos_token=family.add_bos_token)
        config_file.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
        if (base / "tokenizer.model").exists():
            shutil.copyfile(base / "tokenizer.model", tmp / "tokenizer.model")
        (tmp / "family.json").write_text(json.dumps(
            {"family": family.name, "key": family.key, "vocab": family.vocab, "template": family.template,
             "tokenizer_s": round(tokenizer_s, 1), "build_s": round(time.monotonic() - started, 1),
             "tokenizer_convert_s": json.loads((base / "build.json").read_text())["convert_s"]}, indent=2))
    return target


def family_model(name: str, cache: Path, log=print) -> Path:
    """The cached model directory of family `name` under `cache` (a model cache, as SFTFLOW_CACHE), built
    on first use; concurrent callers wait for one builder."""
    family = FAMILIES[name]
    target = cache / "models" / "families" / f"{name}-{family.key}"
    with exclusive_lock(target.with_name(f".{target.name}.lock")):
        if not (target / "family.json").exists():
            log(f"building the {name} family model in {target}")
            build_family_model(family, target, cache, log)
    return target
