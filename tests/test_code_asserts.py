"""Assert-style code tests (HumanEval `check(candidate)`, MBPP `assert` lines); attempts to fake a pass."""

from __future__ import annotations

import secrets

import pytest
from kexaone_align.verifiers.api import Sample
from kexaone_align.verifiers.code import CodeVerifier, SandboxLimits

from kexaone_align.errors import KexaoneError

LIMITS = SandboxLimits(cpu_s=2, wall_s=3, memory_mb=512)
CHECK = {
    "check": (
        "def check(candidate):\n"
        "    assert candidate([3, 1, 2]) == [1, 2, 3]\n"
        "    assert candidate([]) == []\n"
        "    assert candidate((2, 1)) == [1, 2]\n"
    ),
    "entry_point": "sort_list",
    "setup": "from typing import List\n\n\ndef sort_list(xs: List[int]) -> List[int]:\n    '''Sort.'''\n",
}
ASSERTS = {"asserts": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]}


def _answer(code: str) -> str:
    return f"Sure.\n```python\n{code}\n```\n"


def _verify(code: str, reference, **kw):
    return CodeVerifier(limits=LIMITS, **kw).verify(Sample("p", _answer(code), reference, "code"))


def test_check_function_passes_and_fails():
    good = _verify("def sort_list(xs):\n    return sorted(xs)", CHECK)
    assert good.reward == 1.0 and good.details["mode"] == "assert" and good.details["total"] == 1
    wrong = _verify("def sort_list(xs):\n    return list(xs)", CHECK)
    assert wrong.reward == 0.0
    assert wrong.details["tests"][0]["reason"] == "assertion failed: assert candidate([3, 1, 2]) == [1, 2, 3]"
    crash = _verify("def sort_list(xs):\n    raise ValueError('no')", CHECK)
    assert crash.details["tests"][0]["reason"] == "ValueError: no"
    broken = _verify("def sort_list(xs):\n    return sorted(xs\n", CHECK)
    assert broken.reward == 0.0 and broken.details["tests"][0]["reason"].startswith("import: SyntaxError")


def test_body_only_completion_continues_the_setup_like_the_official_harness():
    body = "    return sorted(xs)\n"
    assert _verify(body, CHECK).reward == 1.0
    # Unfenced answers count in this mode when they are Python (alone or after the setup); prose does not.
    verifier = CodeVerifier(limits=LIMITS)
    assert verifier.verify(Sample("p", body, CHECK, "code")).reward == 1.0
    prose = verifier.verify(Sample("p", "Use sorted() on the list.", CHECK, "code"))
    assert prose.reward == 0.0 and prose.details["reason"] == "no_code_block"
    # The setup's imports are there for the program, as when prompt + completion run together.
    assert _verify("def sort_list(xs: List[int]):\n    return sorted(xs)", CHECK).reward == 1.0


def test_assert_lines_stop_at_first_failure_and_give_partial_credit():
    assert _verify("def add(a, b):\n    return a + b", ASSERTS).reward == 1.0
    half = "def add(a, b):\n    return a + b if a > 0 else 7"
    first = _verify(half, ASSERTS)
    assert first.reward == 0.0 and [t["passed"] for t in first.details["tests"]] == [True, False]
    assert first.details["tests"][1]["reason"] == "assertion failed: assert add(-1, 1) == 0"
    every = _verify(half, ASSERTS, partial_credit=True)
    assert every.reward == pytest.approx(2 / 3) and len(every.details["tests"]) == 3
    # Python's == decides, as in the official harnesses: True == 1 passes, a list is not a tuple.
    assert _verify(
        "def add(a, b):\n    return a + b == 3 or (a + b)", {"asserts": ["assert add(1, 2) == 1"]}
    ).reward
    pair = {"asserts": ["assert pair() == (1, 2)"]}
    assert _verify("def pair():\n    return [1, 2]", pair).reward == 0.0


def test_setup_names_and_program_objects():
    # Trusted setup helpers stay the task's own even when the program redefines them.
    ref = {
        "asserts": ["assert decode(encode('abc')) == 'abc'", "assert encode('abc') == 'bcd'"],
        "setup": "def encode(s):\n    return ''.join(chr(ord(c) + 1) for c in s)\n",
    }
    honest = "def decode(s):\n    return ''.join(chr(ord(c) - 1) for c in s)"
    assert _verify(honest, ref).reward == 1.0
    cheat = "def encode(s):\n    return s if len(s) != 3 else 'bcd'\ndef decode(s):\n    return s"
    assert _verify(cheat, ref).reward == 0.0
    # Nor can it replace the builtins the tests call.
    sized = {"asserts": ["assert len(items()) == 3"]}
    assert _verify("def items():\n    return [1, 2, 3]", sized).reward == 1.0
    assert _verify("def items():\n    return [1]\ndef len(x):\n    return 3", sized).reward == 0.0
    # Objects that are not plain data stay in the program's process and can be passed back to it.
    objects = {"asserts": ["assert longest([Pair(1, 5), Pair(2, 3)]) == 4"]}
    code = (
        "class Pair:\n    def __init__(self, a, b):\n        self.a, self.b = a, b\n"
        "def longest(pairs):\n    return max(p.b - p.a for p in pairs)"
    )
    assert _verify(code, objects).reward == 1.0
    # Such an object has no truth value for the tests (it would be the program's to decide).
    truthy = {"check": "def check(candidate):\n    assert candidate(1)\n", "entry_point": "f"}
    assert _verify("def f(x):\n    return x == 1", truthy).reward == 1.0
    assert _verify("class T:\n    pass\ndef f(x):\n    return T()", truthy).reward == 0.0


@pytest.mark.parametrize(
    "code",
    [
        # an object equal to everything
        "class A:\n    def __eq__(self, o):\n        return True\n    __hash__ = object.__hash__\n"
        "def sort_list(xs):\n    return A()",
        # an int/list subclass with a rigged __eq__
        "class L(list):\n    def __eq__(self, o):\n        return True\n"
        "def sort_list(xs):\n    return L([0])",
        # leave before any assert runs, with a success status
        "import os\nos._exit(0)\ndef sort_list(xs):\n    return xs",
        "import sys\ndef sort_list(xs):\n    sys.exit(0)",
        # print what a verdict might look like
        'import json\nprint(json.dumps({"results": [{"passed": True}], "nonce": ""}))\n'
        'import sys\nsys.stdout.write(\'{"results": [{"passed": true}]}\\n\')\n'
        "def sort_list(xs):\n    return xs",
        # patch the assert machinery of its own interpreter
        "import builtins\nbuiltins.AssertionError = type('E', (BaseException,), {})\n"
        "import sys\nsys.excepthook = lambda *a: None\ndef sort_list(xs):\n    return xs",
        # kill the test runner
        "import os, signal\ndef sort_list(xs):\n    os.kill(os.getppid(), signal.SIGKILL)\n    return xs",
    ],
)
def test_faking_a_pass_fails(code):
    assert _verify(code, CHECK).reward == 0.0


def test_expected_values_cannot_be_read_by_the_program():
    secret = "kxsecret-" + secrets.token_hex(12)
    ref = {"check": f"def check(candidate):\n    assert candidate() == {secret!r}\n", "entry_point": "guess"}
    # Look everywhere the program can reach: files, and every /proc entry of every visible process.
    spy = (
        "import os, re\n"
        "def guess():\n"
        "    pat = re.compile(rb'kxsecret-[0-9a-f]{24}')\n"
        "    seen = set()\n"
        "    paths = [os.path.join(d, f) for d, _, fs in os.walk('/tmp') for f in fs]\n"
        "    for pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
        "        for name in ('cmdline', 'environ', 'mem', 'maps'):\n"
        "            paths.append(f'/proc/{pid}/{name}')\n"
        "        try:\n"
        "            paths += [f'/proc/{pid}/fd/{fd}' for fd in os.listdir(f'/proc/{pid}/fd')]\n"
        "        except OSError:\n"
        "            pass\n"
        "    for path in paths:\n"
        "        try:\n"
        "            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)\n"
        "        except OSError:\n"
        "            continue\n"
        "        try:\n"
        "            data = os.read(fd, 1 << 20)\n"
        "        except OSError:\n"
        "            data = b''\n"
        "        os.close(fd)\n"
        "        seen.update(m.decode() for m in pat.findall(data))\n"
        "    for pid in [p for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()]:\n"
        "        try:\n"
        "            maps = open(f'/proc/{pid}/maps').read().splitlines()\n"
        "            fd = os.open(f'/proc/{pid}/mem', os.O_RDONLY)\n"
        "        except OSError:\n"
        "            continue\n"
        "        for line in maps:\n"
        "            lo, hi = (int(x, 16) for x in line.split()[0].split('-'))\n"
        "            if line.split()[1].startswith('rw') and hi - lo < (64 << 20):\n"
        "                try:\n"
        "                    seen.update(m.decode() for m in pat.findall(os.pread(fd, hi - lo, lo)))\n"
        "                except OSError:\n"
        "                    pass\n"
        "        os.close(fd)\n"
        "    return sorted(seen)[0] if len(seen) == 1 else 'none'\n"
    )
    # Scanning every /proc entry and /tmp takes seconds in a long test session: a generous limit, so the
    # verdict is the assert's (the secret was not found), not a timeout.
    roomy = SandboxLimits(cpu_s=30, wall_s=45, memory_mb=512)
    res = CodeVerifier(limits=roomy).verify(Sample("p", _answer(spy), ref, "code"))
    assert res.reward == 0.0, res.details
    assert "assertion failed" in res.details["tests"][0]["reason"], res.details


def test_slow_call_fails_even_when_the_test_swallows_exceptions():
    ref = {
        "check": (
            "def check(candidate):\n"
            "    try:\n"
            "        candidate(0)\n"
            "    except Exception:\n"
            "        pass\n"
            "    assert candidate(1) == 1\n"
        ),
        "entry_point": "f",
    }
    code = "import time\ndef f(x):\n    if x == 0:\n        time.sleep(60)\n    return x"
    limits = SandboxLimits(cpu_s=2, wall_s=1, memory_mb=512)
    res = CodeVerifier(limits=limits).verify(Sample("p", _answer(code), ref, "code"))
    assert res.reward == 0.0 and res.details["tests"][0]["reason"].startswith("timeout")
    assert res.details["wall_s"] < 8


def test_bad_assert_references_raise():
    for bad in (
        {"check": "def check(candidate):\n    assert candidate() == 1\n"},  # no entry_point
        {"check": "def check(candidate) assert", "entry_point": "f"},
        {"asserts": []},
        {"asserts": ["assert f( == 1"]},
        {"asserts": ["assert f() == 1"], "setup": 3},
        {"asserts": ["assert f() == 1"], "check": "def check(c): pass", "entry_point": "f"},
        {"check": "def check(candidate): pass", "entry_point": "not valid"},
    ):
        with pytest.raises(KexaoneError):
            _verify("def f():\n    return 1", bad)
