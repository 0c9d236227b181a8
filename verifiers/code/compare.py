"""Comparisons done in the verifier process, on plain data only (never on objects the program made).

* stdin/stdout tests: outputs are equal when their lines match after trimming trailing whitespace on
  every line and blank lines at both ends (``\\r\\n`` counts as ``\\n``).
* call-based tests, ``compare: "python_eq"`` (the default): Python's ``==`` between the returned
  value (decoded from typed JSON, so only built-in values) and the expected one, as the official
  HumanEval / MBPP harnesses assert: ``1 == True`` passes, a list is not a tuple, floats are exact.
* call-based tests, ``compare: "tolerant"``: the return value as JSON would carry it (tuples become
  lists, dict keys strings; sets, bytes and complex numbers are unserializable), compared
  structurally: lists element by element, dicts key by key, floats with a small relative/absolute
  tolerance, booleans only equal booleans (``true`` is not ``1``), strings and null by ``==``.
"""

from __future__ import annotations

import json
import math
from typing import Any

FLOAT_REL_TOL = 1e-6
FLOAT_ABS_TOL = 1e-9


def normalize_output(text: str) -> list[str]:
    """Lines of ``text`` with trailing whitespace and surrounding blank lines removed."""
    return [line.rstrip() for line in text.replace("\r\n", "\n").strip().split("\n")]


def outputs_match(got: str, expected: str) -> bool:
    """Whether a program's stdout matches the expected stdout (see module docstring)."""
    return normalize_output(got) == normalize_output(expected)


def values_match(got: Any, expected: Any) -> bool:
    """Structural equality of two JSON values with float tolerance."""
    if isinstance(expected, bool) or isinstance(got, bool):
        return type(got) is type(expected) and got == expected
    if isinstance(expected, int | float) and isinstance(got, int | float):
        if isinstance(expected, int) and isinstance(got, int):
            return got == expected
        return math.isclose(float(got), float(expected), rel_tol=FLOAT_REL_TOL, abs_tol=FLOAT_ABS_TOL)
    if isinstance(expected, list | tuple) and isinstance(got, list | tuple):
        return len(got) == len(expected) and all(
            values_match(g, e) for g, e in zip(got, expected, strict=True)
        )
    if isinstance(expected, dict) and isinstance(got, dict):
        return got.keys() == expected.keys() and all(values_match(got[k], expected[k]) for k in expected)
    if expected is None or got is None:
        return got is None and expected is None
    if isinstance(expected, str) and isinstance(got, str):
        return got == expected
    return False


COMPARE_MODES = ("python_eq", "tolerant")


def python_eq(got: Any, expected: Any) -> bool:
    """Python's ``==`` on built-in values (``got`` comes from ``codec.decode``, never from the program)."""
    try:
        return bool(got == expected)
    except Exception:  # e.g. comparisons nested too deeply
        return False


def json_like(value: Any) -> Any:
    """``value`` as a JSON round trip would return it; ``TypeError`` for what JSON cannot carry."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [json_like(x) for x in value]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not (key is None or isinstance(key, str | int | float | bool)):
                raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")
            out[json.dumps(key) if not isinstance(key, str) else key] = json_like(item)
        return out
    raise TypeError(type(value).__name__)


def results_match(got: Any, expected: Any, compare: str) -> bool:
    """Compare a decoded return value with the expected one under ``compare`` (see module docstring)."""
    if compare == "python_eq":
        return python_eq(got, expected)
    return values_match(json_like(got), expected)
