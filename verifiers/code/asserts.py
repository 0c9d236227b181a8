"""Assert-style code tests, parent side: validate the reference, run ``checker.py`` in the sandbox.

Two reference shapes (see ``checker.py`` for what runs inside the jail and what it protects against):

* ``{"check": "def check(candidate): ...", "entry_point": "f", "setup": "..."}`` (HumanEval): one
  test unit, ``check(f)``, passed when it returns without raising;
* ``{"asserts": ["assert f(1) == 2", ...], "setup": "..."}`` (MBPP): one unit per line, run in order.

``setup`` (optional) is trusted task code run before the program in its namespace and before the
tests in theirs: a HumanEval prompt's helpers and imports, MBPP's ``test_setup_code``.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from typing import Any

from kexaone_align.verifiers.code.sandbox import SandboxResult

from kexaone_align.errors import KexaoneError

_HERE = os.path.dirname(os.path.abspath(__file__))
_JAIL_FILES = {"kx_checker.py": "checker.py", "kx_runner.py": "runner.py", "kx_codec.py": "codec.py"}


def is_assert_reference(reference: dict[str, Any]) -> bool:
    """Whether a (dict) reference holds assert-style tests."""
    return "check" in reference or "asserts" in reference


def validate_assert_reference(reference: dict[str, Any]) -> None:
    """Raise ``KexaoneError`` naming the problem unless ``reference`` is a usable assert-style reference."""
    if "check" in reference and "asserts" in reference:
        raise KexaoneError("code reference has both 'check' and 'asserts'; give one of them")
    entry = reference.get("entry_point")
    if entry is not None and (not isinstance(entry, str) or not entry.isidentifier()):
        raise KexaoneError(f"code reference entry_point must be a Python identifier, got {entry!r}")
    setup = reference.get("setup", "")
    if not isinstance(setup, str):
        raise KexaoneError(f"code reference 'setup' must be Python source text, got {type(setup).__name__}")
    _compiles(setup, "setup")
    if "check" in reference:
        check = reference["check"]
        if not isinstance(check, str) or "check" not in check:
            raise KexaoneError("code reference 'check' must be Python source defining check(candidate)")
        if entry is None:
            raise KexaoneError("code reference with 'check' needs 'entry_point' (the function to test)")
        _compiles(check, "check")
        return
    asserts = reference["asserts"]
    if not isinstance(asserts, list) or not asserts or not all(isinstance(a, str) for a in asserts):
        raise KexaoneError("code reference 'asserts' must be a non-empty list of Python statements")
    for k, line in enumerate(asserts):
        _compiles(line, f"asserts[{k}]")


def _compiles(source: str, where: str) -> None:
    try:
        compile(source, f"<{where}>", "exec")
    except (SyntaxError, ValueError) as exc:
        raise KexaoneError(f"code reference {where} is not valid Python: {exc}") from exc


def unit_count(reference: dict[str, Any]) -> int:
    """Test units: 1 for a ``check`` function, one per ``asserts`` line."""
    return 1 if "check" in reference else len(reference["asserts"])


def run_assert_tests(
    run: Callable[..., SandboxResult],
    program: str,
    reference: dict[str, Any],
    per_call_s: float,
    partial: bool,
) -> tuple[list[dict[str, Any]], SandboxResult]:
    """Run the tests with ``run(program, stdin, files=..., script=...)``; one verdict per unit run."""
    nonce = secrets.token_hex(16)
    job = {
        "nonce": nonce,
        "setup": reference.get("setup", ""),
        "entry_point": reference.get("entry_point"),
        "per_call_s": per_call_s,
        "partial": partial,
    }
    if "check" in reference:
        job["check"] = reference["check"]
    else:
        job["asserts"] = reference["asserts"]
    files = {name: _source(src) for name, src in _JAIL_FILES.items()}
    files["check.json"] = json.dumps(job)
    res = run(program, b"", files=files, script="kx_checker.py")
    verdict = None
    for line in res.stdout.decode("utf-8", "replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("nonce") == nonce and isinstance(rec.get("results"), list):
            verdict = rec
    return (verdict["results"] if verdict else []), res


def _source(name: str) -> str:
    with open(os.path.join(_HERE, name), encoding="utf-8") as fh:
        return fh.read()
