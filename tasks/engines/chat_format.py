"""How a model's chat template frames a conversation, read off renderings of probe conversations.

Nothing here knows a model family. The text around each role's turn, the special token that ends an
assistant turn and where a system prompt goes are found by rendering a few conversations of sentinel
words with the model's own template and tokenizer:

    [user]                      -> what precedes the first user turn, the user suffix, the generation prompt
    [user, assistant]           -> what follows an assistant's content (through its end-of-turn token)
    [user, assistant, user]     -> the same between turns, and the user prefix
    [system, user(, ...)]       -> whether a system prompt has a turn of its own, lives inside a user turn,
                                   or is refused (then sftflow folds it into the first user turn)

Masks (tasks.tokenize), stop tokens (evaluation, export) and the Ollama Modelfile (tasks.export) are
all derived from the result, so a model brings its own format.
"""

from __future__ import annotations

import hashlib
import json

import os
from dataclasses import dataclass
from typing import Literal

from tasks.engines.tokenizer import TemplateError

SYSTEM, USER_1, ASSISTANT, USER_2 = "SftflowSystemProbe", "SftflowUserProbeOne", "SftflowAssistantProbe", "SftflowUserProbeTwo"
FOLD_SEPARATOR = "\n\n"  # between a folded system prompt and the first user message

SystemPlace = Literal["turn", "first_user", "last_user", "folded"]


@dataclass(frozen=True)
class ChatFormat:
    """The literal text a template writes around each turn (sentinel content replaced by the message's)."""

    bos: str  # the template's own BOS text at the very start, or ""
    preamble: str  # what a conversation without a system prompt starts with after bos (e.g. a dated system block)
    user_prefix: str
    user_suffix: str
    assistant_prefix: str  # the generation prompt
    assistant_history_prefix: str  # before an earlier assistant turn's content (no empty think block, Qwen3, Gemma 4)
    assistant_suffix: str  # after an assistant message's content up to the next turn, its end-of-turn token in it
    end_of_turn: str  # the special token that ends an assistant turn
    system: SystemPlace  # where a system prompt goes
    system_prefix: str = ""  # "turn": before the system content (replacing the preamble); else ""
    system_suffix: str = ""  # "turn": after it; "first_user" / "last_user": between it and the user's content

    def fold_system(self, messages: list[dict]) -> list[dict]:
        """The conversation the template must see for its system prompt to reach the model: one the template
        refuses goes before the first user message (as Gemma 3's own template puts it); one the template puts
        in the last user turn goes there itself when the conversation ends with the assistant (Mistral Nemo's
        template would drop it: every training row ends so). Any other conversation as it is."""
        if not messages or messages[0]["role"] != "system":
            return messages
        if self.system == "folded":
            return _prepend(messages, "first", FOLD_SEPARATOR)
        if self.system == "last_user" and messages[-1]["role"] == "assistant":
            return _prepend(messages, "last", self.system_suffix)
        return messages


def _prepend(messages: list[dict], which: str, separator: str) -> list[dict]:
    """The system prompt written before the first or last user message's content, and itself removed."""
    system, rest = messages[0], list(messages[1:])
    users = [i for i, m in enumerate(rest) if m["role"] == "user"]
    if not users:
        return rest
    at = users[0] if which == "first" else users[-1]
    rest[at] = {**rest[at], "content": f"{system['content']}{separator}{rest[at]['content']}"}
    return rest


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _common_prefix(tokenizer, a: str, b: str) -> str:
    """The longest common prefix of two texts that ends on a token boundary of both (char by char, the
    suffix `<|end|>\n<|endoftext|>` and `<|end|>\n<|user|>` would share a stray `<|`)."""
    def token_ends(text: str) -> set[int]:
        return {e for _, e in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]}

    both = token_ends(a) & token_ends(b)
    length = len(os.path.commonprefix([a, b]))
    return a[: max((e for e in both if e <= length), default=0)]


def _special_tokens_in(tokenizer, text: str) -> list[str]:
    """The special tokens of `text`, in order, as the tokenizer splits it."""
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return [tokenizer.convert_ids_to_tokens(i) for i in ids if i in special]


def _unframed(what: str) -> TemplateError:
    return TemplateError(f"the chat template {what}, so sftflow cannot tell where turns begin and end; set "
                         "model.chat_template to a template of the model's format (a name such as chatml or llama3, "
                         "or Jinja)")


def _turn_texts(tokenizer) -> dict[str, str]:
    """The user and assistant framing, from the three probes without a system prompt."""
    user, assistant, user_2 = ({"role": "user", "content": USER_1}, {"role": "assistant", "content": ASSISTANT},
                               {"role": "user", "content": USER_2})
    one, one_prompted = _render(tokenizer, [user], False), _render(tokenizer, [user], True)
    pair, three = _render(tokenizer, [user, assistant], False), _render(tokenizer, [user, assistant, user_2], True)
    if USER_1 not in one_prompted or ASSISTANT not in pair or USER_2 not in three:
        raise _unframed("does not render a conversation's messages where they are expected")
    # without a generation prompt a template may close the conversation instead (Phi-3.5 appends eos)
    common = _common_prefix(tokenizer, one, one_prompted)
    content_end = one_prompted.index(USER_1) + len(USER_1)
    if len(common) < content_end:
        raise _unframed("renders a user message differently with and without the generation prompt")
    head, user_suffix = one_prompted[: one_prompted.index(USER_1)], common[content_end:]
    before_answer = three[three.index(USER_1) + len(USER_1): three.index(ASSISTANT)]
    if not before_answer.startswith(user_suffix):
        raise _unframed("ends a user turn differently when an answer follows")
    after = pair[pair.index(ASSISTANT) + len(ASSISTANT):]
    between = three[three.index(ASSISTANT) + len(ASSISTANT): three.index(USER_2)]
    assistant_suffix = _common_prefix(tokenizer, after, between)
    user_prefix = between[len(assistant_suffix):]
    if not head.endswith(user_prefix):
        raise _unframed("starts the first user turn differently from the later ones")
    return {"head": head, "user_prefix": user_prefix, "user_suffix": user_suffix,
            "assistant_prefix": one_prompted[len(common):], "assistant_suffix": assistant_suffix,
            "assistant_history_prefix": before_answer[len(user_suffix):]}


def _system_place(tokenizer, bos: str, preamble: str, user_prefix: str) -> tuple[SystemPlace, str, str]:
    """(where a system prompt goes, system_prefix, system_suffix), from renderings with one."""
    system, user = {"role": "system", "content": SYSTEM}, {"role": "user", "content": USER_1}
    try:
        text = _render(tokenizer, [system, user], True)
    except Exception:  # the template raises on a system role (Gemma 2's does): fold it, as Gemma 3 does itself
        return "folded", "", ""
    if SYSTEM not in text:  # the template drops it: fold it, or it would be lost
        return "folded", "", ""
    start, end, user_at = text.index(SYSTEM), text.index(SYSTEM) + len(SYSTEM), text.index(USER_1)
    before, after = text[:start], text[end:user_at]
    if user_at > end and before.startswith(bos) and after.endswith(user_prefix):
        return "turn", before[len(bos):], after[: len(after) - len(user_prefix)]
    if before == bos + preamble + user_prefix:  # inside a user turn, before its content: the first or the last?
        conversation = [system, user, {"role": "assistant", "content": ASSISTANT}, {"role": "user", "content": USER_2}]
        longer = _render(tokenizer, conversation, True)
        place = "first_user" if longer.index(SYSTEM) < longer.index(USER_1) else "last_user"
        return place, "", after
    raise _unframed("puts a system prompt where sftflow cannot follow it")


def derive_chat_format(tokenizer) -> ChatFormat:
    """The tokenizer's chat template, as a ChatFormat; TemplateError when its turns cannot be told apart."""
    texts = _turn_texts(tokenizer)
    head = texts.pop("head")
    bos = tokenizer.bos_token if tokenizer.bos_token and head.startswith(tokenizer.bos_token) else ""
    preamble = head[len(bos): len(head) - len(texts["user_prefix"])]
    specials = _special_tokens_in(tokenizer, texts["assistant_suffix"])
    if specials:
        end_of_turn = specials[0]
    elif tokenizer.eos_token and tokenizer.eos_token in texts["assistant_suffix"]:
        end_of_turn = tokenizer.eos_token
    else:
        raise _unframed(f"ends an assistant turn with {texts['assistant_suffix']!r}, which holds no special token "
                        "the model could learn to stop on")
    place, system_prefix, system_suffix = _system_place(tokenizer, bos, preamble, texts["user_prefix"])
    return ChatFormat(bos=bos, preamble=preamble, end_of_turn=end_of_turn, system=place, system_prefix=system_prefix,
                      system_suffix=system_suffix, **texts)


_FORMATS: dict[tuple, ChatFormat] = {}


def chat_format(tokenizer) -> ChatFormat:
    """derive_chat_format, once per template and special tokens."""
    key = (tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token, len(tokenizer))
    if key not in _FORMATS:
        _FORMATS[key] = derive_chat_format(tokenizer)
    return _FORMATS[key]


def template_messages(messages: list[dict]) -> list[dict]:
    """Canonical messages (schemas.tables.MESSAGE_TYPE) as chat templates read them: tool calls as a list
    of OpenAI-shaped calls and reasoning as `reasoning_content` (Qwen3's name), each only where the
    message has one; the loss weight is not the template's business."""
    out, pending_ids = [], []
    for m in messages:
        item = {"role": m["role"], "content": m["content"]}
        calls = m.get("tool_calls")
        if calls:
            calls = json.loads(calls) if isinstance(calls, str) else calls
            # templates that pair results with calls (Mistral's: 9 letters or digits) get an id derived from
            # the call when the data gave none, and each following tool result the id of its call, in order
            calls = [c if c.get("id") else {**c, "id": hashlib.sha256(json.dumps([i, c], sort_keys=True).encode())
                                                 .hexdigest()[:9]} for i, c in enumerate(calls)]
            item["tool_calls"], pending_ids = calls, [c["id"] for c in calls]
        if m.get("reasoning") or m.get("reasoning_content"):
            item["reasoning_content"] = m.get("reasoning") or m["reasoning_content"]
        if m["role"] == "tool" and pending_ids:
            item["tool_call_id"] = m.get("tool_call_id") or pending_ids.pop(0)
        out.append(item)
    return out


def render(tokenizer, messages: list[dict], tools=None, generation_prompt: bool = False) -> str:
    """The model's template rendering of a conversation (a system prompt it refuses folded into the first
    user turn): what training, evaluation and the parity check all see."""
    messages = chat_format(tokenizer).fold_system(template_messages(messages))
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


def end_of_turn_ids(tokenizer) -> set[int]:
    """The ids that end an assistant turn: the template's end-of-turn token, and eos."""
    ids = {tokenizer.convert_tokens_to_ids(chat_format(tokenizer).end_of_turn)}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def stop_tokens(tokenizer) -> list[str]:
    """The tokens a runtime stops generating on: the end-of-turn token first, then eos when it differs."""
    tokens = [chat_format(tokenizer).end_of_turn]
    if tokenizer.eos_token and tokenizer.eos_token not in tokens:
        tokens.append(tokenizer.eos_token)
    return tokens

