"""HumanEval: completions -> programs run in the sandbox -> pass@k.

Prompts and stop sequences as lm-evaluation-harness 0.4.x (``lm_eval/tasks/humaneval``): the
context is the problem's ``prompt`` (signature + docstring); generation stops at ``"\\nclass"``,
``"\\ndef"``, ``"\\n#"``, ``"\\nif"``, ``"\\nprint"``. Greedy for one sample per problem (pass@1,
``humaneval_greedy``: lm-eval's default 256 new tokens); ``num_samples`` > 1 samples at
temperature 0.2, top_p 0.95, up to 1024 new tokens (``humaneval.yaml``). The program is
``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"`` as in openai/human-eval's
``execution.py``; pass@k is the unbiased estimator of Chen et al. (2021).

Executing model-written code is refused unless the caller opts in (``allow_code_execution``).
Each sample runs split in two sandboxes (pyfast/eval/sandbox.py, docs/sandbox.md): the candidate
(prompt + completion) only answers calls of the entry point; ``check`` (prompt + test) runs in a
second sandbox and calls it through a pipe with plain data, so the verdict is out of the
candidate's reach. Before any sample runs, :func:`pyfast.eval.sandbox.require` proves the chosen
mode works here or raises SandboxUnavailable naming the missing layer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from pyfast.eval import metrics
from pyfast.eval.data import DataStore
from pyfast.eval.sandbox import Limits, check_mode, require, run_check, run_many
from pyfast.io import parse_jsonl

STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
GREEDY_MAX_GEN_TOKS = 256
SAMPLED = {"do_sample": True, "temperature": 0.2, "top_p": 0.95, "max_gen_toks": 1024}
PASS_AT_K = (1, 10, 100)
DATA = {
    "name": "humaneval",
    "hf_path": "openai/openai_humaneval",
    "hf_config": None,
    "split": "test",
    "fields": ["task_id", "prompt", "test", "entry_point"],
}
REFUSAL = (
    "humaneval runs model-written code; pass --allow-code-execution to run it in pyfast's "
    "sandbox (see README, 'HumanEval')"
)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k), as the stable product prod(1 - k/i)."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def truncate(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """`text` up to the earliest stop sequence (as generate_until's `until` cuts)."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def candidate_source(problem: dict, completion: str) -> str:
    """What the candidate sandbox runs: the prompt and the completion (never the test)."""
    return problem["prompt"] + completion


def loggable(text: str) -> str:
    """`text` as it can be written to a UTF-8 log (a lone surrogate becomes its escape)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def build_program(problem: dict, completion: str) -> str:
    """The single program of openai/human-eval (for reference and export; pyfast runs the
    candidate and the check apart, see :func:`score`)."""
    return (
        problem["prompt"]
        + completion
        + "\n"
        + problem["test"]
        + "\n"
        + f"check({problem['entry_point']})"
    )


def load_problems(store: DataStore, split: str = "test", limit: int | None = None) -> list[dict]:
    rows = store.load(DATA, split, "humaneval")
    if not rows:
        raise ValueError(f"humaneval: split {split!r} has no problems")
    return rows[:limit] if limit else rows


def read_completions(path: str | Path, problems: list[dict]) -> dict[str, list[str]]:
    """JSONL of {"task_id", "completion"} (openai/human-eval samples) -> task_id -> completions.

    Raises ValueError naming the file and line of malformed rows or unknown task ids, or the
    problems without any completion; FileNotFoundError if `path` is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"completions file not found: {path}")
    known = {p["task_id"] for p in problems}
    out: dict[str, list[str]] = {}
    for lineno, row in parse_jsonl(path.read_text(encoding="utf-8"), path):
        for key in ("task_id", "completion"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"{path}:{lineno}: missing or non-string field {key!r}")
        if row["task_id"] not in known:
            if not row["task_id"].startswith("HumanEval/"):
                raise ValueError(f"{path}:{lineno}: unknown task_id {row['task_id']!r}")
            continue  # a problem outside this run (--limit, a slice of the data)
        out.setdefault(row["task_id"], []).append(row["completion"])
    missing = [p["task_id"] for p in problems if p["task_id"] not in out]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{path}: no completion for {', '.join(missing[:5])}{more}")
    return out


def generation_requests(
    problems: list[dict], num_samples: int, seed: int = 1234
) -> list[tuple[str, dict]]:
    """(context, gen_kwargs) per problem and sample: greedy for 1 sample, sampled otherwise."""
    if num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num_samples}")
    out = []
    for p in problems:
        for j in range(num_samples):
            if num_samples == 1:
                kw = {"until": list(STOP_SEQUENCES), "do_sample": False}
                kw["max_gen_toks"] = GREEDY_MAX_GEN_TOKS
            else:
                kw = {"until": list(STOP_SEQUENCES), **SAMPLED, "seed": seed + j}
            out.append((p["prompt"], kw))
    return out


def score(
    problems: list[dict],
    completions: dict[str, list[str]],
    *,
    allow_code_execution: bool = False,
    limits: Limits | None = None,
    workers: int = 2,
    sandbox: str = "strict",
) -> tuple[dict, list[dict], dict]:
    """Runs every completion; returns (metrics, per-problem sample logs, execution facts).

    Metrics: n (problems) and pass@k (+ stderr over problems) for each k in (1, 10, 100) that
    every problem has enough samples for. Execution facts: samples per problem, status counts,
    time, and the sandbox that ran (mode, each layer, which limits were enforced how).

    Raises:
        ValueError: no ``allow_code_execution``, or an unknown sandbox mode.
        SandboxUnavailable (a ValueError): a layer of `sandbox` cannot be set up here; nothing
            ran. A sample's own trouble (cleanup included) only fails that sample.
    """
    if not allow_code_execution:
        raise ValueError(REFUSAL)
    check_mode(sandbox)
    facts = require(sandbox)
    jobs = [(p, c) for p in problems for c in completions[p["task_id"]]]
    t0 = time.perf_counter()
    calls = [
        lambda p=p, c=c: run_check(
            candidate_source(p, c), p["test"], p["entry_point"], p["prompt"], limits,
            sandbox=sandbox,
        )
        for p, c in jobs
    ]  # fmt: skip
    results = run_many(calls, workers=workers)
    exec_s = time.perf_counter() - t0
    by_task: dict[str, list] = {}
    for (p, c), r in zip(jobs, results, strict=True):
        by_task.setdefault(p["task_id"], []).append((c, r))
    n_min = min(len(v) for v in by_task.values())
    ks = [k for k in PASS_AT_K if k <= n_min]
    per_k: dict[str, list[float]] = {f"pass@{k}": [] for k in ks}
    samples = []
    statuses: dict[str, int] = {}
    for doc_id, p in enumerate(problems):
        runs = by_task[p["task_id"]]
        n, c = len(runs), sum(r.passed for _, r in runs)
        scores = {f"pass@{k}": pass_at_k(n, c, k) for k in ks}
        for key, v in scores.items():
            per_k[key].append(v)
        for _, r in runs:
            statuses[r.status] = statuses.get(r.status, 0) + 1
        samples.append(
            {
                "doc_id": doc_id,
                "task_id": p["task_id"],
                "context": p["prompt"],
                "completions": [loggable(comp) for comp, _ in runs],
                "status": [r.status for _, r in runs],
                "sandbox": [r.isolation.get("mode", sandbox) for _, r in runs],
                "error": [None if r.passed else r.output[-300:] for _, r in runs],
                "num_correct": c,
                **scores,
            }
        )
    res: dict = {"n": len(problems)}
    for key, vals in per_k.items():
        res[key] = sum(vals) / len(vals)
        res[f"{key}_stderr"] = metrics.mean_stderr(vals)
    modes: dict[str, int] = {}
    for r in results:
        m = r.isolation.get("mode", sandbox)
        modes[m] = modes.get(m, 0) + 1
    execution = {
        "num_samples": n_min,
        "programs": len(results),
        "status_counts": statuses,
        "execution_s": round(exec_s, 3),
        "wall_s": (limits or Limits()).wall_s,
        "sandbox": {**facts, "mode": sandbox},
        "sandbox_modes": modes,  # samples per mode that ran them: every sample, one mode
    }
    return res, samples, execution
