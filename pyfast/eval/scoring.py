"""Target-token log-probs from hidden states: the one place evaluation touches the vocabulary.

Only the hidden states at the scored positions reach the lm_head, so the (B, T, V) logits of a
whole batch never exist. In float32 the fused ``pyfast.ops.linear_token_logprobs`` kernel does the
work; in reduced precision the stock-PyTorch body below keeps lm-evaluation-harness's numerics
(log_softmax in the model dtype), at most (chunk, V) logits at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyfast.hf.head import PLAIN, LogitMap, apply_logit_map
from pyfast.ops import linear_token_logprobs

Tensor = torch.Tensor


def target_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    chunk: int = 512,
    logit_map: LogitMap = PLAIN,
) -> tuple[Tensor, Tensor]:
    """log p(target) and is-argmax at N positions.

    Args:
        hidden: (N, H) final hidden states (after the model's last norm), model dtype.
        weight: (V, H) lm_head weight; bias: optional (V,).
        targets: (N,) int64 token ids in [0, V).
        chunk: rows per matmul, bounding the transient logits to (chunk, V).
        logit_map: the model's transform of its head's output (:mod:`pyfast.hf.head`).

    Returns:
        logprob: (N,) float32, log_softmax(hidden @ weight.T + bias)[target] (float32 models:
        the fused kernel; others: computed in the model dtype like lm-evaluation-harness, then
        widened);
        is_argmax: (N,) bool, whether the target is the argmax of the logits.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"target_logprobs: hidden must be (N, H) and targets (N,), got "
            f"{tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    if hidden.dtype == torch.float32:
        # The fused kernel: one pass per vocabulary chunk, no (N, V) logits, fp32 accumulation.
        logprob, is_argmax, _ = linear_token_logprobs(
            hidden, weight, targets, bias, scale=logit_map.scale, softcap=logit_map.softcap
        )
        return logprob, is_argmax
    # Reduced precision: log_softmax in the model dtype, as lm-evaluation-harness computes it.
    n = hidden.shape[0]
    logprob = torch.empty(n, dtype=torch.float32, device=hidden.device)
    is_argmax = torch.empty(n, dtype=torch.bool, device=hidden.device)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        logits = apply_logit_map(F.linear(hidden[start:end], weight, bias), logit_map)  # (c, V)
        tgt = targets[start:end].unsqueeze(-1)
        logprob[start:end] = F.log_softmax(logits, dim=-1).gather(-1, tgt).squeeze(-1).float()
        is_argmax[start:end] = logits.argmax(dim=-1) == tgt.squeeze(-1)
    return logprob, is_argmax


def shared_target_logprobs(
    hidden: Tensor,
    weight: Tensor,
    rows: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    chunk: int = 512,
    logit_map: LogitMap = PLAIN,
) -> tuple[Tensor, Tensor]:
    """:func:`target_logprobs` of P (row, target) pairs over N hidden rows, where a row may
    carry several targets (the position before a question's choices predicts the first token
    of each): its normaliser over the vocabulary is computed once.

    Args:
        hidden: (N, H) final hidden states; weight, bias: the lm_head.
        rows: (P,) int64 row of each pair; targets: (P,) int64 token ids. Pairs are distinct.

    Returns:
        logprob (P,) float32 and is_argmax (P,) bool, as :func:`target_logprobs`. Rows with one
        target go through it; rows with more get their logits (chunk, V) at a time, one
        logsumexp (float32; log_softmax in the model dtype otherwise) and one argmax each.
    """
    n, p = hidden.shape[0], rows.shape[0]
    if hidden.dim() != 2 or rows.shape != targets.shape or rows.dim() != 1:
        raise ValueError(
            f"shared_target_logprobs: hidden must be (N, H), rows and targets (P,), got "
            f"{tuple(hidden.shape)}, {tuple(rows.shape)} and {tuple(targets.shape)}"
        )
    logprob = torch.empty(p, dtype=torch.float32, device=hidden.device)
    is_argmax = torch.empty(p, dtype=torch.bool, device=hidden.device)
    many = torch.bincount(rows, minlength=n) > 1  # (N,)
    single = ~many[rows]  # (P,)
    if bool(single.any()):
        logprob[single], is_argmax[single] = target_logprobs(
            hidden[rows[single]], weight, targets[single], bias, chunk, logit_map
        )
    multi = many.nonzero().squeeze(1)  # rows with several targets
    if multi.numel():
        local = torch.full((n,), -1, dtype=torch.long, device=hidden.device)
        local[multi] = torch.arange(multi.numel(), device=hidden.device)
        pair = (~single).nonzero().squeeze(1)  # (Q,) pairs of those rows
        at = local[rows[pair]]  # (Q,) their rows among `multi`
        for start in range(0, multi.numel(), chunk):
            sel = (at >= start) & (at < start + chunk)
            q, r = pair[sel], at[sel] - start
            logits = F.linear(hidden[multi[start : start + chunk]], weight, bias)
            logits = apply_logit_map(logits, logit_map)  # (c, V)
            if logits.dtype == torch.float32:
                lse = torch.logsumexp(logits, dim=-1)
                logprob[q] = logits[r, targets[q]] - lse[r]
            else:
                logprob[q] = F.log_softmax(logits, dim=-1)[r, targets[q]].float()
            is_argmax[q] = logits.argmax(dim=-1)[r] == targets[q]
    return logprob, is_argmax
