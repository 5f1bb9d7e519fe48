"""Registry, data loading errors, prompts and few-shot sampling, metrics."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from pyfast.eval import metrics, registry
from pyfast.eval.data import DataStore
from pyfast.eval.registry import MMLU_SUBJECTS, expand, get_task

from .conftest import DATA


def test_registry_names_and_groups():
    names = registry.task_names()
    for t in ["arc_easy", "arc_challenge", "hellaswag", "truthfulqa_mc1", "truthfulqa_mc2"]:
        assert t in names
    assert len(MMLU_SUBJECTS) == 57
    leaves, groups = expand(["mmlu"])
    assert len(leaves) == 57 and set(groups) >= {"mmlu", "mmlu_stem", "mmlu_other"}
    counts = {c: len(groups[f"mmlu_{c}"]) for c in registry.MMLU_CATEGORIES}
    assert counts == {"stem": 19, "humanities": 13, "social_sciences": 12, "other": 13}
    assert expand(["arc_easy", "arc_easy"])[0] == ["arc_easy"]


def test_unknown_task_suggests_close_matches():
    with pytest.raises(ValueError, match="did you mean arc_easy"):
        get_task("arc_esay")
    with pytest.raises(ValueError, match="mmlu_philosophy"):
        expand(["mmlu_philosphy"])
    with pytest.raises(ValueError, match="pyfast ls tasks"):
        get_task("zzzzzz")


def test_missing_file_names_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"arc_easy/test\.jsonl"):
        get_task("arc_easy").docs(DataStore(tmp_path), "test")
    with pytest.raises(FileNotFoundError, match="data directory not found"):
        DataStore(tmp_path / "nope")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    (tmp_path / "arc_easy").mkdir()
    good = (DATA / "arc_easy" / "validation.jsonl").read_text().splitlines()[0]
    (tmp_path / "arc_easy" / "test.jsonl").write_text(good + "\n{not json\n")
    with pytest.raises(ValueError, match=r"test\.jsonl:2: malformed JSON"):
        get_task("arc_easy").docs(DataStore(tmp_path), "test")


def test_missing_field_is_named(tmp_path):
    (tmp_path / "arc_easy").mkdir()
    row = json.loads((DATA / "arc_easy" / "validation.jsonl").read_text().splitlines()[0])
    del row["answerKey"]
    (tmp_path / "arc_easy" / "test.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"test\.jsonl:1: missing field 'answerKey'"):
        get_task("arc_easy").docs(DataStore(tmp_path), "test")


def test_sha256_recorded():
    store = DataStore(DATA)
    get_task("arc_easy").docs(store, "validation")
    assert len(next(iter(store.hashes.values()))) == 64


def test_prompts_hellaswag_and_mmlu():
    store = DataStore(DATA)
    hs = get_task("hellaswag").docs(store, "train")[0]
    assert hs["query"].startswith("Getting a haircut: The man in the center")
    assert hs["gold"] == int(
        json.loads((DATA / "hellaswag/train.jsonl").open().readline())["label"]
    )
    task = get_task("mmlu_marketing")
    docs = task.docs(store, "validation")
    assert all(d["subject"] == "marketing" for d in docs) and len(docs) == 3
    ctx = task.contexts(docs[:1], [], 0, 1234, False)[0]
    assert ctx.startswith(
        "The following are multiple choice questions (with answers) about marketing.\n\n"
    )
    assert ctx.endswith("\nD. " + docs[0]["options"][3] + "\nAnswer:")
    assert task.requests(docs[0], ctx)[1] == (ctx, " B")


def test_fewshot_random_matches_lm_eval_sampler():
    store = DataStore(DATA)
    task = get_task("arc_easy")
    docs = task.docs(store, "validation")[:3]
    pool = task.docs(store, "train")
    ctxs = task.contexts(docs, pool, 2, 1234, same_split=False)
    rnd = random.Random(1234)
    for doc, ctx in zip(docs, ctxs, strict=True):
        shots = rnd.sample(pool, 2)
        want = "".join(
            f"Question: {s['question']}\nAnswer: {s['choices'][s['gold']]}\n\n" for s in shots
        )
        assert ctx == want + f"Question: {doc['question']}\nAnswer:"


def test_fewshot_first_n_and_same_split():
    store = DataStore(DATA)
    task = get_task("mmlu_philosophy")
    pool = task.docs(store, "dev")
    docs = task.docs(store, "validation")
    ctx = task.contexts(docs[:1], pool, 5, 1234, same_split=False)[0]
    assert ctx.count("\nAnswer: ") == 5 and pool[0]["question"] in ctx
    assert ctx.count("The following are") == 1  # description once, before the shots
    own = task.contexts(docs[:1], docs, 2, 1234, same_split=True)[0]
    assert docs[0]["question"] not in own.split("\n\n", 1)[1].rsplit("\n\n", 1)[0]
    with pytest.raises(ValueError, match="exceeds"):
        task.contexts(docs[:1], pool, 6, 1234, same_split=False)


def test_metrics_like_lm_eval():
    assert metrics.multiple_choice([-1.0, -2.0], ["a", "bbbbbb"], 0) == {
        "acc": 1.0,
        "acc_norm": 0.0,
    }
    assert metrics.mc2([math.log(0.5), math.log(0.3), math.log(0.2)], [1, 0, 1]) == pytest.approx(
        0.7
    )
    vals = [1.0, 0.0, 1.0, 1.0]
    assert metrics.mean_stderr(vals) == pytest.approx(np.std(vals, ddof=1) / 2)
    assert metrics.mean_stderr([1.0]) is None
    a, b = [1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0, 0.0]
    pooled = metrics.pooled_stderr([metrics.mean_stderr(a), metrics.mean_stderr(b)], [3, 5])
    want = math.sqrt(
        (2 * metrics.mean_stderr(a) ** 2 * 3 + 4 * metrics.mean_stderr(b) ** 2 * 5) / 6 / 8
    )
    assert pooled == pytest.approx(want)


def test_split_overrides():
    from pyfast.eval.evaluator import parse_split

    assert parse_split("validation,hellaswag=train") == {"*": "validation", "hellaswag": "train"}
    assert parse_split(None) == {}
    with pytest.raises(ValueError, match="TASK=SPLIT"):
        parse_split("=train")
