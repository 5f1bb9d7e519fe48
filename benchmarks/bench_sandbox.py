"""Cost of pyfast's HumanEval sandbox against the pre-issue-20 sandbox (commit 98956ae), same run.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_sandbox.py [--data-dir DIR] [--repeat N]
        [--rounds R] [--sandbox strict|namespaces|weak] [--baseline-commit 98956ae]

The baseline's sandbox.py and _sandbox_child.py are taken from git into a temporary package, so
both run in one process, alternating round by round. Prints per implementation: the median wall
time of one trivial program (sequential, one at a time; the new code also times a trivial
candidate/checker pair) and the wall time of running the canonical solutions of every HumanEval
problem under DIR on 2 workers (old: one program each; new: the candidate/checker pair each).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyfast.eval import humaneval, sandbox
from pyfast.eval.data import DataStore

ROOT = Path(__file__).resolve().parent.parent


def load_baseline(commit: str):
    pkg = Path(tempfile.mkdtemp(prefix="pyfast-bench-")) / "sandbox_baseline"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("sandbox.py", "_sandbox_child.py"):
        src = subprocess.run(
            ["git", "show", f"{commit}:pyfast/eval/{name}"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        (pkg / name).write_text(src)
    sys.path.insert(0, str(pkg.parent))
    return importlib.import_module("sandbox_baseline.sandbox")


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t0)
        assert res.passed, res
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="tests/data/benchmarks")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sandbox", default="strict", choices=sandbox.MODES)
    ap.add_argument("--baseline-commit", default="98956ae")
    args = ap.parse_args()
    old = load_baseline(args.baseline_commit)
    problems = humaneval.load_problems(DataStore(args.data_dir))
    old_progs = [humaneval.build_program(p, p["canonical_solution"]) for p in problems]
    mode = args.sandbox
    check_src = ("def f():\n    return 1\n", "def check(c):\n    assert c() == 1\n", "f")
    rows: dict[str, list[float]] = {}

    def add(key, value):
        rows.setdefault(key, []).append(value)

    for _ in range(args.rounds):
        add("old trivial program (ms)", median_ms(lambda: old.run_program("pass\n"), args.repeat))
        add(
            "new trivial program (ms)",
            median_ms(lambda: sandbox.run_program("pass\n", sandbox=mode), args.repeat),
        )
        add(
            "new trivial candidate+checker (ms)",
            median_ms(lambda: sandbox.run_check(*check_src, sandbox=mode), args.repeat),
        )
        t0 = time.perf_counter()
        res = old.run_programs(old_progs, workers=2)
        add(f"old {len(problems)} canonical, 2 workers (s)", time.perf_counter() - t0)
        assert all(r.passed for r in res)
        t0 = time.perf_counter()
        calls = [
            lambda p=p: sandbox.run_check(
                humaneval.candidate_source(p, p["canonical_solution"]),
                p["test"],
                p["entry_point"],
                p["prompt"],
                sandbox=mode,
            )
            for p in problems
        ]
        res = sandbox.run_many(calls, workers=2)
        add(f"new {len(problems)} canonical, 2 workers (s)", time.perf_counter() - t0)
        assert all(r.passed for r in res), [r.output for r in res if not r.passed]
    print(f"sandbox mode {mode}; {args.rounds} rounds x {args.repeat} repeats; median of rounds")
    for key, vals in rows.items():
        print(f"{key:42s} {statistics.median(vals):8.2f}   rounds: "
              + ", ".join(f"{v:.2f}" for v in vals))  # fmt: skip
    o = statistics.median(rows["old trivial program (ms)"])
    n = statistics.median(rows["new trivial program (ms)"])
    c = statistics.median(rows["new trivial candidate+checker (ms)"])
    oc = statistics.median(rows[f"old {len(problems)} canonical, 2 workers (s)"])
    nc = statistics.median(rows[f"new {len(problems)} canonical, 2 workers (s)"])
    print(f"ratios new/old: trivial program {n / o:.2f}x, candidate+checker {c / o:.2f}x, "
          f"canonical set {nc / oc:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
