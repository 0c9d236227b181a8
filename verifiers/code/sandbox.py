"""Run untrusted, possibly hostile Python in a throw-away jail and return what it did.

Layers (namespace mode, the normal case as root; see ``nsinit.py`` for the inside):

* ``unshare --net --mount --pid --fork --kill-child`` gives a new empty network namespace (no route
  anywhere, not even loopback), a private mount table and a PID namespace whose init is our
  supervisor; killing that init kills every process the program ever started.
* a ``pivot_root`` jail made of read-only binds of system and Python directories (the host root is
  detached); the only writable place is a size-capped tmpfs ``/tmp`` (cwd and HOME); the program runs
  as an unused uid from a small pool (one per concurrent run, so RLIMIT_NPROC counts only that run's
  processes) with ``no_new_privs`` and a seccomp filter against new namespaces and the mount API.
* rlimits (CPU, address space, processes, file size, open files, no core dumps) and, where the cgroup v1
  ``pids``/``memory`` controllers are writable, a per-run cgroup capping the *total* of all processes.
* the parent enforces the wall clock, reads output with a hard cap (killing the run when the cap is
  hit), and on every verdict kills the namespace init and waits until the whole namespace is gone
  before removing the staging directory. The environment is rebuilt from scratch (no parent variables).

Fallbacks, chosen once by ``detect_isolation_mode()`` and announced with a loud one-time warning:
``userns`` (unprivileged but user namespaces allowed: same jail, program keeps mapped uid 0 with all
capabilities dropped) and ``rlimits-only`` (no namespaces: own session, rlimits, an intermediate
supervisor process; as root a separate uid, never root itself, and a sweep that kills every process of
that uid; not root, a sweep by the run's token). ``rlimits-only`` cannot block the network, and without
root the program shares the verifier's uid and can signal it.

Thread safety: no ``chdir``, no signal handlers, no ``preexec_fn`` in the parent; every run has its
own staging directory, uid and selector. Cost (2-core dev box): about 70 ms per run serially (two
Python start-ups, mounts, cgroups), about 37 ms per run of throughput with 8 threads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

from kexaone_align.errors import KexaoneError

log = logging.getLogger(__name__)

_NSINIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nsinit.py")
_UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
_NS_FLAGS = ["--net", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private"]
_MODES = ("namespaces", "userns", "rlimits-only")
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32", "/etc")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
_UID_BASE, _UID_SLOTS = 61000, 4000
_SETUP_GRACE_S = 1.0
_STDERR_CAP = 64 * 1024
_DRAIN_S = 0.2
_KILL_WAIT_S = 2.0


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one run. Times in seconds, sizes in MiB unless named bytes."""

    cpu_s: float = 5.0
    wall_s: float = 10.0
    memory_mb: int = 1024
    max_processes: int = 32
    max_output_bytes: int = 1 << 20
    max_file_bytes: int = 16 << 20
    max_open_files: int = 128
    scratch_mb: int = 64

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int | float) or value <= 0:
                raise KexaoneError(f"SandboxLimits.{name} must be a positive number, got {value!r}")


@dataclass
class SandboxResult:
    """What one sandboxed run did. ``exit_code`` is negative (-signal) when the program was killed."""

    exit_code: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    killed_reason: str | None = None
    wall_s: float = 0.0
    cpu_s: float | None = None
    stdout_truncated: bool = False
    isolation: str = ""
    setup_error: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Exited on its own with status 0, inside every limit."""
        return self.exit_code == 0 and self.killed_reason is None and self.setup_error is None


# ---------------------------------------------------------------- isolation mode detection
_mode_lock = threading.Lock()
_mode: str | None = None


def _probe(cmd: list[str]) -> bool:
    try:
        return (
            subprocess.run(cmd, capture_output=True, timeout=10, env={"PATH": "/usr/bin:/bin"}).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def detect_isolation_mode() -> str:
    """The strongest mode this machine allows, probed once: "namespaces", "userns" or "rlimits-only"."""
    global _mode
    with _mode_lock:
        if _mode is None:
            if os.geteuid() == 0 and _probe([_UNSHARE, *_NS_FLAGS, "true"]):
                _mode = "namespaces"
            elif _probe([_UNSHARE, "--user", "--map-root-user", *_NS_FLAGS, "true"]):
                _mode = "userns"
                log.warning(
                    "!!! kexaone code sandbox: not root, using user namespaces (mode 'userns'); the program "
                    "runs as mapped root without capabilities and per-uid process limits are shared !!!"
                )
            else:
                _mode = "rlimits-only"
                log.warning(
                    "!!! kexaone code sandbox: Linux namespaces are unavailable, falling back to "
                    "rlimits-only isolation: NO network isolation, weaker filesystem isolation, and when not "
                    "root the program runs as YOUR uid and can signal your processes. Do not train on "
                    "untrusted code like this; run as root or allow unprivileged user namespaces !!!"
                )
        return _mode


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    with _mode_lock:
        if message in _warned:
            return
        _warned.add(message)
    log.warning("kexaone code sandbox: %s", message)


# ---------------------------------------------------------------- uid pool
_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()
_uid_next = 0


def _acquire_uid() -> int:
    global _uid_next
    with _uid_lock:
        for _ in range(_UID_SLOTS):
            uid = _UID_BASE + _uid_next
            _uid_next = (_uid_next + 1) % _UID_SLOTS
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid
    raise KexaoneError(f"more than {_UID_SLOTS} concurrent sandbox runs; lower the verifier concurrency")


def _release_uid(uid: int) -> None:
    with _uid_lock:
        _uids_in_use.discard(uid)


# ---------------------------------------------------------------- cgroups (best effort)
_CG_ROOT = "/sys/fs/cgroup"
_cg_ok: bool | None = None


def _make_cgroups(name: str, limits: SandboxLimits) -> list[str]:
    global _cg_ok
    if _cg_ok is False or os.geteuid() != 0:
        return []
    made: list[str] = []
    try:
        pids = os.path.join(_CG_ROOT, "pids", "kexaone-sandbox", name)
        os.makedirs(pids)
        made.append(pids)
        with open(os.path.join(pids, "pids.max"), "w") as fh:
            fh.write(str(limits.max_processes + 2))
        mem = os.path.join(_CG_ROOT, "memory", "kexaone-sandbox", name)
        os.makedirs(mem)
        made.append(mem)
        with open(os.path.join(mem, "memory.limit_in_bytes"), "w") as fh:
            fh.write(str((limits.memory_mb + limits.scratch_mb + 64) << 20))
        _cg_ok = True
        return made
    except OSError as exc:
        if _cg_ok is None:
            log.warning("kexaone code sandbox: cgroup limits unavailable (%s); relying on rlimits", exc)
        _cg_ok = False
        _remove_cgroups(made)
        return []


def _remove_cgroups(paths: list[str]) -> None:
    for path in paths:
        for _ in range(50):
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.005)


# ---------------------------------------------------------------- the run
def _python_dirs(python: str) -> list[str]:
    dirs = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}
    dirs.add(os.path.dirname(os.path.dirname(os.path.realpath(python))))
    dirs.add(os.path.dirname(os.path.abspath(python)))
    return sorted(d for d in dirs if d not in ("/", "/usr") and not d.startswith("/usr/"))


def _child_env(scratch: str, token: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": scratch,
        "TMPDIR": scratch,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MALLOC_ARENA_MAX": "2",  # per-thread malloc arenas would eat RLIMIT_AS
        "KEXAONE_SANDBOX": token,
    }


def _world_executable(path: str) -> bool:
    """Can an unrelated uid run ``path``? (every directory on the way o+x, the file o+x)"""
    real = os.path.realpath(path)
    parts = real.split("/")
    try:
        for i in range(2, len(parts) + 1):
            if not os.stat("/".join(parts[:i]) or "/").st_mode & 0o001:
                return False
    except OSError:
        return False
    return True


def _rlimits(limits: SandboxLimits, dedicated_uid: bool) -> dict[str, list[int]]:
    cpu = max(1, math.ceil(limits.cpu_s))
    out = {
        "CPU": [cpu, cpu + 1],
        "AS": [limits.memory_mb << 20] * 2,
        "FSIZE": [limits.max_file_bytes] * 2,
        "NOFILE": [limits.max_open_files] * 2,
        "CORE": [0, 0],
        "MEMLOCK": [0, 0],
    }
    # RLIMIT_NPROC counts every task of the real uid. With a pool uid that is just this run; when the
    # program shares the verifier's uid (userns, unprivileged rlimits-only) it is offset by what that
    # uid already runs, so a busy trainer does not starve the program and a fork bomb is still capped.
    base = 0 if dedicated_uid else _tasks_of_uid(os.getuid())
    out["NPROC"] = [base + limits.max_processes] * 2
    return out


def _tasks_of_uid(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status", "rb") as fh:
                    fields = dict(line.split(b":", 1) for line in fh if b":" in line)
                if int(fields[b"Uid"].split()[0]) == uid:
                    count += int(fields[b"Threads"])
            except (OSError, KeyError, ValueError):
                continue
    return count


def run_sandboxed(
    program: str,
    stdin: bytes = b"",
    limits: SandboxLimits | None = None,
    *,
    files: Mapping[str, str | bytes] | None = None,
    script: str = "solution.py",
    python: str | None = None,
    mode: str | None = None,
    on_line: Callable[[bytes], bool] | None = None,
) -> SandboxResult:
    """Run ``program`` (saved as ``solution.py``) with ``stdin``; ``files`` are extra files placed
    next to it and ``script`` is the file Python runs. ``mode`` forces an isolation mode (tests).
    ``on_line`` sees each complete stdout line as it arrives; when it returns True the run is ended
    at once (``killed_reason`` "stopped"), e.g. at a test's first failure."""
    limits = limits or SandboxLimits()
    mode = mode or detect_isolation_mode()
    if mode not in _MODES:
        raise KexaoneError(f"unknown sandbox isolation mode {mode!r}; expected one of {_MODES}")
    python = python or sys.executable
    all_files: dict[str, bytes] = {"solution.py": program.encode("utf-8", "surrogatepass")}
    for name, data in (files or {}).items():
        if "/" in name or name in ("", ".", ".."):
            raise KexaoneError(f"sandbox file names must be plain names, got {name!r}")
        all_files[name] = data.encode() if isinstance(data, str) else bytes(data)
    if script not in all_files:
        raise KexaoneError(f"sandbox script {script!r} is not among the files {sorted(all_files)}")

    drop_uid = os.geteuid() == 0 and mode != "userns"
    if drop_uid and mode == "rlimits-only" and not _world_executable(python):
        # Never run untrusted code as root (kill(-1) alone would take the machine down): use a Python
        # that other uids can execute, or refuse.
        fallback = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
        if not fallback or not _world_executable(fallback):
            raise KexaoneError(
                f"the code sandbox cannot run {python} as an unprivileged uid and namespaces are "
                "unavailable; refusing to run untrusted code as root"
            )
        _warn_once(f"{python} is not executable by other uids; rlimits-only runs use {fallback}")
        python = fallback
    uid = _acquire_uid() if drop_uid else None
    token = uuid.uuid4().hex
    staging = tempfile.mkdtemp(prefix="kexaone-sbx-")
    cgroups: list[str] = []
    try:
        os.mkdir(os.path.join(staging, "files"))
        for name, data in all_files.items():
            with open(os.path.join(staging, "files", name), "wb") as fh:
                fh.write(data)
        if mode == "rlimits-only":
            scratch = os.path.join(staging, "scratch")
            os.mkdir(scratch, 0o700)
            if uid is not None:
                os.chown(scratch, uid, uid)
                os.chmod(staging, 0o711)
        else:
            scratch = "/tmp"
            os.mkdir(os.path.join(staging, "root"))
        job = {
            "mode": mode,
            "uid": uid,
            "argv": [python, "-I", "-B", script],
            "env": _child_env(scratch, token),
            "rlimits": _rlimits(limits, dedicated_uid=uid is not None),
            "binds": [*_SYSTEM_DIRS, *_python_dirs(python)],
            "devices": list(_DEVICES),
            "scratch_mb": limits.scratch_mb,
            "backstop_s": limits.wall_s + 10.0,
        }
        cgroups = _make_cgroups(os.path.basename(staging), limits)  # root only; [] otherwise
        job["cgroups"] = cgroups
        with open(os.path.join(staging, "job.json"), "w") as fh:
            json.dump(job, fh)
        init = [sys.executable, "-I", "-S", _NSINIT, staging]
        if mode == "namespaces":
            cmd = [_UNSHARE, *_NS_FLAGS, *init]
        elif mode == "userns":
            cmd = [_UNSHARE, "--user", "--map-root-user", *_NS_FLAGS, *init]
        else:
            cmd = init
        result = _run_and_collect(cmd, stdin, limits, staging, mode, uid, token, on_line)
        result.isolation = mode
        return result
    finally:
        _remove_cgroups(cgroups)
        shutil.rmtree(staging, ignore_errors=True)
        if uid is not None:
            _release_uid(uid)


def run_time_bound_s(limits: SandboxLimits) -> float:
    """Most wall seconds one ``run_sandboxed`` call can take: the limit, start-up grace, the kill."""
    return limits.wall_s + _SETUP_GRACE_S + _KILL_WAIT_S + 1.0


def _run_and_collect(
    cmd: list[str],
    stdin: bytes,
    limits: SandboxLimits,
    staging: str,
    mode: str,
    uid: int | None,
    token: str,
    on_line: Callable[[bytes], bool] | None = None,
) -> SandboxResult:
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        start_new_session=True,
        close_fds=True,
    )
    out, err = bytearray(), bytearray()
    killed_reason: str | None = None
    truncated = False
    deadline = start + limits.wall_s + _SETUP_GRACE_S
    sel = selectors.DefaultSelector()
    try:
        assert proc.stdin and proc.stdout and proc.stderr
        os.set_blocking(proc.stdin.fileno(), False)
        pending = memoryview(stdin)
        if pending:
            sel.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        drain_until: float | None = None
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                killed_reason = "wall_time"
                break
            if drain_until is None and proc.poll() is not None:
                # the supervisor is gone; a stray holder of the pipes (rlimits-only) must not stall us
                drain_until = now + _DRAIN_S
            elif drain_until is not None and now >= drain_until:
                break
            remaining = min(deadline, drain_until or deadline) - now
            for key, _ in sel.select(min(remaining, 0.05)):
                if key.fileobj is proc.stdin:
                    try:
                        sent = os.write(key.fd, pending[:65536])
                        pending = pending[sent:]
                    except BlockingIOError:
                        continue
                    except OSError:
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(key.fileobj)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = key.data
                cap = limits.max_output_bytes if buf is out else _STDERR_CAP
                room = cap - len(buf)
                if len(chunk) > room:
                    buf += chunk[: max(room, 0)]
                    if buf is out:
                        truncated = True
                        killed_reason = "output_limit"
                else:
                    buf += chunk
                if on_line is not None and buf is out and killed_reason is None:
                    killed_reason = _feed_lines(out, len(out) - len(chunk), on_line)
            if killed_reason:
                break
        if killed_reason is None:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                killed_reason = "wall_time"
    finally:
        sel.close()
        _terminate(proc, staging, mode, uid, token)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe and not pipe.closed:
                pipe.close()
    wall = time.monotonic() - start
    status = _read_status(staging)
    exit_code = proc.returncode
    if status.get("signal"):
        exit_code = -int(status["signal"])
    elif status.get("exit_code") is not None:
        exit_code = int(status["exit_code"])
    cpu_s = status.get("cpu_s")
    if killed_reason is None and exit_code is not None and exit_code < 0:
        sig = -exit_code
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_s is not None and cpu_s >= limits.cpu_s):
            killed_reason = "cpu_time"
        elif sig == signal.SIGKILL:
            killed_reason = "killed (memory cgroup or process limit)"
        else:
            killed_reason = f"signal {signal.Signals(sig).name}"
    if killed_reason is None and b"MemoryError" in err:
        killed_reason = "memory"
    return SandboxResult(
        exit_code=exit_code if killed_reason not in ("wall_time", "output_limit", "stopped") else None,
        stdout=bytes(out),
        stderr=bytes(err),
        timed_out=killed_reason == "wall_time",
        killed_reason=killed_reason,
        wall_s=wall,
        cpu_s=cpu_s,
        stdout_truncated=truncated,
        setup_error=status.get("setup_error"),
        extra={"maxrss_kb": status.get("maxrss_kb")},
    )


def _feed_lines(out: bytearray, start: int, on_line: Callable[[bytes], bool]) -> str | None:
    """Hand the lines completed since ``start`` to ``on_line``; "stopped" when it asks to stop."""
    begin = out.rfind(b"\n", 0, max(start, 0)) + 1
    end = out.rfind(b"\n")
    if end < max(start, begin):
        return None
    for line in bytes(out[begin:end]).split(b"\n"):
        if on_line(line):
            return "stopped"
    return None


def _read_status(staging: str) -> dict:
    try:
        with open(os.path.join(staging, "status.json")) as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _terminate(proc: subprocess.Popen, staging: str, mode: str, uid: int | None, token: str) -> None:
    """Leave nothing running: kill the namespace init (and with it the namespace), then reap."""
    if proc.poll() is None:
        if mode == "rlimits-only":
            _sweep(uid, token)  # the supervisor (alive, not swept) then reaps them and exits
        else:
            init_pid = _read_pid(staging)
            if init_pid:
                _kill(init_pid)
        try:
            proc.wait(timeout=_KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            _kill(-proc.pid)
            _kill(proc.pid)
            proc.wait()
    if mode == "rlimits-only":
        _sweep(uid, token)


def _read_pid(staging: str) -> int | None:
    try:
        with open(os.path.join(staging, "pid")) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _sweep(uid: int | None, token: str) -> None:
    """rlimits-only: kill every process of the run's uid (root) or carrying its token, until none remain."""
    needle = f"KEXAONE_SANDBOX={token}".encode()
    for _ in range(20):
        found = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                if uid is not None:
                    with open(f"/proc/{pid}/status", "rb") as fh:
                        fields = dict(line.split(b":", 1) for line in fh if b":" in line)
                    hit = int(fields[b"Uid"].split()[0]) == uid and not fields[b"State"].strip().startswith(
                        b"Z"
                    )
                else:
                    with open(f"/proc/{pid}/environ", "rb") as fh:
                        hit = needle in fh.read()
            except (OSError, KeyError, ValueError, IndexError):
                continue
            if hit:
                found = True
                _kill(pid)
        if not found:
            return
        time.sleep(0.01)
