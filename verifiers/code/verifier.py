"""The ``code`` verifier: run the response's last Python block against the reference tests.

Reference formats (a dict, or the same as a JSON string):

* stdin/stdout: ``{"tests": [{"input": "<stdin>", "output": "<expected stdout>"}, ...]}``; one sandboxed
  run per test, the output compared line by line in this process (``compare.outputs_match``); a run
  must also exit 0 inside every limit.
* call-based: ``{"fn_name": "f", "tests": [{"args": [...], "expected": ...}, ...]}``; one sandboxed
  run of ``harness.py`` calls ``f`` for every test (per-call timeout ``limits.wall_s``, the whole run
  ``limits.wall_s`` per test, capped at 60 s) and returns serialized values that are compared here
  (``compare.values_match``). Expected values never leave this process.

Reward is 1 only when every test passes; ``partial_credit=True`` (or ``metadata["partial_credit"]``)
gives the fraction passed. Without partial credit the stdin/stdout loop stops at the first failure.
A response without a Python block gets 0 with reason ``no_code_block``; a malformed reference raises
``KexaoneError`` (that is a data bug, not a model failure).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from typing import Any

from kexaone_align.verifiers.api import Sample, VerifyResult
from kexaone_align.verifiers.code.compare import outputs_match, values_match
from kexaone_align.verifiers.code.extract import extract_program
from kexaone_align.verifiers.code.sandbox import (
    SandboxLimits,
    SandboxResult,
    detect_isolation_mode,
    run_sandboxed,
)

from kexaone_align.errors import KexaoneError

_HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness.py")
_MAX_CALL_RUN_S = 60.0


def parse_reference(reference: Any) -> dict[str, Any]:
    """Validate a code reference and return it as a dict with ``tests`` (and ``fn_name`` if call-based)."""
    if isinstance(reference, str | bytes):
        try:
            reference = json.loads(reference)
        except ValueError as exc:
            raise KexaoneError(f"code reference is not valid JSON: {exc}") from exc
    if (
        not isinstance(reference, dict)
        or not isinstance(reference.get("tests"), list)
        or not reference["tests"]
    ):
        raise KexaoneError("code reference must be a dict with a non-empty 'tests' list")
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
    """Grades code answers in the sandbox. Thread-safe: share one instance across verifier threads."""

    name = "code"

    def __init__(
        self, limits: SandboxLimits | None = None, partial_credit: bool = False, python: str | None = None
    ) -> None:
        self.limits = limits or SandboxLimits()
        self.partial_credit = partial_credit
        self.python = python

    def verify(self, sample: Sample) -> VerifyResult:
        start = time.monotonic()
        reference = parse_reference(sample.reference)
        partial = bool(sample.metadata.get("partial_credit", self.partial_credit))
        program = extract_program(sample.response)
        total = len(reference["tests"])
        details: dict[str, Any] = {"isolation": detect_isolation_mode(), "total": total}
        if program is None:
            return VerifyResult(0.0, {**details, "reason": "no_code_block", "passed": 0, "tests": []})
        if reference.get("fn_name") is not None:
            details["mode"] = "call"
            verdicts = self._run_call_tests(program, reference)
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

    def _run_call_tests(self, program: str, reference: dict[str, Any]) -> list[dict[str, Any]]:
        tests = reference["tests"]
        call = {
            "fn_name": reference["fn_name"],
            "args": [t.get("args", []) for t in tests],
            "timeout_s": self.limits.wall_s,
        }
        budget = min(self.limits.wall_s * len(tests), max(_MAX_CALL_RUN_S, self.limits.wall_s))
        limits = replace(self.limits, wall_s=budget, cpu_s=min(self.limits.cpu_s * len(tests), budget))
        with open(_HARNESS, encoding="utf-8") as fh:
            harness = fh.read()
        res = self._run(
            program,
            b"",
            limits,
            files={"harness.py": harness, "call.json": json.dumps(call)},
            script="harness.py",
        )
        run = _run_verdict(res)
        if res.killed_reason == "output_limit":
            return [{**run, "passed": False} for _ in tests]
        records: dict[int, dict] = {}
        import_error = None
        for line in res.stdout.decode("utf-8", "replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict):
                continue
            if "i" not in rec and "error" in rec:
                import_error = str(rec["error"])[:300]
            elif isinstance(rec.get("i"), int) and rec["i"] not in records:
                records[rec["i"]] = rec
        verdicts = []
        for k, test in enumerate(tests):
            rec = records.get(k)
            verdict = {"passed": False, "wall_s": round(res.wall_s, 4), "exit_code": res.exit_code}
            if rec is None:
                verdict["reason"] = import_error or run["reason"] or "no_result"
            elif "error" in rec:
                verdict["reason"] = f"error: {str(rec['error'])[:300]}"
            elif "unserializable" in rec:
                verdict["reason"] = f"unserializable return value ({str(rec['unserializable'])[:100]})"
            elif "value" in rec and values_match(rec["value"], test["expected"]):
                verdict.update(passed=True, reason=None)
            else:
                verdict["reason"] = "wrong_value"
            verdicts.append(verdict)
        return verdicts


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
