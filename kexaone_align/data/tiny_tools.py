"""The tiny tool task: multiplying two 2-digit numbers with a calculator tool.

The tiny model cannot multiply ``47 * 86`` in its head, but it can copy the operands into a
``calculator`` call and copy the tool's result into ``\\boxed{}``. ``operand_digits`` (default ``[2, 2]``)
sets the operands' lengths: longer products are more digits to copy, which a from-scratch toy model learns
much more slowly. Problems are split into train and held-out partitions by a hash of their text (about 20%
held out), as in ``tiny_tasks``.

**SFT rows** (``generate_tool_sft_rows``): user question, assistant turn with the tool call, the tool turn
with the exact product, and the final answer ``The answer is \\boxed{4042}.``; the rows carry the
calculator's schema in ``tools``. Two deliberate imperfections leave AGAPO headroom: ``tool_skip`` of
the rows answer at once without the tool (a wrong guess: the product with one digit changed), and
``copy_noise`` of the tool-using rows copy the result with one digit changed. The SFT model imitates
both, so AGAPO's reward teaches it to always call the tool and to copy exactly.

**Prompts** (``generate_tool_prompts``, for AGAPO and GROUPER): ``environment: calculator``,
``task: math``, the product as ``reference``; the episode is scored by the ``math`` verifier on the
final answer. Prompts within a split are distinct problems.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from typing import Any

from kexaone_align.errors import KexaoneError

HELDOUT_PERCENT = 20
_TEMPLATES = ("What is {a} * {b}?", "Compute {a} * {b}.", "Find {a} * {b}.")


def _split_of(a: int, b: int) -> str:
    digest = hashlib.sha256(f"{a} * {b}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT else "train"


def _problems(rng: random.Random, split: str, digits: tuple[int, int]) -> Iterator[tuple[int, int]]:
    (lo_a, hi_a), (lo_b, hi_b) = ((10 ** (d - 1), 10**d - 1) for d in digits)
    while True:
        a, b = rng.randint(lo_a, hi_a), rng.randint(lo_b, hi_b)
        if _split_of(a, b) == split:
            yield a, b


def _digits(operand_digits: Sequence[int]) -> tuple[int, int]:
    digits = tuple(operand_digits)
    if len(digits) != 2 or not all(isinstance(d, int) and 2 <= d <= 6 for d in digits):
        raise KexaoneError(
            f"tiny tools: operand_digits must be two integers in [2, 6], got {operand_digits!r}"
        )
    return digits[0], digits[1]


def _one_digit_off(value: int, rng: random.Random) -> int:
    digits = list(str(value))
    i = rng.randrange(len(digits))
    choices = [d for d in "0123456789" if d != digits[i] and not (i == 0 and d == "0")]
    digits[i] = rng.choice(choices)
    return int("".join(digits))


def _check(n: int, split: str, **fractions: float) -> None:
    if not isinstance(n, int) or n < 0:
        raise KexaoneError(f"tiny tools: n must be a non-negative integer, got {n!r}")
    if split not in ("train", "heldout"):
        raise KexaoneError(f"tiny tools: split must be train or heldout, got {split!r}")
    for name, value in fractions.items():
        if not 0.0 <= value <= 1.0:
            raise KexaoneError(f"tiny tools: {name} must be in [0, 1], got {value!r}")


def calculator_tools() -> list[dict[str, Any]]:
    """The calculator's schema, as the ``calculator`` environment lists it."""
    from kexaone_align.environments import get_environment

    return get_environment("calculator").tools(None)


def generate_tool_sft_rows(
    n: int,
    seed: int,
    split: str = "train",
    *,
    reasoning_fraction: float = 0.0,
    tool_skip: float = 0.3,
    copy_noise: float = 0.2,
    operand_digits: Sequence[int] = (2, 2),
) -> list[dict[str, Any]]:
    """``n`` tool-use SFT conversations (see the module docstring); ``metadata`` says which are corrupted."""
    _check(n, split, reasoning_fraction=reasoning_fraction, tool_skip=tool_skip, copy_noise=copy_noise)
    rng = random.Random(f"kexaone-tiny-tools-sft-{split}-{seed}")
    problems = _problems(rng, split, _digits(operand_digits))
    tools = calculator_tools()
    rows = []
    for i in range(n):
        a, b = next(problems)
        product = a * b
        question = {"role": "user", "content": rng.choice(_TEMPLATES).format(a=a, b=b)}
        thinking = rng.random() < reasoning_fraction
        skip = rng.random() < tool_skip
        noisy = not skip and rng.random() < copy_noise
        if skip:
            answer = _one_digit_off(product, rng)
            messages = [question, {"role": "assistant", "content": f"The answer is \\boxed{{{answer}}}."}]
        else:
            answer = _one_digit_off(product, rng) if noisy else product
            call = {"name": "calculator", "arguments": {"expression": f"{a} * {b}"}}
            messages = [
                question,
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": str(product)},
                {"role": "assistant", "content": f"The answer is \\boxed{{{answer}}}."},
            ]
        rows.append(
            {
                "id": f"tiny-tools-sft-{split}-{seed}-{i}",
                "messages": messages,
                "tools": tools,
                "enable_thinking": thinking,
                "metadata": {"answer": str(product), "skip": skip, "noisy": noisy, "split": split},
            }
        )
    return rows


def generate_tool_prompts(
    n: int,
    seed: int,
    split: str = "train",
    *,
    reasoning_fraction: float = 0.0,
    operand_digits: Sequence[int] = (2, 2),
) -> list[dict[str, Any]]:
    """``n`` calculator-episode prompts graded by ``math`` against the product."""
    _check(n, split, reasoning_fraction=reasoning_fraction)
    rng = random.Random(f"kexaone-tiny-tools-rl-{split}-{seed}")
    digits = _digits(operand_digits)
    (lo_a, hi_a), (lo_b, hi_b) = ((10 ** (d - 1), 10**d - 1) for d in digits)
    share = HELDOUT_PERCENT if split == "heldout" else 100 - HELDOUT_PERCENT
    capacity = (hi_a - lo_a + 1) * (hi_b - lo_b + 1) * share // 100
    if n > capacity // 2:  # distinct prompts: refuse to draw more than half of the split's problems
        raise KexaoneError(
            f"tiny tools: {n} distinct {split} prompts of {digits[0]}x{digits[1]} digits asked, "
            f"at most {capacity // 2} (of ~{capacity}) allowed"
        )
    problems = _problems(rng, split, digits)
    rows, seen = [], set()
    while len(rows) < n:
        a, b = next(problems)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        rows.append(
            {
                "id": f"tiny-tools-{split}-{seed}-{len(rows)}",
                "messages": [{"role": "user", "content": rng.choice(_TEMPLATES).format(a=a, b=b)}],
                "task": "math",
                "environment": "calculator",
                "reference": str(a * b),
                "enable_thinking": rng.random() < reasoning_fraction,
                "metadata": {"problem": f"{a} * {b}", "split": split},
            }
        )
    return rows


STAGE_GENERATORS = {
    "sft": generate_tool_sft_rows,
    "agapo": generate_tool_prompts,
    "grouper": generate_tool_prompts,
}
