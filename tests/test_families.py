"""Family matrix smoke test: each family's tiny model (tests/families.py) loads with the Auto classes,
renders a chat with its real template, runs a forward pass, converts to an f16 GGUF with llama.cpp's
converter through the export's own function, loads in llama.cpp, and tokenizes exactly as transformers
does; the export's parity check then passes its f16 and q8_0 thresholds.

    SFTFLOW_TEST_CACHE=/tmp/famcache python -m pytest -q -p no:cacheprovider tests/test_families.py

(SFTFLOW_TEST_CACHE keeps the built models between sessions; without it each session builds them, about
a minute for all six. It needs the pinned llama-cpp-python sdist that `make` downloads.)
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.families import family_model, vocab_tests

pytestmark = pytest.mark.slow

SYSTEM = "You are a terse assistant."
CHAT = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "42."},
    {"role": "user", "content": "And  doubled?\nShow it."},  # two spaces and a newline: whitespace handling
    {"role": "assistant", "content": "84, since 42 × 2 = 84."},
]


def render(tokenizer, chat: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)


def renders_incrementally(tokenizer, chat: list[dict]) -> bool:
    """Whether every shorter chat renders as a prefix of the whole chat's rendering: the history up to each
    assistant turn as written, and up to each user turn with the generation prompt."""
    whole = render(tokenizer, chat)
    cuts = [i for i in range(1, len(chat)) if chat[i - 1]["role"] in ("user", "assistant")]
    return all(whole.startswith(render(tokenizer, chat[:i], chat[i - 1]["role"] == "user")) for i in cuts)


def first_difference(ours: list[int], theirs: list[int], tokenizer) -> str:
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return (f"first difference at token {at}: llama.cpp {ours[at:at + 6]} vs transformers {theirs[at:at + 6]} "
            f"{tokenizer.convert_ids_to_tokens(theirs[at:at + 6])}")


def test_family_round_trip(family, llama_tools, tmp_path):
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from schemas.quants import BY_NAME
    from tasks.export.convert import convert_to_gguf, quantize
    from tasks.export.parity import HfReference, check_thresholds, control_parity, parity

    row, model_dir = family
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert type(model).__name__ == row.model_class
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied == row.config["tie_word_embeddings"]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (row.bos, row.eos, row.pad)
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids(list(row.stop_tokens))

    # the rebuilt tokenizer encodes llama.cpp's tokenizer tests as the real tokenizer did
    wrong = [(text, ids) for text, ids in vocab_tests(row.vocab)
             if tokenizer(text, add_special_tokens=False).input_ids != ids]
    assert not wrong, f"{len(wrong)} of llama.cpp's {row.vocab} tests encode differently, e.g. {wrong[0][0]!r}"

    if not row.accepts_system:
        with pytest.raises(Exception):
            render(tokenizer, CHAT)
    chat = CHAT if row.accepts_system else CHAT[1:]  # a template that refuses system messages gets none
    text, prompt = render(tokenizer, chat), render(tokenizer, chat[:-1], generation_prompt=True)
    assert row.end_of_turn in text
    assert (SYSTEM in text) == (row.keeps_system and row.accepts_system)
    assert renders_incrementally(tokenizer, chat) == row.prefix_stable

    ids = tokenizer(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size) and torch.isfinite(logits).all()

    gguf = convert_to_gguf(llama_tools, model_dir, tmp_path / "f16.gguf", tmp_path / "convert.log", model_dir.name)
    llm = llama_cpp.Llama(str(gguf), vocab_only=False, verbose=False)
    try:
        for rendered in (text, prompt):
            theirs = tokenizer(rendered, add_special_tokens=False).input_ids
            ours = llm.tokenize(rendered.encode(), add_bos=False, special=True)
            assert ours == theirs, first_difference(ours, theirs, tokenizer)
    finally:
        llm.close()

    # the export's own parity check (logits, top-1, greedy continuation against the HF model) at the export's
    # thresholds; q8_0 quantises every tensor (all dims are multiples of 32) and is held to KL only, as random
    # weights give near-uniform logits whose top-1 flips under 8-bit rounding
    reference = HfReference(model, tokenizer, [prompt], greedy_tokens=8)
    assert check_thresholds(parity(gguf, reference), BY_NAME["f16"].thresholds) == []
    # a control check decodes its greedy continuation only when the other figures leave its verdict open
    assert control_parity(gguf, reference, {"min_top1": 1.01}).greedy_match is None  # top-1 misses already
    decoded = control_parity(gguf, reference, BY_NAME["f16"].thresholds).greedy_match  # the f16 passes the rest
    assert decoded is not None and decoded == parity(gguf, reference).greedy_match
    q8 = quantize(gguf, tmp_path / "q8_0.gguf", "q8_0")
    assert check_thresholds(parity(q8, reference), BY_NAME["q8_0"].thresholds) == []

    # parity's greedy continuation, read from one pass while it follows the HF one, is llama.cpp's token-by-token
    # greedy decoding: when the two agree throughout, and when they part at any position
    from tasks.export.parity import _greedy_gguf

    ids, steps = reference.answer(0).ids, 12
    llm = llama_cpp.Llama(str(q8), n_ctx=512, logits_all=True, verbose=False, seed=0)
    try:
        def greedy(theirs: list[int]) -> list[int]:
            llm.reset()
            llm.eval(ids)
            return _greedy_gguf(llm, np.asarray(llm.scores[len(ids) - 1]), steps, theirs)

        alone = greedy([])  # nothing to follow: token by token
        assert len(alone) == steps and greedy(alone) == alone
        for part in range(steps):
            assert greedy([*alone[:part], (alone[part] + 1) % llm.n_vocab(), *alone[part + 1:]]) == alone, part
    finally:
        llm.close()


def test_a_phi3_gguf_converted_from_the_exports_directory_tokenizes_alike(family_cache, llama_tools, tmp_path):
    """llama.cpp strips the whitespace after Phi-3's special tokens (as transformers does) only when the GGUF's
    general.name says phi-3 (llama-vocab.cpp); the converter would name it after the directory it converts,
    which the export calls 'merged', so the export passes the base model's name."""
    import llama_cpp
    from transformers import AutoTokenizer

    from tasks.export.convert import convert_to_gguf, gguf_model_name

    model_dir = family_model("phi3.5", family_cache, log=lambda *_: None)
    merged = tmp_path / "merged"  # the export's name for the directory it converts (RunDir.merged_dir)
    merged.symlink_to(model_dir, target_is_directory=True)
    name = gguf_model_name("microsoft/Phi-3.5-mini-instruct")  # model.name as a user writes it
    gguf = convert_to_gguf(llama_tools, merged, tmp_path / "f16.gguf", tmp_path / "convert.log", name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = render(tokenizer, CHAT)
    llm = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    try:
        theirs = tokenizer(text, add_special_tokens=False).input_ids
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == theirs
    finally:
        llm.close()


TOOLS = '[{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]'
CALL = '[{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]'
# Per family: what is trained of a tool-call turn (text and call) and of an answer with reasoning, as the
# family's own template writes them; None: the template drops the call, or writes the tool's answer inside the
# assistant's turn, so the row is refused by name (never trained without its call).
TOOL_TURNS = {
    "qwen2.5": ('Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>'
                "The sum is 5.<|im_end|>"),
    "qwen3": ('Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>'
              "<think>\n2 plus 3 is 5.\n</think>\n\nThe sum is 5.<|im_end|>"),
    "llama3": None,  # Llama 3.x renders only the call of a turn that has one: its text would be lost
    "phi3.5": None,  # no tool calls in Phi-3.5's template
    "gemma": None,  # Gemma 4 writes the tool's answer inside the model's turn
    "mistral": None,
}


def test_tool_calls_and_reasoning_are_trained_as_the_family_writes_them(family):
    from transformers import AutoTokenizer

    from tasks.engines.chat_format import chat_format
    from tasks.engines.tokenizer import TemplateError
    from tasks.tokenize import IGNORE, tokenize_conversation

    row, model_dir = family
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eot = tokenizer.convert_tokens_to_ids(chat_format(tokenizer).end_of_turn)
    chat = [{"role": "user", "content": "Add 2 and 3."},
            {"role": "assistant", "content": "Let me add.", "tool_calls": CALL},
            {"role": "tool", "content": "5"},
            {"role": "assistant", "content": "The sum is 5.", "reasoning": "2 plus 3 is 5."}]
    expected = TOOL_TURNS[row.name]
    if expected is None:
        with pytest.raises(TemplateError, match="does not render assistant turn 1's content and tool calls"):
            tokenize_conversation(tokenizer, chat, TOOLS, 4096, eot)
        return
    example = tokenize_conversation(tokenizer, chat, TOOLS, 4096, eot)
    assert example.turns_missing_eot == []
    assert tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]) == expected


def test_a_turn_that_only_calls_a_tool_is_trained_on_its_call(family):
    """Llama 3.x and Mistral write a call-only turn in their own syntax: the call and end-of-turn are trained."""
    from transformers import AutoTokenizer

    from tasks.engines.chat_format import chat_format
    from tasks.tokenize import IGNORE, tokenize_conversation

    row, model_dir = family
    if row.name not in ("llama3", "qwen2.5"):
        pytest.skip("the call-only turn is shown on Llama 3.x and Qwen2.5")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eot = tokenizer.convert_tokens_to_ids(chat_format(tokenizer).end_of_turn)
    chat = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "", "tool_calls": CALL},
            {"role": "tool", "content": "5"}, {"role": "assistant", "content": "The sum is 5."}]
    example = tokenize_conversation(tokenizer, chat, TOOLS, 4096, eot)
    text = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE])
    call = {"llama3": '{"name": "add", "parameters": {"a": 2, "b": 3}}<|eot_id|>',
            "qwen2.5": '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>'}[row.name]
    assert text == call + "The sum is 5." + row.end_of_turn
