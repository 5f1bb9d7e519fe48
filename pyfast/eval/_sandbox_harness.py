"""What runs inside a sandbox, as ``python -I -S -B -c <this file's text> ROLE WORKDIR``.

The bootstrap (_sandbox_child.py) leaves the payload in ``WORKDIR/.payload.json`` (read, then
deleted) and these descriptors: 1/2 the output pipe, 3 the result pipe (not for the candidate),
4 and 5 the call pipes (in, out). Three roles:

* ``program``: runs a whole program; writes the nonce to fd 3 only if it returned normally. The
  nonce lives in this interpreter, so a program could find it (frames, gc): a containment test
  runner, not a verdict anyone should trust; HumanEval uses the next two roles.
* ``candidate``: runs the model-written source (prompt + completion), then answers calls: one
  JSON line per call on fd 4, one JSON line per reply on fd 5. It never sees the test code, the
  nonce or a verdict channel.
* ``checker``: defines the prompt (trusted: helpers such as ``poly`` that tests use) and the
  test, and calls ``check(candidate)`` with a proxy that sends each call over the pipe. The
  verdict (with the nonce) goes to fd 3 only if ``check`` returned.

Arguments and results cross as plain data (:func:`encode`): exact int/float/bool/str/None,
list/tuple/dict/set/frozenset/bytes/complex, non-finite floats and non-string dict keys tagged.
Any other type (a subclass with a custom ``__eq__`` included) fails the call, hence the sample.
Arguments are sent back after the call so that in-place mutations of lists, dicts and sets
reach the caller's objects, as they would in one process. Stdlib-only, no pyfast import.
"""

import math
import os
import sys

MAX_DEPTH = 100
FD_RESULT, FD_IN, FD_OUT = 3, 4, 5


def _codec():
    """(loads, dumps) for JSON lines: CPython's _json scanner/encoder directly (importing json
    costs ~10 ms of re/enum per sandbox); the json module where _json is missing."""
    try:
        import _json

        class Ctx:
            strict, object_hook, object_pairs_hook = True, None, None
            parse_float, parse_int, memo = float, int, {}

            @staticmethod
            def parse_constant(name):
                raise ValueError(f"{name} is not allowed")

        def nodefault(o):
            raise TypeError(f"{type(o).__name__} is not plain data")

        scan = _json.make_scanner(Ctx())
        enc = _json.make_encoder(
            None, nodefault, _json.encode_basestring_ascii, None, ":", ",", False, False, False
        )

        def loads(s):
            try:
                obj, end = scan(s, len(s) - len(s.lstrip(" \t\n\r")))
            except StopIteration:
                raise ValueError("malformed JSON") from None
            if s[end:].strip(" \t\n\r"):
                raise ValueError("trailing data after JSON")
            return obj

        def dumps(o):
            return "".join(enc(o, 0))

        if loads(dumps({"a": [1, 2.5, "\u00e9", None, True]})) != {"a": [1, 2.5, "é", None, True]}:
            raise ImportError("unexpected _json behaviour")
        return loads, dumps
    except (ImportError, AttributeError, TypeError, ValueError):
        import json

        def dumps_(o):
            return json.dumps(o, ensure_ascii=True, allow_nan=False, separators=(",", ":"))

        return json.loads, dumps_


_loads, _dumps = _codec()


class CandidateError(Exception):
    """A call of the candidate failed (raised, returned non-data, or its process went away)."""


def encode(x, depth=0):
    if depth > MAX_DEPTH:
        raise TypeError("value nested too deeply")
    t = type(x)
    if x is None or t is bool or t is int:
        return x
    if t is str:
        x.encode("utf-8")  # a lone surrogate cannot cross
        return x
    if t is float:
        return x if math.isfinite(x) else {"$f": repr(x)}
    if t is list:
        return [encode(v, depth + 1) for v in x]
    if t is tuple:
        return {"$t": [encode(v, depth + 1) for v in x]}
    if t is set or t is frozenset:
        return {"$s" if t is set else "$fs": [encode(v, depth + 1) for v in x]}
    if t is dict:
        if all(type(k) is str for k in x):
            return {"$d": {k: encode(v, depth + 1) for k, v in x.items()}}
        return {"$dp": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in x.items()]}
    if t is bytes:
        return {"$b": x.hex()}
    if t is complex:
        return {"$c": [encode(x.real), encode(x.imag)]}
    raise TypeError(f"{t.__name__} is not plain data")


def decode(x):
    if type(x) is list:
        return [decode(v) for v in x]
    if type(x) is dict:
        if len(x) != 1:
            raise ValueError("malformed tagged value")
        ((tag, v),) = x.items()
        if tag == "$f":
            return float(v)
        if tag == "$t":
            return tuple(decode(e) for e in v)
        if tag == "$s":
            return {decode(e) for e in v}
        if tag == "$fs":
            return frozenset(decode(e) for e in v)
        if tag == "$d":
            return {k: decode(e) for k, e in v.items()}
        if tag == "$dp":
            return {decode(k): decode(e) for k, e in v}
        if tag == "$b":
            return bytes.fromhex(v)
        if tag == "$c":
            return complex(decode(v[0]), decode(v[1]))
        raise ValueError(f"unknown tag {tag!r}")
    if x is None or type(x) in (bool, int, float, str):
        return x
    raise ValueError(f"unexpected {type(x).__name__}")


def _sync(old, new):
    """Replays the candidate's in-place mutation of an argument onto the caller's object."""
    if type(old) is list and type(new) is list:
        old[:] = new
    elif (type(old) is dict and type(new) is dict) or (type(old) is set and type(new) is set):
        old.clear()
        old.update(new)


def _send(f, obj):
    f.write(_dumps(obj) + "\n")
    f.flush()


def _describe(exc):
    try:
        return f"{type(exc).__name__}: {exc}"[:500]
    except BaseException:
        return type(exc).__name__


def _undumpable():
    """PR_SET_DUMPABLE=0 (execve set it back to 1): no same-uid /proc/PID/mem access."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)
    except Exception:
        pass


def _load(workdir):
    import marshal

    path = os.path.join(workdir, ".payload")
    with open(path, "rb") as f:
        cfg = marshal.load(f)  # written by the bootstrap before this interpreter started
    os.remove(path)
    if cfg.get("guard"):
        _audit_guard(workdir)
    return cfg


def program(workdir):
    cfg = _load(workdir)
    token = (cfg["nonce"] + "\n").encode()
    del cfg["nonce"]
    code = compile(cfg["source"], "program.py", "exec")
    sys.argv = ["program.py"]
    scope = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(code, scope)
    except BaseException:  # SystemExit included: leaving early is not passing
        try:
            sys.stdout.flush()
            import traceback

            traceback.print_exc()
        except BaseException:
            pass
        os._exit(1)
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    os.write(FD_RESULT, token)
    os._exit(0)


def candidate(workdir):
    calls = os.fdopen(FD_IN, "r", encoding="ascii")
    replies = os.fdopen(FD_OUT, "w", encoding="ascii")  # before the weak mode's guard
    cfg = _load(workdir)
    scope = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(cfg["source"], "<completion>", "exec"), scope)
        fn = scope[cfg["entry_point"]]
        if not callable(fn):
            raise TypeError(f"{cfg['entry_point']} is not callable")
    except BaseException as exc:  # SystemExit included: leaving early is not loading
        _send(replies, {"load_error": _describe(exc)})
        raise
    _send(replies, {"ready": True})
    for line in calls:
        try:
            msg = _loads(line)
            args, kwargs = decode(msg["args"]), decode(msg["kwargs"])
            out = fn(*args, **kwargs)
            reply = {"ok": encode(out), "args": [encode(a) for a in args]}
        except BaseException as exc:
            reply = {"raise": type(exc).__name__, "message": _describe(exc)}
        try:
            _send(replies, reply)
        except (TypeError, ValueError) as exc:
            _send(replies, {"raise": "TypeError", "message": f"reply not plain data: {exc}"})


def checker(workdir):
    _undumpable()
    cfg = _load(workdir)
    replies = os.fdopen(FD_IN, "r", encoding="ascii")
    calls = os.fdopen(FD_OUT, "w", encoding="ascii")
    builtin_errors = {
        n: v
        for n, v in vars(__builtins__).items()
        if isinstance(v, type) and issubclass(v, Exception)
    }

    def receive():
        line = replies.readline()
        if not line:
            raise CandidateError("the candidate's process ended")
        return _loads(line)

    def proxy(*args, **kwargs):
        try:
            msg = {"args": [encode(a) for a in args], "kwargs": encode(kwargs)}
        except (TypeError, UnicodeEncodeError) as exc:
            raise CandidateError(f"argument not plain data: {exc}") from None
        _send(calls, msg)
        reply = receive()
        if "raise" in reply:
            raise builtin_errors.get(reply["raise"], CandidateError)(reply["message"])
        for old, new in zip(args, decode(reply["args"]), strict=True):
            _sync(old, new)
        return decode(reply["ok"])

    first = receive()
    if "load_error" in first:
        raise CandidateError(f"the completion did not load: {first['load_error']}")
    scope = {"__name__": "__main__", "__builtins__": __builtins__}
    if cfg["prompt"]:
        try:
            exec(compile(cfg["prompt"], "<prompt>", "exec"), scope)
        except SyntaxError:  # a prompt that ends inside a body
            exec(compile(cfg["prompt"] + "\n    pass\n", "<prompt>", "exec"), scope)
    exec(compile(cfg["test"], "<test>", "exec"), scope)
    proxy.__name__ = cfg["entry_point"]
    scope[cfg["entry_point"]] = proxy
    scope["check"](proxy)
    verdict = os.fdopen(FD_RESULT, "w", encoding="ascii")
    _send(verdict, {"verdict": "passed", "nonce": cfg["nonce"]})
    os._exit(0)


def _audit_guard(work):
    """Weak mode only: a Python audit hook (native code it cannot see could bypass it)."""
    work = os.path.realpath(work)
    me = os.getpid()
    deny = {
        "socket.__new__", "socket.connect", "socket.bind", "subprocess.Popen", "os.system",
        "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "pty.spawn",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "os.killpg",
        "signal.pthread_kill", "os.setuid", "os.chroot", "sys.remote_exec",
    }  # fmt: skip
    path_events = {
        "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
        "os.replace": (0, 1), "os.link": (0, 1), "os.symlink": (1,), "os.truncate": (0,),
        "os.chmod": (0,), "os.chown": (0,), "os.utime": (0,), "shutil.rmtree": (0,),
        "os.chdir": (0,),
    }  # fmt: skip
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
        for i in path_events.get(event, ()):
            if i < len(args) and args[i] is not None and not inside(args[i]):
                raise PermissionError(f"sandbox: {event} outside the work directory")

    for name in list(sys.modules):
        if name.split(".")[0] in blocked_modules:
            del sys.modules[name]
    sys.addaudithook(hook)


if __name__ == "__main__":
    {"program": program, "candidate": candidate, "checker": checker}[sys.argv[1]](sys.argv[2])
