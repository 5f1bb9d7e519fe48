"""Per-sequence log-probs of chosen and rejected answers, through the fused log-prob kernel.

Chosen and rejected rows go through the model in one forward (a (2B, T) batch from
:func:`pyfast.align.data.collate_pairs`). Only the hidden states of answer tokens reach the head:
they are gathered into an (M, D) matrix and scored by
:func:`pyfast.ops.linear_token_logprobs` against the lm_head weight, so neither the (2B, T, V)
logits nor a full-vocabulary log-softmax ever exists, and prompt/padding rows cost no head work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pyfast.align.data import IGNORE_INDEX
from pyfast.ops import linear_token_logprobs
from pyfast.ops.token_logprobs import _check_plain_head
from pyfast.train.recipe import causal_lm_hidden

Tensor = torch.Tensor


@dataclass
class PairLogps:
    """Summed answer log-probs and answer lengths, (B,) each, for chosen and rejected."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor

    def averaged(self) -> tuple[Tensor, Tensor]:
        """Token-averaged log-probs (log pi(y|x) / |y|), as IPO, SimPO and ORPO use."""
        return (
            self.chosen / self.chosen_tokens.clamp(min=1),
            self.rejected / self.rejected_tokens.clamp(min=1),
        )

    def nll_chosen(self) -> Tensor:
        """Mean next-token NLL over all chosen answer tokens of the batch (ORPO's SFT term)."""
        return -self.chosen.sum() / self.chosen_tokens.sum().clamp(min=1)


def pair_logps(model: torch.nn.Module, batch: dict[str, Tensor]) -> PairLogps:
    """Summed log pi(answer | prompt) of every row of a (2B, T) pair batch, differentiable.

    `model` is a Hugging Face causal LM (or a peft model wrapping one) with a plain linear head.
    """
    _check_plain_head(model)
    hidden = causal_lm_hidden(model, batch["input_ids"], batch["attention_mask"])  # (2B, T, D)
    shifted = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # (2B, T): token t + 1
    scored = shifted != IGNORE_INDEX
    rows = scored.nonzero()[:, 0]  # (M,) row of each scored token
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    h = hidden[scored]  # (M, D)
    if h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    logprobs, _, _ = linear_token_logprobs(h, weight, shifted[scored], bias)  # (M,)
    n = hidden.shape[0]
    sums = torch.zeros(n, dtype=logprobs.dtype, device=logprobs.device).index_add(0, rows, logprobs)
    counts = scored.sum(-1)
    b = n // 2
    return PairLogps(sums[:b], sums[b:], counts[:b], counts[b:])


def pair_rewards(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Scalar rewards (B,) of chosen and rejected rows: the model's new scalar head
    (``score_head``, see :func:`pyfast.train.freeze.add_scalar_head`) on each row's last real
    token's hidden state (rows are right-padded). Differentiable; float32.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "score_head", None)
    if head is None:
        raise ValueError("reward model: the model has no scalar head (set freeze.new_head=scalar)")
    hidden = causal_lm_hidden(model, batch["input_ids"], batch["attention_mask"])  # (2B, T, D)
    last = batch["attention_mask"].sum(-1).clamp(min=1) - 1  # (2B,)
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (2B, D)
    r = head(h.to(head.weight.dtype)).squeeze(-1).float()
    b = r.shape[0] // 2
    return r[:b], r[b:]
