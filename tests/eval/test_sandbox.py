"""The sandbox contains hostile programs: each is a failure, the run continues, nothing escapes."""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

import pytest

from pyfast.eval import sandbox
from pyfast.eval.sandbox import Limits, run_program, run_programs

FAST = Limits(wall_s=3.0, cpu_s=1, memory_mb=512, fsize_mb=1, nproc=32, nofile=64)
MODES = ["namespaces", "basic"]


def _mode_available(mode: str) -> bool:
    return mode == "basic" or sandbox.isolation_report().get("mode") == "namespaces"


@pytest.fixture(params=MODES)
def mode(request):
    if not _mode_available(request.param):
        pytest.skip("unprivileged user namespaces unavailable here: only the basic guard runs")
    return request.param


def _snapshot(root: Path) -> dict:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _leftover_children() -> list[int]:
    """Processes still running the sandbox bootstrap (fork-bomb survivors would show here)."""
    mine, me = str(sandbox._CHILD).encode(), os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            try:
                if mine in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def test_ordinary_programs_pass_and_fail_by_their_asserts(mode):
    ok = "def f(x):\n    return x + 1\nassert f(1) == 2\nprint('done')\n"
    bad = "def f(x):\n    return x\nassert f(1) == 2\n"
    res = run_programs([ok, bad, "raise ValueError('no')\n"], FAST, isolation=mode)
    assert [r.status for r in res] == ["passed", "failed", "failed"]
    assert res[0].output.strip() == "done" and res[0].isolation["mode"] == mode
    assert "AssertionError" in res[1].output and "ValueError: no" in res[2].output


def test_hostile_suite_is_contained(mode, tmp_path):
    """Every hostile program fails, the run goes on, and the test's own files never change."""
    owned = tmp_path / "owned"
    owned.mkdir()
    (owned / "keep.txt").write_text("precious")
    before = _snapshot(tmp_path)
    hits = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                hits.append(conn.recv(100))
                conn.close()
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    signalled = []
    old = signal.signal(signal.SIGUSR1, lambda *a: signalled.append(a))
    target = str(owned)
    hostile = {
        "infinite loop": "while True:\n    pass\n",
        "sleep forever": "import time\ntime.sleep(1000)\n",
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n"
        "    except OSError:\n        pass\n",
        "memory hog": "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 24))\n",
        "write outside": f"open({target!r} + '/escape.txt', 'w').write('x')\n",
        "delete outside": f"import os\nos.remove({target!r} + '/keep.txt')\n",
        "overwrite outside": f"open({target!r} + '/keep.txt', 'w').write('gone')\n",
        "remount then write": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "assert libc.mount(b'none', b'/', None, 32 | 4096, None) == 0, 'remount refused'\n"
        f"open({target!r} + '/escape.txt', 'w').write('x')\n",
        "network": f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), 2)\n"
        "s.sendall(b'escaped')\n",
        "kill parent": "import os, signal\n"
        "os.kill(os.getppid(), signal.SIGKILL)\n"
        f"os.kill({os.getpid()}, signal.SIGUSR1)\n",
        "kill own group": "import os, signal\nos.kill(0, signal.SIGKILL)\nassert False\n",
        "flood stdout": "while True:\n    print('x' * 10000)\n",
        "sys.exit before asserts": "import sys\nsys.exit(0)\nassert False\n",
        "os._exit before asserts": "import os\nos._exit(0)\nassert False\n",
        "raise SystemExit": "raise SystemExit\n",
        "print a fake sentinel": "import os, sys\nprint('passed')\nsys.stdout.flush()\n"
        "os._exit(0)\n",
    }
    programs = [*hostile.values(), "assert sum(range(4)) == 6\n"]
    try:
        res = run_programs(programs, FAST, isolation=mode)
    finally:
        stop.set()
        t.join(2)
        server.close()
        signal.signal(signal.SIGUSR1, old)
    outcome = dict(zip([*hostile, "ordinary"], (r.status for r in res), strict=True))
    assert outcome.pop("ordinary") == "passed"  # the run continued after every hostile program
    assert set(outcome.values()) <= {"failed", "timeout"}, outcome
    assert outcome["infinite loop"] in ("failed", "timeout")  # SIGXCPU or wall clock
    assert outcome["sleep forever"] == "timeout"
    assert hits == [] and signalled == []
    assert _snapshot(tmp_path) == before
    assert _leftover_children() == []
    # bounded by the wall clock + the supervisor's kill + reaping (the fork bomb's ~300
    # processes take seconds to die on a loaded machine)
    limit = FAST.wall_s + sandbox.TERMINATE_WAIT_S + sandbox.REAP_WAIT_S + 2
    assert max(r.duration_s for r in res) < limit


def test_network_refused_even_to_localhost(mode):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        prog = (
            "import socket\ntry:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), 1)\n"
            "except OSError as e:\n    print('refused', type(e).__name__)\n"
        )
        res = run_program(prog, FAST, isolation=mode)
        server.settimeout(0.3)
        with pytest.raises(OSError):
            server.accept()  # nothing connected
    if mode == "namespaces":  # the socket itself is allowed; there is no route anywhere
        assert res.passed and "refused" in res.output
    else:  # the audit guard refuses the socket module
        assert not res.passed and "PermissionError" in res.output


def test_namespaces_hide_the_host():
    if not _mode_available("namespaces"):
        pytest.skip("unprivileged user namespaces unavailable here")
    prog = (
        "import os\nprint(os.getpid(), os.getppid())\n"
        "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
    )
    res = run_program(prog, FAST, isolation="namespaces")
    assert res.passed
    pid_line, procs = res.output.splitlines()[:2]
    assert pid_line == "1 0" and procs == "[1]"  # PID 1 of its own namespace, alone in /proc
    assert res.isolation["filesystem"].startswith("read-only")
    assert res.isolation["capabilities"] == "none"


def test_bad_arguments():
    with pytest.raises(ValueError, match="isolation"):
        run_program("pass", isolation="docker")
    with pytest.raises(ValueError, match="wall_s"):
        Limits(wall_s=0)
    with pytest.raises(ValueError, match="workers"):
        run_programs(["pass"], workers=0)
