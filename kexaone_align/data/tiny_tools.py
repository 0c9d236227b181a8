"""The tiny tool task: multiplying a 3-digit by a 2-digit number with a calculator tool.

The tiny model cannot multiply ``347 * 29`` in its head, but it can copy the operands into a
``calculator`` call and copy the tool's result into ``\\boxed{}``. Problems are split into train and
held-out partitions by a hash of their text (about 20% held out), as in ``tiny_tasks``.

**SFT rows** (``generate_tool_sft_rows``): user question, assistant turn with the tool call, the tool turn
with the exact product, and the final answer ``The answer is \\boxed{10063}.``; the rows carry the
calculator's schema in ``tools``. Two deliberate imperfections leave AGAPO headroom: ``tool_skip`` of
the rows answer at once without the tool (a wrong guess: the product with one digit changed), and
``copy_noise`` of the tool-using rows copy the result with one digit changed.

**Prompts** (``generate_tool_prompts``, for AGAPO and GROUPER): ``environment: calculator``,
``task: math``, the product as ``reference``; the episode is scored by the ``math`` verifier on the
final answer.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Any

from kexaone_align.errors import KexaoneError

HELDOUT_PERCENT = 20
_TEMPLATES = ("What is {a} * {b}?", "Compute {a} * {b}.", "Find {a} * {b}.")


def _split_of(a: int, b: int) -> str:
    digest = hashlib.sha256(f"{a} * {b}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT else "train"


def _problems(rng: random.Random, split: str) -> Iterator[tuple[int, int]]:
    while True:
        a, b = rng.randint(100, 999), rng.randint(10, 99)
        if _split_of(a, b) == split:
            yield a, b


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
) -> list[dict[str, Any]]:
    """``n`` tool-use SFT conversations (see the module docstring); ``metadata`` says which are corrupted."""
    _check(n, split, reasoning_fraction=reasoning_fraction, tool_skip=tool_skip, copy_noise=copy_noise)
    rng = random.Random(f"kexaone-tiny-tools-sft-{split}-{seed}")
    problems = _problems(rng, split)
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
    n: int, seed: int, split: str = "train", *, reasoning_fraction: float = 0.0
) -> list[dict[str, Any]]:
    """``n`` calculator-episode prompts graded by ``math`` against the product."""
    _check(n, split, reasoning_fraction=reasoning_fraction)
    rng = random.Random(f"kexaone-tiny-tools-rl-{split}-{seed}")
    problems = _problems(rng, split)
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
