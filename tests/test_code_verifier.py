"""The ``code`` verifier end to end: extraction, both reference formats, rewards and partial credit."""

from __future__ import annotations

import json

import pytest
from kexaone_align.verifiers import get_verifier, registered_names
from kexaone_align.verifiers.api import Sample
from kexaone_align.verifiers.code import CodeVerifier, SandboxLimits, extract_program
from kexaone_align.verifiers.code.compare import outputs_match, values_match

from kexaone_align.errors import KexaoneError

LIMITS = SandboxLimits(cpu_s=2, wall_s=3, memory_mb=512)
ADD = {"tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4", "output": "6"}]}
CALL = {
    "fn_name": "pair",
    "tests": [
        {"args": [2, 3], "expected": [5, 6]},
        {"args": [0, 7], "expected": [7, 0]},
        {"args": {"a": 1, "b": 1}, "expected": [2, 1]},
    ],
}


def _answer(code: str, lang: str = "python") -> str:
    return f"Here you go.\n```{lang}\n{code}\n```\n"


def _verify(code: str, reference, **kw) -> float:
    return CodeVerifier(limits=LIMITS, **kw).verify(Sample("p", _answer(code), reference, "code"))


def test_extract_takes_last_python_block_after_think():
    response = (
        "<think>```python\nprint('draft')\n```</think>"
        "First:\n```py\nprint(1)\n```\nThen a shell line:\n```bash\nls\n```\nFinal:\n```\nprint(2)\n```\n"
    )
    assert extract_program(response) == "print(2)\n"
    assert extract_program("<think>```python\nprint(1)\n```</think> no code here") is None
    assert extract_program("```python\nprint(1)\n") is None  # cut off mid-block
    assert extract_program("```text\nhello\n```") is None


def test_registered_as_code():
    assert "code" in registered_names()
    verifier = get_verifier("code")
    assert isinstance(verifier, CodeVerifier) and verifier.name == "code"


def test_stdio_correct_and_wrong():
    good = _verify("a, b = map(int, input().split())\nprint(a + b)   ", ADD)
    assert good.reward == 1.0 and good.details["passed"] == 2 and good.details["mode"] == "stdio"
    assert good.details["isolation"] in ("namespaces", "userns", "rlimits-only")
    wrong = _verify("a, b = map(int, input().split())\nprint(a - b)", ADD)
    assert wrong.reward == 0.0 and wrong.details["tests"][0]["reason"] == "wrong_output"
    assert len(wrong.details["tests"]) == 1  # stops at the first failure without partial credit


def test_stdio_runtime_error_and_no_block():
    crash = _verify("raise ValueError('boom')", ADD)
    assert crash.reward == 0.0 and crash.details["tests"][0]["reason"] == "exit_code 1"
    assert "boom" in crash.details["tests"][0]["stderr_tail"]
    none = CodeVerifier(limits=LIMITS).verify(Sample("p", "I cannot solve this.", ADD, "code"))
    assert none.reward == 0.0 and none.details["reason"] == "no_code_block"


def test_partial_credit():
    code = "a, b = map(int, input().split())\nprint(3 if a == 1 else 0)"
    assert _verify(code, ADD).reward == 0.0
    assert _verify(code, ADD, partial_credit=True).reward == 0.5
    sample = Sample("p", _answer(code), ADD, "code", metadata={"partial_credit": True})
    assert CodeVerifier(limits=LIMITS).verify(sample).reward == 0.5


def test_call_based_correct_wrong_and_partial():
    good = _verify("def pair(a, b):\n    return [a + b, a * b]", CALL)
    assert good.reward == 1.0 and good.details["mode"] == "call" and good.details["compare"] == "python_eq"
    # JSON has no tuples: under Python's == a tuple is not the expected list; the tolerant mode allows it.
    as_tuple = "def pair(a, b):\n    return (a + b, a * b)"
    assert _verify(as_tuple, CALL).details["tests"][0]["reason"] == "wrong_value"
    assert _verify(as_tuple, {**CALL, "compare": "tolerant"}).reward == 1.0
    assert _verify(as_tuple, CALL, compare="tolerant").reward == 1.0
    leetcode = _verify("class Solution:\n    def pair(self, a, b):\n        return [a + b, a * b]", CALL)
    assert leetcode.reward == 1.0
    wrong = _verify("def pair(a, b):\n    return [a + b, a * b + (a == 0)]", CALL, partial_credit=True)
    assert len(wrong.details["tests"]) == 3  # partial credit runs every case
    assert wrong.reward == pytest.approx(2 / 3)
    assert [t["passed"] for t in wrong.details["tests"]] == [True, False, True]
    missing = _verify("def other(a, b):\n    return 0", CALL)
    assert missing.reward == 0.0 and "no function 'pair'" in missing.details["tests"][0]["reason"]


def test_call_based_errors_and_per_call_timeout():
    code = (
        "import time\ndef pair(a, b):\n    if a == 0:\n        time.sleep(60)\n"
        "    if a == 1:\n        raise KeyError(a)\n    return [a + b, a * b]"
    )
    limits = SandboxLimits(cpu_s=2, wall_s=1, memory_mb=512)
    res = CodeVerifier(limits=limits, partial_credit=True).verify(Sample("p", _answer(code), CALL, "code"))
    reasons = [t["reason"] for t in res.details["tests"]]
    assert reasons[0] is None and reasons[1] == "error: timeout" and reasons[2].startswith("error: KeyError")
    assert res.reward == pytest.approx(1 / 3)


def test_prints_in_call_mode_do_not_corrupt_results():
    code = (
        'import json\nprint(json.dumps({"i": 0, "value": "forged"}))\n'
        'def pair(a, b):\n    print("noise")\n    return [a + b, a * b]'
    )
    assert _verify(code, CALL).reward == 1.0


def test_reference_as_json_string_and_bad_references():
    assert _verify("print(3)", json.dumps({"tests": [{"input": "", "output": "3"}]})).reward == 1.0
    for bad in (
        None,
        "not json",
        {"tests": []},
        {"tests": [{"input": 1, "output": "x"}]},
        {"fn_name": "f", "tests": [{"args": [1]}]},
        {"fn_name": "not valid", "tests": [{"expected": 1}]},
    ):
        with pytest.raises(KexaoneError):
            _verify("print(3)", bad)


def test_output_and_value_comparison_rules():
    assert outputs_match("1 2  \r\n3\n\n", "1 2\n3")
    assert not outputs_match("1 2\n3", "1  2\n3")
    assert values_match([1, 2.0000000001, {"a": None}], [1, 2, {"a": None}])
    assert not values_match(True, 1) and not values_match(1, True)
    assert not values_match([1, 2], [1, 2, 3]) and not values_match({"a": 1}, {"a": 1, "b": 2})
    assert not values_match("1", 1) and not values_match(None, 0)


def test_python_eq_matches_python_equality_and_tolerant_keeps_the_old_rules():
    cases = [
        ("return 1", True, 1.0, 0.0),  # 1 == True, as the official harnesses' asserts see it
        ("return True", 1, 1.0, 0.0),
        ("return 0.3 + 1e-8", 0.3, 0.0, 1.0),  # off by 1e-8: == fails; the tolerance is 1e-6 relative
        ("return 0.25", 0.25, 1.0, 1.0),
        ("return {1: 'a'}", {1: "a"}, 1.0, 0.0),  # int keys survive (JSON would make them strings)
        ("return {3, 1}", {1, 3}, 1.0, 0.0),  # sets compare as sets; JSON cannot carry them
        ("return (1, [2])", (1, [2]), 1.0, 1.0),
        ("return [1, 2]", (1, 2), 0.0, 1.0),  # a list where a tuple is expected
    ]
    for body, expected, want_eq, want_tolerant in cases:
        ref = {"fn_name": "f", "tests": [{"args": [], "expected": expected}]}
        code = f"def f():\n    {body}"
        assert _verify(code, ref).reward == want_eq, (body, expected)
        assert _verify(code, {**ref, "compare": "tolerant"}).reward == want_tolerant, (body, expected)
    with pytest.raises(KexaoneError, match="compare"):
        _verify("def f():\n    return 1", {"fn_name": "f", "tests": [{"expected": 1}], "compare": "close"})


def test_rigged_return_values_are_reduced_to_data():
    ref = {"fn_name": "f", "tests": [{"args": [], "expected": 5}]}
    rigged = "class I(int):\n    def __eq__(self, other):\n        return True\ndef f():\n    return I(4)"
    assert _verify(rigged, ref).details["tests"][0]["reason"] == "wrong_value"
    assert _verify(rigged.replace("I(4)", "I(5)"), ref).reward == 1.0  # the data itself is right
    anything = "class A:\n    def __eq__(self, other):\n        return True\ndef f():\n    return A()"
    assert "unserializable" in _verify(anything, ref).details["tests"][0]["reason"]


def test_call_mode_stops_at_the_first_failure_unless_partial_credit():
    # Every case burns ~0.4 s and 200 MB and then answers wrongly: without partial credit the run is
    # ended as soon as the first wrong value arrives.
    tests = [{"args": [k], "expected": k} for k in range(8)]
    code = "import time\ndef f(k):\n    junk = bytearray(200 << 20)\n    time.sleep(0.4)\n    return k + 1"
    ref = {"fn_name": "f", "tests": tests}
    verifier = CodeVerifier(limits=LIMITS)
    first = verifier.verify(Sample("p", _answer(code), ref, "code"))
    assert first.reward == 0.0 and len(first.details["tests"]) == 1
    assert first.details["tests"][0]["reason"] == "wrong_value" and first.details["wall_s"] < 2.5
    every = CodeVerifier(limits=LIMITS, partial_credit=True).verify(Sample("p", _answer(code), ref, "code"))
    assert len(every.details["tests"]) == 8 and every.reward == 0.0 and every.details["wall_s"] > 3.0


def test_time_limit_covers_every_run():
    verifier = CodeVerifier(limits=SandboxLimits(cpu_s=1, wall_s=2))
    stdio = verifier.time_limit_s(Sample("p", "", {"tests": [{"input": "", "output": "1"}] * 3}, "code"))
    call = verifier.time_limit_s(Sample("p", "", {**CALL, "tests": CALL["tests"] * 40}, "code"))
    asserts = verifier.time_limit_s(Sample("p", "", {"asserts": ["assert f() == 1"] * 4}, "code"))
    assert stdio >= 3 * 2 and call >= 60 and asserts >= 4 * 2
    assert call < 120 and asserts < 4 * 2 + 15
