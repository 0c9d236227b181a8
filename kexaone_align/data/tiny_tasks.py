"""The tiny task set: offline, seeded generators for the CPU pipeline (SFT -> AGAPO -> GROUPER).

Everything is generated from a seed with Python's ``random`` (no network, no files read), so the same
seed always gives byte-identical JSONL.

**Problems.** Two-operand addition on 1-2 digit numbers, ``a + b`` with ``0 <= a, b <= 99``, asked
plainly (``"What is 37 + 45?"``) or as a short word problem (``"Ann has 37 apples and gets 45 more. How
many apples does she have now?"``); ``operations=["+", "-"]`` adds subtraction (``a >= b``, answers never
negative). Operands are drawn as 1-digit or 2-digit with equal odds, so easy (``3 + 4``) and carrying
(``37 + 45``) problems are both common. Every problem belongs to exactly one partition, fixed by a hash of
its text and independent of the seed: about 20% are **held-out** and never appear in any training file
(SFT or RL), so held-out accuracy measures arithmetic, not memorisation.

**SFT rows** (``generate_sft_rows``): one user turn and one assistant turn ending in
``The answer is \\boxed{82}.``. Reasoning rows (``enable_thinking: true``, ``reasoning_fraction`` of them)
put a column-arithmetic trace first::

    <think>
    ones: 7 + 5 = 12, carry 1
    tens: 3 + 4 = 7, 7 + 1 = 8
    so 82
    </think>

Each step is a one-digit fact that the training problems cover many times over (both columns use the
same addition table; the carry is its own ``+ 1`` step), and the tiny tokenizer writes one token per
digit, so a held-out problem is a new combination of familiar steps and reasoning mode can generalise.
Non-reasoning rows have no trace and must answer from memory, so RL prompts default to reasoning mode.
Two deliberate imperfections leave headroom for the later stages:

* ``answer_noise`` of the rows end with a wrong answer (off by 1 or 10, the trace's last number changed
  to match), so the SFT model samples wrong answers at temperature 1.0 even when its columns are right,
  and AGAPO's verifiable reward has something to fix;
* ``style_fraction`` of the rows add a style instruction to the question (reply in lowercase; end the
  reply with a given word), and only ``style_compliance`` of those answers obey it, so the SFT model
  follows style instructions only part of the time and GROUPER's rule reward has something to raise.

**RL prompts** (``generate_rl_prompts``): ``task: "math"`` rows with the exact answer as ``reference``,
graded by the ``math`` verifier from ``\\boxed{}`` (or the final line). The ``train`` and ``heldout``
splits come from the disjoint partitions above, and a held-out set never repeats a problem.

**Preference prompts** (``generate_preference_prompts``): arithmetic questions carrying one or two style
instructions, ``task: "ifeval"``, with an IFEval-style reference ``{"instruction_id_list": [...],
"kwargs": [...]}`` using ``change_case:english_lowercase`` and ``startend:end_checker`` (``end_phrase``
one of a few short words), so the ``ifeval`` verifier scores compliance by rule. The arithmetic answer is
kept in ``metadata["math_reference"]`` for rewards that also check correctness.

``write_tiny_dataset(out_dir, seed)`` writes all of these as JSONL files plus a ``manifest.json``;
``generate_rows("tiny_arithmetic", stage, ...)`` serves a recipe's ``data.generator`` for one stage.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kexaone_align.errors import KexaoneError

SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 20
MAX_OPERAND = 99
END_WORDS = ("done", "thanks", "bye")
LOWERCASE_ID = "change_case:english_lowercase"
END_CHECKER_ID = "startend:end_checker"

# The tiny tokenizer writes every digit as its own token, so "37" and " 37" share the digit tokens.
_QUESTION_TEMPLATES = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Find {a} {op} {b}.")
_WORD_TEMPLATES = {  # short word problems: the same arithmetic, the numbers inside a sentence
    "+": (
        "Ann has {a} apples and gets {b} more. How many apples does she have now?",
        "A box holds {a} pens and another holds {b}. How many pens are there in all?",
    ),
    "-": ("Ann has {a} apples and gives away {b}. How many apples does she have left?",),
}
OPERATIONS = ("+", "-")
DEFAULT_OPERATIONS = ("+",)
_LOWERCASE_TEXT = "Reply in lowercase letters only."
_END_TEXT = 'End your reply with the word "{word}".'


@dataclass(frozen=True)
class Problem:
    """One arithmetic problem ``a op b``."""

    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def text(self) -> str:
        return f"{self.a} {self.op} {self.b}"

    def split(self) -> str:
        """The partition this problem belongs to, fixed by its text (never by the generator seed)."""
        digest = hashlib.sha256(self.text.encode()).digest()
        return "heldout" if int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT else "train"


def _check_common(n: int, split: str, **fractions: float) -> None:
    if not isinstance(n, int) or n < 0:
        raise KexaoneError(f"tiny tasks: n must be a non-negative integer, got {n!r}")
    if split not in SPLITS:
        raise KexaoneError(f"tiny tasks: split must be one of {', '.join(SPLITS)}, got {split!r}")
    for name, value in fractions.items():
        if not 0.0 <= value <= 1.0:
            raise KexaoneError(f"tiny tasks: {name} must be in [0, 1], got {value!r}")


def _operand(rng: random.Random) -> int:
    return rng.randint(0, 9) if rng.random() < 0.5 else rng.randint(10, MAX_OPERAND)


def _problems(
    rng: random.Random, split: str, *, unique: bool, operations: tuple[str, ...] = DEFAULT_OPERATIONS
) -> Iterator[Problem]:
    """Endless stream of problems from ``split``; with ``unique`` no problem repeats until all were used."""
    seen: set[Problem] = set()
    pool_size = _partition_size(split, operations) if unique else 0
    while True:
        a, b = _operand(rng), _operand(rng)
        op = operations[0] if len(operations) == 1 else rng.choice(operations)
        if op == "-" and a < b:
            a, b = b, a
        problem = Problem(a, op, b)
        if problem.split() != split:
            continue
        if unique:
            if problem in seen:
                continue
            seen.add(problem)
            if len(seen) >= pool_size:
                seen.clear()
        yield problem


@functools.cache
def _partition_size(split: str, operations: tuple[str, ...]) -> int:
    return sum(1 for p in _all_problems(operations) if p.split() == split)


def _all_problems(operations: tuple[str, ...]) -> Iterator[Problem]:
    for a in range(MAX_OPERAND + 1):
        for b in range(MAX_OPERAND + 1):
            if "+" in operations:
                yield Problem(a, "+", b)
            if "-" in operations and a >= b:
                yield Problem(a, "-", b)


def _check_operations(operations: Any) -> tuple[str, ...]:
    ops = tuple(operations) if isinstance(operations, (list, tuple)) else (operations,)
    if not ops or any(op not in OPERATIONS for op in ops) or len(set(ops)) != len(ops):
        raise KexaoneError(
            f"tiny tasks: operations must be a non-empty list of distinct {list(OPERATIONS)}, "
            f"got {operations!r}"
        )
    return ops


def _question(problem: Problem, rng: random.Random) -> str:
    templates = _QUESTION_TEMPLATES + _WORD_TEMPLATES[problem.op]
    return rng.choice(templates).format(a=problem.a, op=problem.op, b=problem.b)


def worked_steps(problem: Problem, answer: int | None = None) -> str:
    """Column arithmetic, one line per column, then the result: ``ones: ...`` / ``tens: ...`` / ``so 82``.

    Every step is a one-digit fact (or adding the carry, subtracting the borrow) that training data covers
    for every problem, so a held-out problem is a new combination of seen steps. For addition both columns
    use the same one-digit table (the carry is added as a separate ``+ 1`` step), which keeps the set of
    facts the tiny model must learn small. ``answer`` overrides the final number (noise).
    """
    a, op, b = problem.a, problem.op, problem.b
    final = problem.answer if answer is None else answer
    (ta, ua), (tb, ub) = divmod(a, 10), divmod(b, 10)
    if op == "+":
        carry = (ua + ub) // 10
        ones = f"ones: {ua} + {ub} = {ua + ub}, carry {carry}"
        tens = f"tens: {ta} + {tb} = {ta + tb}, {ta + tb} + {carry} = {ta + tb + carry}"
    else:
        borrow = int(ua < ub)
        top = ua + 10 * borrow
        ones = f"ones: {top} - {ub} = {top - ub}, borrow {borrow}"
        tens = f"tens: {ta} - {tb} - {borrow} = {ta - tb - borrow}"
    return f"{ones}\n{tens}\nso {final}"


def _noisy_answer(answer: int, rng: random.Random) -> int:
    deltas = [d for d in (-10, -1, 1, 10) if answer + d >= 0]
    return answer + rng.choice(deltas)


def _style_instructions(rng: random.Random) -> tuple[list[str], list[dict[str, Any]], list[str]]:
    """One or two style instructions: ids, IFEval kwargs and the sentences added to the question."""
    kinds = rng.choice([[LOWERCASE_ID], [END_CHECKER_ID], [LOWERCASE_ID, END_CHECKER_ID]])
    ids, kwargs, texts = [], [], []
    for kind in kinds:
        ids.append(kind)
        if kind == LOWERCASE_ID:
            kwargs.append({})
            texts.append(_LOWERCASE_TEXT)
        else:
            word = rng.choice(END_WORDS)
            kwargs.append({"end_phrase": word})
            texts.append(_END_TEXT.format(word=word))
    return ids, kwargs, texts


def _apply_style(reply: str, ids: list[str], kwargs: list[dict[str, Any]]) -> str:
    """The reply that obeys every instruction in ``ids``."""
    for kind, kw in zip(ids, kwargs, strict=True):
        if kind == END_CHECKER_ID:
            reply = f"{reply} {kw['end_phrase']}"
    if LOWERCASE_ID in ids:
        reply = reply.lower()
    return reply


def generate_sft_rows(
    n: int,
    seed: int,
    reasoning_fraction: float = 0.7,
    *,
    split: str = "train",
    answer_noise: float = 0.25,
    style_fraction: float = 0.4,
    style_compliance: float = 0.5,
    operations: tuple[str, ...] | list[str] = DEFAULT_OPERATIONS,
) -> list[dict[str, Any]]:
    """``n`` conversational SFT rows (``messages``, ``enable_thinking``, ``id``, ``metadata``).

    ``metadata`` records the true answer, whether the row was deliberately corrupted (``noisy``) and the
    style instructions and whether the reply obeys them, so tests and reports can measure the mix.
    """
    _check_common(
        n,
        split,
        reasoning_fraction=reasoning_fraction,
        answer_noise=answer_noise,
        style_fraction=style_fraction,
        style_compliance=style_compliance,
    )
    rng = random.Random(f"kexaone-tiny-sft-{split}-{seed}")
    problems = _problems(rng, split, unique=False, operations=_check_operations(operations))
    rows = []
    for i in range(n):
        problem = next(problems)
        thinking = rng.random() < reasoning_fraction
        noisy = rng.random() < answer_noise
        answer = _noisy_answer(problem.answer, rng) if noisy else problem.answer
        question = _question(problem, rng)
        reply = f"The answer is \\boxed{{{answer}}}."
        if thinking:
            reply = f"<think>\n{worked_steps(problem, answer)}\n</think>\n\n{reply}"
        metadata: dict[str, Any] = {
            "answer": str(problem.answer), "problem": problem.text, "noisy": noisy, "split": split,
        }  # fmt: skip
        if rng.random() < style_fraction:
            ids, kwargs, texts = _style_instructions(rng)
            question = " ".join([question, *texts])
            complies = rng.random() < style_compliance
            if complies:
                reply = _apply_style(reply, ids, kwargs)
            metadata.update(instruction_id_list=ids, kwargs=kwargs, complies=complies)
        rows.append(
            {
                "id": f"tiny-sft-{split}-{seed}-{i}",
                "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}],
                "enable_thinking": thinking,
                "metadata": metadata,
            }
        )
    return rows


def generate_rl_prompts(
    n: int,
    seed: int,
    split: str = "train",
    *,
    reasoning_fraction: float = 1.0,
    operations: tuple[str, ...] | list[str] = DEFAULT_OPERATIONS,
) -> list[dict[str, Any]]:
    """``n`` verifiable math prompts ``{"id", "messages", "task": "math", "reference", "enable_thinking"}``.

    ``train`` and ``heldout`` never share a problem; within a split, problems repeat only after the
    whole partition (about 12,000 train / 3,000 held-out problems) has been used. Reasoning mode by
    default: without the trace the tiny model can only recall answers, not work them out.
    """
    _check_common(n, split, reasoning_fraction=reasoning_fraction)
    rng = random.Random(f"kexaone-tiny-rl-{split}-{seed}")
    problems = _problems(rng, split, unique=True, operations=_check_operations(operations))
    rows = []
    for i in range(n):
        problem = next(problems)
        rows.append(
            {
                "id": f"tiny-math-{split}-{seed}-{i}",
                "messages": [{"role": "user", "content": _question(problem, rng)}],
                "task": "math",
                "reference": str(problem.answer),
                "enable_thinking": rng.random() < reasoning_fraction,
                "metadata": {"problem": problem.text, "split": split},
            }
        )
    return rows


def generate_preference_prompts(
    n: int,
    seed: int,
    split: str = "train",
    *,
    reasoning_fraction: float = 0.5,
    operations: tuple[str, ...] | list[str] = DEFAULT_OPERATIONS,
) -> list[dict[str, Any]]:
    """``n`` style-instruction prompts: ``task: "ifeval"``, reference ``{instruction_id_list, kwargs}``."""
    _check_common(n, split, reasoning_fraction=reasoning_fraction)
    rng = random.Random(f"kexaone-tiny-pref-{split}-{seed}")
    problems = _problems(rng, split, unique=True, operations=_check_operations(operations))
    rows = []
    for i in range(n):
        problem = next(problems)
        ids, kwargs, texts = _style_instructions(rng)
        question = " ".join([_question(problem, rng), *texts])
        rows.append(
            {
                "id": f"tiny-pref-{split}-{seed}-{i}",
                "messages": [{"role": "user", "content": question}],
                "task": "ifeval",
                "reference": {"instruction_id_list": ids, "kwargs": kwargs},
                "enable_thinking": rng.random() < reasoning_fraction,
                "metadata": {"problem": problem.text, "math_reference": str(problem.answer), "split": split},
            }
        )
    return rows


DEFAULT_SIZES: dict[str, int] = {
    "sft_train": 4000,
    "sft_eval": 200,
    "rl_train": 2000,
    "rl_heldout": 200,
    "pref_train": 1000,
    "pref_heldout": 200,
}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` one JSON object a line (UTF-8, keys in insertion order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_tiny_dataset(
    out_dir: str | Path, seed: int, sizes: dict[str, int] | None = None
) -> dict[str, Path]:
    """Generate every tiny file under ``out_dir``; returns ``{name: path}`` (``manifest`` included).

    ``sizes`` overrides the row counts of ``DEFAULT_SIZES`` by name.
    """
    counts = dict(DEFAULT_SIZES)
    for name, value in (sizes or {}).items():
        if name not in counts:
            raise KexaoneError(f"write_tiny_dataset: unknown file {name!r} (known: {', '.join(counts)})")
        counts[name] = value
    out = Path(out_dir)
    files = {
        "sft_train": generate_sft_rows(counts["sft_train"], seed, split="train"),
        "sft_eval": generate_sft_rows(counts["sft_eval"], seed, split="heldout"),
        "rl_train": generate_rl_prompts(counts["rl_train"], seed, "train"),
        "rl_heldout": generate_rl_prompts(counts["rl_heldout"], seed, "heldout"),
        "pref_train": generate_preference_prompts(counts["pref_train"], seed, "train"),
        "pref_heldout": generate_preference_prompts(counts["pref_heldout"], seed, "heldout"),
    }
    paths = {name: write_jsonl(out / f"{name}.jsonl", rows) for name, rows in files.items()}
    manifest = {"seed": seed, "counts": counts, "files": {k: p.name for k, p in paths.items()}}
    manifest_path = out / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    paths["manifest"] = manifest_path
    return paths


_STAGE_GENERATORS = {
    "sft": generate_sft_rows,
    "agapo": generate_rl_prompts,
    "grouper": generate_preference_prompts,
}
GENERATOR_NAMES = ("tiny_arithmetic", "tiny_tools")  # tiny_tools: kexaone_align/data/tiny_tools.py


def generate_rows(
    generator: str,
    stage: str,
    n: int,
    seed: int,
    split: str = "train",
    *,
    reasoning_fraction: float | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Rows for ``stage`` (``sft``, ``agapo`` or ``grouper``) from the offline generator named in a recipe.

    ``reasoning_fraction=None`` keeps the stage's own default; ``options`` are the generator's keyword
    arguments (for example ``answer_noise`` for SFT), and an unknown one is a user error naming the
    accepted ones.
    """
    if generator not in GENERATOR_NAMES:
        raise KexaoneError(f"unknown data generator {generator!r} (known: {', '.join(GENERATOR_NAMES)})")
    fn = _STAGE_GENERATORS.get(stage)
    if generator == "tiny_tools":
        from kexaone_align.data.tiny_tools import STAGE_GENERATORS

        fn = STAGE_GENERATORS.get(stage)
    if fn is None:
        raise KexaoneError(
            f"generator {generator!r} has no data for stage {stage!r} (has: sft, agapo, grouper)"
        )
    accepted = [p for p in inspect.signature(fn).parameters if p not in ("n", "seed", "split")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise KexaoneError(
            f"generator {generator!r} ({stage}) does not take {', '.join(unknown)}; "
            f"it takes: {', '.join(accepted)}"
        )
    if reasoning_fraction is not None:
        options["reasoning_fraction"] = reasoning_fraction
    return fn(n, seed, split=split, **options)
