"""Fused RMSNorm and SwiGLU MLP for Llama-family decoder blocks (Llama, Mistral, Qwen2/3, SmolLM).

- :func:`rms_norm`: ``torch.ops.pyfast.rms_norm`` — one pass instead of transformers' seven
  kernels; autograd keeps the input and one float per row (not the normalised copy).
- :func:`swiglu`: ``silu(gate) * up`` in one pass.
- :func:`swiglu_mlp`: ``down(silu(gate(x)) * up(x))`` whose backward recomputes the product from
  ``gate(x)`` and ``up(x)``: autograd keeps x, gate(x) and up(x) instead of also silu(gate(x)) and
  the product — two (tokens, intermediate) tensors per layer fewer. The matmuls are torch's.
  With ``recompute=True`` it keeps only x and recomputes gate(x) and up(x) in backward (two
  more matmuls for two (tokens, intermediate) tensors fewer: selective recomputation).
  Without autograd on the CPU, gate(x) and up(x) go into a per-thread scratch buffer reused by
  every call (no fresh 12 MB outputs to fault in per layer).
- :func:`rms_norm_offset`: ``torch.ops.pyfast.rms_norm_offset`` — Gemma-2/3's RMSNorm (weight
  applied as ``1 + w``, one rounding at the end), the stock module's bits in float32 / bfloat16.
- :func:`geglu`: ``gelu_tanh(gate) * up`` (Gemma-2/3's MLP activation) in one pass, torch's bits
  wherever torch's own gelu runs its SIMD path.
- :func:`gated_mlp`: :func:`swiglu_mlp` for any gated activation (``"silu"``, ``"gelu_tanh"``) and
  for Phi-3's fused ``gate_up_proj`` weight (``w_gate_up=``), with the same lean backward and
  inference workspace; :func:`swiglu_mlp` is its silu case.
- :func:`rotary`: ``torch.ops.pyfast.rotary`` — transformers' ``apply_rotary_pos_emb`` (``x * cos
  + rotate_half(x) * sin`` for q and k) in one pass over q and k, forward and backward, same bits.
- :func:`fuse_decoder_blocks`: swaps these into a loaded Hugging Face model, module by module,
  for the module classes whose forward is exactly Llama's (same math, same rounding order), and
  makes the decoder body keep each norm's output as a recipe for backward (recomputed from the
  norm's input, which backward keeps anyway) instead of the tensor; its attention layers apply
  the fused rotary embedding (where the installed transformers' attention forward is the one
  pyfast reproduces, :func:`stock_attention_matches`); its grouped-query attention layers run
  SDPA on the key/value heads as they are (``enable_gqa``) when a mask is given on the CPU, where
  transformers copies keys and values once per query head (``repeat_kv``) and autograd keeps the
  copies.

Results equal the stock modules to float32 rounding (the row reduction order differs); they are
checked against them, forward and backward, in tests/ops/test_fused_blocks.py. The compiled
kernels serve CPU tensors; elsewhere (CUDA, or no ``_C``) the same autograd functions run on the
pure-PyTorch twins in :mod:`pyfast.ops.reference`, so the memory saving holds on every device.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
import textwrap
import threading
import types
import warnings
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pyfast._extension import HAS_C
from pyfast.ops import reference
from pyfast.ops.packed_linear import linear_forward, packed_linear

Tensor = torch.Tensor

# Module classes whose forward is transformers' LlamaRMSNorm / LlamaMLP line for line (checked
# by tests/ops/test_fused_blocks.py against the installed transformers).
RMSNORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
# Attention modules whose forward is Llama's but for a sliding window handed to the attention
# function and (Qwen3) q/k norms: see _fused_attention_forward, checked by tests/ops/test_rotary.py.
ATTENTION_CLASSES = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention")
# Decoder bodies (embeddings + layers + final norm) whose forward runs under _LeanNorms.
BODY_CLASSES = ("LlamaModel", "MistralModel", "Qwen2Model", "Qwen3Model")


def _compiled(t: Tensor) -> bool:
    """The CPU kernels serve CPU tensors; other devices use the reference twins."""
    return HAS_C and t.device.type == "cpu"


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


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = _rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_bwd(grad.contiguous(), x, weight, rstd)
        return dx, dw, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return _swiglu_bwd(grad.contiguous(), gate, up)


class _Rotary(torch.autograd.Function):
    """Keeps only cos and sin for backward (as the stock ops do)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotary_fwd(q, k, cos, sin)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        dq, dk = _rotary_bwd(grad_q, grad_k, cos, sin)
        return dq, dk, None, None


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """``weight * (x * rsqrt(mean(x^2, -1) + eps))`` as transformers' LlamaRMSNorm, fused;
    differentiable in x and weight (same dtype, weight of shape (x.shape[-1],))."""
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _rms_norm_fwd(x, weight, eps)[0]
    return _RMSNorm.apply(x, weight, eps)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``, fused; differentiable in both."""
    if not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return _swiglu_fwd(gate, up)
    return _SwiGLU.apply(gate, up)


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
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, cos, sin))):
        return _rotary_fwd(q, k, cos, sin)
    if cos.requires_grad or sin.requires_grad:
        return reference.rotary(q, k, cos, sin)
    return _Rotary.apply(q, k, cos, sin)


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


# -- swapping them into a model ------------------------------------------------------------------


class _LeanNorms:
    """Saved-tensor hooks for one forward of a decoder body: a fused RMSNorm's output that the
    next layers save for backward (the q/k/v projections' and the MLP's input) is stored as the
    recipe (norm input, weight, eps) instead — the input is kept by the norm's own backward
    anyway — and recomputed, bit for bit, when backward unpacks it. One (tokens, hidden) tensor
    per norm fewer stays alive between forward and backward, for one extra pass over it."""

    _local = threading.local()

    def __init__(self):
        self.outputs: dict[int, tuple] = {}

    @classmethod
    def active(cls) -> _LeanNorms | None:
        stack = getattr(cls._local, "stack", None)
        return stack[-1] if stack else None

    def record(self, y: Tensor, x: Tensor, weight: Tensor, eps: float) -> None:
        self.outputs[y.data_ptr()] = (weakref.ref(y), x, weight, eps)

    def pack(self, t: Tensor):
        entry = self.outputs.get(t.data_ptr()) if self.outputs else None
        if entry is not None:
            y = entry[0]()
            # the norm's output itself or a reshape of it (alive, so the address is its own)
            same = y is not None and t.numel() == y.numel() and t.dtype == y.dtype
            if same and t.is_contiguous():
                return (_LeanNorms, entry[1], entry[2], entry[3], t.shape)
        return t

    @staticmethod
    def unpack(packed):
        if type(packed) is tuple and packed[0] is _LeanNorms:
            _, x, weight, eps, shape = packed
            with torch.no_grad():
                return _rms_norm_fwd(x, weight, eps)[0].view(shape)
        return packed

    def __enter__(self):
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        self._local.stack.append(self)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        self._local.stack.pop()
        self.outputs.clear()
        return False


def _fused_norm_forward(self, hidden_states: Tensor) -> Tensor:
    if hidden_states.dtype != self.weight.dtype:  # mixed dtypes: the stock module's promotion
        return type(self).forward(self, hidden_states)
    y = rms_norm(hidden_states, self.weight, self.variance_epsilon)
    lean = _LeanNorms.active()
    if lean is not None and y.requires_grad:
        lean.record(y, hidden_states, self.weight, self.variance_epsilon)
    return y


def _lean_body_forward(module: nn.Module):
    """The body's forward under :class:`_LeanNorms` when gradients are on (its signature kept:
    callers inspect it, e.g. for the name of the cache argument)."""
    stock = type(module).forward

    @functools.wraps(stock)
    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return stock(self, *args, **kwargs)
        with _LeanNorms():
            return stock(self, *args, **kwargs)

    return types.MethodType(forward, module)


def _fused_mlp_forward(self, x: Tensor) -> Tensor:
    g, u, d = self.gate_proj, self.up_proj, self.down_proj
    # Wrapped projections (LoRA adapters, quantised layers) keep the stock path.
    if not (type(g) is nn.Linear and type(u) is nn.Linear and type(d) is nn.Linear):
        return type(self).forward(self, x)
    gate = packed_linear(g, x)  # inside PackedLinears, without autograd: packed weights
    if gate is not None:
        return linear_forward(d, _swiglu_fwd_(gate, linear_forward(u, x)))
    return swiglu_mlp(x, g.weight, u.weight, d.weight, g.bias, u.bias, d.bias,
                      recompute=getattr(self, "_pyfast_recompute", False))  # fmt: skip


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


# What the allowlisted attention forwards add to Llama's: a sliding window handed to the attention
# function (the expression each stock forward passes) and q/k norms. stock_attention_matches()
# checks them against the installed source.
_SLIDING_WINDOW_SOURCE = {
    "MistralAttention": "getattr(self.config, 'sliding_window', None)",
    "Qwen2Attention": "self.sliding_window",
    "Qwen3Attention": "self.sliding_window",
}
_SLIDING_WINDOW = {  # the same expressions, compiled once into functions of the module
    name: eval(f"lambda self: {src}")  # noqa: S307 - our own constant source, above
    for name, src in _SLIDING_WINDOW_SOURCE.items()
}
_QK_NORM = ("Qwen3Attention",)
# Statements of _fused_attention_forward that the stock forward lacks: its own bookkeeping.
_OWN_STATEMENTS = ("stock = ", "ALL_ATTENTION_FUNCTIONS = ", "eager_attention_forward = ",
                   "if cache is None:", "name = ", "extra = ")  # fmt: skip


def _fused_attention_forward(
    self,
    hidden_states: Tensor,
    position_embeddings: tuple[Tensor, Tensor] | None = None,
    attention_mask: Tensor | None = None,
    cache=None,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """transformers' LlamaAttention.forward line for line (with Mistral's / Qwen2's / Qwen3's
    additions for those classes), the rotary embedding fused (:func:`rotary`)."""
    # the names the stock forward finds in its module (each family has its own eager function)
    stock = sys.modules[type(self).__module__]
    ALL_ATTENTION_FUNCTIONS = stock.ALL_ATTENTION_FUNCTIONS  # noqa: N806
    eager_attention_forward = stock.eager_attention_forward

    if cache is None:  # the stock forward's deprecated name for it
        cache = kwargs.pop("past_key_values", None)
    name = type(self).__name__
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)

    if name in _QK_NORM:
        query_states = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        key_states = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
    else:
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

    cos, sin = position_embeddings
    query_states, key_states = rotary(query_states, key_states, cos, sin)

    if cache is not None:
        key_states, value_states = cache.update(
            key_states, value_states, self.layer_idx, kwargs=kwargs
        )

    attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, eager_attention_forward
    )
    extra = {"sliding_window": _SLIDING_WINDOW[name](self)} if name in _SLIDING_WINDOW else {}

    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **extra,
        **kwargs,
    )

    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    attn_output = self.o_proj(attn_output)
    return attn_output, attn_weights


# keyword arguments of transformers' attention functions that ask for more than plain attention
_NOT_PLAIN = ("position_bias", "softcap", "sliding_window", "s_aux")


def _plain_attention(dropout: float, kwargs) -> bool:
    return (
        not dropout
        and all(kwargs.get(k) is None for k in _NOT_PLAIN)
        and not kwargs.get("output_attentions", False)
    )


def _gqa_sdpa_applies(module, query: Tensor, key: Tensor, value: Tensor, mask, kwargs) -> bool:
    """Where transformers' SDPA path would copy keys and values per query head and torch's CPU
    kernel takes them grouped instead: a marked module, several query heads per key/value head,
    a mask (without one transformers already passes ``enable_gqa``), more than one query (one
    query is regrouped without copies), CPU tensors, nothing but plain attention asked for."""
    return (
        getattr(module, "_pyfast_gqa", False)
        and query.device.type == "cpu"
        and mask is not None
        and query.shape[2] > 1
        and query.shape[1] != key.shape[1]
        and key.shape[-1] == value.shape[-1]
        and _plain_attention(0.0, kwargs)
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    )


@functools.cache
def install_sdpa_dispatcher() -> None:
    """Puts a dispatcher in front of transformers' "sdpa" attention function, once per process:

    - a call given ``pyfast_segments=`` (a :class:`pyfast.ops.segments.SegmentedAttention` or
      :class:`~pyfast.ops.segments.TrieAttention`, for plain attention) runs it over the packed
      row;
    - modules marked by :func:`fuse_decoder_blocks` take the grouped path where it applies
      (:func:`_gqa_sdpa_applies`);
    - every other call (other models, other devices, other cases) goes to the stock function
      unchanged.
    """
    from transformers import AttentionInterface

    stock = AttentionInterface._global_mapping["sdpa"]

    def sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        segments = kwargs.get("pyfast_segments")
        if segments is not None and _plain_attention(dropout, kwargs):
            return segments(query, key, value, scaling), None
        if not _gqa_sdpa_applies(module, query, key, value, attention_mask, kwargs):
            return stock(module, query, key, value, attention_mask, dropout=dropout,
                         scaling=scaling, **kwargs)  # fmt: skip
        # transformers' own call with the mask given: not causal-flagged, (B, T, H, D) out
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
            is_causal=False, enable_gqa=True,
        )  # fmt: skip
        return out.transpose(1, 2).contiguous(), None

    sdpa.stock = stock
    AttentionInterface.register("sdpa", sdpa)


def _statements(fn, branch: str | None = None) -> list[str]:
    """The body of `fn` as normalised source, one statement a line (docstring left out); with
    `branch` ("body" / "orelse"), the q/k-norm `if` of the fused forward is replaced by that
    branch's statements."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(fn))))
    out = []
    for s in tree.body[0].body:
        if isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant):
            continue
        if branch and isinstance(s, ast.If) and "_QK_NORM" in ast.unparse(s.test):
            out += [ast.unparse(t) for t in getattr(s, branch)]
        else:
            out.append(ast.unparse(s))
    return out


def _is_subsequence(part: list[str], whole: list[str]) -> bool:
    it = iter(whole)
    return all(any(p == w for w in it) for p in part)


@functools.cache
def stock_attention_matches(cls: type) -> bool:
    """Whether the installed ``cls.forward`` (an attention class of ATTENTION_CLASSES) is the
    forward that :func:`_fused_attention_forward` reproduces: every statement of it, in order,
    the same source once ``apply_rotary_pos_emb`` is read for :func:`rotary` and the sliding
    window for its ``**extra``; nothing added but the fused forward's own bookkeeping; the same
    parameters. transformers releases change these forwards (cache arguments, new keywords), so
    the swap is made only where this holds; elsewhere the stock forward stays."""
    name = cls.__name__
    try:
        stock = _statements(cls.forward)
        mine = _statements(_fused_attention_forward, "body" if name in _QK_NORM else "orelse")
        same_params = list(inspect.signature(cls.forward).parameters) == list(
            inspect.signature(_fused_attention_forward).parameters
        )
    except (OSError, TypeError, SyntaxError, IndexError):  # no source to read
        return False
    mine = [s.replace("= rotary(", "= apply_rotary_pos_emb(") for s in mine]
    if sum("apply_rotary_pos_emb(query_states, key_states, cos, sin)" in s for s in stock) != 1:
        return False
    if name in _SLIDING_WINDOW_SOURCE:
        arg = f"sliding_window={_SLIDING_WINDOW_SOURCE[name]}, "
        if sum(arg in s for s in stock) != 1:
            return False
        stock = [s.replace(arg, "**extra, ") for s in stock]
    else:
        mine = [s.replace("**extra, ", "") for s in mine]
    return (
        same_params
        and _is_subsequence(stock, mine)
        and all(s in stock or s.startswith(_OWN_STATEMENTS) for s in mine)
    )


def _attention_swappable(cls: type) -> bool:
    if stock_attention_matches(cls):
        return True
    if cls not in _DECLINED:
        _DECLINED.add(cls)
        import transformers

        warnings.warn(
            f"pyfast: {cls.__module__}.{cls.__name__}.forward of transformers "
            f"{transformers.__version__} is not the forward pyfast's fused-rotary attention "
            "reproduces; that module keeps its stock forward (RMSNorm and the MLP are still "
            "fused)",
            stacklevel=3,
        )
    return False


_DECLINED: set[type] = set()


def fuse_decoder_blocks(model: nn.Module, recompute_mlp: bool = False) -> int:
    """Makes the model's RMSNorm and SwiGLU-MLP modules (classes in RMSNORM_CLASSES /
    MLP_CLASSES) run the fused ops, its attention modules (ATTENTION_CLASSES, where the installed
    transformers' forward is the one pyfast reproduces: :func:`stock_attention_matches`; others
    keep theirs, with one warning per class) apply the fused rotary embedding (:func:`rotary`)
    and, with grouped-query attention, run SDPA on grouped keys and values (see
    :func:`_gqa_sdpa_applies`), and its decoder body
    (BODY_CLASSES) keep norm outputs as recipes for backward (:class:`_LeanNorms`); returns how
    many modules were swapped. With `recompute_mlp` the MLPs keep only their input for backward
    (:func:`swiglu_mlp` with ``recompute=True``). Idempotent (a second call sets
    `recompute_mlp` anew); other modules, and MLPs whose projections are wrapped (e.g. by LoRA),
    keep their stock forward.

    The swap is per instance (a bound ``forward`` or a mark), so it survives ``copy.deepcopy``
    and leaves the classes — and every other model in the process — untouched; state dicts are
    unchanged.
    """
    n = 0
    for m in model.modules():
        name = type(m).__name__
        if name in MLP_CLASSES:
            m._pyfast_recompute = bool(recompute_mlp)
        if getattr(m, "_pyfast_fused", False):
            n += 1
            continue
        if name in RMSNORM_CLASSES and hasattr(m, "variance_epsilon"):
            m.forward = types.MethodType(_fused_norm_forward, m)
        elif name in MLP_CLASSES and _is_silu(getattr(m, "act_fn", None)):
            m.forward = types.MethodType(_fused_mlp_forward, m)
        elif name in ATTENTION_CLASSES and _attention_swappable(type(m)):
            m.forward = types.MethodType(_fused_attention_forward, m)
            if getattr(m, "num_key_value_groups", 1) > 1:
                install_sdpa_dispatcher()
                m._pyfast_gqa = True
        elif name in BODY_CLASSES:
            m.forward = _lean_body_forward(m)
        else:
            continue
        m._pyfast_fused = True
        n += 1
    return n


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
