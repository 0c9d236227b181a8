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
    good = _verify("def pair(a, b):\n    return (a + b, a * b)", CALL)
    assert good.reward == 1.0 and good.details["mode"] == "call"
    leetcode = _verify("class Solution:\n    def pair(self, a, b):\n        return [a + b, a * b]", CALL)
    assert leetcode.reward == 1.0
    wrong = _verify("def pair(a, b):\n    return [a + b, a * b + (a == 0)]", CALL, partial_credit=True)
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
