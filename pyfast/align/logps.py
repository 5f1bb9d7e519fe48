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
from pyfast.ops.token_logprobs import _check_plain_head, _decoder

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


def decoder_hidden(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The decoder body's last hidden states (2B, T, D) (no head, no logits)."""
    out = _decoder(model)(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    )
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def pair_logps(model: torch.nn.Module, batch: dict[str, Tensor]) -> PairLogps:
    """Summed log pi(answer | prompt) of every row of a (2B, T) pair batch, differentiable.

    `model` is a Hugging Face causal LM (or a peft model wrapping one) with a plain linear head.
    """
    _check_plain_head(model)
    hidden = decoder_hidden(model, batch)  # (2B, T, D)
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


class RewardModel(torch.nn.Module):
    """A causal LM's decoder body plus a new scalar head: r(x, y) from the last token's state.

    Transfer learning with a newly added layer: the head ``score`` (D -> 1, no bias) is freshly
    initialised (normal, std = the model's ``initializer_range`` or 0.02); the body's lm_head is
    kept (unused) so that :meth:`lm` saves and reloads as an ordinary causal LM.
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm
        dim = lm.get_input_embeddings().weight.shape[1]
        param = next(lm.parameters())
        self.score = torch.nn.Linear(dim, 1, bias=False, dtype=param.dtype, device=param.device)
        std = getattr(getattr(lm, "config", None), "initializer_range", 0.02) or 0.02
        torch.nn.init.normal_(self.score.weight, std=std)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Rewards (N,) of right-padded sequences (N, T): the head on each last real token."""
        hidden = decoder_hidden(self.lm, {"input_ids": input_ids, "attention_mask": attention_mask})
        last = attention_mask.sum(-1).clamp(min=1) - 1  # (N,)
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (N, D)
        return self.score(h.to(self.score.weight.dtype)).squeeze(-1).float()

    def pair_rewards(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        r = self(batch["input_ids"], batch["attention_mask"])
        b = r.shape[0] // 2
        return r[:b], r[b:]
