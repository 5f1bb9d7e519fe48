"""The language-model head of a Hugging Face causal LM as pyfast's fused kernels compute it.

pyfast never forms a model's (B, T, V) logits: the decoder body gives hidden states and
:func:`pyfast.ops.linear_token_logprobs` / :func:`pyfast.ops.linear_cross_entropy` take them
with the lm_head weight. Some families transform the head's output before the softmax, and
that transform must reach the kernels or every loss and score is silently different:

- Gemma-2 / Gemma-3 (and Gemma-4, nanochat): ``softcap * tanh(logits / softcap)``
  (``config.final_logit_softcapping``);
- Granite (and its MoE / hybrid variants): ``logits / config.logits_scaling``;
- Cohere / Cohere2: ``logits * config.logit_scale``.

The same config key does not mean the same transform in every family (HyperCLOVA X multiplies by
``logits_scaling``, Granite divides), so the map comes from an allow-list of model types
(:data:`_KNOWN`); a model type outside it is taken as a plain head only where its config has
none of the keys that families use for a transform. :func:`check_head` then checks the map
numerically against ``model(ids).logits`` on a few tokens, once per model, and refuses (one
ValueError naming the model type and the difference) where they disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pyfast.ops.token_logprobs import _mean_nll, linear_token_logprobs

Tensor = torch.Tensor


@dataclass(frozen=True)
class LogitMap:
    """``z = (hidden @ W.T + b) * scale``; then, with a softcap, ``softcap * tanh(z / softcap)``
    — the arguments of the fused head kernels."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def plain(self) -> bool:
        return self.scale == 1.0 and self.softcap is None


PLAIN = LogitMap()  # logits = hidden @ W.T + b


def _softcap(cfg) -> LogitMap:
    cap = getattr(cfg, "final_logit_softcapping", None)
    return LogitMap(softcap=float(cap) if cap else None)


def _divide(cfg) -> LogitMap:
    return LogitMap(scale=1.0 / float(cfg.logits_scaling))


def _multiply(cfg) -> LogitMap:
    return LogitMap(scale=float(cfg.logit_scale))


def _plain(cfg) -> LogitMap:
    return PLAIN


# model_type -> how its ForCausalLM maps the lm_head output (read off each family's forward in
# transformers; checked numerically at load by check_head).
_KNOWN = {
    **dict.fromkeys(
        ("llama", "mistral", "ministral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "phi3",
         "olmo", "olmo2", "gemma", "smollm3", "mixtral", "starcoder2", "stablelm", "phi"),
        _plain,
    ),
    **dict.fromkeys(("gemma2", "gemma3", "gemma3_text", "gemma4", "gemma4_text", "nanochat"),
                    _softcap),
    **dict.fromkeys(("granite", "granitemoe", "granitemoeshared", "granitemoehybrid"), _divide),
    **dict.fromkeys(("cohere", "cohere2"), _multiply),
}  # fmt: skip
# Config keys through which families outside _KNOWN may transform their logits.
_TRANSFORM_KEYS = ("final_logit_softcapping", "logits_scaling", "logit_scale",
                   "output_multiplier_scale", "logit_softcapping", "scale_width")  # fmt: skip


def _config(model):
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError(f"{type(model).__name__} has no config: not a Hugging Face model")
    return getattr(cfg, "text_config", None) or cfg


def logit_map(model: torch.nn.Module) -> LogitMap:
    """The :class:`LogitMap` of `model` (a Hugging Face causal LM, or a PEFT / FSDP wrapper
    of one). Raises ValueError for a model type pyfast does not know whose config names a
    logit transform (the fused head would compute other logits than the model)."""
    outer = getattr(model, "config", None)
    cfg = _config(model)
    kind = getattr(outer, "model_type", None)
    rule = _KNOWN.get(kind) or _KNOWN.get(getattr(cfg, "model_type", None))
    if rule is not None:
        return rule(cfg)
    for key in _TRANSFORM_KEYS:
        value = getattr(cfg, key, None)
        if value not in (None, 0, 1, 1.0, False):
            raise ValueError(
                f"pyfast: model type {kind!r} transforms its logits ({key}={value}) in a way "
                "pyfast does not know; its fused head would give other logits than the model"
            )
    return PLAIN


def apply_logit_map(logits: Tensor, m: LogitMap) -> Tensor:
    """The map on full logits (..., V), in their dtype, as the stock forwards apply it."""
    if m.scale != 1.0:
        logits = logits * m.scale
    if m.softcap is not None:
        logits = torch.tanh(logits / m.softcap) * m.softcap
    return logits


@torch.no_grad()
def check_head(model: torch.nn.Module, tokens: int = 6) -> LogitMap:
    """:func:`logit_map` of `model`, checked once: ``model(ids).logits`` on a few tokens must
    equal the map applied to ``hidden @ W.T + b`` from the decoder body (float32: 1e-4 of the
    logits' scale; reduced precision: 2e-2). The verdict is kept on the model
    (``_pyfast_logit_map``). Raises ValueError naming the model type and the difference where
    they disagree: pyfast's losses and scores would silently differ from the model's."""
    cached = getattr(model, "_pyfast_logit_map", None)
    if isinstance(cached, LogitMap):
        return cached
    m = logit_map(model)
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(model).__name__}: no linear output head (get_output_embeddings)")
    cfg = _config(model)
    device = head.weight.device
    n = min(tokens, int(getattr(cfg, "vocab_size", tokens)))
    ids = (torch.arange(n, device=device) * 7919 % max(1, head.weight.shape[0]))[None]  # (1, n)
    was_training = model.training
    model.eval()
    try:
        stock = model(input_ids=ids, use_cache=False).logits.float()  # (1, n, V)
        out = _body(model)(input_ids=ids, use_cache=False)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        mine = apply_logit_map(
            F.linear(hidden.to(head.weight.dtype), head.weight, getattr(head, "bias", None)), m
        ).float()
    finally:
        model.train(was_training)
    tol = 1e-4 if head.weight.dtype in (torch.float32, torch.float64) else 2e-2
    scale = max(1.0, float(stock.abs().max()))
    diff = float((stock - mine).abs().max())
    if not math.isfinite(diff) or diff > tol * scale:
        raise ValueError(
            f"pyfast: the logits of {type(model).__name__} (model type "
            f"{getattr(model.config, 'model_type', None)!r}) are not its head's output mapped by "
            f"{m} (largest difference {diff:.3g} on logits up to {scale:.3g}); pyfast's fused "
            "head would compute other losses and scores, so the model is refused"
        )
    model._pyfast_logit_map = m
    return m


def _body(model: torch.nn.Module) -> torch.nn.Module:
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is None:
        dec = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if dec is None or dec is model:
        raise TypeError(
            f"causal_lm: cannot find the decoder body of {type(model).__name__} (expected "
            "get_decoder() or a base_model_prefix attribute, as Hugging Face causal LMs have)"
        )
    return dec


def causal_lm_token_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,
    labels: Tensor | None = None,
    attention_mask: Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Next-token log-probs of a Hugging Face causal LM through the fused head.

    Runs the decoder body (``model.get_decoder()``), then :func:`linear_token_logprobs` with
    ``model.get_output_embeddings()`` (works with tied embeddings). Labels follow Hugging Face's
    convention: ``labels[:, t]`` is the token at position t, predicted from positions < t (the
    shift happens here); default ``labels = input_ids``.

    Returns:
        logprobs (B, T), is_argmax (B, T), lse (B, T), and the shifted labels (B, T): entry t
        scores token t + 1; the last position (and every ignored label) is ``ignore_index``.
    """
    m = logit_map(model)
    if labels is None:
        labels = input_ids
    out = _body(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state  # (B, T, D)
    head = model.get_output_embeddings()
    shifted = F.pad(labels[:, 1:], (0, 1), value=ignore_index)  # (B, T)
    weight = head.weight
    bias = getattr(head, "bias", None)
    if weight.dtype != hidden.dtype:
        hidden = hidden.to(weight.dtype)
    logprobs, is_argmax, lse = linear_token_logprobs(
        hidden, weight, shifted, bias, ignore_index, scale=m.scale, softcap=m.softcap
    )
    return logprobs, is_argmax, lse, shifted


def causal_lm_loss(
    model: torch.nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    attention_mask: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """``model(input_ids, labels=labels).loss`` (mean next-token NLL over non-ignored labels),
    computed without the (B, T, V) logits."""
    logprobs, _, _, shifted = causal_lm_token_logprobs(
        model, input_ids, labels, attention_mask, ignore_index
    )
    return _mean_nll(logprobs, shifted, ignore_index)
