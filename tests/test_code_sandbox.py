"""Adversarial tests of the code sandbox: each hostile program must fail to escape, and we must live.

Every test runs a real program in the real sandbox; each asserts an observable effect on the host (a
listener that saw nothing, a file that does not exist, a process that is not there), so a weaker
sandbox makes it fail.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from kexaone_align.verifiers.api import Sample
from kexaone_align.verifiers.code import CodeVerifier, SandboxLimits, detect_isolation_mode, run_sandboxed
from kexaone_align.verifiers.code import sandbox as sb

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only")

FAST = SandboxLimits(cpu_s=2, wall_s=4, memory_mb=512, max_processes=16, max_output_bytes=1 << 16)


def _sandbox_procs() -> list[psutil.Process]:
    """Processes on the host that run as one of the sandbox uids (there must be none after a verdict)."""
    lo, hi = sb._UID_BASE, sb._UID_BASE + sb._UID_SLOTS
    out = []
    for p in psutil.process_iter(["uids", "status"]):
        try:
            if lo <= p.info["uids"].real < hi:
                out.append(p)
        except (psutil.Error, TypeError):
            continue
    return out


def _code(src: str) -> str:
    return f"```python\n{src}\n```"


def test_namespaces_are_used_here():
    # The development machines run as root with unshare available: the strong mode must be in use.
    if os.geteuid() != 0:
        pytest.skip("not root: the namespace mode is not expected")
    assert detect_isolation_mode() == "namespaces"


def test_no_network_not_even_loopback():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    prog = f"""
import socket
results = []
for fam, addr in ((socket.AF_INET, ("127.0.0.1", {port})), (socket.AF_INET, ("1.1.1.1", 80))):
    s = socket.socket(fam)
    s.settimeout(1)
    try:
        s.connect(addr); s.sendall(b"escaped"); results.append("connected")
    except OSError as e:
        results.append("blocked")
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b"escaped", ("127.0.0.1", {port})); results.append("udp-sent")
except OSError:
    results.append("blocked")
print(results)
"""
    res = run_sandboxed(prog, b"", FAST)
    try:
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()
    assert res.ok, res.stderr
    assert res.stdout.decode().strip() == "['blocked', 'blocked', 'blocked']"


def test_no_writes_outside_scratch(tmp_path):
    open_dir = tmp_path / "world-writable"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    # a world-writable directory inside a path that IS visible (read-only) in the jail
    visible = os.path.join(os.path.realpath(sys.prefix), f"kexaone-test-{uuid.uuid4().hex}")
    os.mkdir(visible)
    os.chmod(visible, 0o777)
    name = f"kexaone-escape-{uuid.uuid4().hex}"
    targets = [str(open_dir / "pwned"), f"/tmp/{name}", os.path.join(visible, "pwned"), f"/var/tmp/{name}"]
    prog = f"""
import os
ok = []
for path in {targets!r}:
    try:
        with open(path, "w") as fh:
            fh.write("pwned")
        ok.append(os.path.exists(path))
    except OSError:
        ok.append(False)
with open("scratch.txt", "w") as fh:
    fh.write("fine")
print(ok, open("scratch.txt").read(), os.getcwd())
"""
    try:
        res = run_sandboxed(prog, b"", FAST)
        for path in targets:
            assert not os.path.exists(path), f"sandbox wrote {path}"
        if res.isolation == "namespaces":
            # /tmp inside is the private scratch, so that write lands there and vanishes with it
            assert res.stdout.decode().strip() == "[False, True, False, False] fine /tmp"
        assert not list(open_dir.iterdir())
        assert not os.listdir(visible)
    finally:
        for path in targets:
            if os.path.exists(path):
                os.remove(path)
        os.rmdir(visible)


def test_parent_environment_invisible(monkeypatch):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("KEXAONE_TEST_SECRET", secret)
    prog = f"""
import os
seen = [repr(dict(os.environ))]
paths = ["/proc/self/environ", "/proc/1/environ"]
paths += ["/proc/{os.getpid()}/environ", "/proc/{os.getppid()}/environ"]
for path in paths:
    try:
        seen.append(open(path, "rb").read().decode("latin-1"))
    except OSError as exc:
        seen.append(type(exc).__name__)
print("\\n".join(seen))
"""
    res = run_sandboxed(prog, b"", FAST)
    assert res.ok, res.stderr
    assert secret not in res.stdout.decode("latin-1")
    assert "KEXAONE_TEST_SECRET" not in res.stdout.decode("latin-1")
    assert "PATH" in res.stdout.decode()  # the program did run and print its environment


def test_fork_bomb_is_capped_and_leaves_nothing():
    prog = """
import os, time
n = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
except OSError:
    pass
print(n)
"""
    t0 = time.monotonic()
    res = run_sandboxed(prog, b"", FAST)
    assert res.ok, res.stderr
    assert int(res.stdout) < FAST.max_processes
    assert time.monotonic() - t0 < 4
    assert _sandbox_procs() == []


def test_double_forked_daemon_is_killed_with_the_verdict(tmp_path):
    marker = tmp_path / "marker"
    tmp_path.chmod(0o777)
    prog = f"""
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(1.0)
        for path in ({str(marker)!r}, "/tmp/marker"):
            try:
                open(path, "w").write("daemon alive")
            except OSError:
                pass
        time.sleep(60)
    os._exit(0)
print("parent done")
"""
    res = run_sandboxed(prog, b"", FAST)
    assert res.stdout == b"parent done\n"
    assert res.wall_s < 1.0  # the verdict does not wait for the daemon
    assert _sandbox_procs() == []
    time.sleep(1.3)
    assert not marker.exists()
    assert _sandbox_procs() == []


def test_infinite_loop_hits_cpu_limit():
    limits = SandboxLimits(cpu_s=1, wall_s=6, memory_mb=512)
    res = run_sandboxed("while True:\n    pass\n", b"", limits)
    assert res.killed_reason == "cpu_time"
    assert not res.timed_out
    assert res.wall_s < 4


def test_sleep_forever_hits_wall_limit():
    limits = SandboxLimits(cpu_s=5, wall_s=1, memory_mb=512)
    t0 = time.monotonic()
    res = run_sandboxed("import time\ntime.sleep(3600)\n", b"", limits)
    assert res.timed_out and res.killed_reason == "wall_time"
    assert time.monotonic() - t0 < 3.5
    assert _sandbox_procs() == []


def test_on_line_ends_the_run_when_asked():
    seen: list[bytes] = []

    def on_line(line: bytes) -> bool:
        seen.append(line)
        return line == b"3"

    program = "import sys, time\nfor k in range(100):\n    print(k, flush=True)\n    time.sleep(0.05)\n"
    res = run_sandboxed(program, b"", FAST, on_line=on_line)
    assert res.killed_reason == "stopped" and res.exit_code is None
    assert seen == [b"0", b"1", b"2", b"3"] and res.wall_s < 3
    assert _sandbox_procs() == []


def test_huge_allocation_hits_memory_limit():
    prog = """
chunks = []
for _ in range(100):
    chunks.append(bytearray(64 << 20))  # 6.4 GB in total if nothing stops it
print("allocated", sum(map(len, chunks)))
"""
    res = run_sandboxed(prog, b"", FAST)
    assert b"allocated" not in res.stdout
    assert not res.ok
    assert res.killed_reason is not None and "memory" in res.killed_reason


def test_huge_output_is_truncated_and_killed():
    t0 = time.monotonic()
    prog = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(100):\n    sys.stdout.write(chunk)\n"
    res = run_sandboxed(prog)
    assert res.killed_reason == "output_limit"
    assert res.stdout_truncated
    assert len(res.stdout) == SandboxLimits().max_output_bytes
    assert time.monotonic() - t0 < 5
    verdict = CodeVerifier().verify(
        Sample("p", _code("print('x' * (100 << 20))"), {"tests": [{"input": "", "output": "x" * 10}]}, "code")
    )
    assert verdict.reward == 0.0
    assert verdict.details["tests"][0]["reason"] == "output_limit"


def test_killing_parent_and_process_group_does_not_hurt_the_verifier():
    if detect_isolation_mode() == "rlimits-only" and os.geteuid() != 0:
        pytest.skip("same-uid rlimits-only fallback cannot protect the verifier (warned about at start)")
    me, my_group = os.getpid(), os.getpgid(0)
    prog = f"""
import os, signal
tries = []
for target in (lambda: os.kill(os.getppid(), signal.SIGKILL),
               lambda: os.kill({me}, signal.SIGKILL),
               lambda: os.killpg({my_group}, signal.SIGKILL),
               lambda: os.kill(1, signal.SIGKILL)):
    try:
        target()
        tries.append("sent")
    except OSError as exc:
        tries.append(type(exc).__name__)
print(" ".join(tries), flush=True)
try:
    os.kill(-1, signal.SIGKILL)  # everything it may signal (not itself)
except OSError:
    pass
os.killpg(0, signal.SIGKILL)
"""
    res = run_sandboxed(prog, b"", FAST)
    assert psutil.pid_exists(me)
    tries = res.stdout.decode().split()
    assert len(tries) == 4 and "sent" not in tries, tries
    assert res.exit_code == -9  # the killpg(0) hit only the program itself
    assert _sandbox_procs() == []
    assert run_sandboxed("print(6 * 7)", b"", FAST).stdout == b"42\n"  # and the verifier keeps working


def test_expected_output_is_nowhere_in_the_jail():
    # The program searches everything it can read for the expected output; it must find nothing.
    secret = f"EXPECTED-{uuid.uuid4().hex}"
    prog = """
import os, sys
found = []
def scan(data):
    i = data.find(b"EXPECTED-")
    if i >= 0:
        found.append(data[i:i + 41].decode("latin-1"))
for top in ("/tmp", "/work", "/root", "/home", "/etc", "/dev/shm", "/var", "/run", "."):
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "include", "share")]
        for name in filenames:
            try:
                with open(os.path.join(dirpath, name), "rb") as fh:
                    scan(fh.read(1 << 20))
            except OSError:
                pass
for pid in os.listdir("/proc"):
    if pid.isdigit():
        for part in ("environ", "cmdline"):
            try:
                scan(open(f"/proc/{pid}/{part}", "rb").read())
            except OSError:
                pass
scan(sys.stdin.buffer.read())
print(found[0] if found else "nothing")
"""
    reference = {"tests": [{"input": "hello\n", "output": secret}]}
    verdict = CodeVerifier(limits=FAST).verify(Sample("p", _code(prog), reference, "code"))
    assert verdict.reward == 0.0
    assert verdict.details["tests"][0]["reason"] == "wrong_output"


def test_call_mode_expected_values_not_in_child_memory():
    secret = f"EXPECTED-{uuid.uuid4().hex}"
    prog = """
import gc, sys
def f(x):
    for obj in gc.get_objects():
        if isinstance(obj, dict) and "expected" in obj:
            return obj["expected"]
    frame = sys._getframe()
    while frame is not None:
        for value in list(frame.f_locals.values()) + list(frame.f_globals.values()):
            if isinstance(value, str) and value.startswith("EXPECTED-"):
                return value
        frame = frame.f_back
    try:
        return open("call.json").read()
    except OSError:
        return "nothing"
"""
    reference = {"fn_name": "f", "tests": [{"args": [1], "expected": secret}]}
    verdict = CodeVerifier(limits=FAST).verify(Sample("p", _code(prog), reference, "code"))
    assert verdict.reward == 0.0
    assert verdict.details["tests"][0]["reason"] == "wrong_value"


def test_always_equal_objects_pass_nothing():
    prog = """
class Anything:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    __hash__ = object.__hash__

class Liar(int):
    def __eq__(self, other):
        return True

def f(x):
    return Anything() if x == 1 else Liar(0)
"""
    reference = {"fn_name": "f", "tests": [{"args": [1], "expected": 42}, {"args": [2], "expected": 7}]}
    verifier = CodeVerifier(limits=FAST, partial_credit=True)
    verdict = verifier.verify(Sample("p", _code(prog), reference, "code"))
    assert verdict.reward == 0.0
    reasons = [t["reason"] for t in verdict.details["tests"]]
    assert reasons[0].startswith("unserializable") and reasons[1] == "wrong_value"


def test_exit_before_printing_gets_zero():
    stdio = {"tests": [{"input": "", "output": "3"}]}
    for prog in ("import sys\nsys.exit(0)\nprint(3)", "import os\nos._exit(0)\nprint(3)"):
        assert CodeVerifier(limits=FAST).verify(Sample("p", _code(prog), stdio, "code")).reward == 0.0
    call = {"fn_name": "f", "tests": [{"args": [], "expected": 3}]}
    for prog in ("import sys\nsys.exit(0)\ndef f(): return 3", "import os\nos._exit(0)\ndef f(): return 3"):
        assert CodeVerifier(limits=FAST).verify(Sample("p", _code(prog), call, "code")).reward == 0.0


def test_reading_the_test_file_finds_nothing():
    secret = f"EXPECTED-{uuid.uuid4().hex}"
    prog = """
import os, glob
names = ["tests.json", "expected_output.txt", "reference.json", "call.json", "/tmp/tests.json"]
names += glob.glob("*") + glob.glob("/tmp/*")
for name in names:
    try:
        text = open(name).read()
    except OSError:
        continue
    if "EXPECTED-" in text:
        print(text[text.index("EXPECTED-"):][:41])
        raise SystemExit
print("nothing")
"""
    reference = {"tests": [{"input": "", "output": secret}]}
    verdict = CodeVerifier(limits=FAST).verify(Sample("p", _code(prog), reference, "code"))
    assert verdict.reward == 0.0


def test_concurrent_runs_keep_their_own_verdicts():
    good = _code("print(int(input()) * 2)")
    bomb = _code("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    ref = {"tests": [{"input": "21", "output": "42"}]}
    samples = [Sample("p", good if i % 2 == 0 else bomb, ref, "code") for i in range(6)]
    verifier = CodeVerifier(limits=SandboxLimits(cpu_s=1, wall_s=1.5, memory_mb=512, max_processes=16))
    with ThreadPoolExecutor(max_workers=6) as pool:
        rewards = list(pool.map(lambda s: verifier.verify(s).reward, samples))
    assert rewards == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert _sandbox_procs() == []


def test_rlimits_only_fallback_still_limits_and_cleans_up(caplog):
    prog = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(60)
    os._exit(0)
print(os.getcwd())
"""
    res = run_sandboxed(prog, b"", FAST, mode="rlimits-only")
    assert res.isolation == "rlimits-only"
    assert res.ok and res.wall_s < 2  # a daemon holding the pipes does not stall the verdict
    assert res.stdout.decode().strip().endswith("/scratch")
    token_holders = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "solution.py" in " ".join(p.info["cmdline"] or []):
                token_holders.append(p)
        except psutil.Error:
            continue
    assert token_holders == []
    res = run_sandboxed("while True:\n    pass\n", b"", SandboxLimits(cpu_s=1, wall_s=5), mode="rlimits-only")
    assert res.killed_reason == "cpu_time"


def test_fallback_warns_loudly_once(monkeypatch, caplog):
    monkeypatch.setattr(sb, "_mode", None)
    monkeypatch.setattr(sb, "_probe", lambda cmd: False)
    with caplog.at_level("WARNING", logger=sb.__name__):
        assert detect_isolation_mode() == "rlimits-only"
        assert detect_isolation_mode() == "rlimits-only"
    warnings = [r for r in caplog.records if "rlimits-only" in r.getMessage()]
    assert len(warnings) == 1 and "NO network isolation" in warnings[0].getMessage()


def test_user_namespace_mode_isolates_too():
    if not sb._probe([sb._UNSHARE, "--user", "--map-root-user", *sb._NS_FLAGS, "true"]):
        pytest.skip("user namespaces unavailable")
    name = f"/tmp/kexaone-escape-{uuid.uuid4().hex}"
    prog = f"""
import os, socket
try:
    socket.create_connection(("127.0.0.1", 22), timeout=1); net = "open"
except OSError:
    net = "blocked"
open({name!r}, "w").write("x")
print(net, sorted(os.listdir("/"))[:3], os.getuid())
"""
    res = run_sandboxed(prog, b"", FAST, mode="userns")
    assert res.ok, res.stderr
    assert res.stdout.decode().startswith("blocked")
    assert not os.path.exists(name)
    info = json.dumps(res.isolation)
    assert "userns" in info


def test_no_new_namespaces_mounts_or_host_filesystem():
    if detect_isolation_mode() != "namespaces":
        pytest.skip("namespace mode only")
    prog = """
import ctypes, os, subprocess
libc = ctypes.CDLL(None, use_errno=True)
out = [libc.unshare(0x10000000), libc.unshare(0x40000000)]           # new user ns, new net ns
out.append(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, None))
out.append(subprocess.run(["unshare", "-r", "true"], capture_output=True).returncode != 0)
try:
    os.chroot("/tmp"); out.append("chroot")
except OSError:
    out.append("no-chroot")
print(out, sorted(os.listdir("/")), os.path.exists("/work/main/tests"), os.path.exists("/old_root"))
"""
    res = run_sandboxed(prog, b"", FAST)
    assert res.ok, res.stderr
    text = res.stdout.decode()
    assert text.startswith("[-1, -1, -1, True, 'no-chroot']"), text
    assert text.rstrip().endswith("False False")
    assert "'home'" not in text and "'var'" not in text and "'run'" not in text
