"""HFLM: lm-eval-equal log-likelihoods, shared contexts, batch-size independence, errors."""

from __future__ import annotations

import copy

import pytest
import torch

from pyfast.eval import HFLM
from pyfast.eval.model import _Group, _layout, _packs
from pyfast.eval.scoring import shared_target_logprobs, target_logprobs

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
    """Short unrelated contexts are packed side by side into one row as separate tries (their
    values equal the plain pass: test above)."""
    groups = lm._groups(REQUESTS)
    packs = _packs(groups, lm.row_tokens)
    assert len(packs) < len(groups) and max(len(p) for p in packs) > 2
    assert all(len(_layout(p).ids) <= lm.row_tokens for p in packs if len(p) > 1)


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
    for bad in (-1, "256", 2.5):
        with pytest.raises(ValueError, match="subtree_tokens must be an integer >= 0"):
            HFLM(tiny_model, tiny_tokenizer, subtree_tokens=bad)
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


def test_token_trie_shares_prefixes_and_first_words(tiny_model, tiny_tokenizer):
    """Documents sharing a few-shot prefix, and choices sharing their first words, are one
    token trie: every shared token once (and its head row once); every log-likelihood equals
    the plain causal pass, whatever the pass budget and subtree size."""
    reqs = [
        (FEWSHOT + f"Question: {q}\nAnswer:", choice)
        for q in ("Which gas do plants absorb?", "What do leaves need?", "Why are roots long?")
        for choice in (" carbon dioxide", " carbon monoxide gas", " light and water", " A")
    ]
    lm = HFLM(tiny_model, tiny_tokenizer, batch_size=2)
    (pack,) = _packs(lm._groups(reqs), 4096)
    lay = _layout(pack)
    prefix = lm.encode_pair(reqs[0][0], reqs[0][1])[0]
    pairs = [lm.encode_pair(c, x) for c, x in reqs]
    inputs = {tuple(ctx + cont[:k]) for ctx, cont in pairs for k in range(len(cont))}
    distinct = {s[:n] for s in inputs for n in range(1, len(s) + 1)}
    assert len(lay.ids) == len(distinct)  # one position per distinct input prefix
    unpacked = sum(len(c) + len(x) - 1 for c, x in pairs)
    assert len(lay.ids) < unpacked / 4 and len(pack) == 3
    assert sum(p == 0 for p in lay.pos) == 1 and len(prefix) > 40  # one root: the shared prefix
    carbon = [i for i, (_, c) in enumerate(reqs) if "carbon" in c]
    assert len(carbon) == 6
    for i, j in zip(carbon[::2], carbon[1::2], strict=True):  # " carbon": one scored pair
        assert lay.pairs[lay.index.index(i)][0] == lay.pairs[lay.index.index(j)][0]
    want = [naive_loglikelihood(tiny_model, tiny_tokenizer, c, x, 512) for c, x in reqs]
    for budget, subtree in ((4096, 0), (4096, 256), (4096, 10_000), (64, 0)):
        lm = HFLM(tiny_model, tiny_tokenizer, batch_size=1, row_tokens=budget,
                  subtree_tokens=subtree)  # fmt: skip
        for (lp, greedy), (want_lp, want_greedy) in zip(lm.loglikelihood(reqs), want, strict=True):
            assert lp == pytest.approx(want_lp, rel=1e-5, abs=1e-4)
            assert greedy == want_greedy


def test_packs_cut_at_the_weakest_link():
    """A full pass is cut where its groups share least (between two 'subjects'), not inside the
    next subject's run of groups, whose long shared prefix then runs once."""
    root = [1, 2, 3]
    prefixes = [root + [10] * 40 + [20 + i] for i in range(3)]
    prefixes += [root + [11] * 40 + [30 + i] for i in range(3)]
    groups = [_Group(p, [[5, 6]], [i]) for i, p in enumerate(prefixes)]
    packs = _packs(groups, 93)
    assert [[g.index[0] for g in pack] for pack in packs] == [[0, 1, 2], [3, 4, 5]]
    assert sum(len(_layout(p).ids) for p in packs) == 2 * (43 + 3 * 2)  # once per subject
    assert [[g.index[0] for g in pack] for pack in _packs(groups, 200)] == [[0, 1, 2, 3, 4, 5]]


def test_shared_target_logprobs_equal_one_row_per_target():
    """Rows carrying several targets get one normaliser each; every pair equals
    target_logprobs on the row repeated per target (float32 and bfloat16)."""
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(9, 16), torch.randn(97, 16), torch.randn(97)
    rows = torch.tensor([0, 1, 1, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8])
    targets = torch.randint(0, 97, rows.shape)
    targets[1:4] = torch.tensor([5, 6, 7])
    targets[2] = (hidden[1] @ weight.T + bias).argmax()  # a greedy target among several
    targets[9:11] = torch.tensor([11, 12])
    for dtype in (torch.float32, torch.bfloat16):
        h, w, b = hidden.to(dtype), weight.to(dtype), bias.to(dtype)
        lp, arg = shared_target_logprobs(h, w, rows, targets, b, chunk=2)
        want_lp, want_arg = target_logprobs(h[rows], w, targets, b)
        torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-5)
        assert torch.equal(arg, want_arg) and bool(arg[2])
    with pytest.raises(ValueError, match="rows and targets"):
        shared_target_logprobs(hidden, weight, rows, targets[:-1])


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
    seg = HFLM(tiny_model, tiny_tokenizer, batch_size=2, row_tokens=64)
    rows = HFLM(tiny_model, tiny_tokenizer, batch_size=2, row_tokens=64, segments=False)
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


def test_packed_linear_weights_same_scores_model_left_as_it_was(
    tiny_model, tiny_tokenizer, monkeypatch
):
    from torch import nn

    from pyfast.ops import packed_linear

    if packed_linear.packing_unavailable() is not None:
        pytest.skip(packed_linear.packing_unavailable())
    monkeypatch.setattr(packed_linear, "_MIN_MACS", 0)  # the tiny model's calls are small
    packed = HFLM(tiny_model, tiny_tokenizer, batch_size=4)
    plain = HFLM(tiny_model, tiny_tokenizer, batch_size=4, pack_weights=False)
    assert packed.identity["linear_weights"].startswith("oneDNN-packed float32 weights for 15 ")
    assert plain.identity["linear_weights"] == "off (asked)"
    for (a, ga), (b, gb) in zip(
        packed.loglikelihood(REQUESTS), plain.loglikelihood(REQUESTS), strict=True
    ):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5) and ga == gb
    gen = [("Question: Which gas do plants absorb?\nAnswer:", {"until": ["\n"], "max_gen_toks": 6})]
    assert packed.generate_until(gen) == plain.generate_until(gen)
    # the packs were used (body and head: generation calls the head module) ...
    assert packed._linears.packed_bytes >= sum(
        m.weight.numel() * 4 for m in tiny_model.modules() if type(m) is nn.Linear
    )
    # ... and the in-memory model keeps its own forwards afterwards
    assert not any("forward" in m.__dict__ for m in tiny_model.modules() if type(m) is nn.Linear)
    with pytest.raises(ValueError, match="packed linear weights asked for, but the model has no"):
        HFLM(copy.deepcopy(tiny_model).to(torch.bfloat16), tiny_tokenizer, pack_weights=True)
