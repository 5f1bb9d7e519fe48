"""HFLM.generate_until, generative tasks (gsm8k, gsm8k_cot, truthfulqa_gen), resume, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from pyfast.cli import main
from pyfast.eval import HFLM, evaluate, get_task, metrics
from pyfast.eval.data import DataStore
from pyfast.eval.gen_task import _Regex
from pyfast.eval.generation import normalize_gen_kwargs, parse_gen_kwargs
from tests.conftest import torch_threads

from .conftest import DATA, REFERENCE

CONTEXTS = [
    "Question: How many clips did Natalia sell?\nAnswer:",
    "Q: What is the square root of banana?\nA:",
    "The",
    "Question: Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of "
    "babysitting. How much did she earn?\nAnswer:",
    "A man is sitting on a roof. He",
]


def _hf_generate(model, tok, context, n, until):
    """The oracle: transformers' own greedy generate on one unpadded prompt, cut like lm-eval."""
    ids = torch.tensor([tok(context)["input_ids"]])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    for stop in until:
        text = text.split(stop)[0]
    return text


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny model's matmuls are microseconds: one thread avoids OpenMP waits on a busy CPU."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def lm(tiny_model, tiny_tokenizer):
    return HFLM(tiny_model, tiny_tokenizer, batch_size=4)


def test_greedy_equals_transformers_generate(tiny_model, tiny_tokenizer, lm):
    until = ["\n\n", "Question:"]
    got = lm.generate_until([(c, {"until": until, "max_gen_toks": 24}) for c in CONTEXTS])
    stops = tiny_tokenizer.eos_token, *until
    for ctx, text in zip(CONTEXTS, got, strict=True):
        assert text == _hf_generate(tiny_model, tiny_tokenizer, ctx, 24, stops)
    # no stop strings: exactly max_gen_toks tokens unless EOS came first
    free = lm.generate_until([(CONTEXTS[0], {"max_gen_toks": 7})])[0]
    assert free == _hf_generate(tiny_model, tiny_tokenizer, CONTEXTS[0], 7, stops[:1])
    assert len(tiny_tokenizer(free)["input_ids"]) <= 8


def test_stop_strings_cut_at_first_occurrence(lm):
    long = lm.generate_until([(c, {"max_gen_toks": 40}) for c in CONTEXTS])
    for ctx, text in zip(CONTEXTS, long, strict=True):
        if len(text) < 6:
            continue
        stop_a, stop_b = text[4:6], text[2:3]  # substrings that do occur in the free text
        cut = lm.generate_until([(ctx, {"until": [stop_a, stop_b], "max_gen_toks": 40})])[0]
        first = min(i for i in (text.find(stop_a), text.find(stop_b)) if i >= 0)
        assert cut == text[:first]


def test_greedy_results_independent_of_batch_size(tiny_model, tiny_tokenizer):
    reqs = [(c, {"until": ["\n\n"], "max_gen_toks": 16}) for c in CONTEXTS * 2]
    outs = [
        HFLM(tiny_model, tiny_tokenizer, batch_size=bs).generate_until(reqs) for bs in (1, 3, 16)
    ]
    assert outs[0] == outs[1] == outs[2]
    assert outs[0][: len(CONTEXTS)] == outs[0][len(CONTEXTS) :]


def test_sampling_is_seeded_and_batch_independent(tiny_model, tiny_tokenizer, lm):
    kw = {"do_sample": True, "temperature": 50.0, "max_gen_toks": 12}  # the tiny model is peaked
    reqs = [(CONTEXTS[0], {**kw, "seed": s}) for s in range(4)] + [(CONTEXTS[1], {**kw, "seed": 0})]
    a = lm.generate_until(reqs)
    b = HFLM(tiny_model, tiny_tokenizer, batch_size=1).generate_until(reqs[::-1])[::-1]
    assert a == b
    assert len(set(a[:4])) > 1  # different seeds, different samples
    greedy = lm.generate_until([(CONTEXTS[0], {"max_gen_toks": 12})])[0]
    nucleus = lm.generate_until([(CONTEXTS[0], {**kw, "top_p": 1e-6, "seed": 3})])[0]
    assert nucleus == greedy  # top_p -> 0 keeps only the most likely token
    top1 = lm.generate_until([(CONTEXTS[0], {**kw, "top_k": 1, "seed": 5})])[0]
    assert top1 == greedy


def test_gen_kwargs_validation():
    g = normalize_gen_kwargs({"until": "Q:", "max_new_tokens": 9, "temperature": 0.7})
    assert g.until == ("Q:",) and g.max_gen_toks == 9 and g.do_sample and g.temperature == 0.7
    g = normalize_gen_kwargs({"do_sample": False, "temperature": 0.7})
    assert not g.do_sample and g.temperature == 0.0
    assert normalize_gen_kwargs({"do_sample": True}).temperature == 1.0
    assert parse_gen_kwargs("temperature=0.5, top_p=0.9,max_gen_toks=64") == {
        "temperature": 0.5, "top_p": 0.9, "max_gen_toks": 64}  # fmt: skip
    for bad, msg in [
        ("temperature", "KEY=VALUE"),
        ("tempreature=1", "unknown key 'tempreature'"),
        ("top_p=1.5", "top_p"),
        ("max_gen_toks=x", "max_gen_toks"),
        ("do_sample=maybe", "do_sample"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_gen_kwargs(bad)
    with pytest.raises(ValueError, match="temperature > 0"):
        normalize_gen_kwargs({"do_sample": True, "temperature": 0})


def test_gsm8k_extraction_and_exact_match():
    task = get_task("gsm8k")
    gen = " She sold 48/2 = 24 in May.\nSo 48+24 = $1,072.\n#### 1,072.\n\n"
    assert task.extract(gen) == {"strict-match": "1,072.", "flexible-extract": "1,072."}
    assert task.extract(" It is 5 and then 12 apples") == {
        "strict-match": "[invalid]", "flexible-extract": "12"}  # fmt: skip
    doc = {"question": "?", "answer": "48+24 = 1072\n#### 1072"}
    assert task.score(doc, [gen]) == {
        "exact_match,strict-match": 1.0, "exact_match,flexible-extract": 1.0}  # fmt: skip
    assert task.score(doc, [" #### 1073"])["exact_match,strict-match"] == 0.0
    cot = get_task("gsm8k_cot")
    assert cot.extract("3 + 2 = 5. The answer is 5.")["strict-match"] == "5"
    assert _Regex(r"(a)|(b)", group_select=-1)(["a b"]) == ["b"]
    assert metrics.exact_match("$1,000.", "1000", regexes_to_ignore=[",", r"\$", r"\.$"]) == 1.0
    assert metrics.exact_match("ABC", "abc", ignore_case=True) == 1.0
    assert metrics.exact_match("a.b", "ab", ignore_punctuation=True) == 1.0
    assert metrics.exact_match("a 1", "a 2") == 0.0


def test_prompts_filters_and_metrics_equal_lm_eval():
    """Against what lm-eval 0.4.13 itself built/returned (scripts/make_lm_eval_reference.py)."""
    ref = json.loads((REFERENCE / "generation.json").read_text())
    texts = ref["filter_texts"]
    for key, want in ref["filters"].items():
        name, f = key.split("/")
        assert [get_task(name).extract(t)[f] for t in texts] == want, key
    opts = get_task("gsm8k").exact_match
    for pred, target, want in ref["exact_match"]:
        assert metrics.exact_match(pred, target, **opts) == want, (pred, target)
    task, store = get_task("truthfulqa_gen"), DataStore(DATA)
    docs = {d["question"]: d for d in task.docs(store, "validation")}
    for case in ref["truthfulqa_gen"]:
        doc = docs[case["question"].strip()]
        assert doc["correct_answers"] == case["correct_answers"]
        assert doc["incorrect_answers"] == case["incorrect_answers"]
        got = task.score(doc, [case["completion"]])
        assert got == pytest.approx(case["scores"], rel=1e-12, abs=1e-12)
    for name, prompts in ref["prompts"].items():
        task = get_task(name)
        docs = task.docs(store, "train" if name.startswith("gsm8k") else "validation")[:2]
        assert task.contexts(docs, [], task.num_fewshot, 1234, False) == prompts, name


def test_prompts_plain_and_chat(tiny_model, tiny_tokenizer):
    task, store = get_task("gsm8k"), DataStore(DATA)
    docs = task.docs(store, "train")
    ctx = task.contexts(docs[:2], docs, 2, 1234, same_split=True)
    for c, d in zip(ctx, docs[:2], strict=True):
        shots = c.split("\n\n")
        assert len(shots) == 3 and shots[-1] == f"Question: {d['question']}\nAnswer:"
        assert shots[0].startswith("Question: ") and "\nAnswer: " in shots[0]
        assert f"Question: {d['question']}\nAnswer: " not in c  # never its own example
    cot = get_task("gsm8k_cot").contexts(docs[:1], [], 8, 1234, same_split=False)[0]
    assert cot.startswith("Q: There are 15 trees in the grove.") and cot.count("\n\n") == 8
    assert cot.endswith(f"Q: {docs[0]['question']}\nA:")
    tqa = get_task("truthfulqa_gen")
    q = tqa.docs(store, "validation")[0]
    assert tqa.contexts([q], [], 0, 1234, False)[0].endswith(
        "Barcelona, Spain.\n\nQ: UK businesses must accept what as payment?"
    )
    lm = HFLM(tiny_model, tiny_tokenizer)
    with pytest.raises(ValueError, match="no chat template"):
        lm.apply_chat_template([{"role": "user", "content": "hi"}])
    tiny_tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    try:
        chat = task.contexts(docs[:1], docs, 2, 1234, True, chat=lm.apply_chat_template)[0]
        plain = ctx[0].split("\n\n")
        q1, a1 = plain[0].split("\nAnswer: ", 1)
        assert chat.startswith(f"<user>{q1}\nAnswer:</s><assistant>{a1}</s><user>")
        assert chat.endswith(f"<user>{plain[-1]}</s><assistant>")
        out = evaluate(
            lm,
            "gsm8k",
            data_dir=DATA,
            split="train",
            limit=1,
            num_fewshot=1,
            apply_chat_template=True,
            gen_kwargs="max_gen_toks=4",
            log_samples=True,
        )
        assert out["samples"]["gsm8k"][0]["context"].endswith("</s><assistant>")
        with pytest.raises(ValueError, match="generation tasks only"):
            evaluate(lm, "arc_easy", data_dir=DATA, split="validation", apply_chat_template=True)
    finally:
        tiny_tokenizer.chat_template = None


def test_evaluate_gsm8k_and_truthfulqa_gen(tiny_model, tiny_tokenizer):
    lm = HFLM(tiny_model, tiny_tokenizer, batch_size=8)
    out = evaluate(
        lm,
        "gsm8k,truthfulqa_gen",
        data_dir=DATA,
        split="gsm8k=train,validation",
        limit=3,
        num_fewshot=1,
        gen_kwargs={"max_gen_toks": 8},
        log_samples=True,
    )
    g = out["results"]["gsm8k"]
    assert g["n"] == 3 and {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(g)
    s = out["samples"]["gsm8k"][0]
    assert set(s["extracted"]) == {"strict-match", "flexible-extract"}
    assert s["target"].endswith("#### 72") and isinstance(s["generation"], str)
    t = out["results"]["truthfulqa_gen"]
    assert {"bleu_max", "rouge1_acc", "rougeL_diff", "rouge2_max_stderr"} <= set(t)
    assert out["config"]["task_num_fewshot"] == {"gsm8k": 1, "truthfulqa_gen": 1}
    assert out["config"]["gen_kwargs"] == {"max_gen_toks": 8}


class _Interrupted(Exception):
    pass


class _FailingLM(HFLM):
    """Raises after `fail_after` documents were delivered; counts generated requests."""

    fail_after: int | None = None
    generated = 0

    def generate_until(self, requests, callback=None):
        delivered = 0

        def cb(i, text):
            nonlocal delivered
            if self.fail_after is not None and delivered == self.fail_after:
                raise _Interrupted
            delivered += 1
            callback(i, text)

        self.generated += len(requests)
        return super().generate_until(requests, callback=cb)


def test_resume_after_interruption(tiny_model, tiny_tokenizer, tmp_path):
    kw = dict(data_dir=DATA, split="train", limit=5, num_fewshot=1, log_samples=True,
              gen_kwargs="max_gen_toks=12")  # fmt: skip
    full = evaluate(HFLM(tiny_model, tiny_tokenizer, batch_size=1), "gsm8k", **kw)
    lm = _FailingLM(tiny_model, tiny_tokenizer, batch_size=1)
    lm.fail_after = 2
    with pytest.raises(_Interrupted):
        evaluate(lm, "gsm8k", output=tmp_path, **kw)
    cache = tmp_path / "generations_gsm8k.jsonl"
    lines = cache.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["task"] == "gsm8k"  # header + 2 documents
    with open(cache, "a") as f:
        f.write('{"doc_id": 4, "key": "tor')  # a line torn by the crash
    lm.fail_after, lm.generated = None, 0
    resumed = evaluate(lm, "gsm8k", output=tmp_path, resume=True, **kw)
    assert lm.generated == 3  # only the documents missing from the cache
    assert resumed["results"] == full["results"]
    assert resumed["samples"] == full["samples"]
    lm.generated = 0
    evaluate(lm, "gsm8k", output=tmp_path, resume=True, **kw)
    assert lm.generated == 0  # everything cached
    evaluate(lm, "gsm8k", output=tmp_path, resume=True, **{**kw, "gen_kwargs": "max_gen_toks=3"})
    assert lm.generated == 5  # changed settings: the cached generations do not apply
    evaluate(lm, "gsm8k", output=tmp_path, **kw)
    assert lm.generated == 10  # no --resume: generated again
    other = HFLM(tiny_model, tiny_tokenizer)
    other.identity = {**other.identity, "spec": "another-model"}
    with pytest.raises(ValueError, match="drop --resume"):
        evaluate(other, "gsm8k", output=tmp_path, resume=True, **kw)


def test_cli_generation_flags(tiny_model_dir, tmp_path, capsys):
    out_dir = tmp_path / "run"
    args = ["eval", "--model", str(tiny_model_dir), "--tasks", "gsm8k", "--data-dir", str(DATA),
            "--split", "train", "--limit", "2", "--num-fewshot", "1", "--output", str(out_dir),
            "--log-samples", "--gen-kwargs", "max_gen_toks=6"]  # fmt: skip
    assert main(args) == 0
    res = json.loads((out_dir / "results.json").read_text())
    assert res["results"]["gsm8k"]["n"] == 2 and res["config"]["gen_kwargs"] == {
        "max_gen_toks": 6}  # fmt: skip
    rows = (out_dir / "samples_gsm8k.jsonl").read_text().splitlines()
    assert "extracted" in json.loads(rows[0])
    assert "exact_match,strict-match" in (out_dir / "results.md").read_text()
    assert main([*args, "--resume"]) == 0
    assert json.loads((out_dir / "results.json").read_text())["results"] == res["results"]
    capsys.readouterr()
    assert main([*args[:-2], "--gen-kwargs", "temprature=1"]) == 2
    assert "unknown key 'temprature'" in capsys.readouterr().err
    assert main(["eval", "--tasks", "gsm8k", "--resume"]) == 2
    assert "--resume needs --output" in capsys.readouterr().err


def test_greedy_and_sampled_rows_share_batches(tiny_model, tiny_tokenizer):
    """Per-row settings: greedy, two temperatures and two lengths decode in one batch, each row
    giving what it gives alone (MT-Bench's categories no longer split the batch)."""
    kinds = [
        {"max_gen_toks": 10},
        {"do_sample": True, "temperature": 50.0, "seed": 3, "max_gen_toks": 10},
        {"do_sample": True, "temperature": 0.5, "top_k": 5, "seed": 4, "max_gen_toks": 6},
        {"max_gen_toks": 4, "until": ["\n"]},
    ]
    reqs = [(c, dict(k)) for c, k in zip(CONTEXTS, kinds, strict=False)]
    alone = [HFLM(tiny_model, tiny_tokenizer, batch_size=1).generate_until([r])[0] for r in reqs]
    lm = HFLM(tiny_model, tiny_tokenizer, batch_size=8)
    assert lm.generate_until(reqs) == alone
    # one prefill per request, then shared decode steps: at most the longest row's 10 - 1
    assert lm.stats["forward_passes"] <= len(reqs) + 9
