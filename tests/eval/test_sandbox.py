"""The sandbox against hostile programs: each attack of issue 20 runs, the host sees nothing.

Host-side observations: a listener on a Unix socket file in a host tmp dir, the ctimes of
/dev/null and the interpreter, a mode-600 canary, a fake OPENAI_API_KEY in the parent's
environment, the test's own files, free disk and available memory sampled during the run, the
evaluator's session keyring, and no leftover processes, directories or cgroups.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from pyfast.eval import sandbox
from pyfast.eval.sandbox import Limits, run_check, run_program, run_programs

FAST = Limits(wall_s=4.0, cpu_s=2, memory_mb=256, fsize_mb=1, tmp_mb=8, nproc=8, nofile=64)
ORDINARY = Limits(wall_s=30.0)  # a program of its own after the hostile batch: no race
NS_MODES = ["strict", "namespaces"]
KEY_SPEC_SESSION_KEYRING, KEYCTL_GET_KEYRING_ID = -3, 0


def _strict_available() -> bool:
    return "error" not in sandbox.isolation_report("strict")


needs_ns = pytest.mark.skipif(not _strict_available(), reason="no user namespaces here")


def _snapshot(root: Path) -> dict:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
        if not p.is_socket()
    }


def _leftovers() -> list[str]:
    """Bootstrap processes or weak-mode work dirs of this test process still around."""
    found = [
        f"pid {e}"
        for e in os.listdir("/proc")
        if e.isdigit() and int(e) != os.getpid() and _is_ours(e)
    ]
    found += [str(p) for p in Path("/tmp").glob(f"pyfast-sandbox-{os.getpid()}-*")]
    return found


def _is_ours(pid: str) -> bool:
    try:
        if str(sandbox._CHILD).encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return False
        return Path(f"/proc/{pid}/status").read_text().split("PPid:")[1].split()[0] == str(
            os.getpid()
        )
    except (OSError, IndexError):
        return False


def _session_keyring() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(250, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0)


class Host:
    """What a hostile program would change or read on the host, observed from outside."""

    def __init__(self, root: Path, monkeypatch):
        self.root = root
        self.sock_path = str(root / "host.sock")
        self.canary = root / "canary.txt"
        self.secret = "CANARY-" + secrets.token_hex(8)
        self.canary.write_text(self.secret)
        self.canary.chmod(0o600)
        self.api_key = "sk-fake-" + secrets.token_hex(8)
        monkeypatch.setenv("OPENAI_API_KEY", self.api_key)
        self.watched = ["/dev/null", os.path.realpath(sys.executable)]
        self.ctimes = [os.stat(p).st_ctime_ns for p in self.watched]
        self.modes = [os.stat(p).st_mode for p in self.watched]
        self.hits: list[bytes] = []
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(self.sock_path)
        self.server.listen(8)
        self.server.settimeout(0.1)
        self.stop = threading.Event()
        self.disk_min = self.disk0 = shutil.disk_usage("/tmp").free
        self.mem_min = self.mem0 = self._mem_available()
        self.threads = [
            threading.Thread(target=f, daemon=True) for f in (self._accept, self._sample)
        ]
        self.before = _snapshot(root)
        for t in self.threads:
            t.start()

    @staticmethod
    def _mem_available() -> int:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) << 10
        return 0

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
                self.hits.append(conn.recv(100) or b"<connected>")
                conn.close()
            except OSError:
                pass

    def _sample(self):
        while not self.stop.is_set():
            self.disk_min = min(self.disk_min, shutil.disk_usage("/tmp").free)
            self.mem_min = min(self.mem_min, self._mem_available())
            time.sleep(0.02)

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(2)
        self.server.close()

    def assert_untouched(self, outputs: list[str], limits: Limits):
        assert self.hits == [], "a program reached the host's Unix socket"
        assert [os.stat(p).st_ctime_ns for p in self.watched] == self.ctimes
        assert [os.stat(p).st_mode for p in self.watched] == self.modes
        assert _snapshot(self.root) == self.before
        for out in outputs:
            assert self.secret not in out and self.api_key not in out
            assert "root:" not in out  # /etc/shadow's first line
        # 2 sandboxes at a time; without cgroups each may hold nproc x RLIMIT_AS at most
        budget = 2 * limits.nproc * limits.memory_mb << 20
        assert self.disk0 - self.disk_min < 256 << 20, "the host disk filled up"
        assert self.mem0 - self.mem_min < budget + (1 << 30)
        assert _leftovers() == []


@pytest.fixture
def host(tmp_path, monkeypatch):
    h = Host(tmp_path, monkeypatch)
    yield h
    h.close()


def _hostile(h: Host) -> dict[str, str]:
    target = str(h.root)
    return {
        "unix socket": f"import socket\ns = socket.socket(socket.AF_UNIX)\n"
        f"s.connect({h.sock_path!r})\ns.sendall(b'escaped')\n",
        "chmod fd 0 and stdio": "import os\nfor fd in (0, 1, 2):\n    try:\n"
        "        os.chmod(fd, 0o777)\n    except OSError as e:\n        print('refused', e)\n"
        "assert False\n",
        "chmod /proc/self/exe": "import os, sys\nfor p in ('/proc/self/exe', sys.executable):\n"
        "    try:\n        os.chmod(p, 0o4777)\n    except OSError as e:\n"
        "        print('refused', e)\nassert False\n",
        "read secrets": "import os\n"
        f"for p in ('/etc/shadow', {str(h.canary)!r}, '/root', os.path.expanduser('~')):\n"
        "    try:\n        print(p, open(p).read() if os.path.isfile(p) else os.listdir(p))\n"
        "    except OSError as e:\n        print(p, e)\n"
        "print(dict(os.environ))\nprint(open('/proc/1/environ').read())\nassert False\n",
        "keyring": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print('keyring', libc.syscall(250, 0, -3, 0), ctypes.get_errno())\n"
        "print('add_key', libc.syscall(248, b'user', b'k', b'v', 1, -3), ctypes.get_errno())\n"
        "assert False\n",
        "memory across processes": "import os, time\nkids = 0\nfor _ in range(12):\n"
        "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
        "    if pid == 0:\n        try:\n            b = bytearray(200 << 20)\n"
        "        except MemoryError:\n            pass\n        time.sleep(3)\n"
        "        os._exit(0)\n    kids += 1\nprint('forked', kids)\nassert False\n",
        "fill the disk": "import os\nfor p in ('big', '/tmp/big2', '/big3'):\n    try:\n"
        "        fd = os.open(p, os.O_CREAT | os.O_WRONLY)\n"
        "        os.posix_fallocate(fd, 0, 3 << 30)\n        print('allocated', p)\n"
        "    except OSError as e:\n        print('refused', p, e)\nassert False\n",
        "nested namespaces and kernel surface": "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\nres = {}\n"
        "res['unshare'] = libc.unshare(0x10000000)\n"
        "res['clone'] = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)\n"
        "res['io_uring'] = libc.syscall(425, 8, ctypes.create_string_buffer(120))\n"
        "res['bpf'] = libc.syscall(321, 0, 0, 0)\n"
        "res['perf'] = libc.syscall(298, 0, 0, -1, -1, 0)\n"
        "res['ptrace'] = libc.syscall(101, 0, 0, 0, 0)\n"
        "res['mount'] = libc.mount(b'none', b'/', None, 32, None)\n"
        "res['setns'] = libc.syscall(308, 0, 0)\n"
        "if 0 in res.values():\n    os._exit(0)  # a success ends in a clean exit\n"
        "print(res)\nassert False\n",
        "write outside": f"open({target!r} + '/escape.txt', 'w').write('x')\n",
        "delete outside": f"import os\nos.remove({target!r} + '/canary.txt')\n",
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n"
        "    except OSError:\n        pass\n",
        "memory hog": "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 24))\n",
        "infinite loop": "while True:\n    pass\n",
        "sleep forever": "import time\ntime.sleep(1000)\n",
        "kill parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
        f"os.kill({os.getpid()}, signal.SIGUSR1)\n",
        "kill own group": "import os, signal\nos.kill(0, signal.SIGKILL)\nassert False\n",
        "flood stdout": "while True:\n    print('x' * 10000)\n",
        "deep tree": "import os\nfor _ in range(1500):\n    os.mkdir('d')\n    os.chdir('d')\n"
        "assert False\n",
        "sys.exit before asserts": "import sys\nsys.exit(0)\nassert False\n",
        "os._exit before asserts": "import os\nos._exit(0)\nassert False\n",
        "print a fake sentinel": "import os, sys\nprint('passed')\nsys.stdout.flush()\n"
        "os._exit(0)\n",
    }


@needs_ns
@pytest.mark.parametrize("mode", NS_MODES)
def test_hostile_suite_is_contained(mode, host):
    """Every hostile program fails; the host saw nothing; an ordinary program still passes."""
    signalled = []
    old = signal.signal(signal.SIGUSR1, lambda *a: signalled.append(a))
    hostile = _hostile(host)
    try:
        res = run_programs(list(hostile.values()), FAST, sandbox=mode)
    finally:
        signal.signal(signal.SIGUSR1, old)
    outcome = dict(zip(hostile, (r.status for r in res), strict=True))
    assert set(outcome.values()) <= {"failed", "timeout"}, outcome
    assert outcome["sleep forever"] == "timeout"
    out = dict(zip(hostile, (r.output for r in res), strict=True))
    assert "Read-only file system" in out["chmod fd 0 and stdio"]
    assert "Read-only file system" in out["chmod /proc/self/exe"]
    assert "No such file" in out["unix socket"]
    assert "/etc/shadow [Errno 2]" in out["read secrets"] and "[Errno 2]" in out["read secrets"]
    assert "keyring -1 1" in out["keyring"]  # keyctl denied by seccomp (EPERM)
    assert "refused big" in out["fill the disk"] and "refused /big3" in out["fill the disk"]
    forked = int(out["memory across processes"].split("forked ")[1].split()[0])
    assert forked < FAST.nproc  # RLIMIT_NPROC in the sandbox's user namespace
    assert "'unshare': -1" in out["nested namespaces and kernel surface"]
    assert signalled == []
    host.close()
    host.assert_untouched([r.output for r in res], FAST)
    ordinary = run_program("assert sum(range(4)) == 6\n", ORDINARY, sandbox=mode)
    assert ordinary.status == "passed", ordinary
    assert ordinary.isolation["mode"] == mode


@needs_ns
def test_identity_filesystem_and_layers_reported():
    prog = (
        "import os\nprint(os.getpid(), os.getppid(), os.getuid())\n"
        "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
        "print(sorted(os.listdir('/')))\nprint(open('/proc/self/uid_map').read().split())\n"
        "print(sorted(os.listdir('/proc/self/fd')))\n"
    )
    res = run_program(prog, FAST)
    assert res.passed, res
    pids, procs, top, uid_map, fds = res.output.splitlines()[:5]
    assert pids == "1 0 0" and procs == "[1]"  # PID 1 of its own namespace, alone in /proc
    assert "'run'" not in top and "'home'" not in top and "'work'" not in top
    inside, outside, _ = eval(uid_map)
    assert inside == "0" and outside != "0"  # never host root
    assert eval(fds) == ["0", "1", "2", "3", "4"]  # stdio, result pipe, the listing itself
    iso = res.isolation
    assert iso["mode"] == "strict" and iso["capabilities"].startswith("none")
    assert iso["seccomp"].startswith("on") and iso["proc"].startswith("fresh")
    assert "keyring" in iso and "cgroup" in iso["limits"]
    assert iso["host_uid"] != 0


@needs_ns
@pytest.mark.parametrize(
    "name,completion",
    [
        ("frames and gc for the nonce", "    import gc, sys\n"
         "    for o in gc.get_objects():\n        if isinstance(o, dict) and 'nonce' in o:\n"
         "            print('found', o)\n    f = sys._getframe()\n    while f:\n"
         "        print(sorted(f.f_locals))\n        f = f.f_back\n    return 0\n"),
        ("settrace swaps check", "    import sys\n"
         "    def tr(frame, event, arg):\n"
         "        frame.f_globals.update(check=lambda c: None)\n        return tr\n"
         "    sys.settrace(tr)\n    return 0\n"),
        ("read the tests", "    import os, glob\n"
         "    for p in glob.glob('/tmp/*') + glob.glob('/tmp/.*') + ['/proc/self/cmdline']:\n"
         "        print(p, open(p, 'rb').read()[:2000])\n    return 0\n"),
        ("patch traceback", "    import traceback\n"
         "    traceback.print_exc = lambda *a, **k: None\n    return 0\n"),
        ("always-equal object", "    class Eq(int):\n        def __eq__(self, o):\n"
         "            return True\n        __hash__ = int.__hash__\n    return Eq(0)\n"),
        ("write a fake verdict", "    import os\n    for fd in (3, 5, 6):\n        try:\n"
         "            os.write(fd, b'{\"verdict\": \"passed\", \"nonce\": \"x\"}\\n')\n"
         "        except OSError:\n            pass\n    return 0\n"),
        ("exit during the call", "    import os\n    os._exit(0)\n"),
    ],
)  # fmt: skip
def test_verdicts_cannot_be_forged(name, completion):
    prompt = "def f(x):\n"
    test = "def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(4) == 16\n"
    res = run_check(prompt + completion, test, "f", prompt, FAST)
    assert res.status == "failed", (name, res)
    assert "candidate(3) == 9" not in res.output or name == "read the tests"
    good = run_check(prompt + "    return x * x\n", test, "f", prompt, FAST)
    assert good.passed, good


@needs_ns
def test_plain_data_crosses_and_mutations_replay():
    prompt = "def f(xs, d, s, t):\n"
    completion = (
        "    xs.append(1.5)\n    d[(1, 2)] = frozenset({3})\n    s.add(b'x')\n"
        "    return (float('inf'), t, None, True, 2**80, 'é', [1 + 2j])\n"
    )
    test = (
        "def check(c):\n    xs, d, s = [0], {}, set()\n    r = c(xs, d, s, t=(1, 'a'))\n"
        "    assert r == (float('inf'), (1, 'a'), None, True, 2**80, 'é', [1 + 2j])\n"
        "    assert type(r) is tuple and type(r[3]) is bool\n"
        "    assert xs == [0, 1.5] and d == {(1, 2): frozenset({3})} and s == {b'x'}\n"
    )
    res = run_check(prompt + completion, test, "f", prompt, FAST)
    assert res.passed, res
    raising = run_check(
        "def f(x):\n    raise ValueError('no')\n",
        "def check(c):\n    try:\n        c(1)\n    except ValueError as e:\n"
        "        assert 'no' in str(e)\n    else:\n        assert False\n",
        "f",
        "",
        FAST,
    )
    assert raising.passed, raising


@needs_ns
def test_unencodable_text_fails_only_its_sample():
    res = run_check("def f():\n    return '\ud800'\n", "def check(c):\n    c()\n", "f")
    assert res.status == "failed" and "UTF-8" in res.output
    out = run_check("def f():\n    return 1\n", "def check(c):\n    assert c() == 1\n", "f")
    assert out.passed


def test_weak_mode_survives_deep_trees_and_unreadable_dirs(host):
    prog = (
        "import os\nos.mkdir('locked')\nopen('locked/f', 'w').write('x')\nos.chmod('locked', 0)\n"
        "for _ in range(1500):\n    os.mkdir('d')\n    os.chdir('d')\n"
    )
    res = run_program(prog, FAST, sandbox="weak")
    assert res.passed, res  # the program itself is fine; cleanup is the point
    assert "cleanup" not in res.isolation and _leftovers() == []
    assert res.isolation["mode"] == "weak" and "not a security boundary" in res.isolation["guard"]


def test_weak_mode_guard_refuses_sockets_and_outside_writes(tmp_path):
    progs = [
        "import socket\nsocket.socket()\n",
        f"open({str(tmp_path / 'x')!r}, 'w').write('x')\n",
        "import os\nos.fork()\n",
    ]
    res = run_programs(progs, FAST, sandbox="weak")
    assert [r.status for r in res] == ["failed"] * 3
    assert all("PermissionError: sandbox" in r.output for r in res)
    assert list(tmp_path.iterdir()) == []


def _wrapper(tmp_path: Path, deny: str) -> tuple[str, ...]:
    """A launcher that makes the kernel refuse `deny` for the bootstrap (a hostile host)."""
    script = tmp_path / "deny.py"
    script.write_text(
        "import ctypes, os, sys\nsys.path.insert(0, sys.argv[1])\nimport _sandbox_seccomp as s\n"
        "ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)\n"
        "s.install(s.build(deny=(sys.argv[2],)))\nos.execv(sys.argv[3], sys.argv[3:])\n"
    )
    return (sys.executable, str(script), str(sandbox._HERE), deny)


@needs_ns
@pytest.mark.parametrize(
    "deny,strict_layer,namespaces_ok",
    [
        ("unshare", "namespaces", False),
        ("seccomp", "seccomp", True),
        ("mount", "filesystem", False),
    ],
)
def test_downgrades_are_refused(tmp_path, monkeypatch, deny, strict_layer, namespaces_ok):
    monkeypatch.setattr(sandbox, "LAUNCH_PREFIX", _wrapper(tmp_path, deny))
    with pytest.raises(sandbox.SandboxUnavailable) as err:
        sandbox.require("strict")
    msg = str(err.value)
    assert f"layer {strict_layer}" in msg and "\n" not in msg
    assert ("--sandbox namespaces" in msg) == namespaces_ok
    assert ("--sandbox weak" in msg) == (not namespaces_ok)
    res = run_program("print('ran')\n", FAST)
    assert res.status == "setup_error" and "ran" not in res.output
    if namespaces_ok:
        facts = sandbox.require("namespaces")
        assert facts["seccomp"].startswith("off")
    else:
        with pytest.raises(sandbox.SandboxUnavailable, match="--sandbox weak"):
            sandbox.require("namespaces")
    assert sandbox.require("weak")["mode"] == "weak"


def test_cgroup_layer_code_path_on_a_fake_tree(tmp_path, monkeypatch):
    """Where a cgroup v2 tree offers memory/pids/cpu, each sandbox gets a child with the limits
    and the bootstrap joins it (a plain directory stands in for the cgroup filesystem)."""
    base = tmp_path / "cg"
    base.mkdir()
    (base / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (base / "cgroup.subtree_control").write_text("cpu memory pids\n")
    found, why = sandbox.cgroup_base(base)
    assert found == base and why == "enforced"
    lim = Limits(memory_mb=300, nproc=7)
    cg = sandbox.make_cgroup(base, lim)
    assert (cg / "memory.max").read_text() == str(300 << 20)
    assert (cg / "memory.swap.max").read_text() == "0"
    assert (cg / "pids.max").read_text() == "7" and (cg / "cpu.max").read_text() == "100000 100000"
    for f in list(cg.iterdir()):
        f.unlink()
    assert sandbox.remove_cgroup(cg, time.monotonic() + 1) is None and not cg.exists()
    (base / "cgroup.controllers").write_text("hugetlb\n")
    found, why = sandbox.cgroup_base(base)
    assert found is None and "lacks the memory/pids/cpu" in why and "hugetlb" in why
    if _strict_available():  # the bootstrap joins the child it is given
        (base / "cgroup.controllers").write_text("cpu memory pids\n")
        monkeypatch.setenv(sandbox.CGROUP_ENV, str(base))
        real_make = sandbox.make_cgroup

        def make(base, limits):  # cgroupfs makes cgroup.procs with the directory
            cg = real_make(base, limits)
            (cg / "cgroup.procs").write_text("")
            return cg

        monkeypatch.setattr(sandbox, "make_cgroup", make)
        res = run_program("pass\n", FAST)
        assert res.passed, res
        assert res.isolation["limits"]["cgroup"] == "enforced"
        assert "memory.max" in res.isolation["limits"]["memory"]
        kids = [d for d in base.iterdir() if d.is_dir()]
        assert len(kids) == 1 and (kids[0] / "cgroup.procs").read_text().isdigit()
        assert "cleanup" in res.isolation  # a plain directory cannot be rmdir'ed with files


def test_cgroup_reported_not_enforced_here():
    base, why = sandbox.cgroup_base()
    if base is None:
        rep = sandbox._limits_report(FAST, f"not enforced: {why}", "strict")
        assert rep["cgroup"].startswith("not enforced") and "RLIMIT_NPROC" in rep["pids"]


def test_seccomp_tables_match_the_kernel_headers():
    import re

    from pyfast.eval import _sandbox_seccomp as sc

    headers = {
        "x86_64": ["/usr/include/x86_64-linux-gnu/asm/unistd_64.h", "/usr/include/asm/unistd_64.h"],
        "aarch64": ["/usr/include/asm-generic/unistd.h"],
    }
    checked = 0
    for arch, paths in headers.items():
        path = next((p for p in paths if os.path.exists(p)), None)
        if path is None:
            continue
        text = Path(path).read_text()
        table = {m[0]: int(m[1]) for m in re.findall(r"#define __NR(?:3264)?_(\w+)\s+(\d+)", text)}
        for name, nr in sc.SYSCALLS[arch].items():
            if name in table:
                assert table[name] == nr, (arch, name)
                checked += 1
    if checked == 0:
        pytest.skip("no kernel headers installed")
    with pytest.raises(OSError, match="riscv64"):
        sc.build("riscv64")


def test_bad_arguments():
    with pytest.raises(ValueError, match="sandbox mode"):
        run_program("pass", sandbox="docker")
    with pytest.raises(ValueError, match="wall_s"):
        Limits(wall_s=0)
    with pytest.raises(ValueError, match="workers"):
        run_programs(["pass"], workers=0)
    res = sandbox.run_many([lambda: 1 / 0, lambda: run_program("pass\n", FAST, sandbox="weak")])
    assert res[0].status == "failed" and "ZeroDivisionError" in res[0].output
    assert res[1].passed
