"""linear_token_logprobs (from hidden states, logits never formed) against matmul + log_softmax,
its backward, the cross-entropy helper, and the Hugging Face causal-LM head."""

import importlib

import pytest
import torch

import pyfast
from pyfast.ops import (
    causal_lm_loss,
    causal_lm_token_logprobs,
    linear_cross_entropy,
    linear_token_logprobs,
    reference,
)
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
