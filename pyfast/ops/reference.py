"""Pure-PyTorch twins of every pyfast op: same names, same signatures, same semantics.

They are the test oracle, the stock-PyTorch provider of the benchmarks, and the fallback when the
compiled extension is unavailable. Written for clarity, not speed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Tensor = torch.Tensor


def _trainable(mask: Tensor | None, like: Tensor) -> Tensor | None:
    """The mask broadcast to `like`'s shape (per-row masks gain trailing singleton dims)."""
    if mask is None:
        return None
    mask = mask.to(torch.bool)
    if mask.shape != like.shape:
        mask = mask.reshape(mask.shape + (1,) * (like.dim() - 1))
    return mask


def _mask_at(masks: Sequence[Tensor | None], i: int) -> Tensor | None:
    return masks[i] if len(masks) else None


def fused_adamw_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    masks: Sequence[Tensor | None],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: Tensor | None = None,
) -> None:
    """AdamW (decoupled weight decay, bias correction) in float32 math, in place.

    Frozen entries of `masks` (false) leave param, exp_avg and exp_avg_sq unchanged.
    """
    bc1 = 1.0 - beta1**step
    bc2_sqrt = math.sqrt(1.0 - beta2**step)
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)):
        gf = g.float()
        if grad_scale is not None:
            gf = gf * grad_scale.to(gf.device)
        m_new = m.float().lerp(gf, 1.0 - beta1)
        v_new = v.float() * beta2 + ((1.0 - beta2) * gf) * gf
        p_new = p.float() * (1.0 - lr * weight_decay)
        p_new = p_new + (-(lr / bc1) * m_new) / (v_new.sqrt() / bc2_sqrt + eps)
        keep = _trainable(_mask_at(masks, i), p)
        if keep is not None:
            p_new = torch.where(keep, p_new, p.float())
            m_new = torch.where(keep, m_new, m.float())
            v_new = torch.where(keep, v_new, v.float())
        p.copy_(p_new)
        m.copy_(m_new)
        v.copy_(v_new)


def grad_norm(tensors: Sequence[Tensor], masks: Sequence[Tensor | None]) -> Tensor:
    """Global L2 norm over a tensor list (trainable entries only), a 0-dim float32 tensor."""
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    total = torch.zeros((), dtype=torch.float64, device=tensors[0].device)
    for i, t in enumerate(tensors):
        x = t.double()
        keep = _trainable(_mask_at(masks, i), t)
        if keep is not None:
            x = torch.where(keep, x, 0.0)
        total = total + (x * x).sum()
    return total.sqrt().float()


def grad_mask_(grads: Sequence[Tensor], masks: Sequence[Tensor | None]) -> None:
    """Zeroes, in place, the gradient of every frozen element or row."""
    for g, mask in zip(grads, masks, strict=True):
        keep = _trainable(mask, g)
        if keep is not None:
            g.masked_fill_(~keep, 0)


def _check_labels(op: str, labels: Tensor, vocab: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"{op}: labels contains {value}, out of range for a vocabulary of {vocab} (labels must "
            f"be in [0, {vocab}) or equal ignore_index={ignore_index})"
        )


def token_logprobs(
    logits: Tensor, labels: Tensor, ignore_index: int = -100
) -> tuple[Tensor, Tensor, Tensor]:
    """log_softmax + gather (+ argmax, logsumexp) over logits (..., V), in float32 math
    (float64 for float64 logits). Ignored positions give 0, False, 0."""
    _check_labels("token_logprobs", labels, logits.shape[-1], ignore_index)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(acc)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0).unsqueeze(-1)
    logprobs = torch.log_softmax(x, dim=-1).gather(-1, safe).squeeze(-1)
    lse = torch.logsumexp(x, dim=-1)
    is_argmax = (logits.argmax(dim=-1) == labels) & valid
    zero = torch.zeros((), dtype=acc, device=logits.device)
    return torch.where(valid, logprobs, zero), is_argmax, torch.where(valid, lse, zero)


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """matmul (hidden @ weight.T + bias, in the inputs' dtype), then, in float32 (float64 for
    float64 inputs), z = logits * scale and softcap * tanh(z / softcap) when softcap is given
    (None or 0: none), then token_logprobs of z."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if scale != 1.0 or softcap:
        logits = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
        logits = logits * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
    return token_logprobs(logits, labels, ignore_index)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Llama-family RMSNorm over the last dim: (weight * (x * rstd), rstd), rstd per row, in the
    rounding order of transformers' LlamaRMSNorm (x * rstd in float32, cast back, times weight)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    return weight * (xf * rstd.unsqueeze(-1)).to(x.dtype), rstd


def rms_norm_backward(
    grad: Tensor, x: Tensor, weight: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor]:
    """(d/dx, d/dweight) of rms_norm from the saved per-row rstd."""
    acc = rstd.dtype
    xf, r = x.to(acc), rstd.unsqueeze(-1)
    n = xf * r
    g = grad.to(acc) * weight.to(acc)
    dx = r * (g - n * (g * n).mean(-1, keepdim=True))
    dw = (grad.to(acc) * n.to(x.dtype).to(acc)).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, as transformers' Llama MLP computes it."""
    return torch.nn.functional.silu(gate) * up


def swiglu_(gate: Tensor, up: Tensor) -> Tensor:
    """swiglu written over `gate` (same rounding: silu in gate's dtype, then the product)."""
    return torch.nn.functional.silu(gate, inplace=True).mul_(up)


def swiglu_backward(grad: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """(d/dgate, d/dup) of swiglu: s = sigmoid(gate), dgate = grad * up * s * (1 + gate * (1 - s)),
    dup = grad * silu(gate)."""
    acc = torch.float64 if gate.dtype == torch.float64 else torch.float32
    g, u, d = gate.to(acc), up.to(acc), grad.to(acc)
    s = torch.sigmoid(g)
    d_up = d * torch.nn.functional.silu(gate).to(acc)
    d_gate = d * u * s * (1 + g * (1 - s))
    return d_gate.to(gate.dtype), d_up.to(up.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary position embedding as transformers' apply_rotary_pos_emb: x * cos +
    rotate_half(x) * sin for q (B, H, T, D) and k (B, KV, T, D), cos / sin (B or 1, T, D)
    broadcast over the heads; rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rotary_backward(
    grad_q: Tensor, grad_k: Tensor, cos: Tensor, sin: Tensor
) -> tuple[Tensor, Tensor]:
    """(d/dq, d/dk) of rotary: g * cos + rotate_half^T(g * sin), rotate_half^T(y) =
    cat(y[..., D/2:], -y[..., :D/2]) (the products rounded before the sum, as autograd does)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def one(g: Tensor) -> Tensor:
        gs = g * sin
        h = gs.shape[-1] // 2
        return g * cos + torch.cat((gs[..., h:], -gs[..., :h]), dim=-1)

    return one(grad_q), one(grad_k)


def rms_norm_offset(x: Tensor, weight: Tensor, eps: float, offset: float) -> tuple[Tensor, Tensor]:
    """Gemma-family RMSNorm over the last dim: ((x * rstd) * (offset + weight)) in float32 (float64
    for float64 x), cast to x's dtype once, and rstd per row, as transformers' GemmaRMSNorm."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * (offset + weight.to(acc))).to(x.dtype), rstd.squeeze(-1)


def rms_norm_offset_backward(
    grad: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, offset: float
) -> tuple[Tensor, Tensor]:
    """(d/dx, d/dweight) of rms_norm_offset from the saved per-row rstd (n = x * rstd unrounded)."""
    acc = rstd.dtype
    xf, r = x.to(acc), rstd.unsqueeze(-1)
    n = xf * r
    g = grad.to(acc) * (offset + weight.to(acc))
    dx = r * (g - n * (g * n).mean(-1, keepdim=True))
    dw = (grad.to(acc) * n).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


def geglu(gate: Tensor, up: Tensor) -> Tensor:
    """gelu_tanh(gate) * up, as transformers' Gemma MLP computes it."""
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


def geglu_(gate: Tensor, up: Tensor) -> Tensor:
    """geglu written over `gate` (same rounding: gelu in gate's dtype, then the product)."""
    return gate.copy_(torch.nn.functional.gelu(gate, approximate="tanh")).mul_(up)


def geglu_backward(grad: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """(d/dgate, d/dup) of geglu, as autograd through the stock module forms them: dup = grad *
    gelu_tanh(gate), dgate = gelu_tanh'(gate) * (grad * up)."""
    d_up = grad * torch.nn.functional.gelu(gate, approximate="tanh")
    d_gate = torch.ops.aten.gelu_backward(grad * up, gate, approximate="tanh")
    return d_gate, d_up


def gated_mlp(
    x: Tensor,
    w_gate: Tensor | None = None,
    w_up: Tensor | None = None,
    w_down: Tensor | None = None,
    b_gate: Tensor | None = None,
    b_up: Tensor | None = None,
    b_down: Tensor | None = None,
    activation: str = "silu",
    recompute: bool = False,
    *,
    w_gate_up: Tensor | None = None,
    b_gate_up: Tensor | None = None,
) -> Tensor:
    """down(act(gate(x)) * up(x)) as the stock modules write it (Llama/Gemma: two projections;
    Phi-3: one fused gate_up projection chunked gate first); `recompute` changes nothing here."""
    fns = {"silu": torch.nn.functional.silu,
           "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh")}  # fmt: skip
    act = fns[activation]
    linear = torch.nn.functional.linear
    if w_gate_up is not None:
        gate, up = linear(x, w_gate_up, b_gate_up).chunk(2, dim=-1)
    else:
        gate, up = linear(x, w_gate, b_gate), linear(x, w_up, b_up)
    return linear(act(gate) * up, w_down, b_down)
