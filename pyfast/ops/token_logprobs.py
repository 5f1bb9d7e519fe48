"""Target-token log-probs: from logits, or from hidden states without ever forming the logits.

One op family serves the SFT loss, DPO/ORPO sequence log-probs and multiple-choice scoring:

- :func:`token_logprobs` / :func:`linear_token_logprobs`: per-token ``log p(label)``,
  ``is_argmax`` and the row logsumexp (differentiable through log-probs and lse).
- :func:`sequence_logprobs`: sum per sequence over a continuation mask, plus an all-greedy flag.
- :func:`fused_cross_entropy` / :func:`linear_cross_entropy`: mean NLL over non-ignored tokens.

The Hugging Face side (decoder body, then the fused head with the model's logit map) lives in
:mod:`pyfast.hf.head`.
"""

from __future__ import annotations

import math

import torch

from pyfast._extension import HAS_C
from pyfast.ops import reference
from pyfast.ops._dispatch import use_kernel

Tensor = torch.Tensor

# Logits per whole-row block of linear_token_logprobs_with_grad (kFullRowElems in csrc/cpu and
# csrc/cuda), and how many blocks N * V must hold before the one-pass gradient is taken: on the
# CPU 20, so that the block stays under 5% of the (N, V) logits; on a GPU 2 (at most half),
# because there the recomputing backward's fourth matmul costs a third more time while GPU
# memory is less tight than host memory in CPU fine-tuning.
_FULL_ROW_ELEMS = {"cpu": 8 << 20, "cuda": 64 << 20}
_MIN_BLOCKS = {"cpu": 20, "cuda": 2}


def _check_leading(op: str, x: Tensor, xname: str, labels: Tensor) -> None:
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64:
        got = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f"{op}: labels must be an int64 tensor, got {got}")
    if x.dim() < 1 or tuple(x.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"{op}: labels must have the leading shape of {xname} {tuple(x.shape[:-1])}, got "
            f"{tuple(labels.shape)}"
        )


def token_logprobs(
    logits: Tensor, labels: Tensor, ignore_index: int = -100
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token log p(label), is-argmax flag and logsumexp, in one pass over each row.

    Args:
        logits: (..., V) float32, bfloat16 or float64 (any strides; rows are read in place when
            the last dim is contiguous and the leading dims flatten to a view).
        labels: (...) int64, in [0, V) or equal to ``ignore_index``. Labels are aligned with the
            logits (shift them yourself for next-token prediction).

    Returns:
        logprobs (...) float32 (float64 for float64 logits), is_argmax (...) bool (label is the
        first argmax of its row), lse (...) float32/float64. Ignored positions give 0, False, 0
        and no gradient. Differentiable w.r.t. logits through logprobs and lse.

    Raises:
        TypeError / ValueError / RuntimeError naming ``logits`` or ``labels`` for wrong dtypes,
        shapes or out-of-range labels.
    """
    _check_leading("token_logprobs", logits, "logits", labels)
    lead = labels.shape
    x = logits.reshape(-1, logits.shape[-1])  # (N, V)
    flat = labels.reshape(-1)
    if use_kernel(logits.device):
        out = torch.ops.pyfast.token_logprobs(x, flat, ignore_index)
    else:
        out = reference.token_logprobs(x, flat, ignore_index)
    return tuple(o.view(lead) for o in out)


def _logit_map(op: str, scale: float, softcap: float | None) -> tuple[float, float]:
    """(scale, softcap) as the kernels take them: softcap None -> 0.0 (off)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite number, got {scale!r}")
    if softcap is None:
        return float(scale), 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise ValueError(f"{op}: softcap must be None or a positive number, got {softcap!r}")
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(
            f"{op}: softcap must be None (no soft-capping) or a positive finite number, "
            f"got {softcap!r}"
        )
    return float(scale), float(softcap)


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """token_logprobs of the logits ``z(hidden @ weight.T + bias)``, never forming them.

    ``z(x) = scale * x``, then ``softcap * tanh(z / softcap)`` when ``softcap`` is given: the
    logit transforms of Gemma-2/3 (``softcap=config.final_logit_softcapping``), Granite
    (``scale=1 / config.logits_scaling``) and Cohere (``scale=config.logit_scale``). The matmul
    rounds to the inputs' dtype, scale and cap run in float32 (float64 for float64 inputs): for
    float32 models exactly what transformers computes; bf16 models in transformers also round
    the scaled / capped logits to bf16, which the kernel does not.

    Args:
        hidden: (..., D) float32, bfloat16 or float64.
        weight: (V, D), hidden's dtype (the lm_head / tied embedding weight).
        labels: (...) int64 in [0, V) or ``ignore_index``.
        bias: optional (V,).
        scale: finite multiplier of the logits (default 1: none).
        softcap: None (default) or a positive cap.

    Returns:
        As :func:`token_logprobs`. Differentiable w.r.t. hidden, weight and bias; the backward
        recomputes the logits chunk by chunk (peak extra memory: one 2048 x 2048 chunk on CPU,
        16 MiB in fp32; 4 Mi logits on CUDA) and computes only the gradients autograd asks
        for (a frozen head costs no weight-gradient matmul or buffer).

    Raises:
        ValueError for a non-finite scale or a softcap that is not positive and finite, and
        as :func:`token_logprobs` for bad shapes, dtypes or labels.
    """
    _check_leading("linear_token_logprobs", hidden, "hidden", labels)
    scale, cap = _logit_map("linear_token_logprobs", scale, softcap)
    lead = labels.shape
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
    flat = labels.reshape(-1)
    if use_kernel(hidden.device):
        op = torch.ops.pyfast.linear_token_logprobs
        out = op(h, weight, flat, bias, ignore_index, scale, cap)
    else:
        out = reference.linear_token_logprobs(h, weight, flat, bias, ignore_index, scale, softcap)
    return tuple(o.view(lead) for o in out)


def sequence_logprobs(
    logits: Tensor,
    labels: Tensor,
    mask: Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor]:
    """Sum of log p(label) per sequence over the continuation, and whether it is all greedy.

    Args:
        logits: (B, T, V); labels: (B, T) aligned with logits (logits[:, t] scores labels[:, t]).
        mask: optional (B, T) bool, true on the continuation tokens to score; positions with
            labels == ignore_index are never scored.

    Returns:
        sum_logprob (B,) float32 (differentiable), all_greedy (B,) bool (every scored token is
        its row's argmax; true for a sequence with nothing scored).
    """
    if mask is not None:
        if mask.shape != labels.shape:
            raise ValueError(
                f"sequence_logprobs: mask must have labels' shape {tuple(labels.shape)}, "
                f"got {tuple(mask.shape)}"
            )
        labels = torch.where(mask.to(torch.bool), labels, ignore_index)
    logprobs, is_argmax, _ = token_logprobs(logits, labels, ignore_index)
    scored = labels != ignore_index
    return logprobs.sum(-1), (is_argmax | ~scored).all(-1)


def _mean_nll(logprobs: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    count = (labels != ignore_index).sum().clamp(min=1)
    return -logprobs.sum() / count


def fused_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean negative log-likelihood over non-ignored tokens (0 when every token is ignored).

    Equals ``F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten())`` when some token
    is scored. logits (..., V), labels (...) aligned with them.
    """
    logprobs, _, _ = token_logprobs(logits, labels, ignore_index)
    return _mean_nll(logprobs, labels, ignore_index)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    scale: float = 1.0,
    softcap: float | None = None,
) -> Tensor:
    """:func:`fused_cross_entropy` of the logits ``z(hidden @ weight.T + bias)``, never forming
    them; ``scale`` and ``softcap`` as in :func:`linear_token_logprobs`.

    When a gradient is needed, the compiled kernel is available and the problem is large
    (N * V at least 20 of the CPU kernel's whole-row blocks of 8 Mi logits, so that a block stays
    under 5% of the (N, V) logits; on a GPU at least 2 blocks of 64 Mi), the gradients are
    computed in the forward pass (the loss's per-token weights, -1/count, are known up front) and
    only scaled in backward: the logits are computed once instead of twice. Otherwise backward
    recomputes them chunk by chunk. Either way only the gradients of the inputs that require
    grad are computed (a frozen head: no grad_weight matmul, no (V, D) buffer).
    """
    _check_leading("linear_cross_entropy", hidden, "hidden", labels)
    scale, cap = _logit_map("linear_cross_entropy", scale, softcap)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    kind = hidden.device.type
    large = kind in _MIN_BLOCKS and (
        labels.numel() * weight.shape[0] >= _MIN_BLOCKS[kind] * _FULL_ROW_ELEMS[kind]
    )
    if wants_grad and large and use_kernel(hidden.device):
        return _LinearCrossEntropy.apply(hidden, weight, bias, labels, ignore_index, scale, cap)
    logprobs, _, _ = linear_token_logprobs(
        hidden, weight, labels, bias, ignore_index, scale, cap or None
    )
    return _mean_nll(logprobs, labels, ignore_index)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean NLL whose gradients come out of the forward pass (linear_token_logprobs_with_grad)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, scale, softcap):
        h = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
        flat = labels.reshape(-1)
        valid = flat != ignore_index
        count = valid.sum().clamp(min=1)
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        row_weight = -valid.to(acc) / count  # d loss / d logprob_i
        mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
                bias is not None and bool(ctx.needs_input_grad[2])]  # fmt: skip
        logprobs, _, _, grad_h, grad_w, grad_b = torch.ops.pyfast.linear_token_logprobs_with_grad(
            h, weight, flat, bias, ignore_index, row_weight, scale, softcap, mask
        )
        if grad_h is not None:
            grad_h = grad_h.view(hidden.shape)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return -logprobs.sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        # Scaled in place: fresh copies would double the gradients' memory at the end of
        # backward. A second backward through the same graph then fails autograd's
        # saved-tensor version check instead of returning wrongly scaled gradients.
        grads = ctx.saved_tensors
        out = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads]
        return (*out, None, None, None, None)


if HAS_C:

    def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.float32

    @torch.library.register_fake("pyfast::token_logprobs")
    def _token_logprobs_fake(logits, labels, ignore_index=-100):
        n = logits.shape[0]
        acc = _acc_dtype(logits.dtype)
        return (logits.new_empty((n,), dtype=acc), logits.new_empty((n,), dtype=torch.bool),
                logits.new_empty((n,), dtype=acc))  # fmt: skip

    @torch.library.register_fake("pyfast::token_logprobs_backward")
    def _token_logprobs_backward_fake(grad_logprobs, grad_lse, logits, labels, lse, ignore_index):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake("pyfast::linear_token_logprobs")
    def _linear_token_logprobs_fake(hidden, weight, labels, bias=None, ignore_index=-100,
                                    scale=1.0, softcap=0.0):  # fmt: skip
        n = hidden.shape[0]
        acc = _acc_dtype(hidden.dtype)
        return (hidden.new_empty((n,), dtype=acc), hidden.new_empty((n,), dtype=torch.bool),
                hidden.new_empty((n,), dtype=acc))  # fmt: skip

    def _linear_grads_fake(hidden, weight, bias, output_mask):
        """The (grad_hidden, grad_weight, grad_bias) that output_mask asks for, None otherwise."""
        want_h, want_w, want_b = output_mask
        return (
            hidden.new_empty(hidden.shape) if want_h else None,
            weight.new_empty(weight.shape) if want_w else None,
            bias.new_empty(bias.shape) if want_b and bias is not None else None,
        )

    @torch.library.register_fake("pyfast::linear_token_logprobs_backward")
    def _linear_token_logprobs_backward_fake(grad_logprobs, grad_lse, hidden, weight, labels, bias,
                                             lse, ignore_index, scale=1.0, softcap=0.0,
                                             output_mask=(True, True, True)):  # fmt: skip
        return _linear_grads_fake(hidden, weight, bias, output_mask)

    @torch.library.register_fake("pyfast::linear_token_logprobs_with_grad")
    def _linear_token_logprobs_with_grad_fake(hidden, weight, labels, bias, ignore_index,
                                              grad_logprobs, scale=1.0, softcap=0.0,
                                              output_mask=(True, True, True)):  # fmt: skip
        lp, am, lse = _linear_token_logprobs_fake(hidden, weight, labels, bias, ignore_index)
        return (lp, am, lse, *_linear_grads_fake(hidden, weight, bias, output_mask))

    def _row_grads(grad_logprobs, grad_lse, lse):
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse)
        return grad_logprobs, grad_lse

    def _token_logprobs_setup(ctx, inputs, output):
        logits, labels, ignore_index = inputs
        ctx.save_for_backward(logits, labels, output[2])
        ctx.ignore_index = ignore_index

    def _token_logprobs_backward(ctx, grad_logprobs, grad_is_argmax, grad_lse):
        logits, labels, lse = ctx.saved_tensors
        g, h = _row_grads(grad_logprobs, grad_lse, lse)
        grad = torch.ops.pyfast.token_logprobs_backward(g, h, logits, labels, lse,
                                                        ctx.ignore_index)  # fmt: skip
        return grad, None, None

    torch.library.register_autograd(
        "pyfast::token_logprobs", _token_logprobs_backward, setup_context=_token_logprobs_setup
    )

    def _linear_setup(ctx, inputs, output):
        hidden, weight, labels, bias, ignore_index, scale, softcap = inputs
        ctx.save_for_backward(hidden, weight, labels, bias, output[2])
        ctx.ignore_index, ctx.scale, ctx.softcap = ignore_index, scale, softcap

    def _linear_backward(ctx, grad_logprobs, grad_is_argmax, grad_lse):
        hidden, weight, labels, bias, lse = ctx.saved_tensors
        g, h = _row_grads(grad_logprobs, grad_lse, lse)
        need = ctx.needs_input_grad  # (hidden, weight, labels, bias, ignore_index, scale, softcap)
        mask = [bool(need[0]), bool(need[1]), bias is not None and bool(need[3])]
        grad_hidden, grad_weight, grad_bias = torch.ops.pyfast.linear_token_logprobs_backward(
            g, h, hidden, weight, labels, bias, lse, ctx.ignore_index, ctx.scale, ctx.softcap, mask
        )
        return grad_hidden, grad_weight, None, grad_bias, None, None, None

    torch.library.register_autograd(
        "pyfast::linear_token_logprobs", _linear_backward, setup_context=_linear_setup
    )
