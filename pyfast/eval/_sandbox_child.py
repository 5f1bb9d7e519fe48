"""Bootstrap of one sandboxed program (run by pyfast.eval.sandbox as ``python -I THIS_FILE``).

Trusted code up to the ``exec`` of the program. It reads one JSON line from stdin (nonce, program
path, work directory, limits, isolation mode, result fd), then on Linux with unprivileged user
namespaces:

1. ``unshare(NEWUSER | NEWNS | NEWNET | NEWPID | NEWIPC | NEWUTS)``, maps its own uid/gid to 0;
2. forks: the child is PID 1 of the new PID namespace (parent death -> SIGKILL; when it exits the
   kernel kills every process left in the namespace);
3. mounts a fresh /proc, caps the namespace's pid_max, makes every mount read-only, nosuid and
   nodev (mount_setattr, recursive) except a bind mount of the work directory;
4. drops every capability (bounding set, ambient, securebits NOROOT locked, capset 0) and sets
   no_new_privs, so the program cannot undo 3.

Without namespaces (mode "basic", or "auto" where unshare fails) it installs an audit hook that
refuses sockets, subprocesses, ctypes, signals to other processes and writes outside the work
directory — a best-effort Python-level guard, not a kernel boundary.

In both modes: rlimits (CPU, address space, file size, processes, open files, no core dumps),
then the program runs with ``exec``; only if it returns normally is the nonce written to the
result fd. ``sys.exit``/``SystemExit`` is caught and counts as failure; ``os._exit`` never
reaches the nonce. Deliberately stdlib-only and import-free of pyfast (runs under ``-I``).
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 1, 2, 4
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
SYS_MOUNT_SETATTR = {"x86_64": 442, "aarch64": 442}
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_SECUREBITS = 1, 24, 28
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
SECBITS_ALL_LOCKED = 0x3F  # NOROOT, NO_SETUID_FIXUP, KEEP_CAPS and their lock bits
SECBITS_NO_KEEP_CAPS = 0x2F  # KEEP_CAPS off, the other five on

_libc = None


def _c():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


class _MountAttr(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("attr_set", "attr_clr", "propagation", "userns")]


def _mount_setattr(path, flags, attr_set=0, attr_clr=0):
    nr = SYS_MOUNT_SETATTR.get(os.uname().machine)
    if nr is None:
        raise OSError(38, "mount_setattr: unknown syscall number on this machine")
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    ret = _c().syscall(
        ctypes.c_long(nr),
        ctypes.c_int(AT_FDCWD),
        ctypes.c_char_p(path.encode()),
        ctypes.c_uint(flags),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(ret, f"mount_setattr {path}")


def _mount(src, dst, fstype, flags):
    ret = _c().mount(
        src.encode() if src else None,
        dst.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        None,
    )
    _check(ret, f"mount {dst}")


def _enter_namespaces(info):
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    _check(_c().unshare(ctypes.c_int(flags)), "unshare")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"0 {uid} 1")
    _write("/proc/self/gid_map", f"0 {gid} 1")
    info.update(user_ns=True, net_ns=True, pid_ns=True, ipc_ns=True, uts_ns=True)


def _supervise(child):
    """Namespace creator outside the new PID namespace: relays the exit status of PID 1.

    SIGTERM (the parent's wall-clock timeout) kills PID 1; waitpid returns only once the kernel
    has killed and reaped every process of the namespace, so nothing outlives the run.
    """
    signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGKILL))
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


def _lock_filesystem(work, pid_max, info):
    _c().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.setsid()  # kill(0, ...) from the program reaches only its own namespace
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    try:  # a /proc of the new PID namespace: host processes are not even listed
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        info["proc"] = "private"
        try:
            _write("/proc/sys/kernel/pid_max", str(pid_max))
            info["pid_max"] = pid_max
        except OSError as exc:
            info["pid_max"] = f"unchanged ({exc.strerror})"
    except OSError as exc:
        info["proc"] = f"host ({exc.strerror})"
    _mount(work, work, None, MS_BIND | MS_REC)
    locked = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
    _mount_setattr("/", AT_RECURSIVE, attr_set=locked)
    _mount_setattr(work, 0, attr_clr=MOUNT_ATTR_RDONLY)
    info["filesystem"] = "read-only, nodev, nosuid except the work directory"


def _drop_privileges(info):
    libc = _c()
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break
    _check(libc.prctl(PR_SET_SECUREBITS, SECBITS_NO_KEEP_CAPS, 0, 0, 0), "securebits")

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint32) for n in ("effective", "permitted", "inheritable")]

    data = (Data * 2)()
    _check(libc.capset(ctypes.byref(Header(0x20080522, 0)), data), "capset")
    info["capabilities"] = "none"


def _audit_guard(work):
    """Fallback without namespaces: Python audit hook (bypassable by native code it blocks)."""
    work = os.path.realpath(work)
    me = os.getpid()
    deny = {
        "socket.__new__",
        "socket.connect",
        "socket.bind",
        "subprocess.Popen",
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.fork",
        "os.forkpty",
        "pty.spawn",
        "ctypes.dlopen",
        "ctypes.dlsym",
        "ctypes.cdata",
        "ctypes.call_function",
        "os.killpg",
        "signal.pthread_kill",
        "os.setuid",
        "os.chroot",
        "sys.remote_exec",
    }
    path_events = {
        "os.remove": 0,
        "os.rmdir": 0,
        "os.mkdir": 0,
        "os.rename": (0, 1),
        "os.replace": (0, 1),
        "os.link": (0, 1),
        "os.symlink": (1,),
        "os.truncate": 0,
        "os.chmod": 0,
        "os.chown": 0,
        "os.utime": 0,
        "shutil.rmtree": 0,
        "os.chdir": None,
    }
    blocked_modules = {"_ctypes", "ctypes", "_posixsubprocess", "_socket", "socket", "_ssl"}

    def inside(p):
        if isinstance(p, int):
            return False
        try:
            real = os.path.realpath(os.fsdecode(p))
        except Exception:
            return False
        return real == work or real.startswith(work + os.sep)

    def hook(event, args):
        if event in deny:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0].split(".")[0] in blocked_modules:
            raise PermissionError(f"sandbox: import of {args[0]} is not allowed")
        if event == "os.kill" and args[0] not in (0, me):
            raise PermissionError("sandbox: signals to other processes are not allowed")
        if event == "open":
            path, mode, flags = args
            writing = (mode and any(c in str(mode) for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
            if writing and path is not None and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the work directory")
        if event in path_events:
            idx = path_events[event]
            if idx is None:
                if not inside(args[0]):
                    raise PermissionError("sandbox: leaving the work directory")
                return
            for i in (idx,) if isinstance(idx, int) else idx:
                if i < len(args) and args[i] is not None and not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} outside the work directory")

    for name in list(sys.modules):
        if name.split(".")[0] in blocked_modules:
            del sys.modules[name]
    sys.addaudithook(hook)


def _limits(lim):
    def setlim(kind, soft, hard=None):
        resource.setrlimit(kind, (soft, soft if hard is None else hard))

    setlim(resource.RLIMIT_CORE, 0)
    setlim(resource.RLIMIT_CPU, lim["cpu_s"], lim["cpu_s"] + 1)
    setlim(resource.RLIMIT_AS, lim["memory_mb"] << 20)
    setlim(resource.RLIMIT_FSIZE, lim["fsize_mb"] << 20)
    setlim(resource.RLIMIT_NOFILE, lim["nofile"])
    setlim(resource.RLIMIT_NPROC, lim["nproc"])


def _fail(fd, message):
    os.write(fd, (json.dumps({"error": message}) + "\n").encode())
    os._exit(3)


def main():
    cfg = json.loads(sys.stdin.readline())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.umask(0o077)
    fd, work, mode = cfg["result_fd"], cfg["workdir"], cfg["isolation"]
    info = {"mode": "basic"}
    namespaces = False
    guard = mode == "basic"
    if mode in ("auto", "namespaces"):
        try:
            _enter_namespaces(info)
            namespaces = True
        except OSError as exc:
            if mode == "namespaces":
                _fail(fd, f"namespaces unavailable: {exc}")
            info["namespace_error"] = str(exc)
            guard = True
    if namespaces:
        child = os.fork()
        if child:
            os.close(fd)
            _supervise(child)
        try:
            _lock_filesystem(work, cfg["limits"]["pid_max"], info)
        except OSError as exc:  # e.g. no mount_setattr: keep the namespaces, add the guard
            if mode == "namespaces":
                _fail(fd, f"sandbox setup failed: {exc}")
            info["filesystem"] = f"writable: {exc}; audit-hook guard added"
            guard = True
        try:
            _drop_privileges(info)
        except OSError as exc:
            _fail(fd, f"sandbox setup failed: {exc}")
        info["mode"] = "namespaces" if not guard else "namespaces+guard"
    _c().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    os.chdir(work)
    _limits(cfg["limits"])
    info["rlimits"] = cfg["limits"]
    os.write(fd, (json.dumps(info) + "\n").encode())
    _run(cfg.pop("program"), cfg.pop("nonce").encode() + b"\n", fd, work, guard)


def _run(path, token, fd, work, guard):
    with open(path, encoding="utf-8") as f:
        source = f.read()
    code = compile(source, path, "exec")
    if guard:
        _audit_guard(work)
    sys.argv = [path]
    sys.path[:0] = [work]
    scope = {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}
    try:
        exec(code, scope)
    except BaseException:  # SystemExit included: leaving early is not passing
        try:
            import traceback

            traceback.print_exc()
        except BaseException:
            pass
        os._exit(1)
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    os.write(fd, token)
    os._exit(0)


if __name__ == "__main__":
    main()
