"""Per-sequence log-probs of chosen and rejected answers, through the fused log-prob kernel.

Two batch layouts, one result (:class:`PairLogps`):

- concatenated (:func:`pyfast.align.data.collate_pairs`): chosen and rejected rows, each prompt +
  answer, go through the model in one (2B, T) forward;
- shared prompt (:func:`pyfast.align.data.collate_shared_prompt`, the recipe's default): each
  prompt runs once for both answers, so its tokens cost once instead of twice, forward and
  backward. On transformers' "sdpa" attention the batch runs as one unpadded row of trees (a
  prompt, then each answer), attention per tree part (:mod:`pyfast.ops.segments`); otherwise
  the prompts run as (B, P) and their key/value cache is repeated for the two answers, which
  run as one (2B, A) forward on top of it (gradients flow through the cache).

Either way only the hidden states of answer tokens reach the head: they are gathered into an
(M, D) matrix and scored by :func:`pyfast.ops.linear_token_logprobs` against the lm_head weight,
so neither the logits nor a full-vocabulary log-softmax ever exists, and prompt/padding rows cost
no head work.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pyfast.align.data import IGNORE_INDEX
from pyfast.hf.head import logit_map
from pyfast.hf.packing import decoder_hidden, prepare_segments
from pyfast.ops import linear_token_logprobs
from pyfast.ops.segments import trie_attention
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


def _head_sums(model: torch.nn.Module, h: Tensor, targets: Tensor, rows: Tensor, n: int) -> Tensor:
    """Log-probs of `targets` (M,) through the model's head from the hidden states `h` (M, D)
    that predict them, summed into `n` rows by `rows` (M,)."""
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    if h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    m = logit_map(model)  # the model's softcap / scale of its head's output
    logprobs, _, _ = linear_token_logprobs(
        h, weight, targets, bias, scale=m.scale, softcap=m.softcap
    )  # (M,)
    return torch.zeros(n, dtype=logprobs.dtype, device=logprobs.device).index_add(0, rows, logprobs)


def _score(model: torch.nn.Module, hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed log-probs (N,) and scored-token counts (N,) of `labels` (N, T) given the hidden
    states (N, T, D) that predict them (IGNORE_INDEX: not scored)."""
    scored = labels != IGNORE_INDEX
    rows = scored.nonzero()[:, 0]  # (M,) row of each scored token
    sums = _head_sums(model, hidden[scored], labels[scored], rows, hidden.shape[0])
    return sums, scored.sum(-1)


def _shared_prompt_logps(model: torch.nn.Module, batch: dict[str, Tensor]) -> PairLogps:
    from transformers import DynamicCache

    if (
        model.training
        and torch.is_grad_enabled()
        and getattr(model, "is_gradient_checkpointing", False)
    ):
        # transformers' checkpointed layers run without the cache: the answers would not see
        # their prompt and the log-probs would be silently wrong
        raise ValueError(
            "pair_logps: the shared-prompt layout needs the key/value cache, which gradient "
            "checkpointing disables; collate with pyfast.align.data.collate_pairs instead"
        )

    body = model.get_decoder()
    # transformers 5.x renames past_key_values to cache; the cache object is updated in place.
    key = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
    cache = DynamicCache()
    pmask, amask = batch["prompt_mask"], batch["answer_mask"]  # (B, P), (2B, A)
    ppos = (pmask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at each prompt
    out = body(input_ids=batch["prompt_ids"], attention_mask=pmask, position_ids=ppos,
               use_cache=True, **{key: cache})  # fmt: skip
    cache.batch_repeat_interleave(2)  # (2B, ...): rows 2i, 2i + 1 continue prompt i
    a_len = amask.shape[1]
    start = pmask.sum(-1).repeat_interleave(2)  # (2B,) first answer position
    apos = start[:, None] + torch.arange(a_len, device=start.device)[None]  # (2B, A)
    mask = torch.cat([pmask.repeat_interleave(2, 0), amask], 1)  # (2B, P + A)
    h_ans = body(input_ids=batch["answer_ids"], attention_mask=mask, position_ids=apos,
                 use_cache=True, **{key: cache}).last_hidden_state  # (2B, A, D)  # fmt: skip
    # Answer token 0 is predicted by the prompt's last state, token t by the answer's state t - 1.
    first = out.last_hidden_state[:, -1:].repeat_interleave(2, 0)  # (2B, 1, D)
    hidden = torch.cat([first, h_ans[:, :-1]], 1)  # (2B, A, D)
    labels = batch["answer_ids"].masked_fill(amask == 0, IGNORE_INDEX)
    sums, counts = _score(model, hidden, labels)
    return PairLogps(sums[0::2], sums[1::2], counts[0::2], counts[1::2])


def _tree_logps(model: torch.nn.Module, batch: dict[str, Tensor]) -> PairLogps:
    """The shared-prompt batch as one unpadded row of trees: per pair its prompt, then the
    chosen and the rejected answer but their last tokens, position ids continuing the prompt;
    attention per tree part (:func:`pyfast.ops.segments.trie_attention`, cut at every branch):
    the prompt causally over itself, each answer over the prompt and causally over itself. The
    last layer's MLP runs only at the positions that predict answer tokens."""
    pmask, amask = batch["prompt_mask"].bool(), batch["answer_mask"].bool()
    ids, pos, end, where, targets, owner = [], [], [], [], [], []
    t = 0
    for i in range(pmask.shape[0]):
        prompt = batch["prompt_ids"][i][pmask[i]]
        n = prompt.numel()
        ids.append(prompt)
        pos.append(torch.arange(n))
        p0, t = t, t + n
        for j in (2 * i, 2 * i + 1):
            answer = batch["answer_ids"][j][amask[j]]
            m = answer.numel()
            if m == 0:
                continue
            # answer token 0 is predicted at the prompt's last position, token k at its k - 1
            where += [p0 + n - 1, *range(t, t + m - 1)]
            targets.append(answer)
            owner += [j] * m
            ids.append(answer[:-1])
            pos.append(torch.arange(n, n + m - 1))
            end += [t + m - 1] * (m - 1)  # an answer: a chain below the prompt
            t += m - 1
        end[p0:p0] = [t] * n  # the prompt: the root of this pair's subtree
    dev = batch["prompt_ids"].device
    attention = trie_attention(end, 0, dev)
    rows, at = torch.unique(torch.tensor(where), return_inverse=True)
    hidden = decoder_hidden(
        model, torch.cat(ids).to(dev), torch.cat(pos).to(dev), attention,
        "call pair_logps(..., trees=False)", rows.to(dev),
    )[at.to(dev)]  # (M, D)  # fmt: skip
    owner_t = torch.tensor(owner, device=dev)
    sums = _head_sums(model, hidden, torch.cat(targets).to(dev), owner_t, amask.shape[0])
    counts = amask.sum(-1)
    return PairLogps(sums[0::2], sums[1::2], counts[0::2], counts[1::2])


def pair_logps(
    model: torch.nn.Module, batch: dict[str, Tensor], trees: bool | None = None
) -> PairLogps:
    """Summed log pi(answer | prompt) of chosen and rejected answers of a pair batch (either
    layout, see the module docstring), differentiable.

    `model` is a Hugging Face causal LM (or a peft model wrapping one) with a linear head (its
    softcap / scale as :mod:`pyfast.hf.head` maps them). A shared-prompt batch runs as one
    unpadded row of prompt trees (:func:`_tree_logps`) where `trees` is True, or None and the
    model is on transformers' "sdpa" attention without sliding windows; otherwise prompts
    run once and their key/value cache is repeated for the answers.
    """
    if "prompt_ids" in batch:
        if trees is None:
            trees = prepare_segments(model) is None
        elif trees:
            prepare_segments(model)
        if trees:
            return _tree_logps(model, batch)
        return _shared_prompt_logps(model, batch)
    hidden = causal_lm_hidden(model, batch["input_ids"], batch["attention_mask"])  # (2B, T, D)
    shifted = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # (2B, T): token t + 1
    sums, counts = _score(model, hidden, shifted)
    b = hidden.shape[0] // 2
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
