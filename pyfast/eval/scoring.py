"""Target-token log-probs from hidden states: the one place evaluation touches the vocabulary.

Only the hidden states at the scored positions reach the lm_head, so the (B, T, V) logits of a
whole batch never exist. In float32 the fused ``pyfast.ops.linear_token_logprobs`` kernel does the
work; in reduced precision the stock-PyTorch body below keeps lm-evaluation-harness's numerics
(log_softmax in the model dtype), at most (chunk, V) logits at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyfast.ops import linear_token_logprobs

Tensor = torch.Tensor


def target_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None, chunk: int = 512
) -> tuple[Tensor, Tensor]:
    """log p(target) and is-argmax at N positions.

    Args:
        hidden: (N, H) final hidden states (after the model's last norm), model dtype.
        weight: (V, H) lm_head weight; bias: optional (V,).
        targets: (N,) int64 token ids in [0, V).
        chunk: rows per matmul, bounding the transient logits to (chunk, V).

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
        logprob, is_argmax, _ = linear_token_logprobs(hidden, weight, targets, bias)
        return logprob, is_argmax
    # Reduced precision: log_softmax in the model dtype, as lm-evaluation-harness computes it.
    n = hidden.shape[0]
    logprob = torch.empty(n, dtype=torch.float32, device=hidden.device)
    is_argmax = torch.empty(n, dtype=torch.bool, device=hidden.device)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        logits = F.linear(hidden[start:end], weight, bias)  # (c, V)
        tgt = targets[start:end].unsqueeze(-1)
        logprob[start:end] = F.log_softmax(logits, dim=-1).gather(-1, tgt).squeeze(-1).float()
        is_argmax[start:end] = logits.argmax(dim=-1) == tgt.squeeze(-1)
    return logprob, is_argmax
