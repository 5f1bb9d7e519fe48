"""The Gemma / Phi-3 block ops — rms_norm_offset, geglu, gated_mlp — against their reference twins
and against the stock transformers modules they stand for (Gemma2RMSNorm, Gemma3RMSNorm,
Gemma2MLP, Gemma3MLP, Phi3MLP on tiny random configs), forward and backward; opcheck, gradcheck,
argument errors."""

import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma2Config, Gemma3TextConfig, Phi3Config
from transformers.models.gemma2 import modeling_gemma2
from transformers.models.gemma3 import modeling_gemma3
from transformers.models.phi3 import modeling_phi3

import pyfast
from pyfast.ops import fused_blocks as fb
from pyfast.ops import reference

needs_c = pytest.mark.skipif(not pyfast.HAS_C, reason="compiled extension not available")
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float64: 1e-12}
# Awkward shapes: one row, odd widths (SIMD tails), 3-D batches, widths below one SIMD vector.
SHAPES = [(1, 576), (97, 33), (3, 7, 576), (5, 3), (2, 3, 100), (4, 2304)]


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def _ulps(a, b) -> int:
    """Largest distance in float32 units in the last place (bfloat16 / float32 values)."""
    ia, ib = (t.float().contiguous().view(torch.int32).long() for t in (a, b))
    return int((ia - ib).abs().max()) if ia.numel() else 0


def _rand(shape, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, dtype=torch.float64, generator=g) * scale).to(dtype)


# -- geglu ----------------------------------------------------------------------------------------


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
def test_geglu_has_torchs_bits_where_torch_runs_simd(dtype):
    """(4, 256): one chunk of whole SIMD vectors in torch's own kernels, so every element takes
    torch's vectorized path (at::vec's tanh), the one the kernel runs: equal bits, forward and
    backward, against F.gelu(approximate="tanh") * up and autograd through it."""
    g, u, dh = (
        _rand((4, 256), dtype, 3, 1),
        _rand((4, 256), dtype, 1, 2),
        _rand((4, 256), dtype, 1, 3),
    )
    assert torch.equal(torch.ops.pyfast.geglu(g, u), F.gelu(g, approximate="tanh") * u)
    g1, u1 = g.clone().requires_grad_(), u.clone().requires_grad_()
    (F.gelu(g1, approximate="tanh") * u1).backward(dh)
    dg, du = torch.ops.pyfast.geglu_backward(dh, g, u)
    assert torch.equal(dg, g1.grad) and torch.equal(du, u1.grad)
    assert all(map(torch.equal, (dg, du), reference.geglu_backward(dh, g, u)))


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_geglu_matches_reference(shape, dtype):
    """Any shape: torch computes the last < 16 (bfloat16: 32) elements of each of its chunks with
    std::tanh, the kernel every element with at::vec's tanh (Sleef, 1 ulp): a few ulps apart there
    in float32 (measured: <= 10 on the gelu of large negative inputs, where 1 + tanh cancels)."""
    g, u, dh = _rand(shape, dtype, 3, 1), _rand(shape, dtype, 1, 2), _rand(shape, dtype, 1, 3)
    h, h_ref = torch.ops.pyfast.geglu(g, u), reference.geglu(g, u)
    assert h.dtype == dtype and h.shape == g.shape
    assert _rel(h, h_ref) <= TOL[dtype]
    dg, du = torch.ops.pyfast.geglu_backward(dh, g, u)
    dg_ref, du_ref = reference.geglu_backward(dh, g, u)
    assert _rel(dg, dg_ref) <= 4 * TOL[dtype] and _rel(du, du_ref) <= 4 * TOL[dtype]
    if dtype == torch.float32:
        assert _ulps(h, h_ref) <= 32
    if dtype == torch.bfloat16:  # rounding to bfloat16 hides the tanh differences
        assert (h != h_ref).float().mean() <= 0.01
    into, ptr = g.clone(), None
    ptr = into.data_ptr()
    torch.ops.pyfast.geglu_(into, u)
    assert into.data_ptr() == ptr and torch.equal(into, h)
    assert torch.equal(reference.geglu_(g.clone(), u), h_ref)


@needs_c
def test_geglu_results_do_not_depend_on_position_or_threads():
    """The last partial vector runs the same SIMD math (zero-padded lanes): a row's values are
    the same wherever it sits and however many threads split the tensor."""
    g, u = _rand((37, 1001), torch.float32, 3, 4), _rand((37, 1001), torch.float32, 1, 5)
    whole = torch.ops.pyfast.geglu(g, u)
    for r in (0, 17, 36):
        assert torch.equal(torch.ops.pyfast.geglu(g[r : r + 1], u[r : r + 1]), whole[r : r + 1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(torch.ops.pyfast.geglu(g, u), whole)
    finally:
        torch.set_num_threads(threads)


@needs_c
def test_geglu_non_contiguous_and_empty():
    g, u = _rand((20, 6), torch.float32, 3).t(), _rand((6, 20), torch.float32)
    assert _rel(fb.geglu(g, u), reference.geglu(g, u)) <= 2e-6
    assert fb.geglu(torch.empty(0, 8), torch.empty(0, 8)).shape == (0, 8)
    dg, du = torch.ops.pyfast.geglu_backward(
        torch.empty(0, 3), torch.empty(0, 3), torch.empty(0, 3)
    )
    assert dg.shape == du.shape == (0, 3)


# -- rms_norm_offset ------------------------------------------------------------------------------


def _gemma_norm(cls, d, dtype, weight_dtype=None, eps=1e-6):
    m = cls(d, eps)
    with torch.no_grad():
        m.weight.copy_(_rand((d,), torch.float32, 0.3, 7))
    return m.to(weight_dtype or dtype)


@needs_c
@pytest.mark.parametrize("cls", [modeling_gemma2.Gemma2RMSNorm, modeling_gemma3.Gemma3RMSNorm])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_offset_has_the_stock_modules_bits(shape, dtype, cls):
    """Forward: the stock module's bits (rstd's row sum in torch's order). Backward: float
    rounding (autograd's chain vs the closed form; dw's row order)."""
    m = _gemma_norm(cls, shape[-1], dtype)
    x = _rand(shape, dtype, 2, 8)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w2 = m.weight.detach().clone().requires_grad_()
    y1, y2 = m(x1), fb.rms_norm_offset(x2, w2, m.eps, 1.0)
    assert y2.dtype == dtype and torch.equal(y1, y2)
    dy = _rand(shape, dtype, 1, 9)
    y1.backward(dy)
    y2.backward(dy)
    tol = 4e-6 if dtype == torch.float32 else 1e-2
    assert _rel(x2.grad, x1.grad) <= tol and _rel(w2.grad, m.weight.grad) <= tol
    assert w2.grad.dtype == m.weight.grad.dtype


@needs_c
def test_rms_norm_offset_float32_weight_under_bfloat16_activations():
    m = _gemma_norm(modeling_gemma2.Gemma2RMSNorm, 96, torch.bfloat16, weight_dtype=torch.float32)
    x = _rand((13, 96), torch.bfloat16, 2).requires_grad_()
    w = m.weight.detach().clone().requires_grad_()
    y = fb.rms_norm_offset(x, w, m.eps)
    assert y.dtype == torch.bfloat16 and torch.equal(y, m(x))
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("offset", [1.0, 0.0, -0.5])
def test_rms_norm_offset_matches_reference(shape, dtype, offset):
    x, w = _rand(shape, dtype, 3, 10), _rand(shape[-1:], dtype, 1, 11)
    y, rstd = torch.ops.pyfast.rms_norm_offset(x, w, 1e-5, offset)
    y_ref, rstd_ref = reference.rms_norm_offset(x, w, 1e-5, offset)
    assert rstd.shape == x.shape[:-1] and rstd.dtype == rstd_ref.dtype
    if dtype == torch.float64:
        assert _rel(y, y_ref) <= 1e-12 and _rel(rstd, rstd_ref) <= 1e-12
    else:
        assert torch.equal(y, y_ref) and torch.equal(rstd, rstd_ref)
    dy = _rand(shape, dtype, 1, 12)
    dx, dw = torch.ops.pyfast.rms_norm_offset_backward(dy, x, w, rstd, offset)
    dx_ref, dw_ref = reference.rms_norm_offset_backward(dy, x, w, rstd_ref, offset)
    assert _rel(dx, dx_ref) <= 4 * TOL[dtype] and _rel(dw, dw_ref) <= 4 * TOL[dtype]


@needs_c
def test_rms_norm_offset_non_contiguous_and_empty():
    x, w = _rand((6, 40), torch.float32)[:, ::2], _rand((40,), torch.float32)[::2]
    assert torch.equal(fb.rms_norm_offset(x, w), reference.rms_norm_offset(x, w, 1e-6, 1.0)[0])
    y, rstd = torch.ops.pyfast.rms_norm_offset(torch.empty(0, 8), torch.ones(8), 1e-6, 1.0)
    assert y.shape == (0, 8) and rstd.shape == (0,)
    dx, dw = torch.ops.pyfast.rms_norm_offset_backward(torch.empty(0, 8), torch.empty(0, 8),
                                                       torch.ones(8), rstd, 1.0)  # fmt: skip
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros(8))


@needs_c
def test_llama_rms_norm_now_has_the_stock_bits_too():
    """The shared row sum (torch's order) makes the Llama op's forward the stock module's bits."""
    from transformers.models.llama import modeling_llama

    for dtype in (torch.float32, torch.bfloat16):
        m = modeling_llama.LlamaRMSNorm(2304, 1e-5).to(dtype)
        with torch.no_grad():
            m.weight.copy_(_rand((2304,), dtype, 1, 13))
        x = _rand((33, 2304), dtype, 2, 14)
        assert torch.equal(fb.rms_norm(x, m.weight.detach(), 1e-5), m(x))


# -- gated_mlp against the stock MLPs -------------------------------------------------------------

H, F_ = 64, 160  # intermediate a multiple of 32 and 33 tokens: torch's gelu runs whole vectors


def _stock_mlp(kind, dtype):
    torch.manual_seed(15)
    if kind == "gemma2":
        cfg = Gemma2Config(
            hidden_size=H, intermediate_size=F_, hidden_activation="gelu_pytorch_tanh"
        )
        m = modeling_gemma2.Gemma2MLP(cfg)
    elif kind == "gemma3":
        cfg = Gemma3TextConfig(hidden_size=H, intermediate_size=F_,
                               hidden_activation="gelu_pytorch_tanh")  # fmt: skip
        m = modeling_gemma3.Gemma3MLP(cfg)
    else:
        m = modeling_phi3.Phi3MLP(
            Phi3Config(hidden_size=H, intermediate_size=F_, hidden_act="silu")
        )
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return m.to(dtype)


def _fused_call(m, x, recompute=False):
    if hasattr(m, "gate_up_proj"):
        return fb.gated_mlp(x, None, None, m.down_proj.weight, activation="silu",
                            recompute=recompute, w_gate_up=m.gate_up_proj.weight)  # fmt: skip
    return fb.gated_mlp(x, m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight,
                        activation="gelu_tanh", recompute=recompute)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "phi3"])
def test_gated_mlp_matches_the_stock_mlp(kind, dtype):
    """Forward: the stock module's bits (training and inference paths). Backward: float rounding
    (the fused op reassociates nothing in the activation, but its gate gradient is one formula)."""
    m = _stock_mlp(kind, dtype)
    x = _rand((3, 11, H), dtype, 1, 16)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = m(x1), _fused_call(m, x2)
    assert y2.dtype == dtype and torch.equal(y1, y2)
    with torch.no_grad():
        assert torch.equal(_fused_call(m, x), y1)  # the inference (workspace) path
        fb._WORKSPACE.__dict__.clear()
    dy = _rand(y1.shape, dtype, 1, 17)
    y1.backward(dy)
    grads = torch.autograd.grad(y2, [x2] + [p for p in m.parameters()], dy)
    tol = 4e-6 if dtype == torch.float32 else 2e-2
    assert _rel(grads[0], x1.grad) <= tol
    for g, (name, p) in zip(grads[1:], m.named_parameters(), strict=True):
        assert g.dtype == p.dtype and g.shape == p.shape and _rel(g, p.grad) <= tol, name


@pytest.mark.parametrize("kind", ["gemma2", "phi3"])
def test_gated_mlp_recompute_same_bits_keeps_only_x(kind):
    m = _stock_mlp(kind, torch.float32)
    x = _rand((40, H), torch.float32, 1, 18)
    saved, grads = [], []
    for recompute in (False, True):
        seen = {}

        def pack(t, seen=seen):
            if t.dim() > 1 and t.shape[0] == 40:  # activations, not weights
                seen[t.data_ptr()] = t.numel() * t.element_size()
            return t

        xi = x.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = _fused_call(m, xi, recompute)
        grads.append(torch.autograd.grad(y.square().sum(), [xi, *m.parameters()]))
        saved.append(sum(seen.values()))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
    assert saved == [40 * (H + 2 * F_) * 4, 40 * H * 4]


def test_gated_mlp_gradcheck():
    """Every input in float64 (kernels on the CPU, or the twins without _C): both activations,
    two weights with biases and the fused gate_up weight with its bias, with and without
    recompute."""
    torch.manual_seed(19)

    def t(*s):
        return torch.randn(s, dtype=torch.float64, requires_grad=True)

    x, wg, wu, wd, bg, bu, bd = t(2, 3, 6), t(8, 6), t(8, 6), t(6, 8), t(8), t(8), t(6)
    wgu, bgu = t(16, 6), t(16)
    for act in ("silu", "gelu_tanh"):
        for rc in (False, True):
            assert torch.autograd.gradcheck(
                lambda *a, act=act, rc=rc: fb.gated_mlp(*a, activation=act, recompute=rc),
                (x, wg, wu, wd, bg, bu, bd),
            )
            assert torch.autograd.gradcheck(
                lambda x, wd, bd, wgu, bgu, act=act, rc=rc: fb.gated_mlp(
                    x, None, None, wd, None, None, bd, act, rc, w_gate_up=wgu, b_gate_up=bgu
                ),
                (x, wd, bd, wgu, bgu),
            )
    ref = reference.gated_mlp(
        x, None, None, wd, None, None, bd, "silu", w_gate_up=wgu, b_gate_up=bgu
    )
    got = fb.gated_mlp(x, None, None, wd, None, None, bd, "silu", w_gate_up=wgu, b_gate_up=bgu)
    assert _rel(got, ref) < 1e-12
    # swiglu_mlp is the silu case
    assert torch.equal(fb.swiglu_mlp(x, wg, wu, wd, bg, bu, bd),
                       fb.gated_mlp(x, wg, wu, wd, bg, bu, bd, "silu"))  # fmt: skip


def test_gated_mlp_argument_errors():
    x, w = torch.randn(2, 4), torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"gated_mlp: activation must be one of"):
        fb.gated_mlp(x, w, w, w.t(), activation="gelu")
    with pytest.raises(ValueError, match=r"gated_mlp: w_down is required"):
        fb.gated_mlp(x, w, w)
    with pytest.raises(ValueError, match=r"gated_mlp: give w_gate and w_up, or w_gate_up"):
        fb.gated_mlp(x, w, None, w.t())
    with pytest.raises(ValueError, match=r"gated_mlp: w_gate_up \(fused\) excludes w_gate"):
        fb.gated_mlp(x, w, None, w.t(), w_gate_up=torch.randn(12, 4))
    with pytest.raises(ValueError, match=r"gated_mlp: w_gate_up must have shape"):
        fb.gated_mlp(x, None, None, w.t(), w_gate_up=torch.randn(11, 4))
    with pytest.raises(ValueError, match=r"gated_mlp: b_gate_up needs w_gate_up"):
        fb.gated_mlp(x, w, w, w.t(), b_gate_up=torch.randn(12))


# -- op contracts ---------------------------------------------------------------------------------


@needs_c
def test_opcheck_and_gradcheck():
    x = torch.randn(5, 17, dtype=torch.float64, requires_grad=True)
    w = torch.randn(17, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.pyfast.rms_norm_offset.default, (x, w, 1e-6, 1.0))
    assert torch.autograd.gradcheck(
        lambda a, b: torch.ops.pyfast.rms_norm_offset(a, b, 1e-6, 1.0)[0], (x, w)
    )
    assert torch.autograd.gradcheck(lambda a, b: fb.rms_norm_offset(a, b, 1e-6, 0.5), (x, w))
    g = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    u = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.pyfast.geglu.default, (g, u))
    assert torch.autograd.gradcheck(torch.ops.pyfast.geglu, (g, u))
    assert torch.autograd.gradcheck(fb.geglu, (g, u))
    xb = torch.randn(3, 40, dtype=torch.bfloat16)
    for op, args in [
        (torch.ops.pyfast.rms_norm_offset.default, (xb, torch.randn(40), 1e-6, 1.0)),
        (torch.ops.pyfast.rms_norm_offset_backward.default,
         (x.detach(), x.detach(), w.detach(), torch.rand(5, dtype=torch.float64), 1.0)),
        (torch.ops.pyfast.geglu_backward.default, (g.detach(), g.detach(), u.detach())),
        (torch.ops.pyfast.geglu_.default, (g.detach().clone(), u.detach())),
    ]:  # fmt: skip
        torch.library.opcheck(op, args)


@needs_c
def test_bad_inputs_name_the_op_and_argument():
    ops = torch.ops.pyfast
    with pytest.raises(RuntimeError, match=r"rms_norm_offset: weight must have shape \[8\]"):
        ops.rms_norm_offset(torch.randn(2, 8), torch.randn(7), 1e-6, 1.0)
    with pytest.raises(RuntimeError, match=r"rms_norm_offset: weight must have x's dtype Float,"):
        ops.rms_norm_offset(torch.randn(2, 8), torch.randn(8, dtype=torch.float64), 1e-6, 1.0)
    with pytest.raises(
        RuntimeError, match=r"rms_norm_offset: weight must have x's dtype BFloat16 or float32"
    ):
        ops.rms_norm_offset(
            torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(8).double(), 1e-6, 1.0
        )
    with pytest.raises(
        RuntimeError, match=r"rms_norm_offset: x must be float32, bfloat16 or float64"
    ):
        ops.rms_norm_offset(torch.ones(2, 8, dtype=torch.int32), torch.ones(8), 1e-6, 1.0)
    with pytest.raises(RuntimeError, match=r"rms_norm_offset: eps must be >= 0"):
        ops.rms_norm_offset(torch.ones(2, 8), torch.ones(8), -1.0, 1.0)
    with pytest.raises(RuntimeError, match=r"rms_norm_offset: x must have a non-empty last dim"):
        ops.rms_norm_offset(torch.ones(2, 0), torch.ones(0), 1e-6, 1.0)
    with pytest.raises(RuntimeError, match=r"rms_norm_offset_backward: rstd must be"):
        ops.rms_norm_offset_backward(torch.ones(2, 8), torch.ones(2, 8), torch.ones(8),
                                     torch.ones(3), 1.0)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"rms_norm_offset_backward: grad must have x's shape"):
        ops.rms_norm_offset_backward(torch.ones(3, 8), torch.ones(2, 8), torch.ones(8),
                                     torch.ones(2), 1.0)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"geglu: up must have gate's shape"):
        ops.geglu(torch.randn(2, 8), torch.randn(2, 9))
    with pytest.raises(
        RuntimeError, match=r"geglu: up must have gate's shape .* Float, got .* Double"
    ):
        ops.geglu(torch.randn(2, 8), torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"geglu: gate must be float32, bfloat16 or float64"):
        ops.geglu(torch.ones(2, dtype=torch.int64), torch.ones(2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"geglu_: gate must be contiguous"):
        ops.geglu_(torch.randn(8, 2).t(), torch.randn(2, 8))
    with pytest.raises(RuntimeError, match=r"geglu_backward: grad must have gate's shape"):
        ops.geglu_backward(torch.randn(3), torch.randn(2), torch.randn(2))
