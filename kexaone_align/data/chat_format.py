"""Token-level helpers on top of the K-EXAONE chat template, for the SFT and RL stages.

The template itself (in the tokenizer, see ``kexaone_align.models.tokenizer``) decides the text. These
helpers only tokenize it and mark which tokens the assistant produced, by reading the token stream: an
assistant turn starts after the ``<|assistant|>`` header (the token and its newline) and ends with its
``<|endofturn|>`` inclusive. That works for any tokenizer with these control tokens (the tiny one and
the real K-EXAONE one), whatever its template does to the text in between.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from kexaone_align.errors import KexaoneError

ASSISTANT_HEADER = "<|assistant|>"
END_OF_TURN = "<|endofturn|>"
_ROLES = {"system", "user", "assistant", "tool"}

Message = dict[str, Any]


def _check_messages(messages: Sequence[Message]) -> None:
    if not messages:
        raise KexaoneError("a conversation needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise KexaoneError(
                f"message {i} must be a dict with a role in {sorted(_ROLES)}, got {message!r:.200}"
            )


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise KexaoneError(f"the tokenizer has no {token!r} token; is it a K-EXAONE tokenizer?")
    return token_id


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _generation_prompt(tokenizer: PreTrainedTokenizerBase, enable_thinking: bool) -> str | None:
    """The text the template appends for ``add_generation_prompt`` (e.g. ``<|assistant|>\\n<think>\\n``)."""
    probe = [{"role": "user", "content": "."}]
    bare, prompted = (
        tokenizer.apply_chat_template(
            probe, tokenize=False, add_generation_prompt=gen, enable_thinking=enable_thinking
        )
        for gen in (False, True)
    )
    return prompted[len(bare) :] if prompted.startswith(bare) and len(prompted) > len(bare) else None


def _encode_at_generation_points(
    tokenizer: PreTrainedTokenizerBase, text: str, messages: Sequence[Message], enable_thinking: bool
) -> list[int]:
    """Tokenize ``text``, cutting it where generation starts for each turn after the last user message.

    Pre-tokenization and BPE look across that point (the prompt's final ``"\\n\\n"`` is one token, but
    ``"\\n\\n4"`` encodes as ``"\\n", "\\n", "4"``), so encoding the whole string would give ids that differ
    from ``render_prompt(...) + generated ids``. Cutting there makes
    the SFT tokens of the answered turn exactly what the model sees and produces at inference.
    """
    gen_prompt = _generation_prompt(tokenizer, enable_thinking)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    n_generated = sum(m["role"] == "assistant" for m in messages[last_user + 1 :])
    headers = [m.start() for m in re.finditer(re.escape(ASSISTANT_HEADER), text)]
    cuts = []
    if gen_prompt and n_generated:
        for pos in headers[-n_generated:]:
            if text.startswith(gen_prompt, pos):
                cuts.append(pos + len(gen_prompt))
    ids: list[int] = []
    for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True):
        ids.extend(_encode(tokenizer, text[start:end]))
    return ids


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    enable_thinking: bool,
    tools: list[dict] | None = None,
) -> list[int]:
    """Token ids of ``messages`` followed by the assistant generation prompt (think block opened or empty)."""
    _check_messages(messages)
    if messages[-1]["role"] == "assistant":
        raise KexaoneError("render_prompt: the last message is an assistant turn; nothing left to generate")
    text = tokenizer.apply_chat_template(
        list(messages),
        tools=tools,
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=enable_thinking,
    )
    return _encode(tokenizer, text)


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    enable_thinking: bool,
    tools: list[dict] | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and a loss mask that is 1 exactly on assistant-produced tokens.

    Assistant-produced: everything after each ``<|assistant|>\\n`` header up to and including its
    ``<|endofturn|>`` (so the ``<think>...</think>`` block, the answer, tool calls and the end-of-turn token).
    Role headers, system/user/tool turns and the newline after ``<|endofturn|>`` get 0. With
    ``enable_thinking=False`` the final turn's reasoning is dropped (non-reasoning-mode data).
    """
    _check_messages(messages)
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    if n_assistant == 0:
        raise KexaoneError("tokenize_conversation: the conversation has no assistant message to train on")
    text = tokenizer.apply_chat_template(
        list(messages), tools=tools, tokenize=False, enable_thinking=enable_thinking
    )
    input_ids = _encode_at_generation_points(tokenizer, text, messages, enable_thinking)
    header, eot = _token_id(tokenizer, ASSISTANT_HEADER), _token_id(tokenizer, END_OF_TURN)
    newline = _encode(tokenizer, "\n")

    loss_mask = [0] * len(input_ids)
    n_headers, i = 0, 0
    while i < len(input_ids):
        if input_ids[i] != header:
            i += 1
            continue
        n_headers += 1
        i += 1
        if input_ids[i : i + len(newline)] == newline:
            i += len(newline)
        while i < len(input_ids) and input_ids[i] != eot:
            loss_mask[i] = 1
            i += 1
        if i == len(input_ids):
            raise KexaoneError("tokenize_conversation: an assistant turn is not closed by <|endofturn|>")
        loss_mask[i] = 1
        i += 1
    if n_headers != n_assistant:
        raise KexaoneError(
            f"tokenize_conversation: found {n_headers} '{ASSISTANT_HEADER}' headers for {n_assistant} "
            "assistant messages; a message's content probably contains chat control tokens"
        )
    return input_ids, loss_mask
