"""Child process that runs math-verify for ``verifiers.math_pool`` (one JSON request per stdin line).

Run as a plain script with ``python -P`` (no package imports, and this folder kept off sys.path so
our ``math.py`` cannot shadow the stdlib) so it starts fast and cannot recurse into the parent's
``__main__``. math-verify's own signal timeouts are disabled; the parent kills this process instead.
"""

from __future__ import annotations

import json
import os
import sys


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


def handle(req: dict, parse, verify) -> dict:
    gold = _parse_any(parse, _gold_forms(req["gold"]))
    if not gold:
        return {"error": f"could not parse the reference answer {req['gold'][:200]!r}"}
    matched, parsed_out = [], []
    for cand in req["candidates"]:
        parsed = _parse_any(parse, _candidate_forms(cand["text"], cand["mode"]))
        if not parsed and cand.get("fallback"):
            parsed = _parse_any(parse, [cand["fallback"]])
        parsed_out.append(str(parsed[-1]) if parsed else None)
        ok = bool(parsed) and bool(verify(gold, parsed, timeout_seconds=None))
        matched.append(ok)
    return {"matched": matched, "parsed": parsed_out, "gold_parsed": str(gold[-1])}


def main() -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol stream
    _harden()
    import logging

    logging.disable(logging.WARNING)
    from math_verify import parse, verify

    handle({"gold": "1", "candidates": [{"text": "1", "mode": "boxed"}]}, parse, verify)  # warm caches
    proto.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        try:
            resp = handle(json.loads(line), parse, verify)
        except BaseException as exc:  # MemoryError, RecursionError, sympy internals
            resp = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        proto.write(json.dumps(resp) + "\n")


if __name__ == "__main__":
    main()
