"""The tiny task generator: reproducible, split-disjoint, correctly graded by the project's verifiers."""

from __future__ import annotations

import json
import re

import pytest

from kexaone_align.data.tiny_tasks import (
    END_CHECKER_ID,
    LOWERCASE_ID,
    Problem,
    generate_preference_prompts,
    generate_rl_prompts,
    generate_rows,
    generate_sft_rows,
    worked_steps,
    write_tiny_dataset,
)
from kexaone_align.errors import KexaoneError

_PROBLEM_RE = re.compile(r"(\d+) ([+-]) (\d+)")
_BOXED_RE = re.compile(r"\\boxed\{(-?\d+)\}")


def _problem(row: dict) -> Problem:
    a, op, b = _PROBLEM_RE.fullmatch(row["metadata"]["problem"]).groups()
    return Problem(int(a), op, int(b))


def test_same_seed_same_rows_other_seed_other_rows():
    assert generate_sft_rows(50, 3) == generate_sft_rows(50, 3)
    assert generate_rl_prompts(50, 3, "train") == generate_rl_prompts(50, 3, "train")
    assert generate_preference_prompts(20, 3) == generate_preference_prompts(20, 3)
    assert generate_rl_prompts(50, 3, "train") != generate_rl_prompts(50, 4, "train")


def test_rl_splits_are_disjoint_and_heldout_has_no_repeats():
    train = {r["metadata"]["problem"] for r in generate_rl_prompts(2000, 0, "train")}
    held_rows = generate_rl_prompts(500, 1, "heldout")
    held = [r["metadata"]["problem"] for r in held_rows]
    assert len(set(held)) == len(held)
    assert not train & set(held)
    # and training SFT data never contains a held-out problem, whatever the seed
    sft = {_problem(r).text for r in generate_sft_rows(2000, 7)}
    assert not sft & set(held)
    assert all(Problem(*_split(p)).split() == "heldout" for p in held)


def _split(text: str) -> tuple[int, str, int]:
    a, op, b = text.split()
    return int(a), op, int(b)


def test_rl_references_are_the_exact_answers():
    for row in generate_rl_prompts(300, 0, "train"):
        a, op, b = _split(row["metadata"]["problem"])
        assert row["task"] == "math"
        assert row["reference"] == str(a + b if op == "+" else a - b)
        assert int(row["reference"]) >= 0 and 0 <= a <= 99 and 0 <= b <= 99
        assert row["messages"][-1]["role"] == "user"
        assert re.findall(r"\d+", row["messages"][0]["content"]) == [str(a), str(b)]
        assert isinstance(row["enable_thinking"], bool)


def test_sft_mix_matches_the_requested_fractions():
    rows = generate_sft_rows(3000, 0, reasoning_fraction=0.4, answer_noise=0.2, style_fraction=0.3)
    thinking = [r for r in rows if r["enable_thinking"]]
    assert abs(len(thinking) / len(rows) - 0.4) < 0.04
    noisy = 0
    for row in rows:
        reply = row["messages"][1]["content"]
        problem = _problem(row)
        boxed = int(_BOXED_RE.search(reply).group(1))
        assert (boxed != problem.answer) == row["metadata"]["noisy"]
        noisy += row["metadata"]["noisy"]
        if row["enable_thinking"]:
            trace = reply.split("</think>")[0]
            assert reply.startswith("<think>\n") and trace.rstrip().endswith(f"so {boxed}")
        else:
            assert "<think>" not in reply
    assert abs(noisy / len(rows) - 0.2) < 0.03
    styled = [r for r in rows if "instruction_id_list" in r["metadata"]]
    assert abs(len(styled) / len(rows) - 0.3) < 0.04
    complies = sum(r["metadata"]["complies"] for r in styled) / len(styled)
    assert 0.4 < complies < 0.6


@pytest.mark.parametrize(
    "problem", [Problem(37, "+", 45), Problem(52, "-", 17), Problem(3, "+", 4), Problem(99, "+", 99)]
)
def test_worked_steps_are_true_column_arithmetic(problem):
    ones, tens, final = worked_steps(problem).split("\n")
    sign = 1 if problem.op == "+" else -1
    x, y, r, c = map(int, re.findall(r"\d+", ones))
    assert x + sign * y == r and c == (r // 10 if sign == 1 else int(x >= 10))
    assert x % 10 == problem.a % 10 and y == problem.b % 10
    if sign == 1:  # the carry is a separate step: "tens: 3 + 4 = 7, 7 + 1 = 8"
        ta, tb, s, s2, c2, t = map(int, re.findall(r"\d+", tens))
        assert s == s2 == ta + tb and t == s + c2
    else:
        ta, tb, c2, t = map(int, re.findall(r"\d+", tens))
        assert t == ta - tb - c2
    assert (ta, tb, c2) == (problem.a // 10, problem.b // 10, c)
    assert final == f"so {problem.answer}" and 10 * t + (r % 10) == problem.answer
    assert worked_steps(problem, answer=5).endswith("so 5")


def test_addition_by_default_subtraction_on_request_and_word_problems_mixed_in():
    rows = generate_rl_prompts(400, 0, "train")
    assert {_split(r["metadata"]["problem"])[1] for r in rows} == {"+"}
    words = [
        r for r in rows if "apples" in r["messages"][0]["content"] or "pens" in r["messages"][0]["content"]
    ]
    assert 0.2 < len(words) / len(rows) < 0.6
    both = generate_rl_prompts(400, 0, "train", operations=["+", "-"])
    assert {_split(r["metadata"]["problem"])[1] for r in both} == {"+", "-"}
    assert all(int(r["reference"]) >= 0 for r in both)
    with pytest.raises(KexaoneError, match="operations"):
        generate_sft_rows(3, 0, operations=["*"])
    # through a recipe's generator options too
    assert generate_rows("tiny_arithmetic", "agapo", 5, 0, operations=["-"])[0]["metadata"]["problem"].count(
        "-"
    )


def test_sft_noise_off_and_reasoning_extremes():
    rows = generate_sft_rows(200, 1, reasoning_fraction=1.0, answer_noise=0.0, style_fraction=0.0)
    assert all(r["enable_thinking"] and r["messages"][1]["content"].startswith("<think>") for r in rows)
    assert not any(r["metadata"]["noisy"] for r in rows)
    rows = generate_sft_rows(50, 1, reasoning_fraction=0.0)
    assert not any(r["enable_thinking"] for r in rows)


def test_bad_arguments_are_user_errors():
    with pytest.raises(KexaoneError, match="split"):
        generate_rl_prompts(3, 0, "test")
    with pytest.raises(KexaoneError, match="reasoning_fraction"):
        generate_sft_rows(3, 0, reasoning_fraction=1.5)
    with pytest.raises(KexaoneError, match="n must be"):
        generate_preference_prompts(-1, 0)


def test_math_verifier_grades_sft_replies_by_their_correctness():
    from kexaone_align.verifiers import Sample, get_verifier

    verifier = get_verifier("math")
    rows = generate_sft_rows(40, 2, answer_noise=0.5, style_fraction=0.0)
    assert {r["metadata"]["noisy"] for r in rows} == {True, False}
    for row in rows:
        sample = Sample(
            prompt=row["messages"][:1],
            response=row["messages"][1]["content"],
            reference=row["metadata"]["answer"],
            task="math",
        )
        assert verifier.verify(sample).reward == (0.0 if row["metadata"]["noisy"] else 1.0), row


def test_ifeval_verifier_scores_style_compliance():
    from kexaone_align.verifiers import Sample, get_verifier

    verifier = get_verifier("ifeval")
    rows = [r for r in generate_sft_rows(300, 4, style_fraction=1.0) if r["metadata"]["complies"] is not None]
    kinds = set()
    for row in rows:
        ids = row["metadata"]["instruction_id_list"]
        kinds.add(tuple(ids))
        reference = {"instruction_id_list": ids, "kwargs": row["metadata"]["kwargs"]}
        sample = Sample(row["messages"][:1], row["messages"][1]["content"], reference, task="ifeval")
        reward = verifier.verify(sample).reward
        if row["metadata"]["complies"]:
            assert reward == 1.0, row
        else:
            assert reward < 1.0, row
    assert kinds == {(LOWERCASE_ID,), (END_CHECKER_ID,), (LOWERCASE_ID, END_CHECKER_ID)}


def test_preference_prompts_carry_ifeval_references():
    rows = generate_preference_prompts(200, 0, "heldout")
    train = {r["metadata"]["problem"] for r in generate_preference_prompts(500, 0, "train")}
    assert not train & {r["metadata"]["problem"] for r in rows}
    for row in rows:
        ref = row["reference"]
        assert row["task"] == "ifeval"
        assert len(ref["instruction_id_list"]) == len(ref["kwargs"]) >= 1
        for kind, kw in zip(ref["instruction_id_list"], ref["kwargs"], strict=True):
            if kind == END_CHECKER_ID:
                assert f'"{kw["end_phrase"]}"' in row["messages"][0]["content"]
            else:
                assert kind == LOWERCASE_ID and kw == {}
        assert row["metadata"]["math_reference"] == str(_problem(row).answer)


def test_write_tiny_dataset_writes_loadable_jsonl(tmp_path):
    from kexaone_align.data.prompts import load_prompt_set
    from kexaone_align.data.sft import load_chat_dataset

    sizes = {
        "sft_train": 30,
        "sft_eval": 5,
        "rl_train": 20,
        "rl_heldout": 10,
        "pref_train": 8,
        "pref_heldout": 4,
    }
    paths = write_tiny_dataset(tmp_path, seed=5, sizes=sizes)
    again = write_tiny_dataset(tmp_path / "again", seed=5, sizes=sizes)
    for name, count in sizes.items():
        assert paths[name].read_bytes() == again[name].read_bytes()
        assert len(paths[name].read_text().splitlines()) == count
    assert json.loads(paths["manifest"].read_text())["counts"] == sizes
    assert len(load_chat_dataset(paths["sft_train"])) == 30
    rl = load_prompt_set(paths["rl_heldout"])
    assert {r.task for r in rl} == {"math"} and len(rl) == 10
    pref = load_prompt_set(paths["pref_train"])
    assert all(isinstance(r.reference, dict) for r in pref)
    with pytest.raises(KexaoneError, match="unknown file"):
        write_tiny_dataset(tmp_path, seed=5, sizes={"nope": 1})


def test_generate_rows_serves_each_stage_from_a_recipe_name():
    sft = generate_rows("tiny_arithmetic", "sft", 5, 0, answer_noise=0.0)
    assert sft == generate_sft_rows(5, 0, answer_noise=0.0)
    rl = generate_rows("tiny_arithmetic", "agapo", 4, 0, "heldout", reasoning_fraction=0.0)
    assert rl == generate_rl_prompts(4, 0, "heldout", reasoning_fraction=0.0)
    assert generate_rows("tiny_arithmetic", "grouper", 3, 1) == generate_preference_prompts(3, 1)
    with pytest.raises(KexaoneError, match="does not take colour; it takes: reasoning_fraction"):
        generate_rows("tiny_arithmetic", "agapo", 2, 0, colour="red")
    with pytest.raises(KexaoneError, match="unknown data generator 'gsm8k'"):
        generate_rows("gsm8k", "sft", 2, 0)
    with pytest.raises(KexaoneError, match="no data for stage 'dpo'"):
        generate_rows("tiny_arithmetic", "dpo", 2, 0)
