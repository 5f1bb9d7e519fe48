"""HFLM: lm-eval-equal log-likelihoods, shared contexts, batch-size independence, errors."""

from __future__ import annotations

import pytest
import torch

from pyfast.eval import HFLM
from pyfast.eval.model import _rows, _trees
from pyfast.eval.scoring import target_logprobs

from .conftest import naive_loglikelihood

REQUESTS = [
    ("Question: Which gas do plants absorb?\nAnswer:", " carbon dioxide"),
    ("Question: Which gas do plants absorb?\nAnswer:", " oxygen"),
    ("Question: Which gas do plants absorb?\nAnswer:", " nitrogen from the soil"),
    ("Question: Which gas do plants absorb?\nAnswer: ", "water"),  # trailing space moves over
    ("The following are questions.\n\nWhat is 2+2?\nAnswer:", " A"),
    ("The following are questions.\n\nWhat is 2+2?\nAnswer:", " B"),
    ("Short", " x"),
    ("", "an empty context is conditioned on the prefix token"),
    ("A much longer context " * 6 + "ends here.", " and the end"),
]


@pytest.fixture(scope="module")
def lm(tiny_model, tiny_tokenizer):
    return HFLM(tiny_model, tiny_tokenizer, batch_size=4)


def test_matches_naive_lm_eval_algorithm(lm, tiny_model, tiny_tokenizer):
    got = lm.loglikelihood(REQUESTS)
    for (ctx, cont), (lp, greedy) in zip(REQUESTS, got, strict=True):
        if ctx == "":
            continue  # covered below
        want_lp, want_greedy = naive_loglikelihood(tiny_model, tiny_tokenizer, ctx, cont, 512)
        assert lp == pytest.approx(want_lp, rel=1e-5, abs=1e-4)
        assert greedy == want_greedy


def test_unrelated_requests_share_rows_not_attention(lm):
    """Short unrelated contexts are separate trees packed side by side into one row (their
    values equal the plain pass: test above)."""
    trees = _trees(lm._groups(REQUESTS), lm.row_tokens, lm.min_shared)
    rows = _rows(trees, lm.row_tokens)
    assert len(rows) < len(trees) and max(len(r) for r in rows) > 2
    assert all(sum(t.length for t in r) <= lm.row_tokens for r in rows if len(r) > 1)


def test_empty_context_uses_prefix_token(lm, tiny_tokenizer, tiny_model):
    ((lp, _),) = lm.loglikelihood([("", " hello")])
    cont = tiny_tokenizer.encode(" hello", add_special_tokens=False)
    ids = torch.tensor([[tiny_tokenizer.eos_token_id, *cont[:-1]]])
    with torch.no_grad():
        logp = torch.log_softmax(tiny_model(ids).logits[0], -1)
    want = float(logp.gather(-1, torch.tensor(cont)[:, None]).sum())
    assert lp == pytest.approx(want, rel=1e-5)


def test_shared_context_runs_once(lm):
    groups = lm._groups(REQUESTS[:3])
    assert len(groups) == 1 and len(groups[0].conts) == 3


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3, 16, "auto"])
def test_batch_size_independent(tiny_model, tiny_tokenizer, batch_size, packing):
    ref = HFLM(tiny_model, tiny_tokenizer, batch_size=2, packing=False).loglikelihood(REQUESTS)
    lm = HFLM(tiny_model, tiny_tokenizer, batch_size=batch_size, packing=packing)
    got = lm.loglikelihood(REQUESTS)
    for (a, ga), (b, gb) in zip(ref, got, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
        assert ga == gb


def test_left_truncation_like_lm_eval(tiny_model, tiny_tokenizer):
    lm = HFLM(tiny_model, tiny_tokenizer, batch_size=4, max_length=12)
    ctx, cont = REQUESTS[-1]
    ((lp, greedy),) = lm.loglikelihood([(ctx, cont)])
    want_lp, want_greedy = naive_loglikelihood(tiny_model, tiny_tokenizer, ctx, cont, 12)
    assert lp == pytest.approx(want_lp, rel=1e-5)
    assert greedy == want_greedy


def test_errors(tiny_model, tiny_tokenizer, lm):
    with pytest.raises(TypeError, match="tokenizer"):
        HFLM(tiny_model)
    with pytest.raises(ValueError, match="batch size"):
        HFLM(tiny_model, tiny_tokenizer, batch_size=0)
    with pytest.raises(ValueError, match="unknown generation kwarg.*'max_tokenz'"):
        lm.generate_until([("Q:", {"until": ["\n"], "max_tokenz": 3})])
    with pytest.raises(ValueError, match="max_gen_toks 600 must be smaller"):
        lm.generate_until([("Q:", {"max_gen_toks": 600})])


def test_target_logprobs_matches_log_softmax():
    torch.manual_seed(0)
    hidden, weight = torch.randn(37, 16), torch.randn(97, 16)
    targets = torch.randint(0, 97, (37,))
    targets[3] = (hidden[3] @ weight.T).argmax()
    lp, arg = target_logprobs(hidden, weight, targets, chunk=8)
    logits = hidden @ weight.T
    want = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(lp, want)
    assert torch.equal(arg, logits.argmax(-1) == targets) and bool(arg[3])
    with pytest.raises(ValueError, match="hidden must be"):
        target_logprobs(hidden[None], weight, targets)


FEWSHOT = "The following are questions about plants.\n\n" + "".join(
    f"Question: Which part of a plant number {i} grows first?\nAnswer: the root\n\n"
    for i in range(4)
)


def test_packed_prefix_tree_shares_few_shot_prefix(tiny_model, tiny_tokenizer):
    """Documents sharing a few-shot prefix are packed into one row as a tree: the prefix once,
    each question, each choice; every log-likelihood equals the plain causal pass."""
    reqs = [
        (FEWSHOT + f"Question: {q}\nAnswer:", choice)
        for q in ("Which gas do plants absorb?", "What do leaves need?", "Why are roots long?")
        for choice in (" carbon dioxide", " light and water", " A")
    ]
    lm = HFLM(tiny_model, tiny_tokenizer, batch_size=2, min_shared=8)
    trees = _trees(lm._groups(reqs), lm.row_tokens, lm.min_shared)
    assert len(trees) == 1 and len(trees[0].groups) == 3
    assert trees[0].shared >= len(tiny_tokenizer.encode(FEWSHOT)) - 1
    unpacked = sum(len(lm.encode_pair(c, x)[0]) + len(lm.encode_pair(c, x)[1]) for c, x in reqs)
    assert trees[0].length < unpacked / 3
    for (ctx, cont), (lp, greedy) in zip(reqs, lm.loglikelihood(reqs), strict=True):
        want_lp, want_greedy = naive_loglikelihood(tiny_model, tiny_tokenizer, ctx, cont, 512)
        assert lp == pytest.approx(want_lp, rel=1e-5, abs=1e-4)
        assert greedy == want_greedy
    # Without prefix sharing: a tree per document, side by side in one row; the same results.
    small = HFLM(tiny_model, tiny_tokenizer, batch_size=2, min_shared=10_000, row_tokens=2048)
    trees = _trees(small._groups(reqs), 2048, 10_000)
    assert len(trees) == 3 and len(_rows(trees, 2048)) == 1
    for (a, _), (b, _) in zip(small.loglikelihood(reqs), lm.loglikelihood(reqs), strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)


def test_packing_falls_back_where_masks_are_not_custom(tiny_model, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(tiny_model.config, "sliding_window", 64, raising=False)
    assert not HFLM(tiny_model, tiny_tokenizer).packed
    with pytest.raises(ValueError, match="sliding-window"):
        HFLM(tiny_model, tiny_tokenizer, packing=True)


def test_segments_one_unpadded_row_per_pass_same_results(tiny_model, tiny_tokenizer):
    """By default (sdpa attention) a batch is one unpadded row with attention per tree part; the
    padded rows under a dense mask (segments=False) give the same log-likelihoods."""
    reqs = REQUESTS + [
        (FEWSHOT + f"Question: {q}\nAnswer:", choice)
        for q in ("Which gas do plants absorb?", "Why are roots long?")
        for choice in (" carbon dioxide", " A")
    ]
    seg = HFLM(tiny_model, tiny_tokenizer, batch_size=2, row_tokens=64, min_shared=8)
    rows = HFLM(tiny_model, tiny_tokenizer, batch_size=2, row_tokens=64, min_shared=8,
                segments=False)  # fmt: skip
    assert seg.segmented and not rows.segmented
    got, want = seg.loglikelihood(reqs), rows.loglikelihood(reqs)
    for (a, ga), (b, gb) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
        assert ga == gb


def test_segments_fall_back_to_rows_when_a_layer_ignores_them(tiny_model, tiny_tokenizer):
    lm = HFLM(tiny_model, tiny_tokenizer, batch_size=4)
    ref = HFLM(tiny_model, tiny_tokenizer, batch_size=4, segments=False).loglikelihood(REQUESTS)
    forward = lm.body.forward

    def drops_the_keyword(*args, pyfast_segments=None, **kwargs):
        return forward(*args, **kwargs)

    lm.body.forward = drops_the_keyword
    try:
        with pytest.warns(UserWarning, match="did not run segmented attention"):
            got = lm.loglikelihood(REQUESTS)
    finally:
        del lm.body.forward
    assert not lm.segmented
    for (a, ga), (b, gb) in zip(got, ref, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
        assert ga == gb


def test_segments_need_sdpa(tiny_model, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(tiny_model.config, "_attn_implementation", "eager")
    assert not HFLM(tiny_model, tiny_tokenizer).segmented  # packed rows with a dense mask
    with pytest.raises(ValueError, match="segments need 'sdpa' attention, the model runs 'eager'"):
        HFLM(tiny_model, tiny_tokenizer, segments=True)
