"""Bootstrap of one sandbox (run by pyfast.eval.sandbox as ``python -I -S -B THIS_FILE``).

Trusted code up to its ``execve`` of the interpreter. It reads one JSON document from stdin
(mode, role, harness payload, limits, descriptor numbers, bind sources, cgroup) and, in the
``strict`` and ``namespaces`` modes:

1. joins the per-program cgroup v2 child the parent made (where the parent found one usable);
2. ``unshare(NEWUSER | NEWNS | NEWNET | NEWPID | NEWIPC | NEWUTS | NEWCGROUP)``; the uid/gid map
   sends the namespace's uid 0 to the overflow uid (65534) when the host uid is 0 (written by a
   helper forked before the unshare, which keeps CAP_SETUID in the parent namespace), else to the
   caller's own uid: the sandbox is never host root;
3. forks PID 1 of the new PID namespace; this process stays outside as the supervisor (SIGTERM
   -> SIGKILL of PID 1, after which the kernel kills every process of the namespace);
4. PID 1 opens the bind sources (O_PATH, still as the host uid), switches to the mapped uid,
   builds a fresh tmpfs root with read-only binds of only those paths (interpreter prefix, /usr,
   /lib*, /etc/ld.so.cache), a /dev of four bound devices, a size-capped tmpfs /tmp, then
   ``pivot_root`` and detaches the old root; mounts a fresh /proc of its PID namespace;
5. closes every descriptor but stdout/stderr (pipes), the result pipe and the call pipes,
   reopens stdin from the sandbox's /dev/null; drops every capability (bounding set, ambient,
   securebits locked, capset 0), sets no_new_privs, installs the seccomp filter
   (_sandbox_seccomp.py), sets the rlimits, reports what it set up on the result pipe and
   ``execve``s the interpreter on the harness (_sandbox_harness.py) from inside.

Any layer that fails in ``strict`` mode (seccomp included; ``namespaces`` mode tolerates a missing
seccomp filter and a host-root identity) is reported as ``{"error", "layer"}`` and nothing runs.
In ``weak`` mode: no namespaces, a new session, rlimits, no_new_privs and the harness's Python
audit hook, in a host temporary directory: a guard against accidents, not a boundary.
Deliberately stdlib-only and import-free of pyfast.
"""

import ctypes
import fcntl
import marshal
import os
import resource
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # -I leaves the script dir out
import _sandbox_seccomp  # noqa: E402  (the filter is built before the host tree goes away)

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = (
    0x20000,
    0x02000000,
    0x04000000,
    0x08000000,
)
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
# statvfs f_flag bit -> mount flag: a bind remount must repeat the flags the kernel locked
ST_TO_MS = {1: MS_RDONLY, 2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME}
ST_TO_MS |= {2048: MS_NODIRATIME, 4096: MS_RELATIME}
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_SECUREBITS = 1, 4, 24, 28
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
SECBITS_LOCKED_NOROOT = 0x2F  # NOROOT, NO_SETUID_FIXUP (+ locks), KEEP_CAPS lock; KEEP_CAPS off
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
KEYCTL_JOIN_SESSION_KEYRING = 1
SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}
DEVICES = ("null", "zero", "random", "urandom")
FD_STDOUT, FD_RESULT, FD_CALLS_IN, FD_CALLS_OUT = 1, 3, 4, 5

_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    def __init__(self, layer, message):
        super().__init__(message)
        self.layer = layer


def _check(ret, layer, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise SetupError(layer, f"{what}: {os.strerror(err)}")


def _write(path, text):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _mount(src, dst, fstype, flags, data=None, layer="filesystem"):
    ret = _libc.mount(
        src.encode() if src else None,
        dst.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    _check(ret, layer, f"mount {src or fstype} on {dst}")


def _remount_readonly(target, extra=0):
    """Bind remount read-only + nosuid (+ `extra`), keeping every flag the mount already has."""
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | extra
    st = os.statvfs(target).f_flag
    for bit, ms in ST_TO_MS.items():
        if st & bit:
            flags |= ms
    _mount(None, target, None, flags)


def _char(c):
    return c if " " <= c < "\x7f" and c not in '"\\' else f"\\u{ord(c):04x}"


def _dumps(x):
    """JSON of str/int/bool/None/dict/list without importing json (its re/enum cost ~10 ms)."""
    if x is None or x is True or x is False:
        return {None: "null", True: "true", False: "false"}[x]
    if type(x) is int:
        return str(x)
    if type(x) is str:
        return '"' + "".join(map(_char, x)) + '"'
    if type(x) is dict:
        return "{" + ", ".join(_dumps(str(k)) + ": " + _dumps(v) for k, v in x.items()) + "}"
    if type(x) in (list, tuple):
        return "[" + ", ".join(_dumps(v) for v in x) + "]"
    return _dumps(repr(x))


def _report(info):
    os.write(FD_RESULT, (_dumps(info) + "\n").encode())


def _fail(layer, message):
    try:
        _report({"error": message, "layer": layer})
    finally:
        os._exit(3)


def _join_cgroup(path):
    try:
        _write(os.path.join(path, "cgroup.procs"), str(os.getpid()))
    except OSError as exc:
        raise SetupError("cgroup", f"joining {path}: {exc.strerror}") from None


def _map_helper(uid, gid):
    """Forked before the unshare while still host root: writes the parent's maps on request."""
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    target = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(go_w)
        os.close(done_r)
        ok = b"\0"
        try:
            if os.read(go_r, 1) == b"1":
                _write(f"/proc/{target}/uid_map", f"0 {uid} 1")
                _write(f"/proc/{target}/gid_map", f"0 {gid} 1")
                ok = b"1"
        except OSError as exc:
            ok = exc.strerror.encode()[:200]
        os.write(done_w, ok)
        os._exit(0)
    os.close(go_r)
    os.close(done_w)
    return pid, go_w, done_r


def _enter_namespaces(info, cgroup):
    host_uid, host_gid = os.geteuid(), os.getegid()
    if cgroup:
        _join_cgroup(cgroup)
    helper = None
    if host_uid == 0:
        overflow = int(open("/proc/sys/kernel/overflowuid").read())
        overflow_g = int(open("/proc/sys/kernel/overflowgid").read())
        helper = _map_helper(overflow, overflow_g)
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC
    flags |= CLONE_NEWUTS | CLONE_NEWCGROUP
    try:
        _check(_libc.unshare(ctypes.c_int(flags)), "namespaces", "unshare")
    except SetupError:
        if helper:
            os.write(helper[1], b"0")
            os.waitpid(helper[0], 0)
        raise
    _write("/proc/self/setgroups", "deny")
    if helper:
        pid, go_w, done_r = helper
        os.write(go_w, b"1")
        answer = os.read(done_r, 256)
        os.waitpid(pid, 0)
        os.close(go_w)
        os.close(done_r)
        if answer != b"1":
            raise SetupError("identity", f"writing the uid map: {answer.decode(errors='replace')}")
        info["identity"] = (
            f"uid 0 in the sandbox = host uid {overflow} (overflow), gid {overflow_g}"
        )
        info["host_uid"] = overflow
    else:
        try:
            _write("/proc/self/uid_map", f"0 {host_uid} 1")
            _write("/proc/self/gid_map", f"0 {host_gid} 1")
        except OSError as exc:
            raise SetupError("identity", f"writing the uid map: {exc.strerror}") from None
        info["identity"] = f"uid 0 in the sandbox = host uid {host_uid} (the caller, not root)"
        info["host_uid"] = host_uid
    info["namespaces"] = "user, mount, pid, net, ipc, uts, cgroup"


def _supervise(child):
    """Stays outside the PID namespace and relays the exit status of its PID 1.

    SIGTERM (the parent's wall-clock timeout) kills PID 1; waitpid returns once the kernel has
    killed and reaped every process of the namespace, so nothing outlives the run.
    """

    def kill(*_):
        try:
            os.kill(child, signal.SIGKILL)
        except OSError:
            pass

    signal.signal(signal.SIGTERM, kill)
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.closerange(3, 1 << 16)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


def _mkdirs(root, path):
    cur = root
    for part in path.strip("/").split("/"):
        cur = os.path.join(cur, part)
        if not os.path.lexists(cur):
            os.mkdir(cur, 0o755)


def _build_root(binds, limits, info):
    """A tmpfs root holding only the read-only binds, /dev, /tmp and /proc; pivot_root into it."""
    sources = []
    for path in binds:  # resolved as the host uid, before the identity switch
        try:
            sources.append((path, os.open(path, os.O_PATH | os.O_CLOEXEC), os.path.isdir(path)))
        except OSError:
            continue  # e.g. no /lib64 on this machine
    devs = [(d, os.open(f"/dev/{d}", os.O_PATH | os.O_CLOEXEC)) for d in DEVICES]
    try:
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)  # the mapped uid (host overflow uid when the host uid is 0)
    except OSError as exc:
        raise SetupError("identity", f"setresuid: {exc.strerror}") from None
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    root = "/tmp"  # any existing directory: the tmpfs hides it in this mount namespace only
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=512,mode=0755")
    for path, fd, is_dir in sources:
        target = root + path
        if os.path.islink(path):  # /lib -> usr/lib: the same link inside
            _mkdirs(root, os.path.dirname(path))
            if not os.path.lexists(target):
                os.symlink(os.readlink(path), target)
            continue
        if is_dir:
            _mkdirs(root, path)
        else:
            _mkdirs(root, os.path.dirname(path))
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
        _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
        _remount_readonly(target, MS_NODEV)
    _mkdirs(root, "/dev")
    for name, fd in devs:
        target = f"{root}/dev/{name}"
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
        _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
        _remount_readonly(target, MS_NOEXEC)
    for name, dst in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0")):
        os.symlink(dst, f"{root}/dev/{name}")
    os.symlink("/proc/self/fd/1", f"{root}/dev/stdout")
    os.symlink("/proc/self/fd/2", f"{root}/dev/stderr")
    _mkdirs(root, "/proc")
    _mkdirs(root, "/tmp")
    tmp_opts = f"size={limits['tmp_mb']}m,nr_inodes={limits['tmp_inodes']},mode=0700"
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, tmp_opts)
    try:  # while the host's /proc is still visible (the kernel wants one unmasked proc mount)
        _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, layer="proc")
        info["proc"] = "fresh (this PID namespace only)"
    except SetupError as exc:  # e.g. a masked host /proc: the sandbox then has no /proc at all
        info["proc"] = f"absent ({exc})"
    for _, fd, _ in sources:
        os.close(fd)
    for _, fd in devs:
        os.close(fd)
    os.chdir(root)
    nr = SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is None:
        raise SetupError("filesystem", f"pivot_root: no syscall number for {os.uname().machine}")
    _check(_libc.syscall(ctypes.c_long(nr), b".", b"."), "filesystem", "pivot_root")
    _check(_libc.umount2(b".", ctypes.c_int(MNT_DETACH)), "filesystem", "detaching the old root")
    os.chdir("/")
    _mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    info["filesystem"] = (
        "fresh tmpfs root, read-only binds of "
        + ", ".join(p for p, _, _ in sources)
        + f"; /tmp tmpfs {limits['tmp_mb']} MiB, {limits['tmp_inodes']} inodes"
    )
    try:
        _libc.sethostname(b"sandbox", 7)
    except OSError:
        pass


def _new_keyring(info):
    nr = SYS_KEYCTL.get(os.uname().machine)
    ret = -1 if nr is None else _libc.syscall(ctypes.c_long(nr), KEYCTL_JOIN_SESSION_KEYRING, None)
    if ret < 0:
        raise SetupError("keyring", f"new session keyring: {os.strerror(ctypes.get_errno())}")
    info["keyring"] = "new anonymous session keyring"


def _drop_privileges(info):
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break
    _check(
        _libc.prctl(PR_SET_SECUREBITS, SECBITS_LOCKED_NOROOT, 0, 0, 0), "capabilities", "securebits"
    )

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint32) for n in ("effective", "permitted", "inheritable")]

    data = (Data * 2)()
    _check(_libc.capset(ctypes.byref(Header(0x20080522, 0)), data), "capabilities", "capset")
    info["capabilities"] = "none (bounding set emptied, securebits locked)"


def _seccomp(info, mode, prog):
    try:
        if isinstance(prog, OSError):
            raise prog
        _sandbox_seccomp.install(prog)
        info["seccomp"] = "on: " + ", ".join(_sandbox_seccomp.DENIED) + ", clone ns flags"
    except OSError as exc:
        if mode == "strict":
            raise SetupError("seccomp", str(exc)) from None
        info["seccomp"] = f"off ({exc})"


def _rlimits(lim):
    def setlim(kind, soft, hard=None):
        resource.setrlimit(kind, (soft, soft if hard is None else hard))

    setlim(resource.RLIMIT_CORE, 0)
    setlim(resource.RLIMIT_CPU, lim["cpu_s"], lim["cpu_s"] + 1)
    setlim(resource.RLIMIT_AS, lim["memory_mb"] << 20)
    setlim(resource.RLIMIT_FSIZE, lim["fsize_mb"] << 20)
    setlim(resource.RLIMIT_NOFILE, lim["nofile"])
    setlim(resource.RLIMIT_NPROC, lim["nproc"])


def _arrange_fds(fds, stdin_path):
    """Moves the pipes the parent passed to fixed numbers, closes every other descriptor and
    reopens stdin from `stdin_path`. stdout and stderr are the parent's output pipe."""
    keep = {1: 1, 2: 2, FD_RESULT: fds["result"]}
    if fds.get("calls_in") is not None:
        keep[FD_CALLS_IN], keep[FD_CALLS_OUT] = fds["calls_in"], fds["calls_out"]
    moved = {}
    for src in set(keep.values()):  # out of the way first: targets may collide with sources
        moved[src] = fcntl.fcntl(src, fcntl.F_DUPFD_CLOEXEC, 16)
    for dst, src in keep.items():
        os.dup2(moved[src], dst)
    null = os.open(stdin_path, os.O_RDONLY)
    os.dup2(null, 0)
    os.closerange(max(keep) + 1, 1 << 16)
    for fd in range(3, max(keep) + 1):
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _exec(cfg, info, workdir):
    role = cfg["role"]
    with open(os.path.join(workdir, ".payload"), "wb") as f:
        marshal.dump(cfg["payload"], f)  # plain dict of str: written here, read by the harness
    _rlimits(cfg["limits"])
    info["rlimits"] = cfg["limits"]
    _report(info)
    if role == "candidate":  # the candidate gets no result pipe: its verdicts would be ignored
        os.close(FD_RESULT)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
    argv = [cfg["python"], "-I", "-S", "-B", "-c", cfg["harness"], role, workdir]
    try:
        os.execve(cfg["python"], argv, env)
    except OSError as exc:
        _fail("exec", f"execve {cfg['python']}: {exc.strerror}")


def main():
    chunks = []
    while True:
        data = os.read(0, 1 << 16)
        if not data:
            break
        chunks.append(data)
    cfg = marshal.loads(b"".join(chunks))  # from the parent, which is trusted
    mode = cfg["mode"]
    _arrange_fds(cfg["fds"], "/dev/null")
    fixed = {"result": FD_RESULT}
    if cfg["fds"].get("calls_in") is not None:
        fixed |= {"calls_in": FD_CALLS_IN, "calls_out": FD_CALLS_OUT}
    os.umask(0o077)
    info = {"mode": mode}
    if mode == "weak":
        os.chdir(cfg["workdir"])
        _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        info["guard"] = "Python audit hook only: not a security boundary"
        _exec(cfg, info, cfg["workdir"])
    try:
        _enter_namespaces(info, cfg.get("cgroup"))
    except SetupError as exc:
        _fail(exc.layer, str(exc))
    except OSError as exc:
        _fail("namespaces", str(exc))
    if info["host_uid"] == 0 and mode == "strict":
        _fail("identity", "the sandbox would be host root")
    try:
        seccomp_prog = _sandbox_seccomp.build()
    except OSError as exc:  # no table for this architecture
        seccomp_prog = exc
    child = os.fork()
    if child:
        _supervise(child)
    try:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        os.setsid()
        _build_root(cfg["binds"], cfg["limits"], info)
        _arrange_fds(fixed, "/dev/null")  # the sandbox's /dev/null: no host inode stays open
        _new_keyring(info)
        _drop_privileges(info)
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs", "prctl")
        _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        _seccomp(info, mode, seccomp_prog)
    except SetupError as exc:
        _fail(exc.layer, str(exc))
    except OSError as exc:
        _fail("filesystem", str(exc))
    os.chdir("/tmp")
    _exec(cfg, info, "/tmp")


if __name__ == "__main__":
    try:
        main()
    except BaseException as exc:  # the bootstrap's own failure: a setup error, never a run
        _fail("bootstrap", f"{type(exc).__name__}: {exc}")
