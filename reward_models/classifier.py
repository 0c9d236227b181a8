"""A scalar reward model (``AutoModelForSequenceClassification`` with one output), e.g. Bradley-Terry trained.

A Bradley-Terry RM outputs a logit ``s`` whose differences are log-odds of preference. We map it to [0, 1]
with ``sigmoid((s - shift) / scale)``: with the defaults (0, 1) that is the probability the response beats
a response of score 0. ``shift``/``scale`` let a team centre a model whose logits sit far from 0.
Scores are computed in batches (``batch_size``, right padding; the model picks each row's last real token)
and do not depend on how samples are batched.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kexaone_align.verifiers.api import Sample, VerifyResult

from kexaone_align.errors import KexaoneError


class SequenceClassifierRM:
    """Scores ``Sample``s with a sequence-classification reward model; a ``Verifier`` too (``verify``)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        batch_size: int = 8,
        max_length: int = 4096,
        device: str | None = None,
        shift: float = 0.0,
        scale: float = 1.0,
        label_index: int = 0,
        name: str = "classifier_rm",
    ) -> None:
        if batch_size < 1 or max_length < 1:
            raise KexaoneError("classifier RM batch_size and max_length must be >= 1")
        if not scale > 0:
            raise KexaoneError(f"classifier RM scale must be > 0, got {scale}")
        if isinstance(model, str | Path):
            model, tokenizer = _load(Path(model), tokenizer)
        elif tokenizer is None:
            raise KexaoneError("SequenceClassifierRM was given a model object but no tokenizer")
        if device is not None:
            model = model.to(device)
        num_labels = int(getattr(model.config, "num_labels", 1))
        if not 0 <= label_index < num_labels:
            raise KexaoneError(
                f"classifier RM label_index {label_index} is out of range for {num_labels} label(s)"
            )
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise KexaoneError("the reward model tokenizer has neither a pad token nor an EOS token")
        if model.config.pad_token_id is None:
            model.config.pad_token_id = pad_id  # needed to find each row's last token in a padded batch
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.shift = float(shift)
        self.scale = float(scale)
        self.label_index = int(label_index)
        self.name = name
        self._lock = threading.Lock()

    def text(self, sample: Sample) -> str:
        """The scored text: prompt + response through the chat template when the tokenizer has one."""
        prompt = sample.prompt
        messages = (
            list(prompt) if isinstance(prompt, list | tuple) else [{"role": "user", "content": str(prompt)}]
        )
        messages.append({"role": "assistant", "content": sample.response})
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n\n".join(str(m.get("content", "")) for m in messages)

    def raw_scores(self, samples: Sequence[Sample]) -> list[float]:
        """The model's logits (before the sigmoid), in the order of ``samples``."""
        import torch

        texts = [self.text(s) for s in samples]
        ids = [
            self.tokenizer(t, add_special_tokens=False, truncation=True, max_length=self.max_length)[
                "input_ids"
            ]
            for t in texts
        ]
        order = sorted(
            range(len(ids)), key=lambda i: len(ids[i])
        )  # similar lengths share a batch: less padding
        out = [0.0] * len(ids)
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                width = max(len(ids[i]) for i in rows)
                input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, i in enumerate(rows):
                    input_ids[r, : len(ids[i])] = torch.tensor(ids[i])
                    mask[r, : len(ids[i])] = 1
                logits = self.model(
                    input_ids=input_ids.to(self.model.device), attention_mask=mask.to(self.model.device)
                ).logits
                for r, i in enumerate(rows):
                    out[i] = float(logits[r, self.label_index])
        return out

    def to_reward(self, raw: float) -> float:
        z = (raw - self.shift) / self.scale
        return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))

    def score_batch(self, samples: Sequence[Sample]) -> list[VerifyResult]:
        if not samples:
            return []
        return [
            VerifyResult(self.to_reward(r), {"raw_score": r, "rm": self.name})
            for r in self.raw_scores(samples)
        ]

    def score(self, sample: Sample) -> VerifyResult:
        return self.score_batch([sample])[0]

    def verify(self, sample: Sample) -> VerifyResult:
        return self.score(sample)


def _load(path: Path, tokenizer: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not path.is_dir():
        raise KexaoneError(f"reward model directory {str(path)!r} does not exist")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path))
        if tokenizer is None or isinstance(tokenizer, str | Path):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer or path))
    except (OSError, ValueError) as exc:
        raise KexaoneError(f"could not load the reward model from {str(path)!r}: {exc}") from None
    return model, tokenizer
