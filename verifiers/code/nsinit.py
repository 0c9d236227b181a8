"""The sandbox supervisor: runs *inside* the namespaces, builds the jail, runs the program, reports.

Started by ``sandbox.run_sandboxed`` as ``unshare --net --mount --pid --fork --kill-child python -I -S
nsinit.py STAGING`` (namespace mode) or plainly (rlimits-only mode). Standard library only, because it
runs in isolated mode with no site-packages. It is PID 1 of the new PID namespace, so

* when it exits the kernel kills every process left in the namespace (fork swarms, double-forked
  daemons), and it exits as soon as the program's main process ends;
* the program cannot signal it (PID 1 ignores signals it has no handler for, and the program runs as
  another uid), and the verifier's own PID is not visible at all.

Jail (namespace mode): ``pivot_root`` into a small read-only tmpfs root (the old root is detached)
holding read-only, nosuid bind mounts of the system directories and the Python installation only (no
/work, /home, /root, /var, /run, host /tmp), a few device nodes, a fresh ``/proc`` of the new PID
namespace with ``hidepid=invisible``, and a size-capped tmpfs ``/tmp`` owned by the program's uid as the
only writable place (cwd and HOME). The network namespace is new and empty (loopback down). The program
runs in its own session as an unprivileged uid with rlimits, ``no_new_privs``, a seccomp filter that
refuses new namespaces (user namespaces included), the mount API, io_uring, bpf, perf and keyrings,
and, in user-namespace mode, all capabilities dropped.

Input: ``STAGING/job.json`` and ``STAGING/files/*`` (written by the parent, mode 0700, root-owned).
Output: ``STAGING/status.json`` (exit status, CPU time, setup errors), opened before the chroot so the
program can never reach it; the program's stdio are the parent's pipes.
"""

import ctypes
import json
import os
import resource
import shutil
import signal
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_SET_DUMPABLE = 38, 24, 4
MNT_DETACH = 2
PR_SET_CHILD_SUBREAPER = 36
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(src, target, fstype, flags, data=None):
    enc = [None if x is None else os.fsencode(x) for x in (src, target, fstype, data)]
    if _libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {src} -> {target} ({fstype}): {os.strerror(err)}")


def _bind_ro(src, target, extra=MS_NOSUID | MS_NODEV):
    _mount(src, target, None, MS_BIND | MS_REC)
    try:
        _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | extra)
    except OSError:
        # user namespaces refuse to clear locked flags; keep what the source has, but read-only
        st = os.statvfs(target)
        _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | extra | (st.f_flag & 0x40F))


def _build_jail(job, staging, files):
    root = os.path.join(staging, "root")
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    # The scratch /tmp is mounted before the binds: a Python installation that itself lives under
    # /tmp (a checkout in /tmp with its .venv) is then bound on top of it instead of being hidden.
    os.makedirs(root + "/tmp")
    uid = job["uid"] if job["uid"] is not None else 0
    opts = f"size={int(job['scratch_mb'])}m,nr_inodes=4096,mode=700,uid={uid},gid={uid}"
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, opts)
    for path in job["binds"]:
        dst = root + path
        if os.path.islink(path) and os.path.dirname(path) == "/":
            os.symlink(os.readlink(path), dst)
            continue
        if not os.path.isdir(path):
            continue
        os.makedirs(dst, exist_ok=True)
        _bind_ro(path, dst)
    os.makedirs(root + "/dev", exist_ok=True)
    for dev in job["devices"]:
        if os.path.exists(dev):
            open(root + dev, "w").close()
            _bind_ro(dev, root + dev, extra=MS_NOSUID | MS_NOEXEC)
    os.makedirs(root + "/proc")
    try:
        _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible")
    except OSError:
        _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _write_files(root + "/tmp", files, job["uid"])
    _mount(None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    _enter_root(root)
    os.chdir("/tmp")


def _enter_root(root):
    """pivot_root into the jail and detach the old root, so no host path is left in this mount
    namespace at all; chroot only where pivot_root is unavailable."""
    nr = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is not None:
        os.chdir(root)
        if _libc.syscall(nr, b".", b".") == 0 and _libc.umount2(b".", MNT_DETACH) == 0:
            os.chdir("/")
            return
    os.chroot(root)


def _write_files(dest, files, uid):
    for name, data in files.items():
        path = os.path.join(dest, name)
        with open(path, "wb") as fh:
            fh.write(data)
        if uid is not None:
            os.chown(path, uid, uid)


def _drop_caps():
    for cap in range(64):
        _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [
            ("effective", ctypes.c_uint32),
            ("permitted", ctypes.c_uint32),
            ("inheritable", ctypes.c_uint32),
        ]

    hdr = Header(0x20080522, 0)
    data = (Data * 2)()
    if _libc.capset(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


# seccomp (x86_64 only): no new namespaces, no mount API, no io_uring/bpf/perf/userfaultfd/keyrings.
# Normal Python (threads, fork, subprocess) is unaffected; clone3 answers ENOSYS so glibc uses clone.
_AUDIT_ARCH_X86_64 = 0xC000003E
_DENY_EPERM = (
    272,
    308,
    165,
    166,
    155,
    161,
    428,
    429,
    430,
    431,
    432,
    433,
    442,
    425,
    321,
    298,
    323,
    250,
    248,
    249,
)  # unshare setns mount umount2 pivot_root chroot open_tree..fspick mount_setattr
#                           io_uring_setup bpf perf_event_open userfaultfd keyctl add_key request_key
_SYS_CLONE, _SYS_CLONE3 = 56, 435
_CLONE_NS_FLAGS = 0x10000000 | 0x00020000 | 0x20000000 | 0x40000000 | 0x04000000 | 0x08000000 | 0x02000000
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000


def _seccomp_program():
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    # each entry: (code, jump-true label, jump-false label, k); labels resolved below
    prog = [
        (ld, None, None, 4),
        (jeq, None, "allow", _AUDIT_ARCH_X86_64),
        (ld, None, None, 0),
        (jge, "eperm", None, 0x40000000),
    ]
    prog += [(jeq, "eperm", None, nr) for nr in _DENY_EPERM]
    prog += [
        (jeq, "enosys", None, _SYS_CLONE3),
        (jeq, None, "allow", _SYS_CLONE),
        (ld, None, None, 16),
        (jset, "eperm", "allow", _CLONE_NS_FLAGS),
    ]
    labels = {"allow": len(prog), "eperm": len(prog) + 1, "enosys": len(prog) + 2}
    prog += [
        (ret, None, None, _RET_ALLOW),
        (ret, None, None, _RET_ERRNO | 1),
        (ret, None, None, _RET_ERRNO | 38),
    ]
    out = []
    for i, (code, jt, jf, k) in enumerate(prog):
        rel = [0 if lab is None else labels[lab] - i - 1 for lab in (jt, jf)]
        out.append((code, rel[0], rel[1], k))
    return out


def _install_seccomp():
    if os.uname().machine != "x86_64":
        return

    class Filter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_uint16),
            ("jt", ctypes.c_uint8),
            ("jf", ctypes.c_uint8),
            ("k", ctypes.c_uint32),
        ]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    insns = _seccomp_program()
    arr = (Filter * len(insns))(*[Filter(*x) for x in insns])
    prog = Prog(len(insns), arr)
    if _libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "seccomp filter refused")


def _exec_program(job):
    """Child side of the fork: limits, identity, then exec. Never returns."""
    try:
        os.setsid()
        for name, (soft, hard) in job["rlimits"].items():
            resource.setrlimit(getattr(resource, "RLIMIT_" + name), (soft, hard))
        uid = job["uid"]
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        if job["mode"] == "userns":
            _drop_caps()
        _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        if job["mode"] != "rlimits-only":
            _install_seccomp()
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        os.execve(job["argv"][0], job["argv"], job["env"])
    except BaseException as exc:
        os.write(2, f"kexaone-sandbox: could not start the program: {exc!r}\n".encode())
    os._exit(126)


def main(staging):
    status = {"exit_code": None, "signal": None, "cpu_s": None, "maxrss_kb": None, "setup_error": None}
    status_fd = os.open(os.path.join(staging, "status.json"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with open(os.path.join(staging, "pid"), "w") as fh:
            fh.write(os.readlink("/proc/self"))
        with open(os.path.join(staging, "job.json")) as fh:
            job = json.load(fh)
        signal.signal(signal.SIGALRM, lambda *_: os._exit(137))
        signal.setitimer(signal.ITIMER_REAL, float(job["backstop_s"]))
        files = {}
        fdir = os.path.join(staging, "files")
        for name in os.listdir(fdir):
            with open(os.path.join(fdir, name), "rb") as fh:
                files[name] = fh.read()
        for cg in job.get("cgroups", []):
            with open(os.path.join(cg, "cgroup.procs"), "w") as fh:
                fh.write("0")
        if job["mode"] in ("namespaces", "userns"):
            _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
            _build_jail(job, staging, files)
        else:
            scratch = os.path.join(staging, "scratch")
            _write_files(scratch, files, job["uid"])
            shutil.rmtree(fdir, ignore_errors=True)
            os.chdir(scratch)
    except BaseException as exc:
        status["setup_error"] = repr(exc)
        os.write(status_fd, json.dumps(status).encode())
        os._exit(125)
    if job["mode"] == "rlimits-only":
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans (daemons) come back to us
    pid = os.fork()
    if pid == 0:
        _exec_program(job)
    _, wstatus, usage = os.wait4(pid, 0)
    status["cpu_s"] = usage.ru_utime + usage.ru_stime
    status["maxrss_kb"] = usage.ru_maxrss
    if os.WIFSIGNALED(wstatus):
        status["signal"] = os.WTERMSIG(wstatus)
        code = 128 + status["signal"]
    else:
        status["exit_code"] = code = os.WEXITSTATUS(wstatus)
    os.write(status_fd, json.dumps(status).encode())
    if job["mode"] == "rlimits-only":
        _kill_and_reap_descendants()
    os._exit(code)


def _kill_and_reap_descendants():
    """rlimits-only: as subreaper, kill whatever the program left behind and reap it (no PID namespace
    does it for us), so no process and no zombie survives the verdict."""
    me = str(os.getpid()).encode()
    while True:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    ppid = fh.read().rsplit(b")", 1)[1].split()[1]
            except (OSError, IndexError):
                continue
            if ppid == me:
                try:
                    os.kill(int(entry), signal.SIGKILL)
                except OSError:
                    pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


if __name__ == "__main__":
    main(sys.argv[1])
