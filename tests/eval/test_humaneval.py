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
    assert execution["sandbox"]["mode"] == "strict"
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


def _completions_file(path, problems, wrong=()):
    rows = [
        {
            "task_id": p["task_id"],
            "completion": "    return None\n" if i in wrong else p["canonical_solution"],
        }
        for i, p in enumerate(problems)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_scores_a_completions_file_without_a_model(tmp_path, problems, monkeypatch, capsys):
    from pyfast.cli import main
    from pyfast.eval import evaluator

    def no_model(*args, **kw):
        raise AssertionError("a model was loaded for --completions")

    monkeypatch.setattr(evaluator, "_as_lm", no_model)
    comps = _completions_file(tmp_path / "samples.jsonl", problems, wrong={3})
    args = ["eval", "--tasks", "humaneval", "--completions", str(comps), "--data-dir", str(DATA)]
    assert main(args) == 2
    assert "--allow-code-execution" in capsys.readouterr().err
    out = tmp_path / "run"
    rc = main([*args, "--allow-code-execution", "--output", str(out), "--log-samples"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["results"]["humaneval"]["pass@1"] == pytest.approx(19 / 20)
    assert res["results"]["humaneval"]["n"] == 20 and res["model"]["spec"] is None
    info = res["task_info"]["humaneval"]
    assert info["status_counts"] == {"passed": 19, "failed": 1}
    assert info["sandbox"]["mode"] == "strict"
    rows = [json.loads(x) for x in (out / "samples_humaneval.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows].count(["failed"]) == 1 and rows[3]["pass@1"] == 0.0
    assert "pass@1" in (out / "results.md").read_text()
    assert main([*args, "--allow-code-execution", "--num-samples", "0"]) == 2
    assert "--num-samples must be >= 1" in capsys.readouterr().err


def test_generation_path_with_a_tiny_model(tiny_model, tiny_tokenizer):
    from pyfast.eval import HFLM, evaluate

    class Spy(HFLM):
        def generate_until(self, requests):
            self.seen = list(requests)
            return super().generate_until(requests)

    lm = Spy(tiny_model, tiny_tokenizer, batch_size=4)
    opts = {"allow_code_execution": True, "num_samples": 2}
    out = evaluate(
        lm,
        "humaneval",
        data_dir=DATA,
        limit=2,
        gen_kwargs={"max_gen_toks": 6},
        task_options=opts,
        log_samples=True,
    )
    prompts = [s["context"] for s in out["samples"]["humaneval"]]
    assert prompts == [p["prompt"] for p in humaneval.load_problems(DataStore(DATA), limit=2)]
    assert [ctx for ctx, _ in lm.seen] == [p for p in prompts for _ in range(2)]
    kws = [kw for _, kw in lm.seen]
    assert all(kw["until"] == humaneval.STOP_SEQUENCES and kw["max_gen_toks"] == 6 for kw in kws)
    assert all(kw["do_sample"] and kw["temperature"] == 0.2 for kw in kws)
    assert len({kw["seed"] for kw in kws}) == 4
    r = out["results"]["humaneval"]
    assert r["n"] == 2 and r["pass@1"] == 0.0 and "pass@10" not in r  # a random model
    assert out["task_info"]["humaneval"]["num_samples"] == 2
    assert all(len(s["completions"]) == 2 for s in out["samples"]["humaneval"])


def test_cli_refuses_a_downgraded_sandbox(tmp_path, problems, monkeypatch, capsys):
    """unshare refused by the kernel (simulated with a seccomp wrapper): the CLI exits 2 with one
    line naming the layer and the flag; nothing runs, no sample is written."""
    from pyfast.cli import main
    from pyfast.eval import sandbox

    from .test_sandbox import _strict_available, _wrapper

    if not _strict_available():
        pytest.skip("no user namespaces here")
    monkeypatch.setattr(sandbox, "LAUNCH_PREFIX", _wrapper(tmp_path, "unshare"))
    comps = _completions_file(tmp_path / "samples.jsonl", problems[:2])
    out = tmp_path / "run"
    args = ["eval", "--tasks", "humaneval", "--completions", str(comps), "--data-dir", str(DATA)]
    assert main([*args, "--allow-code-execution", "--limit", "2", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "layer namespaces" in err[0] and "--sandbox weak" in err[0], err
    # results.json is written first (the run's config, then its status): the refusal is
    # recorded there, and no sample ran or was written
    import json

    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "failed" and not res.get("results"), res
    assert not list(out.glob("samples_*"))
    monkeypatch.setattr(sandbox, "LAUNCH_PREFIX", ())
    rc = main([*args, "--allow-code-execution", "--limit", "2", "--output", str(out), "--sandbox",
               "weak", "--log-samples"])  # fmt: skip
    assert rc == 0
    assert "sandbox mode weak" in capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["task_info"]["humaneval"]["sandbox_modes"] == {"weak": 2}
    rows = [json.loads(x) for x in (out / "samples_humaneval.jsonl").read_text().splitlines()]
    assert [r["sandbox"] for r in rows] == [["weak"], ["weak"]]


def test_forged_and_broken_samples_fail_alone(problems):
    """Wrong answers dressed as right ones fail; a lone surrogate fails only its sample."""
    p = problems[1]  # largest_divisor(n: int) -> int
    comps = {
        p["task_id"]: [
            p["canonical_solution"],
            "    class Eq(int):\n        def __eq__(self, o):\n            return True\n"
            "    return Eq(1)\n",
            "    import gc\n    return [o for o in gc.get_objects() if 'nonce' in str(o)[:50]]\n",
            "    return '\ud800'\n",
        ]
    }
    res, samples, execution = humaneval.score([p], comps, allow_code_execution=True, limits=QUICK)
    assert samples[0]["status"] == ["passed", "failed", "failed", "failed"]
    assert "\\ud800" in samples[0]["completions"][3]  # loggable as UTF-8
    assert res["pass@1"] == pytest.approx(0.25)
