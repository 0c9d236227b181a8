"""Call-based test runner that runs *inside* the sandbox (standard library only, copied in as a file).

It imports ``solution.py``, calls ``fn_name`` (a top-level function, or a method of ``class Solution``
as on LeetCode) once per argument list in ``call.json``, and writes one JSON line per call to the
original stdout: ``{"i": k, "value": <typed JSON, see codec.py>}``, ``{"i": k, "unserializable":
"<type>"}`` or ``{"i": k, "error": "<exception>"}``. The program's own prints are redirected to
stderr so they cannot corrupt that channel by accident. The parent reads the lines as they come and
ends the run at the first failing case unless every case counts (partial credit).

Why serialize here and compare in the parent: the parent only ever sees built-in values, so an
object with a rigged ``__eq__`` (or a subclass of int/str/list) is reduced to its real data or
rejected as unserializable. The expected values never enter the sandbox: ``call.json`` holds only
the arguments. A hostile program can of course write fake lines itself, but it can only *claim*
return values, which is no more than returning them.
"""

import importlib.util
import json
import os
import signal
import sys


class _CallTimeout(BaseException):
    pass


def _on_alarm(signum, frame):
    raise _CallTimeout()


def _resolve(module, name):
    fn = getattr(module, name, None)
    if callable(fn):
        return fn
    cls = getattr(module, "Solution", None)
    if isinstance(cls, type) and callable(getattr(cls, name, None)):
        return getattr(cls(), name)
    raise AttributeError(f"solution defines no function {name!r} (nor Solution.{name})")


def main():
    with open("call.json") as fh:
        call = json.load(fh)
    os.remove("call.json")
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    codec = _load("kx_codec", "kx_codec.py")

    def emit(record):
        try:
            if "value" in record:
                record = {"i": record["i"], "value": codec.encode(record["value"])}
            line = json.dumps(record)
        except BaseException:  # Unencodable, RecursionError, a __index__ that raises, ...
            line = json.dumps({"i": record.get("i"), "unserializable": _type_name(record.get("value"))})
        out.write(line + "\n")
        out.flush()

    try:
        fn = _resolve(_load("solution", "solution.py"), call["fn_name"])
    except BaseException as exc:
        emit({"error": f"import: {_describe(exc)}"})
        return
    signal.signal(signal.SIGALRM, _on_alarm)
    for i, args in enumerate(call["args"]):
        signal.setitimer(signal.ITIMER_REAL, float(call["timeout_s"]))
        try:
            value = fn(**args) if isinstance(args, dict) else fn(*args)
        except _CallTimeout:
            emit({"i": i, "error": "timeout"})
            continue
        except BaseException as exc:
            signal.setitimer(signal.ITIMER_REAL, 0)
            emit({"i": i, "error": _describe(exc)})
            continue
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        emit({"i": i, "value": value})


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, os.path.abspath(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _type_name(value):
    try:
        return str(type(value).__qualname__)[:100]
    except BaseException:
        return "?"


def _describe(exc):
    try:
        return f"{type(exc).__name__}: {exc}"[:300]
    except BaseException:
        return _type_name(exc)


if __name__ == "__main__":
    main()
