"""Assert-mode candidate process, *inside* the jail (standard library only, copied in as a file).

Started by ``checker.py`` with pipes as stdin/stdout. It runs the task's trusted ``setup`` code and
then ``solution.py`` in one module namespace (the way official harnesses run prompt + completion),
reports the module's top-level callables, and then serves calls: one JSON request per stdin line
(``{"call": name, "args": [...], "kwargs": [...]}`` in typed JSON, ``codec.py``), one answer per
stdout line (``{"value": ...}`` or ``{"error": {"type": ..., "msg": ...}}``). Values the codec cannot
carry stay here and travel as references that the checker can only pass back.

Nothing here is trusted: the program may rewrite all of it. It never sees the tests (they are in the
checker's memory, which it cannot read), so the most it can do is claim return values.
"""

import importlib.util
import json
import os
import sys
import types


def main():
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # the program's prints go to stderr, not into the protocol
    spec = importlib.util.spec_from_file_location("kx_codec", os.path.abspath("kx_codec.py"))
    codec = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(codec)
    refs = []

    def send(record):
        proto.write(json.dumps(record) + "\n")
        proto.flush()

    def failure(exc):
        try:
            return {"error": {"type": type(exc).__name__[:100], "msg": str(exc)[:300]}}
        except BaseException:
            return {"error": {"type": "Exception", "msg": "?"}}

    job = json.loads(sys.stdin.readline())
    module = types.ModuleType("solution")
    module.__file__ = os.path.abspath("solution.py")
    sys.modules["solution"] = module
    try:
        setup = job.get("setup") or ""
        with open("solution.py", encoding="utf-8") as fh:
            source = fh.read()
        try:
            code = compile(source, "solution.py", "exec")
        except SyntaxError:
            if not setup:
                raise
            # A completion that continues the setup (a HumanEval body after its prompt) runs as
            # setup + completion, the way the official harness builds its program.
            code, setup = compile(setup + source, "solution.py", "exec"), ""
        exec(compile(setup, "<setup>", "exec"), module.__dict__)
        exec(code, module.__dict__)
        names = [k for k, v in list(module.__dict__.items()) if callable(v) and not k.startswith("__")]
    except BaseException as exc:
        send({"import_error": failure(exc)["error"]})
        return
    send({"ready": names})
    for line in sys.stdin:
        try:
            req = json.loads(line)
            args = codec.decode(req["args"], refs.__getitem__)
            kwargs = dict(codec.decode(req["kwargs"], refs.__getitem__))
            fn = module.__dict__[req["call"]]
            value = fn(*args, **kwargs)
            out = {"value": codec.encode(value, refs)}
        except BaseException as exc:
            out = failure(exc)
        try:
            send(out)
        except BaseException as exc:
            send(failure(exc))


if __name__ == "__main__":
    main()
