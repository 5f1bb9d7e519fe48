"""Running untrusted (model-written) Python programs: one contained child process per program.

Each program gets a private temporary directory (its cwd, the only writable place), a minimal
environment, and a child process started in a new session with stdout/stderr captured into a
file bounded by RLIMIT_FSIZE. The bootstrap (``_sandbox_child.py``) then isolates it:

* ``namespaces`` (Linux with unprivileged user namespaces — the default where available): new
  user, mount, network, PID, IPC and UTS namespaces. The network namespace has only a downed
  loopback, so no connection of any kind (not even to 127.0.0.1) is possible. Every mount is
  read-only, nodev and nosuid except the work directory; the program runs without capabilities
  and with no_new_privs, so it cannot remount. It is PID 1 of its own PID namespace: no process
  outside is visible or signalable, and when it ends (or is killed) every process it started is
  killed by the kernel. pid_max of the namespace caps the number of processes (fork bombs) even
  where RLIMIT_NPROC does not apply (uid 0 is exempt from RLIMIT_NPROC).
* ``basic`` (fallback where namespaces are unavailable): the same rlimits, new session, plus a
  Python audit hook refusing sockets, subprocesses, ctypes, signals to other processes and file
  writes outside the work directory. Native code can bypass an audit hook, so this mode is a
  guard against accidents, not a security boundary; results record which mode ran.

Both modes: RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_NOFILE, no core dumps, and a
wall-clock timeout after which the whole process group is killed (SIGKILL). A program passes
only if the bootstrap saw it return normally and wrote a per-run random nonce to a private pipe:
``sys.exit``, ``os._exit``, signals and crashes before the end are failures. The nonce lives in
the bootstrap's memory, so a program written to search the interpreter (``gc``/frames) for it
could forge a pass — as it could by returning objects whose ``__eq__`` is always true; no
HumanEval executor prevents the tested code from cheating its own asserts.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

_CHILD = Path(__file__).with_name("_sandbox_child.py")
ISOLATION_MODES = ("auto", "namespaces", "basic")
OUTPUT_TAIL = 2000
TERMINATE_WAIT_S = 5.0  # at the timeout: how long the supervisor gets to kill its namespace
REAP_WAIT_S = 10.0  # after a kill: how long to wait for the sandbox's last processes to die


@dataclass(frozen=True)
class Limits:
    """Per-program limits. pid_max caps processes in the PID namespace (kernel minimum 301)."""

    wall_s: float = 10.0
    cpu_s: int = 5
    memory_mb: int = 1024
    fsize_mb: int = 16
    nproc: int = 64
    nofile: int = 64
    pid_max: int = 301

    def __post_init__(self):
        for name in ("wall_s", "cpu_s", "memory_mb", "fsize_mb", "nproc", "nofile"):
            if getattr(self, name) <= 0:
                raise ValueError(f"sandbox limit {name} must be > 0, got {getattr(self, name)}")


@dataclass
class ExecResult:
    """Outcome of one program: passed only if it ran to its end (nonce seen by the parent)."""

    passed: bool
    status: str  # passed | failed | timeout | setup_error
    returncode: int | None
    duration_s: float
    output: str = ""  # last OUTPUT_TAIL characters of stdout+stderr
    isolation: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _drain(fd: int, wait_s: float, cap: int = 1 << 16) -> bytes:
    """Reads the result pipe until EOF — every process of the sandbox holds its write end, so EOF
    means all of them are gone — or until `wait_s` passes; keeps at most `cap` bytes."""
    import select

    chunks, total = [], 0
    deadline = time.monotonic() + wait_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        data = os.read(fd, 1 << 16)
        if not data:
            break
        if total < cap:
            chunks.append(data[: cap - total])
            total += len(chunks[-1])
    return b"".join(chunks)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def _wait_group_gone(pgid: int, deadline: float) -> None:
    """Waits (until `deadline`, time.monotonic) for the last process of group `pgid` to go: killed
    processes of the program that do not hold the result pipe (a fork bomb's) are still dying
    when the pipe reaches EOF."""
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.02)


def run_program(
    program: str, limits: Limits | None = None, *, isolation: str = "auto"
) -> ExecResult:
    """Runs `program` (Python source) in a fresh sandbox; never raises for the program's sake.

    Raises:
        ValueError: unknown isolation mode.
        RuntimeError: isolation="namespaces" was required but is unavailable on this machine.
    """
    if isolation not in ISOLATION_MODES:
        raise ValueError(f"unknown sandbox isolation {isolation!r}; use one of {ISOLATION_MODES}")
    limits = limits or Limits()
    nonce = secrets.token_hex(16)
    work = Path(tempfile.mkdtemp(prefix="pyfast-sandbox-"))
    read_fd, write_fd = os.pipe()
    t0 = time.perf_counter()
    try:
        prog = work / "program.py"
        prog.write_text(program, encoding="utf-8")
        cfg = {
            "nonce": nonce,
            "program": str(prog),
            "workdir": str(work),
            "isolation": isolation,
            "result_fd": write_fd,
            "limits": {k: v for k, v in asdict(limits).items() if k != "wall_s"},
        }
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work)}
        with tempfile.TemporaryFile() as out:
            proc = subprocess.Popen(
                [sys.executable, "-I", str(_CHILD)],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=work,
                env=env,
                pass_fds=(write_fd,),
                start_new_session=True,
            )
            os.close(write_fd)
            write_fd = -1
            timed_out = False
            try:
                proc.stdin.write((json.dumps(cfg) + "\n").encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                proc.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                proc.terminate()  # the supervisor kills its PID namespace and waits for it
                try:
                    proc.wait(timeout=TERMINATE_WAIT_S)
                except subprocess.TimeoutExpired:
                    pass
            _kill_group(proc)  # also reaps stragglers of the basic mode's process group
            proc.wait()
            reap_deadline = time.monotonic() + REAP_WAIT_S
            _wait_group_gone(proc.pid, reap_deadline)
            out.seek(0, os.SEEK_END)
            size = out.tell()
            out.seek(max(0, size - OUTPUT_TAIL * 4))
            output = out.read().decode("utf-8", "replace")[-OUTPUT_TAIL:]
        lines = _drain(read_fd, max(0.5, reap_deadline - time.monotonic())).split(b"\n")
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
        shutil.rmtree(work, ignore_errors=True)
    duration = time.perf_counter() - t0
    try:
        info = json.loads(lines[0]) if lines and lines[0] else {}
    except ValueError:
        info = {}
    if "error" in info:
        if isolation == "namespaces":
            raise RuntimeError(f"sandbox: {info['error']}")
        return ExecResult(False, "setup_error", proc.returncode, duration, info["error"], info)
    passed = not timed_out and proc.returncode == 0 and nonce.encode() in lines[1:]
    status = "passed" if passed else ("timeout" if timed_out else "failed")
    return ExecResult(passed, status, proc.returncode, duration, output, info)


def run_programs(
    programs: list[str],
    limits: Limits | None = None,
    *,
    workers: int = 2,
    isolation: str = "auto",
    progress=None,
) -> list[ExecResult]:
    """Runs programs `workers` at a time (each in its own sandboxed process), in input order."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if isolation not in ISOLATION_MODES:
        raise ValueError(f"unknown sandbox isolation {isolation!r}; use one of {ISOLATION_MODES}")
    results: list[ExecResult | None] = [None] * len(programs)

    def one(i: int) -> None:
        results[i] = run_program(programs[i], limits, isolation=isolation)
        if progress is not None:
            progress(i, results[i])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for f in [pool.submit(one, i) for i in range(len(programs))]:
            f.result()
    return results  # type: ignore[return-value]


@cache
def isolation_report() -> dict:
    """What the sandbox guarantees on this machine (runs one trivial program to find out)."""
    res = run_program("pass\n", Limits(wall_s=20))
    return {"passed_probe": res.passed, **res.isolation}
