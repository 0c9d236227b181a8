"""A judge model generating in this process with transformers (no server needed).

Useful when the judge is small enough to sit next to the trainer, or for offline evaluation. Requests are
batched (left padding, the tokenizer's chat template) and serialised by a lock, since one model object must
not run two ``generate`` calls at once. ``RayJudgeBackend`` puts this same class in a Ray actor.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kexaone_align.reward_models.backends.base import Messages

from kexaone_align.errors import KexaoneError


class TransformersJudgeBackend:
    """Greedy (``temperature=0``) or sampled chat completions from a local causal LM."""

    batched = True

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        device: str | None = None,
        dtype: str = "auto",
        max_batch_size: int = 8,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise KexaoneError(f"judge max_batch_size must be >= 1, got {max_batch_size}")
        if isinstance(model, str | Path):
            model, tokenizer = _load(Path(model), tokenizer, dtype)
        elif tokenizer is None:
            raise KexaoneError("TransformersJudgeBackend was given a model object but no tokenizer")
        elif isinstance(tokenizer, str | Path):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = int(max_batch_size)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self._pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        if self._pad_id is None:
            raise KexaoneError(
                "the judge tokenizer has neither a pad token nor an EOS token to pad batches with"
            )
        self._lock = threading.Lock()

    def prompt_text(self, messages: Messages) -> str:
        """The judge's input string: the chat template, or ``role: content`` lines when there is none."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **self.chat_template_kwargs
            )
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "

    def complete(self, messages: Messages, *, max_tokens: int = 512, temperature: float = 0.0) -> str:
        out = self.complete_batch([messages], max_tokens=max_tokens, temperature=temperature)[0]
        if isinstance(out, Exception):
            raise out
        return out

    def complete_batch(
        self, batch: Sequence[Messages], *, max_tokens: int = 512, temperature: float = 0.0
    ) -> list[str | Exception]:
        """Texts for many chats, ``max_batch_size`` per ``generate``; a failing chunk reports its error."""
        out: list[str | Exception] = []
        for start in range(0, len(batch), self.max_batch_size):
            chunk = batch[start : start + self.max_batch_size]
            try:
                out.extend(self._generate(chunk, max_tokens, temperature))
            except Exception as exc:  # e.g. out of memory on one chunk: the judge counts and retries
                out.extend([exc] * len(chunk))
        return out

    def _generate(self, chunk: Sequence[Messages], max_tokens: int, temperature: float) -> list[str]:
        import torch

        texts = [self.prompt_text(m) for m in chunk]
        enc = self.tokenizer(
            texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        ).to(self.model.device)
        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": float(temperature), "top_k": 0, "top_p": 1.0}
        with self._lock, torch.inference_mode():
            ids = self.model.generate(
                **enc, max_new_tokens=int(max_tokens), pad_token_id=self._pad_id, **sampling
            )
        new = ids[:, enc["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)


def _load(path: Path, tokenizer: Any, dtype: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_dir():
        raise KexaoneError(f"judge model directory {str(path)!r} does not exist")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, str | Path) else None
        if tok is None:
            tok = AutoTokenizer.from_pretrained(str(tokenizer or path))
    except (OSError, ValueError) as exc:
        raise KexaoneError(f"could not load the judge model from {str(path)!r}: {exc}") from None
    return model, tok
