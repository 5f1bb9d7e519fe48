"""The stock model as the oracle: sequence log-probs and eval log-likelihoods from
``model(ids).logits`` and ``log_softmax``, shared by the tests of pyfast.hf."""

import pytest
import torch
import torch.nn.functional as F


def stock_sums(model, ids, mask, labels):
    """Per-row sum of log p(label) over the labelled next tokens, from the full logits."""
    logp = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    tgt = labels[:, 1:]
    lp = logp[:, :-1].gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(tgt != -100, lp, 0).sum(-1)


def assert_loglikelihoods(got, requests, model, tokenizer, tol: float):
    """`got` [(logprob, is_greedy)] equals the stock forward's for each (context, continuation):
    logprob within `tol` (relative and absolute), the same greedy flag."""
    for (ctx, cont), (lp, greedy) in zip(requests, got, strict=True):
        c = tokenizer(ctx)["input_ids"]
        t = tokenizer(ctx + cont)["input_ids"]
        n = len(t) - len(c)
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=torch.tensor([t])).logits[0].float(), -1)
        target = torch.tensor(t[-n:])
        rows = logp[len(t) - n - 1 : len(t) - 1]
        want = float(rows.gather(-1, target[:, None]).sum())
        assert lp == pytest.approx(want, rel=tol, abs=tol), (ctx, cont)
        assert greedy == bool((rows.argmax(-1) == target).all()), (ctx, cont)


def sft_batch(vocab: int, seed=1, b=2, t=12):
    """(ids, attention_mask, labels): random tokens, row 1 right-padded by 3, a 4-token prompt
    and the padding labelled -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, -3:] = 0  # a right-padded row
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    labels[mask == 0] = -100
    return ids, mask, labels
