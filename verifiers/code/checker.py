"""Assert-mode test runner, *inside* the jail (standard library only, copied in as a file).

Assert-style tests (a HumanEval ``check(candidate)`` function, or MBPP ``assert`` lines) hold their
expected values in Python code, so those values must be in the jail. This process keeps them away
from the program anyway:

1. it makes itself non-dumpable (no ``ptrace``, no ``/proc/<pid>/mem`` or ``fd`` for same-uid
   processes without CAP_SYS_PTRACE, which the program never has), reads ``check.json`` and deletes it
   before any of the program's code runs;
2. it starts the program in a separate interpreter (``runner.py``), never importing it here, so the
   program cannot patch this interpreter (builtins, ``AssertionError``, ``sys.exit``, the output);
3. the test code runs here, where ``candidate`` (and every other name the program defines that
   neither the trusted ``setup`` nor the builtins define) is a proxy that sends the arguments over a
   pipe and decodes the answer into built-in values (``codec.py``): a rigged ``__eq__`` never
   arrives, only data;
4. each call has a time limit; an overrun kills the program's process (it is restarted for the next
   call) and fails the test even if the test code swallows the exception;
5. the verdict goes to this process's own stdout, which the program's process never holds, as one
   JSON line carrying a nonce that only the parent and this process know.
"""

import builtins
import ctypes
import json
import linecache
import os
import select
import subprocess
import sys
import time
import traceback


class CandidateError(Exception):
    """The program's function failed in a way that is not a built-in exception type."""


class CandidateTimeout(BaseException):
    """A call ran past its limit (a BaseException, so ``except Exception`` in a test cannot hide it)."""


class Ref:
    """An object that stayed in the program's process; it can only be passed back to it."""

    __slots__ = ("id",)

    def __init__(self, ref_id):
        self.id = ref_id

    def __repr__(self):
        return f"<object #{self.id} of the program>"

    def __bool__(self):
        # Its truth value would be the program's to decide; ``assert candidate(x)`` must not pass on it.
        raise TypeError("an object of the program has no truth value here")


class Candidate:
    """The program's process and the proxies that call into it."""

    def __init__(self, codec, setup, per_call_s):
        self.codec, self.setup, self.per_call_s = codec, setup, per_call_s
        self.proc, self.buf, self.names, self.timed_out = None, b"", [], False
        self.import_error = None

    def start(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "kx_runner.py"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        self.buf = b""
        self._send({"setup": self.setup})
        hello = self._receive()
        if "ready" not in hello:
            self.import_error = _describe_remote(hello.get("import_error"))
            self.stop()
            raise CandidateError(f"the program failed to load: {self.import_error}")
        self.names = [n for n in hello["ready"] if isinstance(n, str)]

    def stop(self):
        if self.proc is not None:
            try:
                self.proc.kill()
                self.proc.wait()
            except OSError:
                pass
            self.proc = None

    def _send(self, record):
        try:
            self.proc.stdin.write((json.dumps(record) + "\n").encode("utf-8"))
            self.proc.stdin.flush()
        except OSError as exc:
            self.stop()
            raise CandidateError("the program's process is gone") from exc

    def _receive(self):
        deadline = time.monotonic() + self.per_call_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                self.stop()
                self.timed_out = True
                raise CandidateTimeout(f"call took longer than {self.per_call_s:g}s")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                self.stop()
                raise CandidateError("the program's process exited")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise CandidateError("unreadable answer from the program") from exc
        if not isinstance(record, dict):
            raise CandidateError("unreadable answer from the program")
        return record

    def call(self, name, args, kwargs):
        if self.proc is None:
            self.start()
        try:
            payload = {
                "call": name,
                "args": self.codec.encode(list(args), self._ref_ids),
                "kwargs": self.codec.encode(dict(kwargs), self._ref_ids),
            }
        except Exception as exc:
            raise CandidateError(f"argument cannot be passed to the program: {exc}") from None
        self._send(payload)
        answer = self._receive()
        if "value" in answer:
            try:
                return self.codec.decode(answer["value"], Ref)
            except Exception as exc:
                raise CandidateError(f"unreadable return value: {exc}") from None
        raise _exception_from(answer.get("error"))

    @staticmethod
    def _ref_ids(obj):
        if type(obj) is Ref:
            return {"$": "ref", "v": obj.id}
        raise TypeError(f"a {type(obj).__name__} is neither data nor one of the program's objects")

    def proxy(self, name):
        def candidate(*args, **kwargs):
            return self.call(name, args, kwargs)

        candidate.__name__ = candidate.__qualname__ = name
        return candidate


def _describe_remote(info):
    if not isinstance(info, dict):
        return "unknown error"
    return f"{str(info.get('type'))[:100]}: {str(info.get('msg'))[:300]}"


def _exception_from(info):
    kind = getattr(builtins, str((info or {}).get("type", "")), None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(str(info.get("msg", "")))
        except Exception:
            pass
    return CandidateError(_describe_remote(info))


def _compile(source, name):
    """Compile test code, keeping its lines for tracebacks (failure reasons quote the assert)."""
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    return compile(source, name, "exec")


def _reason(exc):
    if isinstance(exc, CandidateTimeout):
        return f"timeout ({exc})"
    if isinstance(exc, AssertionError) and not str(exc):
        frames = traceback.extract_tb(exc.__traceback__)
        return f"assertion failed: {(frames[-1].line if frames else '').strip()[:300]}"
    try:
        return f"{type(exc).__name__}: {exc}"[:400]
    except BaseException:
        return type(exc).__name__


def _run_unit(candidate, code, namespace, entry_point):
    """Run one test unit; returns (passed, reason)."""
    candidate.timed_out = False
    try:
        if code is None:
            namespace["check"](candidate.proxy(entry_point))
        else:
            exec(code, namespace)
    except BaseException as exc:
        return False, _reason(exc)
    if candidate.timed_out:
        return False, f"timeout (a call took longer than {candidate.per_call_s:g}s)"
    return True, None


def main():
    try:
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0
    except OSError:
        pass
    with open("check.json", encoding="utf-8") as fh:
        job = json.load(fh)
    os.remove("check.json")
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    spec_path = os.path.abspath("kx_codec.py")
    codec_ns = {"__name__": "kx_codec", "__file__": spec_path}
    with open(spec_path, encoding="utf-8") as fh:
        exec(compile(fh.read(), spec_path, "exec"), codec_ns)
    codec = type(sys)("kx_codec")
    codec.__dict__.update(codec_ns)

    def finish(results, error=None):
        out.write(json.dumps({"nonce": job["nonce"], "results": results, "error": error}) + "\n")
        out.flush()

    namespace = {"__name__": "__kx_tests__"}
    setup = job.get("setup") or ""
    exec(_compile(setup, "<setup>"), namespace)
    candidate = Candidate(codec, setup, float(job["per_call_s"]))
    units = job.get("asserts")
    try:
        candidate.start()
    except (CandidateError, CandidateTimeout) as exc:
        reason = f"import: {candidate.import_error}" if candidate.import_error else _reason(exc)
        finish([{"passed": False, "reason": reason}], error=reason)
        return
    entry = job.get("entry_point")
    for name in candidate.names:
        # The program's own names only: never one the trusted setup defines or a builtin (a program
        # exporting ``len`` or ``sorted`` must not change what the tests' own calls return).
        if name == entry or (name not in namespace and not hasattr(builtins, name)):
            namespace[name] = candidate.proxy(name)
    results = []
    if units is None:
        exec(_compile(job["check"], "<check>"), namespace)
        passed, reason = _run_unit(candidate, None, namespace, entry)
        results.append({"passed": passed, "reason": reason})
    else:
        for k, line in enumerate(units):
            passed, reason = _run_unit(candidate, _compile(line, f"<assert {k}>"), namespace, entry)
            results.append({"passed": passed, "reason": reason})
            if not passed and not job.get("partial"):
                break
    candidate.stop()
    finish(results)


if __name__ == "__main__":
    main()
