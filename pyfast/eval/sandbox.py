"""Running untrusted (model-written) Python: one sandbox per process, verdicts outside its reach.

Modes (``--sandbox``; see docs/sandbox.md for the threat model and the measured costs):

* ``strict`` (default): every layer or nothing runs. New user, mount, PID, network, IPC, UTS and
  cgroup namespaces; the sandbox's uid 0 is the host's overflow uid (65534) when pyfast runs as
  root, the caller's own uid otherwise, never host root; a fresh tmpfs root holding read-only
  binds of only the interpreter's prefix, /usr, /lib* and /etc/ld.so.cache, four bound devices
  and a size-capped tmpfs /tmp, entered with ``pivot_root`` (no host /tmp, /run, $HOME, sockets
  or /etc/shadow exist inside); a fresh /proc; no descriptor of the host but the output and
  verdict pipes; a new session keyring; no capabilities; no_new_privs; a seccomp filter
  (_sandbox_seccomp.py); rlimits; a cgroup v2 child per sandbox (memory.max, memory.swap.max,
  pids.max, cpu.max) where a writable cgroup v2 tree offers those controllers, else reported as
  not enforced (``isolation["limits"]`` says which limit held how).
* ``namespaces``: the same, but it runs without the seccomp filter (no table for this
  architecture, or seccomp(2) refused) and with a host-root identity when no uid map to the
  overflow uid can be written; ``isolation`` records what is missing.
* ``weak``: no namespaces; a new session, rlimits and a Python audit hook in a host temporary
  directory. Native code can bypass the hook: a guard against accidents, not a boundary.

If a layer of the chosen mode cannot be set up, the program does not run (status
``setup_error``) and :func:`require` raises :class:`SandboxUnavailable` naming the layer and the
weaker mode that would accept it. Outcomes are ``ExecResult``; nothing a program does makes the
caller raise.
"""

from __future__ import annotations

import json
import marshal
import os
import secrets
import selectors
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

_HERE = Path(__file__).parent
_CHILD = _HERE / "_sandbox_child.py"
_HARNESS = _HERE / "_sandbox_harness.py"
MODES = ("strict", "namespaces", "weak")
NAMESPACES_ACCEPTS = ("seccomp", "identity")  # layers the namespaces mode runs without
LAUNCH_PREFIX: tuple[
    str, ...
] = ()  # a wrapper before the bootstrap (tests simulate a hostile host)
OUTPUT_TAIL = 2000
OUTPUT_CAP = 1 << 20  # bytes of stdout+stderr read before the sandbox is killed as a flood
TERMINATE_WAIT_S = 5.0  # at the timeout: how long the supervisor gets to kill its namespace
REAP_WAIT_S = 10.0  # after a kill: how long to wait for the last processes to die
CGROUP_ENV = "PYFAST_SANDBOX_CGROUP"  # a delegated cgroup v2 directory to create children in


class SandboxUnavailable(ValueError):
    """A layer of the requested sandbox mode cannot be set up on this machine."""


@dataclass(frozen=True)
class Limits:
    """Per-sandbox limits. nproc: RLIMIT_NPROC (counted in the sandbox's own user namespace)
    and pids.max; memory_mb: RLIMIT_AS per process and memory.max for the whole sandbox."""

    wall_s: float = 10.0
    cpu_s: int = 5
    memory_mb: int = 1024
    fsize_mb: int = 16
    tmp_mb: int = 16
    tmp_inodes: int = 4096
    nproc: int = 16
    nofile: int = 64

    def __post_init__(self):
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"sandbox limit {name} must be > 0, got {value}")


@dataclass
class ExecResult:
    """Outcome of one program or check: passed only on a verdict the parent can trust."""

    passed: bool
    status: str  # passed | failed | timeout | setup_error
    returncode: int | None
    duration_s: float
    output: str = ""  # last OUTPUT_TAIL characters of stdout+stderr (of the candidate)
    isolation: dict = field(default_factory=dict)
    error: str | None = None  # setup_error: the layer and why

    def to_dict(self) -> dict:
        return asdict(self)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown sandbox mode {mode!r}; use one of {', '.join(MODES)}")
    return mode


@cache
def _binds() -> tuple[str, ...]:
    """Host paths bound read-only into the sandbox: what the interpreter needs, nothing else."""
    prefix = os.path.realpath(sys.base_prefix)
    exe_dir = os.path.dirname(os.path.realpath(sys.executable))
    paths = ["/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/etc/ld.so.cache"]
    for p in (prefix, exe_dir):
        if not any(p == b or p.startswith(b + "/") for b in paths if os.path.isdir(b)):
            paths.insert(0, p)
    return tuple(dict.fromkeys(p for p in paths if os.path.lexists(p)))


# --- cgroup v2 -------------------------------------------------------------------------------

CGROUP_CONTROLLERS = ("memory", "pids", "cpu")


def _own_cgroup() -> Path | None:
    try:
        rel = next(
            ln[3:] for ln in Path("/proc/self/cgroup").read_text().splitlines() if ln[:3] == "0::"
        )
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except (OSError, StopIteration):
        return None
    for ln in mounts:
        left, _, right = ln.partition(" - ")
        if right.split(" ")[0] == "cgroup2":
            return Path(left.split(" ")[4]) / rel.lstrip("/")
    return None


def cgroup_base(base: str | os.PathLike | None = None) -> tuple[Path | None, str]:
    """(directory to make per-sandbox children in, or None; why). `base` (else $PYFAST_SANDBOX_
    CGROUP, else this process's own cgroup v2) must offer memory, pids and cpu to children."""
    base = base or os.environ.get(CGROUP_ENV)
    where = Path(base) if base else _own_cgroup()
    if where is None:
        return None, "no cgroup v2 hierarchy mounted"
    try:
        have = (where / "cgroup.controllers").read_text().split()
    except OSError as exc:
        return None, f"{where}: {exc.strerror}"
    missing = [c for c in CGROUP_CONTROLLERS if c not in have]
    if missing:
        return None, f"cgroup v2 {where} lacks the {'/'.join(missing)} controller(s) " + (
            f"(it offers: {' '.join(have) or 'none'})"
        )
    try:
        enabled = (where / "cgroup.subtree_control").read_text().split()
        if not all(c in enabled for c in CGROUP_CONTROLLERS):
            (where / "cgroup.subtree_control").write_text(
                " ".join(f"+{c}" for c in CGROUP_CONTROLLERS)
            )
    except OSError as exc:
        return None, f"cannot enable {'/'.join(CGROUP_CONTROLLERS)} in {where}: {exc.strerror}"
    if not os.access(where, os.W_OK):
        return None, f"{where} is not writable"
    return where, "enforced"


def make_cgroup(base: Path, limits: Limits) -> Path:
    """A child cgroup of `base` holding the whole sandbox: memory (no swap), pids, one CPU."""
    cg = base / f"pyfast-sandbox-{secrets.token_hex(6)}"
    cg.mkdir(mode=0o755)
    (cg / "memory.max").write_text(str(limits.memory_mb << 20))
    (cg / "memory.swap.max").write_text("0")
    (cg / "pids.max").write_text(str(limits.nproc))
    (cg / "cpu.max").write_text("100000 100000")
    return cg


def remove_cgroup(cg: Path, deadline: float) -> str | None:
    """Kills what is left in `cg` and removes it; returns an error text or None."""
    try:
        if (cg / "cgroup.kill").exists():
            (cg / "cgroup.kill").write_text("1")
        while time.monotonic() < deadline:
            events = (cg / "cgroup.events").read_text() if (cg / "cgroup.events").exists() else ""
            if "populated 1" not in events:
                break
            time.sleep(0.01)
        cg.rmdir()
        return None
    except OSError as exc:
        return f"cgroup {cg}: {exc.strerror}"


def _limits_report(limits: Limits, cgroup: str, mode: str) -> dict:
    enforced = cgroup == "enforced"
    per_proc = f"RLIMIT_AS {limits.memory_mb} MiB per process"
    ns = mode != "weak"
    return {
        "memory": f"cgroup memory.max {limits.memory_mb} MiB, no swap, for the whole sandbox"
        if enforced
        else f"{per_proc} only (no cgroup: up to nproc x that in total)",
        "pids": f"cgroup pids.max {limits.nproc}"
        if enforced
        else (
            f"RLIMIT_NPROC {limits.nproc} in the sandbox's user namespace"
            if ns
            else f"RLIMIT_NPROC {limits.nproc} (not applied to uid 0)"
        ),
        "cpu": f"RLIMIT_CPU {limits.cpu_s} s per process"
        + (", cgroup cpu.max 1 CPU" if enforced else ""),
        "disk": f"tmpfs /tmp {limits.tmp_mb} MiB, {limits.tmp_inodes} inodes; nothing else writable"
        if ns
        else f"RLIMIT_FSIZE {limits.fsize_mb} MiB per file in a host temp dir (no total cap)",
        "wall": f"{limits.wall_s} s",
        "cgroup": cgroup,
    }


@cache
def _harness_source() -> str:
    return _HARNESS.read_text(encoding="utf-8")


# --- one sandbox -----------------------------------------------------------------------------


class _Box:
    """One bootstrap process and the parent's ends of its pipes."""

    def __init__(self, role, payload, limits, mode, cgroup_dir, calls=None):
        self.role, self.limits, self.mode = role, limits, mode
        self.cgroup = make_cgroup(cgroup_dir, limits) if cgroup_dir and mode != "weak" else None
        self.workdir = (
            tempfile.mkdtemp(prefix=f"pyfast-sandbox-{os.getpid()}-") if mode == "weak" else None
        )
        if self.workdir:
            payload = {**payload, "guard": role != "checker"}
        out_r, out_w = os.pipe()
        res_r, res_w = os.pipe()
        fds = {"result": res_w}
        passed = [res_w]
        if calls is not None:
            fds["calls_in"], fds["calls_out"] = calls
            passed += list(calls)
        cfg = {
            "mode": mode,
            "role": role,
            "payload": payload,
            "python": os.path.realpath(sys.executable),
            "harness": _harness_source(),
            "binds": list(_binds()),
            "limits": {k: v for k, v in asdict(limits).items() if k != "wall_s"},
            "fds": fds,
            "cgroup": str(self.cgroup) if self.cgroup else None,
            "workdir": self.workdir,
        }
        data = marshal.dumps(cfg)  # the bootstrap skips json's import cost
        try:
            self.proc = subprocess.Popen(
                [*LAUNCH_PREFIX, sys.executable, "-I", "-S", "-B", str(_CHILD)],
                stdin=subprocess.PIPE,
                stdout=out_w,
                stderr=out_w,
                cwd="/",
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                pass_fds=passed,
                start_new_session=True,
            )
        finally:
            os.close(out_w)
            os.close(res_w)
        self.out_fd, self.res_fd = out_r, res_r
        self.out, self.res, self.out_total = bytearray(), bytearray(), 0
        try:
            self.proc.stdin.write(data)  # the bootstrap reads it all before anything else
            self.proc.stdin.close()
        except BrokenPipeError:
            pass

    def feed(self, fd: int, data: bytes) -> None:
        if fd == self.out_fd:
            self.out_total += len(data)
            self.out += data
            del self.out[: max(0, len(self.out) - OUTPUT_TAIL * 4)]
        elif len(self.res) < 1 << 16:
            self.res += data

    def kill(self) -> None:
        for how in (lambda: os.killpg(self.proc.pid, 9), self.proc.kill):
            try:
                how()
            except (ProcessLookupError, PermissionError):
                pass

    def info(self) -> tuple[dict, list[bytes]]:
        lines = bytes(self.res).split(b"\n")
        try:
            info = json.loads(lines[0]) if lines[0] else {}
        except ValueError:
            info = {}
        return (info if isinstance(info, dict) else {}), lines[1:]

    def close(self, deadline: float) -> str | None:
        """Frees what the sandbox held on the host; returns an error text or None."""
        errors = []
        for fd in (self.out_fd, self.res_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.cgroup is not None:
            errors.append(remove_cgroup(self.cgroup, deadline))
        if self.workdir is not None:
            errors.append(rmtree(self.workdir))
        return "; ".join(e for e in errors if e) or None


def rmtree(path: str) -> str | None:
    """Removes `path` without recursion (any depth) and through unreadable directories; returns
    an error text or None. Never follows symlinks."""
    stack = [path]
    try:
        while stack:
            top = stack[-1]
            try:
                entries = list(os.scandir(top))
            except PermissionError:
                os.chmod(top, 0o700)
                entries = list(os.scandir(top))
            subdirs = [e.path for e in entries if e.is_dir(follow_symlinks=False)]
            for e in entries:
                if not e.is_dir(follow_symlinks=False):
                    os.unlink(e.path)
            if subdirs:
                for d in subdirs:
                    st = os.lstat(d)
                    if stat.S_IMODE(st.st_mode) & 0o700 != 0o700:
                        os.chmod(d, 0o700)
                stack.extend(subdirs)
            else:
                os.rmdir(top)
                stack.pop()
        return None
    except OSError as exc:
        return f"removing {path}: {exc}"


def _run_boxes(boxes: list[_Box], limits: Limits) -> tuple[bool, bool]:
    """Reads every pipe until EOF or the wall clock; kills on timeout or flood.
    Returns (timed_out, flooded)."""
    sel = selectors.DefaultSelector()
    for b in boxes:
        sel.register(b.out_fd, selectors.EVENT_READ, b)
        sel.register(b.res_fd, selectors.EVENT_READ, b)
    judge = next((b for b in boxes if b.role == "checker"), None)
    deadline = time.monotonic() + limits.wall_s
    timed_out = flooded = False
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(left):
                data = os.read(key.fd, 1 << 16)
                if not data:
                    sel.unregister(key.fd)
                    continue
                key.data.feed(key.fd, data)
                flooded = flooded or key.data.out_total > OUTPUT_CAP
            if flooded:
                break
            fds = sel.get_map()
            if judge is not None and judge.out_fd not in fds and judge.res_fd not in fds:
                break  # the checker has decided; the candidate's end is not worth waiting for
        done = {b for b in boxes if b.out_fd not in sel.get_map() and b.res_fd not in sel.get_map()}
    finally:
        sel.close()
    for b in boxes:
        if b not in done and b.proc.poll() is None:
            b.proc.terminate()  # the supervisor kills its PID namespace
    end = time.monotonic() + TERMINATE_WAIT_S
    for b in boxes:
        try:
            b.proc.wait(timeout=max(0.01, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for b in boxes:
        b.kill()  # the weak mode's process group; a no-op for an exited supervisor
        b.proc.wait()
    return timed_out, flooded


def _tail(b: _Box) -> str:
    return bytes(b.out).decode("utf-8", "replace")[-OUTPUT_TAIL:]


def _encodable(*texts: str) -> str | None:
    for t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"text cannot be encoded as UTF-8 ({exc.reason} at position {exc.start})"
    return None


def _execute(specs, limits, mode, cgroup_dir, verdict) -> ExecResult:
    """Starts the sandboxes of `specs` ((role, payload, calls) each), runs them to the end and
    judges with `verdict(lines of the judging box's result pipe) -> bool`."""
    t0 = time.perf_counter()
    boxes: list[_Box] = []
    error = None
    try:
        for role, payload, calls in specs:
            boxes.append(_Box(role, payload, limits, mode, cgroup_dir, calls))
    finally:
        for _, _, calls in specs:  # the sandboxes hold their own copies now
            for fd in calls or ():
                os.close(fd)
    timed_out, flooded = _run_boxes(boxes, limits)
    end = time.monotonic() + REAP_WAIT_S
    for b in boxes:
        error = b.close(end) or error
    duration = time.perf_counter() - t0
    infos = [b.info() for b in boxes]
    for (info, _), b in zip(infos, boxes, strict=True):
        if "error" in info:
            msg = f"layer {info.get('layer', '?')}: {info['error']}"
            return ExecResult(False, "setup_error", b.proc.returncode, duration, msg, info, msg)
    judge = boxes[-1]
    info, lines = infos[-1]
    isolation = {
        **info,
        "mode": mode,
        "limits": _limits_report(limits, _cgroup_state(cgroup_dir), mode),
    }
    isolation.pop("rlimits", None)
    if error:
        isolation["cleanup"] = error
    passed = not timed_out and not flooded and judge.proc.returncode == 0 and verdict(lines)
    status = "passed" if passed else ("timeout" if timed_out else "failed")
    out = _tail(boxes[0])
    if judge is not boxes[0] and not passed:
        out = (out + "\n" + _tail(judge)).strip()[-OUTPUT_TAIL:]
    if flooded:
        out = (out + f"\n[output over {OUTPUT_CAP} bytes: killed]")[-OUTPUT_TAIL:]
    return ExecResult(passed, status, judge.proc.returncode, duration, out, isolation)


_CGROUP_STATE: dict[str, str] = {}


def _cgroup_state(cgroup_dir) -> str:
    return "enforced" if cgroup_dir else _CGROUP_STATE.get("why", "not used")


def _cgroup_for(mode: str) -> Path | None:
    if mode == "weak":
        _CGROUP_STATE["why"] = "not used in weak mode"
        return None
    base, why = cgroup_base()
    _CGROUP_STATE["why"] = f"not enforced: {why}" if base is None else why
    return base


def run_program(
    program: str, limits: Limits | None = None, *, sandbox: str = "strict"
) -> ExecResult:
    """Runs `program` (Python source) in a fresh sandbox; passed if it returned normally.

    A containment runner: the pass token lives in the program's own interpreter, so a program
    can forge it. HumanEval verdicts come from :func:`run_check`.
    """
    check_mode(sandbox)
    limits = limits or Limits()
    bad = _encodable(program)
    if bad:
        return ExecResult(False, "failed", None, 0.0, bad)
    nonce = secrets.token_hex(16)
    spec = [("program", {"source": program, "nonce": nonce}, None)]
    return _execute(spec, limits, sandbox, _cgroup_for(sandbox), lambda ls: nonce.encode() in ls)


def run_check(
    source: str,
    test: str,
    entry_point: str,
    prompt: str = "",
    limits: Limits | None = None,
    *,
    sandbox: str = "strict",
) -> ExecResult:
    """HumanEval's check, split: `source` (prompt + completion) runs in a candidate sandbox that
    only answers calls of `entry_point`; `prompt` + `test` run in a checker sandbox whose
    ``check(candidate)`` calls it through pipes with plain data. Passed only on the checker's
    verdict with this run's nonce; the candidate never sees the test, the nonce or the verdict
    pipe. Both share one wall clock."""
    check_mode(sandbox)
    limits = limits or Limits()
    bad = _encodable(source, test, entry_point, prompt)
    if bad:
        return ExecResult(False, "failed", None, 0.0, bad)
    nonce = secrets.token_hex(16)
    to_cand_r, to_cand_w = os.pipe()
    to_check_r, to_check_w = os.pipe()
    specs = [
        ("candidate", {"source": source, "entry_point": entry_point}, (to_cand_r, to_check_w)),
        (
            "checker",
            {"prompt": prompt, "test": test, "entry_point": entry_point, "nonce": nonce},
            (to_check_r, to_cand_w),
        ),
    ]

    def verdict(lines: list[bytes]) -> bool:
        for ln in lines:
            try:
                v = json.loads(ln)
            except ValueError:
                continue
            if isinstance(v, dict) and v.get("verdict") == "passed" and v.get("nonce") == nonce:
                return True
        return False

    return _execute(specs, limits, sandbox, _cgroup_for(sandbox), verdict)


def run_many(jobs, *, workers: int = 2, progress=None) -> list[ExecResult]:
    """Runs zero-argument callables `workers` at a time, in input order; a job that raises
    becomes a failed result carrying the error (one sample's trouble never stops the run)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    results: list[ExecResult | None] = [None] * len(jobs)

    def one(i: int) -> None:
        t0 = time.perf_counter()
        try:
            results[i] = jobs[i]()
        except Exception as exc:  # noqa: BLE001  (the sandbox's own trouble: this sample only)
            msg = f"sandbox error: {type(exc).__name__}: {exc}"
            results[i] = ExecResult(False, "failed", None, time.perf_counter() - t0, msg)
        if progress is not None:
            progress(i, results[i])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for f in [pool.submit(one, i) for i in range(len(jobs))]:
            f.result()
    return results  # type: ignore[return-value]


def run_programs(
    programs: list[str], limits: Limits | None = None, *, workers: int = 2, sandbox="strict"
) -> list[ExecResult]:
    """:func:`run_program` over `programs`, `workers` at a time, in input order."""
    check_mode(sandbox)
    return run_many(
        [lambda p=p: run_program(p, limits, sandbox=sandbox) for p in programs], workers=workers
    )


def require(sandbox: str = "strict") -> dict:
    """Runs one trivial check in `sandbox` mode; returns its isolation facts, or raises
    SandboxUnavailable naming the layer that failed and the flag that accepts a weaker mode."""
    check_mode(sandbox)
    res = run_check(
        "def f():\n    return 1\n",
        "def check(c):\n    assert c() == 1\n",
        "f",
        limits=Limits(wall_s=30),
        sandbox=sandbox,
    )
    if res.status == "setup_error":
        layer = res.isolation.get("layer", "?")
        weaker = "namespaces" if sandbox == "strict" and layer in NAMESPACES_ACCEPTS else "weak"
        hint = (
            f"; pass --sandbox {weaker} to accept a weaker sandbox (docs/sandbox.md)"
            if sandbox != "weak"
            else ""
        )
        raise SandboxUnavailable(f"sandbox {sandbox!r} refused: {res.error}{hint}")
    if not res.passed:
        raise SandboxUnavailable(
            f"sandbox {sandbox!r}: the probe program did not pass: {res.output[-300:]!r}"
        )
    return res.isolation


@cache
def isolation_report(sandbox: str = "strict") -> dict:
    """What the sandbox guarantees on this machine (runs one probe); {'error': ...} if none."""
    try:
        return require(sandbox)
    except SandboxUnavailable as exc:
        return {"mode": sandbox, "error": str(exc)}
