"""Child process that runs math-verify for ``verifiers.math_pool`` (one JSON request per stdin line).

Run as a plain script with ``python -P`` (no package imports, and this folder kept off sys.path so
our ``math.py`` cannot shadow the stdlib) so it starts fast and cannot recurse into the parent's
``__main__``. math-verify's own signal timeouts are disabled; the parent kills this process instead.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _harden() -> None:
    """Die with the parent and cap memory, so a runaway sympy computation cannot take the host down."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    try:
        import resource

        mem_mb = int(os.environ.get("KEXAONE_MATH_WORKER_MEM_MB", "2048"))
        if mem_mb > 0:
            limit = mem_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except Exception:
        pass


def _parse_any(parse, texts: list[str]) -> list:
    for text in texts:
        try:
            parsed = parse(text, parsing_timeout=None)
        except Exception:
            parsed = []
        if parsed:
            return parsed
    return []


def _gold_forms(gold: str) -> list[str]:
    if "\\boxed" in gold or "$" in gold or "\\(" in gold or "\\[" in gold:
        return [gold]
    return [f"\\boxed{{{gold}}}", f"${gold}$", gold]


def _candidate_forms(text: str, mode: str) -> list[str]:
    if mode == "raw":
        return [text]
    return [f"\\boxed{{{text}}}", f"${text}$", text]


MAX_DIGITS = 1_000_000  # far beyond any real answer; towers like 9^{9^{9^9}} are refused, not computed


def _log10_size(expr) -> float | None:
    """Rough log10 of |expr| for plain numbers, powers, products and sums; None when unknown."""
    import math as _m

    import sympy

    if isinstance(expr, sympy.Integer | sympy.Rational | sympy.Float):
        value = abs(expr)
        if value == 0:
            return 0.0
        if isinstance(expr, sympy.Integer) and abs(int(expr)).bit_length() > 3000:
            return abs(int(expr)).bit_length() * 0.30103
        try:
            return _m.log10(float(value))
        except (OverflowError, ValueError):
            return float("inf")
    if isinstance(expr, sympy.Pow):
        base, exp = _log10_size(expr.base), _log10_size(expr.exp)
        if base is None or exp is None or base <= 0:
            return None if base is None or exp is None else 0.0
        if exp > 300:
            return float("inf")
        return base * 10**exp
    if isinstance(expr, sympy.Mul | sympy.Add):
        parts = [_log10_size(a) for a in expr.args]
        if any(p is None for p in parts):
            return None
        return sum(max(p, 0.0) for p in parts) if isinstance(expr, sympy.Mul) else max(parts) + 1
    return None


def _too_big(parsed: list) -> bool:
    """Whether a parsed answer would make sympy build an astronomically large number."""
    import sympy

    for item in parsed:
        if not isinstance(item, sympy.Basic):
            continue
        for node in sympy.preorder_traversal(item):
            if isinstance(node, sympy.Pow):
                size = _log10_size(node)
                if size is not None and size > MAX_DIGITS:
                    return True
            elif isinstance(node, sympy.factorial) and node.args[0].is_number:
                size = _log10_size(node.args[0])
                if size is not None and size > 5:
                    return True
    return False


def handle(req: dict, parse, verify) -> dict:
    gold = _parse_any(parse, _gold_forms(req["gold"]))
    if not gold:
        return {"error": f"could not parse the reference answer {req['gold'][:200]!r}"}
    guard = not _too_big(gold)  # a huge reference is compared as is; the parent's deadline still holds
    matched, parsed_out, refused = [], [], []
    for cand in req["candidates"]:
        parsed = _parse_any(parse, _candidate_forms(cand["text"], cand["mode"]))
        if not parsed and cand.get("fallback"):
            parsed = _parse_any(parse, [cand["fallback"]])
        parsed_out.append(str(parsed[-1]) if parsed else None)
        if parsed and guard and _too_big(parsed):
            matched.append(False)
            refused.append(cand["text"][:200])
            continue
        ok = bool(parsed) and bool(verify(gold, parsed, timeout_seconds=None))
        matched.append(ok)
    return {"matched": matched, "parsed": parsed_out, "gold_parsed": str(gold[-1]), "too_big": refused}


# One pair per lazily loaded code path (polynomial algebra, fractions from \boxed, intervals, sets,
# inequalities, equations, radicals, percentages). In a fresh process the first comparison of a kind
# took up to 1.4 s on a busy 2-core machine and the same kind afterwards 0.02-0.2 s; paying that
# here, before the ready message, keeps it out of every request's deadline.
WARM_UP = (
    ("(x+1)(x-2)", "x^2-x-2", "boxed"),
    ("\\frac{1}{2}", "so \\boxed{\\frac{2}{4}}", "raw"),
    ("(0,1]", "(0, 1]", "boxed"),
    ("\\{1,2\\}", "\\{2, 1\\}", "boxed"),
    ("x<2", "(-\\infty, 2)", "boxed"),
    ("3", "x = 3", "phrase"),
    ("2\\sqrt{2}", "\\sqrt{8}", "boxed"),
    ("0.1", "10\\%", "boxed"),
)


def warm_up(parse, verify) -> int:
    """Parse and verify every ``WARM_UP`` pair; returns how many matched (all of them, normally)."""
    matched = 0
    for gold, text, mode in WARM_UP:
        try:
            out = handle({"gold": gold, "candidates": [{"text": text, "mode": mode}]}, parse, verify)
            matched += all(out.get("matched") or [False])
        except Exception:
            pass
    return matched


def main() -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol stream
    _harden()
    import logging

    logging.disable(logging.WARNING)
    from math_verify import parse, verify

    start = time.monotonic()
    warmed = warm_up(parse, verify)
    ready = {
        "ready": True,
        "pid": os.getpid(),
        "warmed": warmed,
        "warm_total": len(WARM_UP),
        "warm_s": round(time.monotonic() - start, 3),
    }
    proto.write(json.dumps(ready) + "\n")
    for line in sys.stdin:
        try:
            resp = handle(json.loads(line), parse, verify)
        except BaseException as exc:  # MemoryError, RecursionError, sympy internals
            resp = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        proto.write(json.dumps(resp) + "\n")


if __name__ == "__main__":
    main()
