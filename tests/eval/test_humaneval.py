"""HumanEval: pass@k, programs, completions files, and scoring through the sandbox."""

from __future__ import annotations

import json
import math

import pytest

from pyfast.eval import humaneval
from pyfast.eval.data import DataStore
from pyfast.eval.sandbox import Limits

from .conftest import DATA

QUICK = Limits(wall_s=5.0, cpu_s=3, memory_mb=512)


@pytest.fixture(scope="module")
def problems():
    return humaneval.load_problems(DataStore(DATA))


def test_pass_at_k_is_the_unbiased_estimator():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1.0 - math.comb(n - c, k) / math.comb(n, k)
                assert humaneval.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert humaneval.pass_at_k(200, 0, 100) == 0.0 and humaneval.pass_at_k(200, 101, 100) == 1.0
    # large n: the product form stays finite where C(n, k) would overflow a float
    assert 0.0 < humaneval.pass_at_k(5000, 3, 1000) < 1.0
    assert humaneval.pass_at_k(5000, 3, 1) == pytest.approx(3 / 5000)
    with pytest.raises(ValueError, match="n=3 c=4"):
        humaneval.pass_at_k(3, 4, 1)


def test_program_and_stops_follow_the_references(problems):
    p = problems[1]
    assert p["task_id"] == "HumanEval/24"
    prog = humaneval.build_program(p, "    return 1\n")
    assert prog == p["prompt"] + "    return 1\n\n" + p["test"] + "\ncheck(largest_divisor)"
    text = "    return x\n\ndef helper():\n    pass\nif __name__"
    assert humaneval.truncate(text) == "    return x\n"
    assert humaneval.truncate("    return 1\n# done\nprint(2)") == "    return 1"
    reqs = humaneval.generation_requests(problems[:2], 1)
    assert reqs[0] == (
        problems[0]["prompt"],
        {"until": humaneval.STOP_SEQUENCES, "do_sample": False, "max_gen_toks": 256},
    )
    sampled = humaneval.generation_requests(problems[:1], 3, seed=7)
    assert [kw["seed"] for _, kw in sampled] == [7, 8, 9]
    assert sampled[0][1]["temperature"] == 0.2 and sampled[0][1]["top_p"] == 0.95
    with pytest.raises(ValueError, match="num-samples"):
        humaneval.generation_requests(problems, 0)


def test_execution_needs_explicit_permission(problems):
    comps = {p["task_id"]: [p["canonical_solution"]] for p in problems[:1]}
    with pytest.raises(ValueError, match="--allow-code-execution"):
        humaneval.score(problems[:1], comps)


def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
    """All 20 shipped problems: the canonical solution passes, a plausible wrong one fails."""
    comps = {p["task_id"]: [p["canonical_solution"], "    return None\n"] for p in problems}
    # a solution of another problem: syntactically fine, semantically wrong
    comps[problems[0]["task_id"]].append(problems[1]["canonical_solution"])
    res, samples, execution = humaneval.score(
        problems, comps, allow_code_execution=True, limits=QUICK
    )
    assert res["n"] == 20 and execution["num_samples"] == 2
    bad = [s["task_id"] for s in samples if s["status"][:2] != ["passed", "failed"]]
    assert bad == []
    assert samples[0]["status"][2] == "failed" and samples[0]["num_correct"] == 1
    assert res["pass@1"] == pytest.approx((1 / 3 + 19 / 2) / 20)  # c=1 of n=3, then n=2
    assert "pass@10" not in res
    assert execution["status_counts"] == {"passed": 20, "failed": 21}
    assert execution["sandbox"]["mode"] in ("namespaces", "basic")
    assert samples[0]["error"][0] is None and "AssertionError" in samples[0]["error"][1]


def test_completions_file_errors(tmp_path, problems):
    two = problems[:2]
    good = tmp_path / "samples.jsonl"
    rows = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems]
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = humaneval.read_completions(good, two)  # rows of other problems are skipped
    assert list(got) == ["HumanEval/10", "HumanEval/24"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:2: malformed JSON"):
        humaneval.read_completions(bad, two)
    bad.write_text(json.dumps({"task_id": "HumanEval/10"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: missing or non-string field 'completion'"):
        humaneval.read_completions(bad, two)
    bad.write_text(json.dumps({"task_id": "Other/1", "completion": ""}) + "\n")
    with pytest.raises(ValueError, match="unknown task_id 'Other/1'"):
        humaneval.read_completions(bad, two)
    bad.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match="no completion for HumanEval/24"):
        humaneval.read_completions(bad, two)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        humaneval.read_completions(tmp_path / "nope.jsonl", two)
