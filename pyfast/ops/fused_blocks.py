"""Fused decoder-block ops: RMSNorm (Llama's and Gemma's), SwiGLU / GeGLU, the gated MLP and the
rotary embedding, CPU kernels with pure-PyTorch twins (:mod:`pyfast.ops.reference`).

- :func:`rms_norm`: ``torch.ops.pyfast.rms_norm`` — one pass instead of transformers' seven
  kernels; autograd keeps the input and one float per row (not the normalised copy).
- :func:`swiglu`: ``silu(gate) * up`` in one pass.
- :func:`rms_norm_offset`: ``torch.ops.pyfast.rms_norm_offset`` — Gemma-2/3's RMSNorm (weight
  applied as ``offset + w``, one rounding at the end; offset 0 is OLMo-2's), the stock module's
  bits in float32 / bfloat16.
- :func:`geglu`: ``gelu_tanh(gate) * up`` (Gemma-2/3's MLP activation) in one pass, torch's bits
  wherever torch's own gelu runs its SIMD path.
- :func:`gated_mlp`: ``down(act(gate(x)) * up(x))`` for ``"silu"`` and ``"gelu_tanh"``, with two
  weights or Phi-3's fused ``gate_up_proj`` (``w_gate_up=``). Backward keeps x, gate(x) and
  up(x) instead of also act(gate(x)) and the product — two (tokens, intermediate) tensors per
  layer fewer; with ``recompute=True`` only x (two more matmuls). Without autograd on the CPU,
  gate(x) and up(x) go into a per-thread scratch buffer reused by every call. The matmuls are
  torch's. :func:`swiglu_mlp` is its silu case.
- :func:`rotary`: ``torch.ops.pyfast.rotary`` — transformers' ``apply_rotary_pos_emb`` (``x * cos
  + rotate_half(x) * sin`` for q and k) in one pass over q and k, forward and backward, same bits.

Swapping them into a Hugging Face model (with the per-class self-checks) is
:mod:`pyfast.hf.swaps`. The compiled kernels serve CPU tensors; elsewhere (CUDA, or no ``_C``)
the same autograd functions run on the pure-PyTorch twins, so the memory saving holds on every
device. Tests: tests/ops/test_fused_blocks.py, test_gated_blocks.py, test_rotary.py.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from pyfast._extension import HAS_C
from pyfast.ops import reference

Tensor = torch.Tensor


def _compiled(t: Tensor) -> bool:
    """Whether torch.ops.pyfast serves `t`'s device: the C++ kernels on the CPU; on CUDA the
    reference twins registered as the ops' CUDA kernels below (one autograd path, the ops'
    registered one, on both). Elsewhere, or without ``_C``, the twins run under torch's own
    autograd."""
    return HAS_C and (t.device.type == "cpu" or (t.device.type == "cuda" and _CUDA_TWINS))


def _rms_norm_fwd(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    if _compiled(x):
        return torch.ops.pyfast.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def _rms_norm_bwd(grad: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    if _compiled(x):
        return torch.ops.pyfast.rms_norm_backward(grad, x, weight, rstd)
    return reference.rms_norm_backward(grad, x, weight, rstd)


def _swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    return torch.ops.pyfast.swiglu(gate, up) if _compiled(gate) else reference.swiglu(gate, up)


def _swiglu_fwd_(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up written over `gate` (a temporary nothing else reads)."""
    if _compiled(gate) and gate.is_contiguous():
        torch.ops.pyfast.swiglu_(gate, up)
        return gate
    return reference.swiglu_(gate, up)


def _swiglu_bwd(grad: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    if _compiled(gate):
        return torch.ops.pyfast.swiglu_backward(grad, gate, up)
    return reference.swiglu_backward(grad, gate, up)


def _geglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    return torch.ops.pyfast.geglu(gate, up) if _compiled(gate) else reference.geglu(gate, up)


def _geglu_fwd_(gate: Tensor, up: Tensor) -> Tensor:
    """gelu_tanh(gate) * up written over `gate` (a temporary nothing else reads)."""
    if _compiled(gate) and gate.is_contiguous():
        torch.ops.pyfast.geglu_(gate, up)
        return gate
    return reference.geglu_(gate, up)


def _geglu_bwd(grad: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    if _compiled(gate):
        return torch.ops.pyfast.geglu_backward(grad, gate, up)
    return reference.geglu_backward(grad, gate, up)


# The gated activations of gated_mlp: name -> (forward, in-place forward, backward).
GATED_ACTIVATIONS = {
    "silu": (_swiglu_fwd, _swiglu_fwd_, _swiglu_bwd),
    "gelu_tanh": (_geglu_fwd, _geglu_fwd_, _geglu_bwd),
}


def _rotary_fwd(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    if _compiled(q):
        return torch.ops.pyfast.rotary(q, k, cos, sin)
    return reference.rotary(q, k, cos, sin)


def _rotary_bwd(gq: Tensor, gk: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    if _compiled(gq):
        return torch.ops.pyfast.rotary_backward(gq, gk, cos, sin)
    return reference.rotary_backward(gq, gk, cos, sin)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """``weight * (x * rsqrt(mean(x^2, -1) + eps))`` as transformers' LlamaRMSNorm, fused;
    differentiable in x and weight (same dtype, weight of shape (x.shape[-1],))."""
    return _rms_norm_fwd(x, weight, eps)[0]  # the op's registered autograd (or the twin's)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``, fused; differentiable in both."""
    return _swiglu_fwd(gate, up)


def rms_norm_offset(x: Tensor, weight: Tensor, eps: float = 1e-6, offset: float = 1.0) -> Tensor:
    """``(x * rsqrt(mean(x^2, -1) + eps)) * (offset + weight)`` in float32, cast to x's dtype once:
    transformers' GemmaRMSNorm / Gemma2RMSNorm / Gemma3RMSNorm (offset 1.0), fused, with the stock
    module's bits in float32 and bfloat16 (float64 x computes in float64, the stock module in
    float32). weight: shape (x.shape[-1],), x's dtype or float32 (for bfloat16 x). Differentiable
    in x and weight (the op's registered autograd: it keeps x and one float per row); the weight
    gradient has the weight's dtype. Raises RuntimeError naming the argument for bad inputs."""
    if _compiled(x):
        return torch.ops.pyfast.rms_norm_offset(x, weight, eps, offset)[0]
    return reference.rms_norm_offset(x, weight, eps, offset)[0]


def geglu(gate: Tensor, up: Tensor) -> Tensor:
    """``F.gelu(gate, approximate="tanh") * up`` (Gemma's ``act_fn(gate_proj(x)) * up_proj(x)``),
    fused; gate and up of one shape and dtype (float32 / bfloat16 / float64). Differentiable in
    both (the op's registered autograd: it keeps gate and up)."""
    if _compiled(gate):
        return torch.ops.pyfast.geglu(gate, up)
    return reference.geglu(gate, up)


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin)`` (``x * cos + rotate_half(x) * sin``,
    cos / sin (B or 1, T, D) broadcast over the heads of q (B, H, T, D) and k (B, KV, T, D)), fused
    and with the same bits; differentiable in q and k. Outputs are contiguous. Mixed dtypes (e.g.
    bfloat16 q/k under autocast with float32 cos/sin) and differentiable cos / sin take the stock
    formula (:func:`pyfast.ops.reference.rotary`), with its type promotion."""
    if not (q.dtype == k.dtype == cos.dtype == sin.dtype):
        return reference.rotary(q, k, cos, sin)
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        return reference.rotary(q, k, cos, sin)
    return _rotary_fwd(q, k, cos, sin)  # the op's registered autograd keeps only cos and sin


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _gate_up(x, w_gate, w_up, b_gate, b_up, w_gate_up, b_gate_up) -> tuple[Tensor, Tensor]:
    """gate(x), up(x) from two weights, or from the halves of a fused (2F, D) gate_up weight (one
    matmul per half: contiguous outputs, the same values as chunking the one fused product)."""
    if w_gate_up is None:
        return F.linear(x, w_gate, b_gate), F.linear(x, w_up, b_up)
    f = w_gate_up.shape[0] // 2
    bg, bu = (None, None) if b_gate_up is None else (b_gate_up[:f], b_gate_up[f:])
    return F.linear(x, w_gate_up[:f], bg), F.linear(x, w_gate_up[f:], bu)


class _GatedMLP(torch.autograd.Function):
    """down(act(gate(x)) * up(x)); saves x, gate(x), up(x) (or only x with `recompute`) and
    recomputes the product in backward."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, b_gate, b_up, b_down, w_gate_up, b_gate_up,
                activation, recompute):  # fmt: skip
        fwd = GATED_ACTIVATIONS[activation][0]
        # Autocast (if active) applies to these linears as in the stock module.
        gate, up = _gate_up(x, w_gate, w_up, b_gate, b_up, w_gate_up, b_gate_up)
        out = F.linear(fwd(gate, up), w_down, b_down)
        ctx.cdt = gate.dtype  # the compute dtype (bfloat16 under autocast)
        ctx.recompute, ctx.activation = recompute, activation
        weights = (w_gate, w_up, w_down, w_gate_up)
        if recompute:  # the biases are parameters, kept anyway
            ctx.save_for_backward(x, *weights, b_gate, b_up, b_gate_up)
        else:
            ctx.save_for_backward(x, gate, up, *weights)
        ctx.bias_dtypes = [
            None if b is None else b.dtype for b in (b_gate, b_up, b_down, b_gate_up)
        ]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        cdt = ctx.cdt
        fwd, _, bwd = GATED_ACTIVATIONS[ctx.activation]
        if ctx.recompute:
            # the forward's linears again, on the forward's compute dtype: bit for bit its values
            x, w_gate, w_up, w_down, w_gate_up, b_gate, b_up, b_gate_up = ctx.saved_tensors

            def c(t):
                return None if t is None else t.to(cdt)

            gate, up = _gate_up(x.to(cdt), c(w_gate), c(w_up), c(b_gate), c(b_up), c(w_gate_up),
                                c(b_gate_up))  # fmt: skip
        else:
            x, gate, up, w_gate, w_up, w_down, w_gate_up = ctx.saved_tensors
        need = ctx.needs_input_grad
        go = grad_out.to(cdt)
        g_wg = g_wu = g_wd = g_bg = g_bu = g_bd = g_x = g_wgu = g_bgu = None
        if need[3]:
            g_wd = (_flat(go).t() @ _flat(fwd(gate, up))).to(w_down.dtype)
        if need[6]:
            g_bd = _flat(go).sum(0).to(ctx.bias_dtypes[2])
        if not any(need[i] for i in (0, 1, 2, 4, 5, 7, 8)):
            return g_x, g_wg, g_wu, g_wd, g_bg, g_bu, g_bd, g_wgu, g_bgu, None, None
        d_gate, d_up = bwd((go @ w_down.to(cdt)).contiguous(), gate, up)
        xc = _flat(x.to(cdt))
        if w_gate_up is not None:
            # as autograd through Phi-3's chunk: one (tokens, 2F) gradient, one matmul each
            d_gu = torch.cat((_flat(d_gate), _flat(d_up)), -1)
            if need[7]:
                g_wgu = (d_gu.t() @ xc).to(w_gate_up.dtype)
            if need[8]:
                g_bgu = d_gu.sum(0).to(ctx.bias_dtypes[3])
            if need[0]:
                g_x = (d_gu @ w_gate_up.to(cdt)).view(*x.shape[:-1], -1).to(x.dtype)
            return g_x, g_wg, g_wu, g_wd, g_bg, g_bu, g_bd, g_wgu, g_bgu, None, None
        if need[1]:
            g_wg = (_flat(d_gate).t() @ xc).to(w_gate.dtype)
        if need[2]:
            g_wu = (_flat(d_up).t() @ xc).to(w_up.dtype)
        if need[4]:
            g_bg = _flat(d_gate).sum(0).to(ctx.bias_dtypes[0])
        if need[5]:
            g_bu = _flat(d_up).sum(0).to(ctx.bias_dtypes[1])
        if need[0]:
            g_x = (d_gate @ w_gate.to(cdt)).add_(d_up @ w_up.to(cdt)).to(x.dtype)
        return g_x, g_wg, g_wu, g_wd, g_bg, g_bu, g_bd, g_wgu, g_bgu, None, None


def _check_mlp_args(w_gate, w_up, w_down, b_gate, b_up, w_gate_up, b_gate_up, activation):
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(
            f"gated_mlp: activation must be one of {sorted(GATED_ACTIVATIONS)}, got {activation!r}"
        )
    if w_down is None:
        raise ValueError("gated_mlp: w_down is required")
    if w_gate_up is None:
        if w_gate is None or w_up is None:
            raise ValueError("gated_mlp: give w_gate and w_up, or w_gate_up (fused, gate first)")
        if b_gate_up is not None:
            raise ValueError("gated_mlp: b_gate_up needs w_gate_up")
        return
    if w_gate is not None or w_up is not None or b_gate is not None or b_up is not None:
        raise ValueError(
            "gated_mlp: w_gate_up (fused) excludes w_gate / w_up / b_gate / b_up; pass b_gate_up"
        )
    if w_gate_up.dim() != 2 or w_gate_up.shape[0] % 2:
        raise ValueError(
            f"gated_mlp: w_gate_up must have shape (2 * intermediate, hidden), got "
            f"{tuple(w_gate_up.shape)}"
        )


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
    """``F.linear(act(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up), w_down, b_down)``:
    the gated MLP of Llama / Qwen / Mistral (``activation="silu"``), Gemma-2/3
    (``"gelu_tanh"``: ``F.gelu(approximate="tanh")``) and, with ``w_gate_up`` (shape (2F, D),
    gate rows first, as Phi-3's ``gate_up_proj``; ``b_gate_up`` its (2F,) bias) in place of w_gate
    and w_up, Phi-3 (silu). x (..., D), weights (F, D) / (D, F). act(gate) is rounded to the
    compute dtype before the product, as the stock modules do.

    Backward keeps only x, gate(x) and up(x) — or, with `recompute`, only x (gate(x) and up(x)
    are computed again in backward; the gradients are the same bits). The fused weight gets one
    (2F, D) gradient. Without autograd on the CPU, gate(x) and up(x) go into a reused per-thread
    buffer. Raises ValueError for an unknown activation or an inconsistent weight set."""
    _check_mlp_args(w_gate, w_up, w_down, b_gate, b_up, w_gate_up, b_gate_up, activation)
    tensors = (x, w_gate, w_up, w_down, b_gate, b_up, b_down, w_gate_up, b_gate_up)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _GatedMLP.apply(*tensors, activation, bool(recompute))
    fwd_ = GATED_ACTIVATIONS[activation][1]
    if w_gate_up is not None:
        f = w_gate_up.shape[0] // 2
        w_gate, w_up = w_gate_up[:f], w_gate_up[f:]
        if b_gate_up is not None:
            b_gate, b_up = b_gate_up[:f], b_gate_up[f:]
    ws = _inference_workspace(x, w_gate, w_up, b_gate, b_up)
    if ws is not None:  # CPU inference: gate(x) and up(x) into reused buffers
        gate, up = ws
        x2 = x.reshape(-1, x.shape[-1])
        torch.mm(x2, w_gate.t(), out=gate)
        torch.mm(x2, w_up.t(), out=up)
        out = F.linear(fwd_(gate, up), w_down, b_down)
        return out.view(*x.shape[:-1], out.shape[-1])
    # Inference: the product overwrites gate(x), a fresh temporary (no second buffer).
    return F.linear(fwd_(F.linear(x, w_gate, b_gate), F.linear(x, w_up, b_up)), w_down, b_down)


def swiglu_mlp(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    b_gate: Tensor | None = None,
    b_up: Tensor | None = None,
    b_down: Tensor | None = None,
    recompute: bool = False,
) -> Tensor:
    """``F.linear(silu(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up), w_down, b_down)``
    (a Llama MLP): :func:`gated_mlp` with ``activation="silu"``."""
    return gated_mlp(x, w_gate, w_up, w_down, b_gate, b_up, b_down, "silu", recompute)


# Scratch memory of the CPU inference MLP, per thread: one buffer for gate(x) and up(x), grown to
# the largest call and reused by every layer and batch. Fresh (tokens, intermediate) outputs of
# 12 MB each (2,000 tokens of SmolLM2) are freed at the top of glibc's heap, which trims them and
# faults their pages in again at the next layer: ~300,000 page faults, ~0.5 s (4%) of a 0-shot
# HellaSwag evaluation here (benchmarks/bench_eval.py). Capped: a larger call allocates as usual.
_WORKSPACE = threading.local()
_WORKSPACE_MAX_ELEMS = 64 << 20


def _inference_workspace(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate, b_up):
    """Two (tokens, intermediate) views of this thread's scratch buffer for `swiglu_mlp`'s
    inference path, or None where it does not apply (not CPU, biases, mixed dtypes, autocast,
    torch.compile, a call above the cap)."""
    if (
        x.device.type != "cpu"
        or b_gate is not None
        or b_up is not None
        or not (x.dtype == w_gate.dtype == w_up.dtype)
        or w_gate.shape != w_up.shape
        or torch.is_autocast_enabled("cpu")
        or torch.compiler.is_compiling()
    ):
        return None
    n, f = x.numel() // x.shape[-1], w_gate.shape[0]
    # up(x) starts 64-byte aligned, as a fresh tensor does: BLAS may pick its kernels (and so its
    # rounding) by alignment, and the outputs must be the stock path's bits.
    step = 64 // x.element_size()
    second = -(-n * f // step) * step
    if n == 0 or second + n * f > _WORKSPACE_MAX_ELEMS:
        return None
    buf = getattr(_WORKSPACE, "buf", None)
    if buf is None or buf.dtype != x.dtype or buf.numel() < second + n * f:
        with torch.inference_mode(False):  # a normal tensor: usable in and out of that mode
            buf = torch.empty(second + n * f, dtype=x.dtype)
        _WORKSPACE.buf = buf
    return buf[: n * f].view(n, f), buf[second : second + n * f].view(n, f)


if HAS_C:

    @torch.library.register_fake("pyfast::rms_norm")
    def _rms_norm_fake(x, weight, eps):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=acc)

    @torch.library.register_fake("pyfast::rms_norm_backward")
    def _rms_norm_backward_fake(grad, x, weight, rstd):
        return x.new_empty(x.shape), weight.new_empty(weight.shape)

    @torch.library.register_fake("pyfast::swiglu")
    def _swiglu_fake(gate, up):
        return gate.new_empty(gate.shape)

    @torch.library.register_fake("pyfast::swiglu_")
    def _swiglu_inplace_fake(gate, up):
        return None

    @torch.library.register_fake("pyfast::trie_attention")
    def _trie_attention_fake(query, key, value, end, scale):
        _, heads, length, dim = query.shape
        return query.new_empty(1, length, heads, dim)

    @torch.library.register_fake("pyfast::swiglu_backward")
    def _swiglu_backward_fake(grad, gate, up):
        return gate.new_empty(gate.shape), up.new_empty(up.shape)

    def _rms_norm_setup(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, weight, output[1])

    def _rms_norm_backward(ctx, grad_y, grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = torch.ops.pyfast.rms_norm_backward(grad_y.contiguous(), x, weight, rstd)
        return dx, dw, None

    torch.library.register_autograd(
        "pyfast::rms_norm", _rms_norm_backward, setup_context=_rms_norm_setup
    )

    def _swiglu_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _swiglu_backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return torch.ops.pyfast.swiglu_backward(grad.contiguous(), gate, up)

    torch.library.register_autograd("pyfast::swiglu", _swiglu_backward, setup_context=_swiglu_setup)

    @torch.library.register_fake("pyfast::rotary")
    def _rotary_fake(q, k, cos, sin):
        return q.new_empty(q.shape), k.new_empty(k.shape)

    @torch.library.register_fake("pyfast::rotary_backward")
    def _rotary_backward_fake(grad_q, grad_k, cos, sin):
        def token_major(g):  # (B, N, T, D) with (B, T, N, D) memory order
            b, n, t, d = g.shape
            return g.new_empty(b, t, n, d).transpose(1, 2)

        return token_major(grad_q), token_major(grad_k)

    def _rotary_setup(ctx, inputs, output):
        q, k, cos, sin = inputs
        if cos.requires_grad or sin.requires_grad:
            raise ValueError(
                "torch.ops.pyfast.rotary: no gradient for cos / sin; use pyfast.ops.rotary, "
                "which takes the stock formula for differentiable cos / sin"
            )
        ctx.save_for_backward(cos, sin)

    def _rotary_backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        return (*torch.ops.pyfast.rotary_backward(grad_q, grad_k, cos, sin), None, None)

    torch.library.register_autograd("pyfast::rotary", _rotary_backward, setup_context=_rotary_setup)


if HAS_C:  # the Gemma-family ops: rms_norm_offset, geglu

    @torch.library.register_fake("pyfast::rms_norm_offset")
    def _rms_norm_offset_fake(x, weight, eps, offset):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=acc)

    @torch.library.register_fake("pyfast::rms_norm_offset_backward")
    def _rms_norm_offset_backward_fake(grad, x, weight, rstd, offset):
        return x.new_empty(x.shape), weight.new_empty(weight.shape)

    def _rms_norm_offset_setup(ctx, inputs, output):
        x, weight, _, offset = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.offset = offset
        ctx.save_for_backward(x, weight, output[1])

    def _rms_norm_offset_backward(ctx, grad_y, grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = torch.ops.pyfast.rms_norm_offset_backward(
            grad_y.contiguous(), x, weight, rstd, ctx.offset
        )
        return dx, dw, None, None

    torch.library.register_autograd(
        "pyfast::rms_norm_offset", _rms_norm_offset_backward, setup_context=_rms_norm_offset_setup
    )

    @torch.library.register_fake("pyfast::geglu")
    def _geglu_fake(gate, up):
        return gate.new_empty(gate.shape)

    @torch.library.register_fake("pyfast::geglu_")
    def _geglu_inplace_fake(gate, up):
        return None

    @torch.library.register_fake("pyfast::geglu_backward")
    def _geglu_backward_fake(grad, gate, up):
        return gate.new_empty(gate.shape), up.new_empty(up.shape)

    def _geglu_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _geglu_backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return torch.ops.pyfast.geglu_backward(grad.contiguous(), gate, up)

    torch.library.register_autograd("pyfast::geglu", _geglu_backward, setup_context=_geglu_setup)


def _token_major(t: Tensor) -> Tensor:
    """`t` (B, N, T, D) in (B, T, N, D) memory order, as the CPU rotary_backward writes it."""
    out = t.new_empty(t.shape[0], t.shape[2], t.shape[1], t.shape[3]).transpose(1, 2)
    return out.copy_(t)


def _inplace(fn):
    def run(gate, up):
        fn(gate, up)

    return run


# The ops' CUDA kernels where the extension has none: the reference twins, so that CUDA tensors
# take the same registered autograd (lean saved tensors) as the CPU ones.
_TWINS = {
    "rms_norm": reference.rms_norm,
    "rms_norm_backward": reference.rms_norm_backward,
    "rms_norm_offset": reference.rms_norm_offset,
    "rms_norm_offset_backward": reference.rms_norm_offset_backward,
    "swiglu": reference.swiglu,
    "swiglu_": _inplace(reference.swiglu_),
    "swiglu_backward": reference.swiglu_backward,
    "geglu": reference.geglu,
    "geglu_": _inplace(reference.geglu_),
    "geglu_backward": reference.geglu_backward,
    "rotary": reference.rotary,
    "rotary_backward": lambda gq, gk, cos, sin: tuple(
        map(_token_major, reference.rotary_backward(gq, gk, cos, sin))
    ),
}
_CUDA_TWINS = False
if HAS_C:
    for _name, _fn in _TWINS.items():
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"pyfast::{_name}", "CUDA"):
            torch.library.impl(f"pyfast::{_name}", "CUDA")(_fn)
    _CUDA_TWINS = True
