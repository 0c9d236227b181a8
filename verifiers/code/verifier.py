"""The ``code`` verifier: run the response's last Python block against the reference tests.

Reference formats (a dict, or the same as a JSON string):

* stdin/stdout: ``{"tests": [{"input": "<stdin>", "output": "<expected stdout>"}, ...]}``; one sandboxed
  run per test, the output compared line by line in this process (``compare.outputs_match``); a run
  must also exit 0 inside every limit.
* call-based: ``{"fn_name": "f", "tests": [{"args": [...], "expected": ...}, ...], "compare": ...}``;
  one sandboxed run of ``harness.py`` calls ``f`` for every test (per-call timeout ``limits.wall_s``,
  the whole run ``limits.wall_s`` per test, capped at 60 s) and streams typed return values that are
  compared here as they arrive (``compare.results_match``: ``"python_eq"``, the default, or
  ``"tolerant"``). Expected values never leave this process.
* assert-style: ``{"check": "def check(candidate): ...", "entry_point": "f"}`` or ``{"asserts":
  ["assert f(1) == 2", ...]}``, with optional trusted ``setup`` code (``asserts.py``, ``checker.py``);
  a raw HumanEval or MBPP row is read as one of these (``convert.benchmark_reference``).

Assert-style tasks also accept an answer without a fenced block when it is Python on its own or as a
continuation of ``setup`` (HumanEval's completion format). Reward is 1 only when every test passes;
``partial_credit=True`` (or ``metadata["partial_credit"]``) gives the fraction passed. Without partial
credit every mode stops at the first failing test. A response without a Python block gets 0 with
reason ``no_code_block``; a malformed reference raises ``KexaoneError`` (that is a data bug, not a
model failure).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from typing import Any

from kexaone_align.verifiers.api import Sample, VerifyResult
from kexaone_align.verifiers.code import codec
from kexaone_align.verifiers.code.asserts import (
    is_assert_reference,
    run_assert_tests,
    unit_count,
    validate_assert_reference,
)
from kexaone_align.verifiers.code.compare import COMPARE_MODES, outputs_match, results_match
from kexaone_align.verifiers.code.convert import benchmark_reference
from kexaone_align.verifiers.code.extract import extract_program
from kexaone_align.verifiers.code.sandbox import (
    SandboxLimits,
    SandboxResult,
    detect_isolation_mode,
    run_sandboxed,
    run_time_bound_s,
)

from kexaone_align.errors import KexaoneError

_HERE = os.path.dirname(os.path.abspath(__file__))
_MAX_CALL_RUN_S = 60.0
_OVERHEAD_S = 5.0  # extraction, staging, comparison and thread scheduling around the sandboxed runs


def parse_reference(reference: Any) -> dict[str, Any]:
    """Validate a code reference and return it as a dict (see the module docstring for the formats)."""
    if isinstance(reference, str | bytes):
        try:
            reference = json.loads(reference)
        except ValueError as exc:
            raise KexaoneError(f"code reference is not valid JSON: {exc}") from exc
    if not isinstance(reference, dict):
        raise KexaoneError(f"code reference must be a dict, got {type(reference).__name__}")
    reference = benchmark_reference(reference) or reference  # a raw HumanEval / MBPP row
    compare = reference.get("compare", "python_eq")
    if compare not in COMPARE_MODES:
        raise KexaoneError(f"code reference compare must be one of {COMPARE_MODES}, got {compare!r}")
    if is_assert_reference(reference):
        validate_assert_reference(reference)
        return reference
    if not isinstance(reference.get("tests"), list) or not reference["tests"]:
        raise KexaoneError(
            "code reference must be a dict with a non-empty 'tests' list, or assert-style "
            "('check' + 'entry_point', or 'asserts')"
        )
    fn_name = reference.get("fn_name")
    for k, test in enumerate(reference["tests"]):
        if not isinstance(test, dict):
            raise KexaoneError(f"code reference test #{k} must be a dict, got {type(test).__name__}")
        if fn_name is not None:
            if not isinstance(fn_name, str) or not fn_name.isidentifier():
                raise KexaoneError(f"code reference fn_name must be a Python identifier, got {fn_name!r}")
            if "expected" not in test or not isinstance(test.get("args", []), list | dict):
                raise KexaoneError(f"code reference test #{k} needs 'args' (list or dict) and 'expected'")
        elif not isinstance(test.get("input", ""), str) or not isinstance(test.get("output"), str):
            raise KexaoneError(f"code reference test #{k} needs string 'input' and 'output'")
    return reference


class CodeVerifier:
    """Grades code answers in the sandbox. Thread-safe: share one instance across verifier threads.

    ``compare`` is the default comparison for call-based tests (a reference's own ``compare`` wins).
    """

    name = "code"

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        partial_credit: bool = False,
        python: str | None = None,
        compare: str = "python_eq",
    ) -> None:
        if compare not in COMPARE_MODES:
            raise KexaoneError(f"CodeVerifier compare must be one of {COMPARE_MODES}, got {compare!r}")
        self.limits = limits or SandboxLimits()
        self.partial_credit = partial_credit
        self.python = python
        self.compare = compare

    def time_limit_s(self, sample: Sample) -> float:
        """The longest ``verify(sample)`` can take under this verifier's limits (``score_batch`` uses it)."""
        reference = parse_reference(sample.reference)
        if is_assert_reference(reference) or reference.get("fn_name") is not None:
            return run_time_bound_s(self._run_limits(reference)) + _OVERHEAD_S
        return len(reference["tests"]) * run_time_bound_s(self.limits) + _OVERHEAD_S

    def verify(self, sample: Sample) -> VerifyResult:
        start = time.monotonic()
        reference = parse_reference(sample.reference)
        partial = bool(sample.metadata.get("partial_credit", self.partial_credit))
        program = extract_program(sample.response)
        assert_mode = is_assert_reference(reference)
        if program is None and assert_mode:
            program = _bare_code(sample.response, reference.get("setup") or "")
        total = unit_count(reference) if assert_mode else len(reference["tests"])
        details: dict[str, Any] = {"isolation": detect_isolation_mode(), "total": total}
        if program is None:
            return VerifyResult(0.0, {**details, "reason": "no_code_block", "passed": 0, "tests": []})
        if assert_mode:
            details["mode"] = "assert"
            verdicts = self._run_assert_tests(program, reference, partial)
        elif reference.get("fn_name") is not None:
            details["mode"] = "call"
            details["compare"] = reference.get("compare", self.compare)
            verdicts = self._run_call_tests(program, reference, details["compare"], stop_early=not partial)
        else:
            details["mode"] = "stdio"
            verdicts = self._run_stdio_tests(program, reference["tests"], stop_early=not partial)
        passed = sum(1 for v in verdicts if v["passed"])
        reward = passed / total if partial else float(passed == total)
        first_fail = next((v["reason"] for v in verdicts if not v["passed"]), None)
        details.update(
            reason="all_passed" if passed == total else f"failed: {first_fail or 'not run'}",
            passed=passed,
            tests=verdicts,
            wall_s=round(time.monotonic() - start, 4),
        )
        return VerifyResult(reward, details)

    def _run(self, program: str, stdin: bytes, limits: SandboxLimits, **kw: Any) -> SandboxResult:
        return run_sandboxed(program, stdin, limits, python=self.python, **kw)

    def _run_limits(self, reference: dict[str, Any]) -> SandboxLimits:
        """One run for all of a reference's call or assert tests: ``wall_s`` per test (assert-style: and
        one more for the program's start-up and the verdict after an overrun call), capped at 60 s."""
        n = unit_count(reference) + 1 if is_assert_reference(reference) else len(reference["tests"])
        budget = min(self.limits.wall_s * n, max(_MAX_CALL_RUN_S, self.limits.wall_s))
        return replace(self.limits, wall_s=budget, cpu_s=min(self.limits.cpu_s * n, budget))

    def _run_stdio_tests(self, program: str, tests: list[dict], stop_early: bool) -> list[dict[str, Any]]:
        verdicts: list[dict[str, Any]] = []
        for test in tests:
            res = self._run(program, test.get("input", "").encode(), self.limits)
            verdict = _run_verdict(res)
            if verdict["reason"] is None:
                got = res.stdout.decode("utf-8", "replace")
                ok = outputs_match(got, test["output"])
                verdict.update(passed=ok, reason=None if ok else "wrong_output")
            verdicts.append(verdict)
            if stop_early and not verdict["passed"]:
                break
        return verdicts

    def _run_assert_tests(self, program: str, reference: dict[str, Any], partial: bool) -> list[dict]:
        limits = self._run_limits(reference)
        results, res = run_assert_tests(
            lambda *a, **kw: self._run(a[0], a[1], limits, **kw),
            program,
            reference,
            self.limits.wall_s,
            partial,
        )
        run = _run_verdict(res)
        if not results:  # no verdict: the run itself failed (limits, crash)
            return [{**run, "passed": False, "reason": run["reason"] or "no_result"}]
        verdicts = []
        for rec in results:
            ok = rec.get("passed") is True
            verdicts.append({"passed": ok, "reason": None if ok else str(rec.get("reason"))[:500]})
        return verdicts

    def _run_call_tests(
        self, program: str, reference: dict[str, Any], compare: str, stop_early: bool
    ) -> list[dict[str, Any]]:
        tests = reference["tests"]
        call = {
            "fn_name": reference["fn_name"],
            "args": [t.get("args", []) for t in tests],
            "timeout_s": self.limits.wall_s,
        }
        files = {
            "harness.py": _read(os.path.join(_HERE, "harness.py")),
            "kx_codec.py": _read(os.path.join(_HERE, "codec.py")),
            "call.json": json.dumps(call),
        }
        records: dict[int, dict[str, Any]] = {}
        state: dict[str, Any] = {"import_error": None}

        def on_line(line: bytes) -> bool:
            try:
                rec = json.loads(line)
            except ValueError:
                return False
            if not isinstance(rec, dict):
                return False
            if "i" not in rec and "error" in rec:
                state["import_error"] = str(rec["error"])[:300]
                return stop_early
            k = rec.get("i")
            if not isinstance(k, int) or not 0 <= k < len(tests) or k in records:
                return False
            records[k] = _call_verdict(rec, tests[k]["expected"], compare)
            return stop_early and not records[k]["passed"]

        res = self._run(
            program, b"", self._run_limits(reference), files=files, script="harness.py", on_line=on_line
        )
        run = _run_verdict(res)
        if res.killed_reason == "output_limit":
            return [{**run, "passed": False} for _ in tests]
        verdicts = []
        for k in range(len(tests)):
            verdict = {"passed": False, "wall_s": round(res.wall_s, 4), "exit_code": res.exit_code}
            if k in records:
                verdict.update(records[k])
            else:
                verdict["reason"] = state["import_error"] or run["reason"] or "no_result"
            verdicts.append(verdict)
            if stop_early and not verdict["passed"]:
                break  # the run was ended here; later tests were not run
        return verdicts


def _call_verdict(rec: dict[str, Any], expected: Any, compare: str) -> dict[str, Any]:
    if "error" in rec:
        return {"passed": False, "reason": f"error: {str(rec['error'])[:300]}"}
    if "unserializable" in rec:
        return {
            "passed": False,
            "reason": f"unserializable return value ({str(rec['unserializable'])[:100]})",
        }
    if "value" not in rec:
        return {"passed": False, "reason": "no_result"}
    try:
        got = codec.decode(rec["value"])
    except (ValueError, TypeError, KeyError, RecursionError):
        return {"passed": False, "reason": "unreadable return value"}
    try:
        ok = results_match(got, expected, compare)
    except TypeError as exc:
        return {"passed": False, "reason": f"unserializable return value ({exc})"}
    return {"passed": ok, "reason": None if ok else "wrong_value"}


def _bare_code(response: str, setup: str) -> str | None:
    """Assert-style tasks also take an unfenced answer that is Python, alone or continuing ``setup``
    (the official HumanEval completion format: the function body after the prompt)."""
    if not isinstance(response, str):
        return None
    text = response.rsplit("</think>", 1)[-1]
    if not text.strip():
        return None
    for source in (text, setup + text):
        try:
            compile(source, "<answer>", "exec")
            return text
        except (SyntaxError, ValueError):
            continue
    return None


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _run_verdict(res: SandboxResult) -> dict[str, Any]:
    """Per-run facts; ``reason`` is set when the run itself failed (limits, crash, setup)."""
    reason = None
    if res.setup_error:
        reason = f"sandbox_setup_error: {res.setup_error}"
    elif res.killed_reason:
        reason = res.killed_reason
    elif res.exit_code != 0:
        reason = f"exit_code {res.exit_code}"
    return {
        "passed": False,
        "reason": reason,
        "wall_s": round(res.wall_s, 4),
        "exit_code": res.exit_code,
        "stderr_tail": res.stderr[-300:].decode("utf-8", "replace") if reason else "",
    }
