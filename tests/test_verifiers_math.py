"""The math verifier: equivalent forms, reasoning-mode rules, several answers, pathological inputs."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from kexaone_align.verifiers import Sample, get_verifier
from kexaone_align.verifiers.math import MathVerifier
from kexaone_align.verifiers.math_pool import MathWorkerPool

from kexaone_align.errors import KexaoneError

# sympy evaluates this product term by term: far longer than any timeout used here.
HANGS = "\\boxed{\\prod_{k=1}^{10^{7}} k}"


def grade(response: str, reference: str, **kw) -> float:
    return MathVerifier(**kw).verify(Sample(prompt="q", response=response, reference=reference)).reward


@pytest.mark.parametrize(
    ("response", "reference"),
    [
        ("so the result is \\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{1/2}", "\\frac{1}{2}"),
        ("\\boxed{\\frac12}", "0.5"),
        ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}"),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
        ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}"),
        ("\\boxed{(0, 1]}", "(0,1]"),
        ("\\boxed{x = 3}", "3"),
        ("\\boxed{10\\%}", "0.1"),
        ("The answer is $\\dfrac{3}{4}$.", "0.75"),
        ("Answer: 12", "12"),
        ("We simplify and get\n$\\frac{6}{4}$", "3/2"),
        ("\\boxed{2^{100}}", "1267650600228229401496703205376"),
        ("\\boxed{3^{3^{3}}}", "3^{27}"),
        ("\\boxed{x^2+2x+1}", "(x+1)^2"),
        ("\\boxed{(-\\infty, 2)}", "x<2"),
    ],
)
def test_equivalent_forms_score_one(response: str, reference: str) -> None:
    assert grade(response, reference) == 1.0


@pytest.mark.parametrize(
    ("response", "reference"),
    [
        ("\\boxed{0.51}", "\\frac{1}{2}"),
        ("\\boxed{[0, 1)}", "(0,1]"),
        ("\\boxed{\\{1, 3\\}}", "\\{1,2\\}"),
        ("\\boxed{3\\sqrt{2}}", "2\\sqrt{2}"),
        ("I do not know.", "7"),
    ],
)
def test_wrong_answers_score_zero(response: str, reference: str) -> None:
    assert grade(response, reference) == 0.0


def test_reasoning_mode_grades_only_after_last_think_close() -> None:
    assert grade("<think>maybe \\boxed{5}</think>The answer is \\boxed{4}.", "4") == 1.0
    # The right answer only inside the reasoning does not count.
    assert grade("<think>it is \\boxed{4}</think>The answer is \\boxed{5}.", "4") == 0.0
    assert grade("<think>it is \\boxed{4}</think>", "4") == 0.0
    # Nested / repeated think blocks: graded after the last close.
    assert grade("<think>a<think>b</think>c \\boxed{9}</think> \\boxed{4}", "4") == 1.0
    assert grade("<think>x</think>\\boxed{9}<think>y</think>\\boxed{4}", "4") == 1.0


def test_unclosed_think_scores_zero_even_with_right_answer() -> None:
    res = MathVerifier().verify(Sample(prompt="q", response="<think>so \\boxed{4}", reference="4"))
    assert res.reward == 0.0
    assert "never closed" in res.details["reason"]
    # A second block opened after the last close and left open: the answer never came.
    assert grade("<think>a</think>\\boxed{4}<think>wait, let me recheck", "4") == 0.0
    # Template opened the block in the prompt: no </think> means the answer never came.
    prefilled = Sample(prompt="q", response="so \\boxed{4}", reference="4", metadata={"reasoning": True})
    assert MathVerifier().verify(prefilled).reward == 0.0
    closed = Sample(prompt="q", response="so</think> \\boxed{4}", reference="4", metadata={"reasoning": True})
    assert MathVerifier().verify(closed).reward == 1.0


def test_several_different_final_answers_score_zero() -> None:
    assert grade("\\boxed{3} or maybe \\boxed{5}", "3") == 0.0
    assert grade("The answer is 3 or 5.", "3") == 0.0
    assert grade("\\boxed{3 \\text{ or } 5}", "3") == 0.0
    # Repeating the same answer (even in another form) is fine.
    assert grade("\\boxed{3}. Check: \\boxed{3}", "3") == 1.0
    assert grade("\\boxed{\\frac{1}{2}} which is \\boxed{0.5}", "1/2") == 1.0


def test_bad_reference_raises() -> None:
    with pytest.raises(KexaoneError, match="ground-truth"):
        MathVerifier().verify(Sample(prompt="q", response="\\boxed{1}", reference=None))


def test_registered_and_deterministic() -> None:
    verifier = get_verifier("math")
    sample = Sample(prompt="q", response="thus \\boxed{\\frac{2}{4}}", reference="0.5")
    results = [verifier.verify(sample) for _ in range(3)]
    assert [r.reward for r in results] == [1.0, 1.0, 1.0]
    assert results[0].details["parsed"] == results[1].details["parsed"]


def test_pathological_inputs_finish_in_budget_from_threads() -> None:
    pool = MathWorkerPool(max_workers=2)
    verifier = MathVerifier(timeout_s=1.0, pool=pool)
    samples = [
        Sample(prompt="q", response=HANGS, reference="3"),
        Sample(prompt="q", response="\\boxed{9^{9^{9^{9}}}}", reference="3"),
        Sample(prompt="q", response="\\boxed{\\binom{10^{9}}{10^{6}}}", reference="3"),
        Sample(prompt="q", response="\\boxed{" + "1+" * 20000 + "1}", reference="3"),
        Sample(prompt="q", response="x" * 2_000_000, reference="3"),
        Sample(prompt="q", response="<think>" + "(" * 100_000, reference="3"),
        Sample(prompt="q", response="\\boxed{" * 50_000, reference="3"),
        Sample(prompt="q", response="\\boxed{6}", reference="6"),
        Sample(prompt="q", response="\\boxed{\\frac{14}{2}}", reference="7"),
    ]
    try:
        with ThreadPoolExecutor(max_workers=4) as ex:
            # Start (and warm) both workers first: the budget below is for the pathological inputs.
            warm = Sample(prompt="q", response="\\boxed{1}", reference="1")
            assert [r.reward for r in ex.map(verifier.verify, [warm, warm])] == [1.0, 1.0]
            start = time.monotonic()
            results = list(ex.map(verifier.verify, samples))
    finally:
        pool.close()
    elapsed = time.monotonic() - start
    assert elapsed < 20, elapsed
    assert [r.reward for r in results] == [0, 0, 0, 0, 0, 0, 0, 1, 1]
    assert results[0].details.get("timeout") is True
    assert "too large" in results[1].details["reason"]  # power towers are refused without computing
    assert threading.current_thread() is threading.main_thread()


def test_worker_killed_on_timeout_is_replaced() -> None:
    pool = MathWorkerPool(max_workers=1)
    verifier = MathVerifier(timeout_s=0.5, pool=pool)
    try:
        hang = verifier.verify(Sample(prompt="q", response=HANGS, reference="2"))
        assert hang.details["timeout"] is True
        ok = verifier.verify(Sample(prompt="q", response="\\boxed{2.0}", reference="2"))
        assert ok.reward == 1.0
        assert pool.stats["timeouts"] == 1 and pool.stats["started"] == 2
    finally:
        pool.close()


def test_workers_survive_the_thread_that_started_them() -> None:
    # Linux ties PR_SET_PDEATHSIG to the spawning thread; workers must outlive short-lived callers.
    pool = MathWorkerPool(max_workers=1)
    verifier = MathVerifier(timeout_s=5.0, pool=pool)
    rewards: list[float] = []
    try:
        for ref in ("2", "3", "4"):
            t = threading.Thread(
                target=lambda r=ref: rewards.append(
                    verifier.verify(Sample(prompt="q", response=f"\\boxed{{{r}.0}}", reference=r)).reward
                )
            )
            t.start()
            t.join()
        assert rewards == [1.0, 1.0, 1.0]
        assert pool.stats["started"] == 1 and pool.stats["crashes"] == 0
    finally:
        pool.close()


def _busy_loops(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def test_first_calls_on_a_loaded_machine_grade_slow_to_parse_answers_right() -> None:
    # math-verify warms up lazily: a fresh process's first polynomial comparison took 1.4 s on a busy
    # 2-core machine, 0.02 s afterwards. Workers warm up before reporting ready and the limit counts the
    # worker's CPU time, so with every core busy-looping the first calls of a fresh pool still pass
    # inside the default 3 s limit. The pairs differ from the worker's own warm-up pairs, so nothing
    # here is served from its caches.
    cases = [
        ("(x+3)(x-5)", "Expanding, the answer is \\boxed{x^2-2x-15}."),
        ("(2x-1)(x+4)", "\\boxed{2x^2+7x-4}"),
        ("(a+b)^2(a-b)", "so we get \\boxed{a^3+a^2 b-a b^2-b^3}"),
        ("\\frac{3}{7}", "The answer is $\\frac{6}{14}$."),
    ]
    hogs = _busy_loops(os.cpu_count() or 2)
    pool = MathWorkerPool(max_workers=1)  # one worker start-up keeps the test short on a loaded machine
    verifier = MathVerifier(pool=pool)  # the default time limit
    try:
        with ThreadPoolExecutor(max_workers=len(cases)) as ex:
            results = list(
                ex.map(lambda c: verifier.verify(Sample(prompt="q", response=c[1], reference=c[0])), cases)
            )
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
        pool.close()
    assert [r.details["reason"] for r in results] == ["equivalent"] * len(cases)
    assert pool.stats["started"] == 1 and pool.stats["warm_failures"] == 0 and pool.stats["timeouts"] == 0
