"""linear_token_logprobs (from hidden states, logits never formed) against matmul + log_softmax,
its backward, the cross-entropy helper, and the Hugging Face causal-LM head."""

import importlib

import pytest
import torch

import pyfast
from pyfast.hf.head import causal_lm_loss, causal_lm_token_logprobs
from pyfast.ops import linear_cross_entropy, linear_token_logprobs, reference
from tests.conftest import HAS_CUDA, devices

needs_c = pytest.mark.skipif(not pyfast.HAS_C, reason="pyfast._C not built")


def make(n, d, v, dtype=torch.float32, device="cpu", bias=False, ignore_frac=0.2):
    hidden = torch.randn(n, d, device=device).to(dtype)
    weight = (torch.randn(v, d, device=device) / d**0.5 * 3).to(dtype)
    b = (torch.randn(v, device=device)).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), device=device)
    labels[torch.rand(n, device=device) < ignore_frac] = -100
    return hidden, weight, b, labels


def check_forward(hidden, weight, labels, bias=None, ignore_index=-100):
    lp, am, lse = linear_token_logprobs(hidden, weight, labels, bias, ignore_index)
    rlp, ram, rlse = reference.linear_token_logprobs(hidden, weight, labels, bias, ignore_index)
    # Logits are rounded to the inputs' dtype on both sides; bf16 matmuls may round differently.
    tol = dict(rtol=1e-5, atol=5e-5) if hidden.dtype == torch.float32 else dict(rtol=0, atol=0.15)
    torch.testing.assert_close(lp, rlp, **tol)
    torch.testing.assert_close(lse, rlse, **tol)
    if hidden.dtype == torch.float32:
        assert torch.equal(am, ram)
    else:  # near-ties may flip under different bf16 rounding
        assert (am != ram).float().mean() < 0.05
    ignored = labels == ignore_index
    assert (lp[ignored] == 0).all() and not am[ignored].any()
    return lp, am, lse


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,v", [(1, 49152), (97, 50257), (5, 151936), (600, 5000)])
def test_forward_matches_reference(device, dtype, n, v):
    hidden, weight, _, labels = make(n, 64, v, dtype, device)
    check_forward(hidden, weight, labels)


@pytest.mark.parametrize("device", devices())
def test_bias_3d_non_contiguous_and_all_ignored(device):
    hidden, weight, bias, labels = make(2 * 13, 48, 9000, bias=True, device=device)
    h3 = hidden.view(2, 13, 48)
    check_forward(h3, weight, labels.view(2, 13), bias)
    # Non-contiguous hidden (a slice along time) and weight (transposed storage).
    big = torch.randn(3, 20, 48, device=device)
    w_t = weight.t().contiguous().t()
    check_forward(big[:, 2:15], w_t, torch.randint(0, 9000, (3, 13), device=device), bias)
    lp, am, lse = check_forward(hidden, weight, torch.full_like(labels, -100), bias)
    assert (lp == 0).all() and (lse == 0).all()


@pytest.mark.parametrize("device", devices())
def test_extreme_logits(device):
    hidden, weight, _, labels = make(16, 32, 4099, ignore_frac=0.0, device=device)
    hidden[0] *= 3000  # logits around +-1e4
    lp, _, lse = check_forward(hidden[:1], weight, labels[:1])
    assert torch.isfinite(lp).all() and torch.isfinite(lse).all()
    bias = torch.zeros(4099, device=device)
    bias[::2] = float("-inf")
    labels[:] = 1
    lp, _, _ = check_forward(hidden, weight, labels, bias)
    assert torch.isfinite(lp).all()


def grads_of(fn, hidden, weight, bias, labels, g, h):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    lp, _, lse = fn(leaves[0], leaves[1], labels, b)
    ((lp * g.to(lp.dtype)).sum() + (lse * h.to(lse.dtype)).sum()).backward()
    out = [leaves[0].grad, leaves[1].grad]
    return out + ([b.grad] if b is not None else [])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,v,bias", [(1, 49152, False), (97, 50257, True), (700, 9000, True)])
def test_backward_matches_reference(device, dtype, n, v, bias):
    hidden, weight, b, labels = make(n, 64, v, dtype, device, bias=bias)
    g, h = torch.randn(n, device=device), torch.randn(n, device=device)
    ours = grads_of(linear_token_logprobs, hidden, weight, b, labels, g, h)
    # Oracle: float64 matmul + log_softmax on the same (rounded) inputs.
    ref = grads_of(reference.linear_token_logprobs, hidden.double(), weight.double(),
                   None if b is None else b.double(), labels, g.double(), h.double())  # fmt: skip
    # fp32 tolerance: the error of summing ~V fp32 products in the matmuls, not of the kernel.
    for name, a, r in zip(("hidden", "weight", "bias")[: len(ours)], ours, ref, strict=True):
        assert a.dtype == dtype, name
        scale = r.abs().max().item() + 1e-12
        err = (a.double() - r).abs().max().item() / scale
        assert err < (5e-5 if dtype == torch.float32 else 3e-2), (name, err)
    assert (ours[0][labels == -100] == 0).all()


@needs_c
def test_gradcheck_float64():
    hidden, weight, bias, labels = make(5, 3, 13, torch.float64, bias=True)
    labels[3] = -100

    def f(hd, w, b):
        lp, _, lse = torch.ops.pyfast.linear_token_logprobs(hd, w, labels, b, -100)
        return lp, lse

    args = tuple(t.requires_grad_() for t in (hidden, weight, bias))
    assert torch.autograd.gradcheck(f, args)


@needs_c
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_chunking_paths(dtype):
    """Several vocabulary chunks and row blocks (2048 x 2048 on CPU) against the float64
    reference: exact in float64; bf16 exercises the fp32 accumulators across row blocks."""
    hidden, weight, bias, labels = make(2100, 8, 5000, dtype, bias=True)
    lp, am, lse = linear_token_logprobs(hidden, weight, labels, bias)
    ref_in = [t.double() for t in (hidden, weight, bias)]
    rlp, ram, rlse = reference.linear_token_logprobs(ref_in[0], ref_in[1], labels, ref_in[2])
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=0, atol=0.15)
    torch.testing.assert_close(lp.double(), rlp, **tol)
    torch.testing.assert_close(lse.double(), rlse, **tol)
    if dtype == torch.float64:
        assert torch.equal(am, ram)
    g, h = torch.randn(2100, dtype=torch.float64), torch.randn(2100, dtype=torch.float64)
    ours = grads_of(linear_token_logprobs, hidden, weight, bias, labels, g, h)
    ref = grads_of(reference.linear_token_logprobs, *ref_in[:2], ref_in[2], labels, g, h)
    for a, r in zip(ours, ref, strict=True):
        err = (a.double() - r).abs().max() / (r.abs().max() + 1e-12)
        assert err < (1e-10 if dtype == torch.float64 else 3e-2)


@needs_c
def test_opcheck():
    hidden, weight, bias, labels = make(6, 8, 50, bias=True)
    op = torch.ops.pyfast.linear_token_logprobs.default
    torch.library.opcheck(op, (hidden.requires_grad_(), weight.requires_grad_(), labels,
                               bias.requires_grad_(), -100))  # fmt: skip
    torch.library.opcheck(op, (hidden.detach(), weight.detach(), labels, None, -100))
    lp, _, lse = op(hidden.detach(), weight.detach(), labels, bias.detach(), -100)
    bwd = torch.ops.pyfast.linear_token_logprobs_backward.default
    args = (torch.randn_like(lp), torch.randn_like(lse), hidden.detach(), weight.detach(), labels,
            bias.detach(), lse, -100)  # fmt: skip
    torch.library.opcheck(bwd, args)
    args = (torch.randn_like(lp), None, hidden.detach(), weight.detach(), labels, None, lse, -100)
    torch.library.opcheck(bwd, args)


@pytest.fixture(params=["recompute", "fused"])
def ce_path(request, monkeypatch):
    """linear_cross_entropy's two gradient paths: recompute in backward, or gradients from the
    forward pass (linear_token_logprobs_with_grad), which small problems do not take by default."""
    if request.param == "fused":
        module = importlib.import_module("pyfast.ops.token_logprobs")
        monkeypatch.setattr(module, "_FULL_ROW_ELEMS", {"cpu": 1, "cuda": 1})
    return request.param


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_gradient_over_several_row_blocks(dtype):
    """The CUDA one-pass gradient in whole-row blocks of 64 Mi logits: 1400 x 49152 logits make
    two blocks (1365 rows, then 35), against the float64 reference."""
    n, v = 1400, 49152
    hidden, weight, bias, labels = make(n, 64, v, dtype, "cuda", bias=True)
    g = torch.randn(n, device="cuda")
    lp, am, lse, gh, gw, gb = torch.ops.pyfast.linear_token_logprobs_with_grad(
        hidden, weight, labels, bias, -100, g
    )
    ref_in = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    rlp, _, rlse = reference.linear_token_logprobs(*ref_in[:2], labels, ref_in[2])
    (rlp * g.double()).sum().backward()
    tol = dict(rtol=1e-5, atol=5e-5) if dtype == torch.float32 else dict(rtol=0, atol=0.15)
    torch.testing.assert_close(lp.double(), rlp.detach(), **tol)
    torch.testing.assert_close(lse.double(), rlse.detach(), **tol)
    for name, a, r in zip(("hidden", "weight", "bias"), (gh, gw, gb), ref_in, strict=True):
        assert a.dtype == dtype, name
        err = (a.double() - r.grad).abs().max().item() / (r.grad.abs().max().item() + 1e-12)
        assert err < (5e-5 if dtype == torch.float32 else 3e-2), (name, err)


@needs_c
def test_torch_compile(ce_path):
    hidden, weight, _, labels = make(40, 16, 300)
    compiled = torch.compile(linear_cross_entropy, backend="aot_eager", fullgraph=True)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    compiled(h1, w1, labels).backward()
    linear_cross_entropy(h2, w2, labels).backward()
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


@pytest.mark.parametrize("device", devices())
def test_linear_cross_entropy_matches_torch(device, ce_path):
    hidden, weight, bias, labels = make(300, 32, 3000, bias=True, device=device)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    refs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = linear_cross_entropy(leaves[0], leaves[1], labels, leaves[2])
    logits = refs[0] @ refs[1].t() + refs[2]
    ref = torch.nn.functional.cross_entropy(logits, labels)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    for a, r in zip(leaves, refs, strict=True):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-6)


def tiny_llama(tied):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_causal_lm_loss_matches_hf(tied):
    model = tiny_llama(tied)
    input_ids = torch.randint(0, 301, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, :3] = 0  # left padding
    labels = input_ids.clone()
    labels[:, :4] = -100  # prompt
    labels[2, :3] = -100
    ref = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    ref_grads = torch.autograd.grad(ref, [p for p in model.parameters()])
    loss = causal_lm_loss(model, input_ids, labels, attention_mask)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)
    lp, am, _, shifted = causal_lm_token_logprobs(model, input_ids, labels, attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    ref_lp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0]
    valid = shifted[:, :-1] != -100
    torch.testing.assert_close(lp[:, :-1][valid], ref_lp[valid], rtol=1e-5, atol=1e-5)
    assert torch.equal(am[:, :-1][valid], (logits[:, :-1].argmax(-1) == input_ids[:, 1:])[valid])


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_matches_cuda(dtype):
    hidden, weight, bias, labels = make(97, 64, 50257, dtype, bias=True)
    g, h = torch.randn(97), torch.randn(97)
    out_cpu = linear_token_logprobs(hidden, weight, labels, bias)
    out_gpu = linear_token_logprobs(hidden.cuda(), weight.cuda(), labels.cuda(), bias.cuda())
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0, atol=0.15)
    torch.testing.assert_close(out_gpu[0].cpu(), out_cpu[0], **tol)
    torch.testing.assert_close(out_gpu[2].cpu(), out_cpu[2], **tol)
    gc = grads_of(linear_token_logprobs, hidden, weight, bias, labels, g, h)
    gg = grads_of(linear_token_logprobs, hidden.cuda(), weight.cuda(), bias.cuda(), labels.cuda(),
                  g.cuda(), h.cuda())  # fmt: skip
    for a, b in zip(gc, gg, strict=True):
        err = (a.double() - b.cpu().double()).abs().max() / (a.double().abs().max() + 1e-12)
        assert err < (1e-4 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("device", devices())
def test_bad_inputs_name_the_argument(device):
    hidden, weight, bias, labels = make(4, 8, 50, bias=True, device=device)
    with pytest.raises((RuntimeError, ValueError), match="labels"):
        linear_token_logprobs(hidden, weight, torch.tensor([0, 1, 50, 2], device=device))
    with pytest.raises(ValueError, match="labels"):
        linear_token_logprobs(hidden, weight, labels[:2])
    with pytest.raises(TypeError, match="labels"):
        linear_token_logprobs(hidden, weight, labels.float())
    with pytest.raises(RuntimeError, match="weight"):
        linear_token_logprobs(hidden, weight[:, :5], labels)
    with pytest.raises(RuntimeError, match="weight"):
        linear_token_logprobs(hidden, weight.double(), labels)
    with pytest.raises(RuntimeError, match="bias"):
        linear_token_logprobs(hidden, weight, labels, bias[:7])
    with pytest.raises(RuntimeError, match="hidden"):
        linear_token_logprobs(hidden.half(), weight.half(), labels)


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_with_grad_matches_forward_and_backward(dtype):
    """The fused forward+gradient op equals the forward op plus the backward op."""
    hidden, weight, bias, labels = make(300, 24, 70000, dtype, bias=True)  # several row blocks
    g = torch.randn(300)
    op = torch.ops.pyfast
    lp, am, lse, gh, gw, gb = op.linear_token_logprobs_with_grad(hidden, weight, labels, bias,
                                                                 -100, g)  # fmt: skip
    rlp, ram, rlse = op.linear_token_logprobs(hidden, weight, labels, bias, -100)
    rgh, rgw, rgb = op.linear_token_logprobs_backward(g, None, hidden, weight, labels, bias, rlse,
                                                      -100)  # fmt: skip
    torch.testing.assert_close(lp, rlp)
    torch.testing.assert_close(lse, rlse)
    assert torch.equal(am, ram)
    for a, r in ((gh, rgh), (gw, rgw), (gb, rgb)):
        assert a.dtype == dtype
        err = (a.double() - r.double()).abs().max() / (r.double().abs().max() + 1e-12)
        assert err < (1e-5 if dtype != torch.bfloat16 else 3e-2)
    args = (hidden[:7], weight[:50], labels[:7].clamp(max=49), bias[:50], -100, g[:7])
    torch.library.opcheck(op.linear_token_logprobs_with_grad.default, args)


@needs_c
def test_fused_cross_entropy_path_refuses_second_backward(ce_path):
    hidden, weight, _, labels = make(30, 8, 200)
    h = hidden.requires_grad_()
    loss = linear_cross_entropy(h, weight, labels)
    loss.backward(retain_graph=True)
    if ce_path == "fused":  # gradients were computed in forward and handed over in place
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
    else:
        first = h.grad.clone()
        loss.backward()
        torch.testing.assert_close(h.grad, 2 * first)


# ---- Non-finite inputs: log_softmax semantics through the fused head ---------------------------

NAN, INF = float("nan"), float("inf")


def nan_close(got, want, tol):
    assert torch.equal(got.isnan(), want.isnan()), (got.isnan().nonzero(), want.isnan().nonzero())
    fin = ~want.isnan()
    torch.testing.assert_close(got[fin].double(), want[fin].double(), **tol)


def nonfinite_head(n, v, dtype, device):
    """hidden / weight / bias with NaN in hidden rows (the whole logits row NaN), +inf / -inf
    from the bias, an all -inf row is not reachable through a finite weight, so the bias makes
    some columns -inf; one test puts NaN in a weight row (a NaN column in every row)."""
    hidden, weight, bias, labels = make(n, 16, v, dtype, device, bias=True, ignore_frac=0.0)
    hidden[1, 3] = NAN
    hidden[4, 0] = NAN
    hidden[4, 15] = NAN
    bias[1::3] = -INF  # -inf mixed into every row
    labels[2] = 1  # a label on a -inf column: log p = -inf
    return hidden, weight, bias, labels


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [37, 4099, 50257, 151936])
def test_nonfinite_hidden_and_bias(device, dtype, v):
    hidden, weight, bias, labels = nonfinite_head(7, v, dtype, device)
    bias[v // 2] = INF  # +inf column: lse +inf, log p NaN, argmax v // 2 in every finite row
    labels[5] = v // 2
    labels[6] = -100
    lp, am, lse = linear_token_logprobs(hidden, weight, labels, bias)
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    want_lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]
    valid = labels != -100
    tol = dict(rtol=1e-5, atol=5e-5)
    nan_close(lp[valid], want_lp[valid], tol)
    nan_close(lse[valid], torch.logsumexp(logits, -1)[valid], tol)
    assert torch.equal(am, (logits.argmax(-1) == labels) & valid)
    assert am[5] and lp[6] == 0 and lse[6] == 0
    assert lse[0] == INF and lp[1].isnan() and lp[4].isnan() and lse[4].isnan()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [37, 50257])
def test_nonfinite_weight_and_all_minus_inf(device, dtype, v):
    hidden, weight, bias, labels = make(6, 16, v, dtype, device, bias=True, ignore_frac=0.0)
    weight[v - 1, 2] = NAN  # the last column (the scalar tail) is NaN in every row
    labels[0] = v - 1
    lp, am, lse = linear_token_logprobs(hidden, weight, labels, bias)
    assert lp.isnan().all() and lse.isnan().all()
    assert torch.equal(am, labels == v - 1)  # NaN is torch's argmax
    # All -inf rows: lse -inf, log p NaN, argmax 0.
    ninf_bias = torch.full((v - 1,), -INF, device=device, dtype=dtype)
    lp, am, lse = linear_token_logprobs(hidden, weight[:-1], labels % (v - 1), ninf_bias)
    assert (lse == -INF).all() and lp.isnan().all() and torch.equal(am, labels % (v - 1) == 0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [37, 50257])
def test_nonfinite_backward_and_with_grad(device, dtype, v):
    """NaN rows give NaN grad_hidden rows and (through G.T @ hidden) NaN in grad_weight, as
    autograd through matmul + log_softmax; the other rows of grad_hidden match the reference.
    linear_token_logprobs_with_grad agrees with forward + backward on every NaN."""
    hidden, weight, bias, labels = nonfinite_head(9, v, dtype, device)
    labels[7] = -100  # ignored: zero gradient
    g = torch.randn(9, device=device)
    ours = grads_of(linear_token_logprobs, hidden, weight, bias, labels, g, torch.zeros_like(g))
    valid = labels != -100
    leaves = [t.detach().float().clone().requires_grad_() for t in (hidden, weight, bias)]
    logits = torch.nn.functional.linear(*leaves)
    rlp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]
    (rlp[valid] * g[valid]).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for name, a, r in zip(("hidden", "weight", "bias"), ours, leaves, strict=True):
        assert torch.equal(a.isnan(), r.grad.isnan()), name
        fin = ~r.grad.isnan()
        if fin.any():
            torch.testing.assert_close(a.float()[fin], r.grad[fin], **tol)
    assert ours[0][1].isnan().all() and (ours[0][7] == 0).all() and ours[1].isnan().any()
    if device == "cpu" and not pyfast.HAS_C:
        return
    op = torch.ops.pyfast
    out = op.linear_token_logprobs_with_grad(hidden, weight, labels, bias, -100, g)
    lp, _, lse = op.linear_token_logprobs(hidden, weight, labels, bias, -100)
    back = op.linear_token_logprobs_backward(g, None, hidden, weight, labels, bias, lse, -100)
    nan_close(out[0], lp, dict(rtol=1e-6, atol=1e-6))
    for a, b in zip(out[3:], back, strict=True):
        assert torch.equal(a.isnan(), b.isnan())


@needs_c
def test_nonfinite_chunked_row_blocks():
    """More rows than one 2048-row block and several vocabulary chunks, NaN in the second block."""
    hidden, weight, bias, labels = make(2100, 8, 5000, torch.float64, bias=True, ignore_frac=0.1)
    hidden[2050, 1] = NAN
    bias[4999] = INF
    hidden[3, :] = 0
    bias[:] = torch.where(torch.arange(5000) % 2 == 0, -INF, bias)
    lp, am, lse = linear_token_logprobs(hidden, weight, labels, bias)
    rlp, ram, rlse = reference.linear_token_logprobs(hidden, weight, labels, bias)
    tol = dict(rtol=1e-10, atol=1e-10)
    nan_close(lp, rlp, tol)
    nan_close(lse, rlse, tol)
    assert torch.equal(am, ram)


# ---- Logit scaling and soft-capping folded into the head -------------------------------------

MAPS = [(0.125, None), (1.7, None), (1.0, 30.0), (0.5, 3.0)]


def ref_map64(hidden, weight, labels, bias, scale, softcap):
    """The float64 oracle: matmul, scale, tanh cap, log_softmax, all in float64."""
    args = [None if t is None else t.double() for t in (hidden, weight, bias)]
    return reference.linear_token_logprobs(args[0], args[1], labels, args[2], -100, scale, softcap)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,v", [(1, 49152), (97, 50257), (600, 5000), (5, 151936)])
@pytest.mark.parametrize("scale,softcap", MAPS)
def test_logit_map_matches_float64_reference(device, dtype, n, v, scale, softcap):
    hidden, weight, bias, labels = make(n, 64, v, dtype, device, bias=n == 97)
    if dtype == torch.float32:
        hidden = hidden * 4  # logits up to ~+-50: the cap bites
    lp, am, lse = linear_token_logprobs(hidden, weight, labels, bias, -100, scale, softcap)
    rlp, ram, rlse = ref_map64(hidden, weight, labels, bias, scale, softcap)
    # bf16: the kernel's logits are rounded to bf16 by the matmul (about 0.05 at |x| ~ 12), the
    # float64 oracle's are not; scale multiplies that error.
    tol = dict(rtol=1e-5, atol=5e-5)
    if dtype == torch.bfloat16:
        tol = dict(rtol=0, atol=0.15 * max(scale, 1))
    torch.testing.assert_close(lp.double(), rlp, **tol)
    torch.testing.assert_close(lse.double(), rlse, **tol)
    if dtype == torch.float32:
        assert (am != ram).float().mean() <= 0.02  # near-ties of tanh-saturated logits may flip
    # The reference twin in the inputs' dtype (the fallback) agrees too.
    flp, _, flse = reference.linear_token_logprobs(hidden, weight, labels, bias, -100, scale,
                                                   softcap)  # fmt: skip
    torch.testing.assert_close(lp, flp, **tol)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,v,bias", [(1, 49152, False), (97, 50257, True), (700, 9000, True)])
@pytest.mark.parametrize("scale,softcap", [(0.125, None), (1.0, 30.0), (0.5, 3.0)])
def test_logit_map_backward_matches_float64_reference(device, dtype, n, v, bias, scale, softcap):
    hidden, weight, b, labels = make(n, 64, v, dtype, device, bias=bias)
    hidden = hidden * 4
    g, h = torch.randn(n, device=device), torch.randn(n, device=device)

    def ours_fn(hd, w, lab, bb):
        return linear_token_logprobs(hd, w, lab, bb, -100, scale, softcap)

    def ref_fn(hd, w, lab, bb):
        return reference.linear_token_logprobs(hd, w, lab, bb, -100, scale, softcap)

    ours = grads_of(ours_fn, hidden, weight, b, labels, g, h)
    ref = grads_of(ref_fn, hidden.double(), weight.double(), None if b is None else b.double(),
                   labels, g.double(), h.double())  # fmt: skip
    for name, a, r in zip(("hidden", "weight", "bias")[: len(ours)], ours, ref, strict=True):
        assert a.dtype == dtype, name
        err = (a.double() - r).abs().max().item() / (r.abs().max().item() + 1e-12)
        assert err < (5e-5 if dtype == torch.float32 else 3e-2), (name, err)


@needs_c
@pytest.mark.parametrize("scale,softcap", [(0.125, 0.0), (1.3, 2.0), (1.0, 0.7)])
def test_logit_map_gradcheck_float64(scale, softcap):
    hidden, weight, bias, labels = make(5, 3, 13, torch.float64, bias=True)
    labels[3] = -100

    def f(hd, w, b):
        lp, _, lse = torch.ops.pyfast.linear_token_logprobs(hd, w, labels, b, -100, scale, softcap)
        return lp, lse

    args = tuple(t.requires_grad_() for t in (hidden, weight, bias))
    assert torch.autograd.gradcheck(f, args)
    lp, lse = f(*args)
    rlp, _, rlse = reference.linear_token_logprobs(*args[:2], labels, args[2], -100, scale,
                                                     softcap)  # fmt: skip
    torch.testing.assert_close(lp, rlp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, rlse, rtol=1e-12, atol=1e-12)


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_logit_map_with_grad_and_opcheck(dtype):
    hidden, weight, bias, labels = make(300, 24, 70000, dtype, bias=True)  # several row blocks
    g = torch.randn(300)
    op = torch.ops.pyfast
    out = op.linear_token_logprobs_with_grad(hidden, weight, labels, bias, -100, g, 0.5, 4.0)
    rlp, ram, rlse = op.linear_token_logprobs(hidden, weight, labels, bias, -100, 0.5, 4.0)
    back = op.linear_token_logprobs_backward(g, None, hidden, weight, labels, bias, rlse, -100,
                                             0.5, 4.0)  # fmt: skip
    torch.testing.assert_close(out[0], rlp)
    torch.testing.assert_close(out[2], rlse)
    assert torch.equal(out[1], ram)
    for a, r in zip(out[3:], back, strict=True):
        err = (a.double() - r.double()).abs().max() / (r.double().abs().max() + 1e-12)
        assert err < (1e-5 if dtype != torch.bfloat16 else 3e-2)
    small = (hidden[:7], weight[:50], labels[:7].clamp(max=49), bias[:50])
    opcheck = torch.library.opcheck
    opcheck(op.linear_token_logprobs.default,
            (small[0].clone().requires_grad_(), small[1].clone().requires_grad_(), small[2],
             small[3].clone().requires_grad_(), -100, 0.5, 4.0))  # fmt: skip
    opcheck(op.linear_token_logprobs_with_grad.default, (*small, -100, g[:7], 0.5, 4.0))
    lp, _, lse = op.linear_token_logprobs(*small, -100, 0.5, 4.0)
    for mask in ([True, True, True], [True, False, False], [False, True, False]):
        opcheck(op.linear_token_logprobs_backward.default,
                (g[:7], None, *small, lse, -100, 0.5, 4.0, mask))  # fmt: skip
        opcheck(op.linear_token_logprobs_with_grad.default, (*small, -100, g[:7], 1.0, 0.0, mask))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("scale,softcap", [(0.125, None), (1.0, 30.0), (2.0, 1.5)])
def test_linear_cross_entropy_logit_map_matches_torch(device, ce_path, scale, softcap):
    hidden, weight, bias, labels = make(300, 32, 3000, bias=True, device=device)
    hidden = hidden * 8
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    refs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = linear_cross_entropy(*leaves[:2], labels, leaves[2], scale=scale, softcap=softcap)
    logits = (refs[0] @ refs[1].t() + refs[2]) * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    ref = torch.nn.functional.cross_entropy(logits, labels)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    for a, r in zip(leaves, refs, strict=True):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-6)


def test_logit_map_bad_arguments():
    hidden, weight, bias, labels = make(4, 8, 50, bias=True)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap"):
            linear_token_logprobs(hidden, weight, labels, softcap=bad)
        with pytest.raises(ValueError, match="softcap"):
            linear_cross_entropy(hidden, weight, labels, softcap=bad)
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="scale"):
            linear_token_logprobs(hidden, weight, labels, scale=bad)
    if pyfast.HAS_C:
        op = torch.ops.pyfast.linear_token_logprobs
        with pytest.raises(RuntimeError, match="linear_token_logprobs: softcap must be"):
            op(hidden, weight, labels, bias, -100, 1.0, -2.0)
        with pytest.raises(RuntimeError, match="linear_token_logprobs: scale must be finite"):
            op(hidden, weight, labels, bias, -100, float("inf"), 0.0)


def tiny_model(kind):
    """Tiny random Gemma-2 (final_logit_softcapping=30; initializer_range=1 so that the logits
    reach about +-40 and the cap changes the loss) / Granite (logits_scaling=8), fp32."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    if kind == "gemma2":
        cfg = transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=30.0,
                                        attn_logit_softcapping=50.0,
                                        initializer_range=1.0)  # fmt: skip
        model = transformers.Gemma2ForCausalLM(cfg)
        return model.eval(), 1.0, 30.0
    cfg = transformers.GraniteConfig(**common, logits_scaling=8.0)
    return transformers.GraniteForCausalLM(cfg).eval(), 1.0 / 8.0, None


@pytest.mark.parametrize("kind", ["gemma2", "granite"])
def test_real_tiny_models_loss(kind, ce_path):
    """model(ids, labels=labels).loss against linear_cross_entropy on the decoder body's hidden
    states with the model's scale / softcap: equal within 1e-5 in fp32, gradients too."""
    model, scale, softcap = tiny_model(kind)
    ids = torch.randint(0, 301, (3, 12))
    labels = ids.clone()
    labels[:, :3] = -100
    ref = model(input_ids=ids, labels=labels).loss
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    hidden = model.model(input_ids=ids).last_hidden_state  # (B, T, D)
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    loss = linear_cross_entropy(hidden, model.lm_head.weight, shifted, scale=scale,
                                softcap=softcap)  # fmt: skip
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)
    # Without the transform the loss would be wrong: the test would notice a dropped argument.
    plain = linear_cross_entropy(hidden.detach(), model.lm_head.weight.detach(), shifted)
    assert (plain - ref).abs() > 1e-3


# ---- Frozen head: no weight-gradient work ------------------------------------------------------


def matmul_calls(fn):
    """How many matmuls (aten::mm / addmm and their out= / in-place forms) fn runs, counted by
    the profiler, which sees the ones the C++ kernels call too."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = ("aten::mm", "aten::addmm", "aten::addmm_")
    return sum(e.count for e in prof.key_averages() if e.key in names)


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_output_mask_skips_weight_grad(dtype):
    """output_mask [True, False, False]: grad_weight / grad_bias come back None, grad_hidden is
    bit-identical to the full backward's, and the weight-gradient matmuls are not run."""
    hidden, weight, bias, labels = make(300, 32, 9000, dtype, bias=True)
    g = torch.randn(300)
    op = torch.ops.pyfast
    _, _, lse = op.linear_token_logprobs(hidden, weight, labels, bias, -100)
    args = (g, None, hidden, weight, labels, bias, lse, -100, 1.0, 0.0)
    full = op.linear_token_logprobs_backward(*args, [True, True, True])
    frozen = op.linear_token_logprobs_backward(*args, [True, False, False])
    assert frozen[1] is None and frozen[2] is None
    assert torch.equal(frozen[0], full[0])
    n_full = matmul_calls(lambda: op.linear_token_logprobs_backward(*args, [True, True, True]))
    n_frozen = matmul_calls(lambda: op.linear_token_logprobs_backward(*args, [True, False, False]))
    chunks = -(-9000 // 2048)
    assert n_frozen == n_full - chunks == 2 * chunks  # logits + grad_hidden per chunk
    fused = op.linear_token_logprobs_with_grad(hidden, weight, labels, bias, -100, g, 1.0, 0.0,
                                               [True, False, False])  # fmt: skip
    fused_full = op.linear_token_logprobs_with_grad(hidden, weight, labels, bias, -100, g)
    assert fused[4] is None and fused[5] is None
    assert torch.equal(fused[3], fused_full[3])
    only_w = op.linear_token_logprobs_backward(*args, [False, True, False])
    assert only_w[0] is None and torch.equal(only_w[1], full[1])


@needs_c
@pytest.mark.parametrize("path", ["recompute", "fused"])
def test_frozen_head_autograd_skips_weight_grad(path, monkeypatch):
    """Through autograd (linear_token_logprobs' backward and linear_cross_entropy's one-pass
    gradient): a weight that does not require grad costs no grad_weight matmul; hidden.grad is
    bit-identical to the trainable head's. On the code before output_mask the counts are equal."""
    if path == "fused":
        module = importlib.import_module("pyfast.ops.token_logprobs")
        monkeypatch.setattr(module, "_FULL_ROW_ELEMS", {"cpu": 1, "cuda": 1})
    hidden, weight, _, labels = make(256, 32, 9000)

    def run(trainable_head):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(trainable_head)
        calls = matmul_calls(lambda: linear_cross_entropy(h, w, labels).backward())
        return h.grad, w.grad, calls

    gh_t, gw_t, calls_t = run(True)
    gh_f, gw_f, calls_f = run(False)
    assert gw_t is not None and gw_f is None
    assert torch.equal(gh_f, gh_t)
    assert calls_f < calls_t
