"""token_logprobs (from logits) against log_softmax + gather, its backward, and the helpers."""

import pytest
import torch

import pyfast
from pyfast.ops import (
    fused_cross_entropy,
    reference,
    sequence_logprobs,
    token_logprobs,
)
from tests.conftest import HAS_CUDA, devices

needs_c = pytest.mark.skipif(not pyfast.HAS_C, reason="pyfast._C not built")

# (rows, vocab): 1 and 97 rows over the vocabularies of SmolLM2, GPT-2 and Qwen2.
SHAPES = [(1, 49152), (97, 50257), (1, 151936), (7, 151936), (97, 49152), (3, 17), (5, 1)]
TOL = {
    torch.float32: dict(rtol=1e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=1e-5, atol=2e-5),  # logits exact in fp32; fp32 math both sides
}


def make(n, v, dtype=torch.float32, device="cpu", scale=4.0, ignore_frac=0.2):
    logits = (torch.randn(n, v, device=device) * scale).to(dtype)
    labels = torch.randint(0, v, (n,), device=device)
    drop = torch.rand(n, device=device) < ignore_frac
    labels[drop] = -100
    return logits, labels


def assert_matches_reference(logits, labels, ignore_index=-100, tol=None):
    """The oracle is the reference twin in float64 (exact next to fp32): the kernel's error is
    about 1e-6, below fp32 log_softmax's own (about 1.5e-5 at V = 151936)."""
    lp, am, lse = token_logprobs(logits, labels, ignore_index)
    rlp, ram, rlse = reference.token_logprobs(logits.double(), labels, ignore_index)
    tol = tol or TOL.get(logits.dtype, dict(rtol=1e-10, atol=1e-10))
    torch.testing.assert_close(lp.double(), rlp, **tol)
    torch.testing.assert_close(lse.double(), rlse, **tol)
    assert torch.equal(am, ram)
    return lp, am, lse


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,v", SHAPES)
def test_forward_matches_reference(device, dtype, n, v):
    logits, labels = make(n, v, dtype, device)
    lp, am, lse = assert_matches_reference(logits, labels)
    assert lp.dtype == lse.dtype == torch.float32 and am.dtype == torch.bool
    ignored = labels == -100
    assert (lp[ignored] == 0).all() and (lse[ignored] == 0).all() and not am[ignored].any()


@pytest.mark.parametrize("device", devices())
def test_argmax_labels_and_ties(device):
    logits, _ = make(64, 1000, device=device)
    labels = logits.argmax(-1)
    labels[::2] = (labels[::2] + 1) % 1000
    logits[1, 5] = logits[1].max() + 1.0  # a later tie would not change torch's first argmax
    logits[1, 900] = logits[1, 5]
    labels[1] = 900
    _, am, _ = assert_matches_reference(logits, labels)
    assert am[3] and not am[2] and not am[1]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_ignored_and_custom_ignore_index(device, dtype):
    logits, labels = make(9, 4097, dtype, device)
    labels[:] = -100
    lp, am, lse = assert_matches_reference(logits, labels)
    assert (lp == 0).all() and not am.any()
    labels = torch.randint(0, 4097, (9,), device=device)
    labels[2] = 7
    lp, _, _ = assert_matches_reference(logits, labels, ignore_index=7)
    assert lp[2] == 0


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_3d_and_non_contiguous(device, dtype):
    base = (torch.randn(4, 10, 3001, device=device) * 3).to(dtype)
    labels = torch.randint(0, 3001, (4, 9), device=device)
    labels[0, :4] = -100
    # logits[:, :-1]: the usual next-token slice, not flattenable to a 2-D view.
    lp, am, lse = assert_matches_reference(base[:, :-1], labels)
    assert lp.shape == am.shape == lse.shape == (4, 9)
    # Strided rows (a column slice keeps unit stride inside a row).
    wide = (torch.randn(6, 5000, device=device) * 3).to(dtype)
    labels = torch.randint(0, 4000, (6,), device=device)
    assert_matches_reference(wide[:, :4000], labels)
    # Transposed storage (no unit stride in the vocabulary dim).
    assert_matches_reference(wide.t().contiguous().t(), torch.randint(0, 5000, (6,), device=device))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits(device, dtype):
    logits, labels = make(8, 50257, dtype, device, ignore_frac=0.0)
    logits[0] = logits[0] * 2500  # about +-1e4
    logits[1, ::3] = float("-inf")
    labels[1] = 1  # a finite entry
    logits[2, :] = float("-inf")
    logits[2, 123] = 1e4
    labels[2] = 123
    logits[3, :] = -1e4
    logits[3, 77] = 1e4
    labels[3] = 78
    lp, am, lse = assert_matches_reference(logits, labels, tol=dict(rtol=1e-5, atol=1e-2))
    assert torch.isfinite(lp).all() and torch.isfinite(lse).all()
    assert lp[2] == 0 and am[2]
    assert lp[3] == logits[3, 78].float() - logits[3, 77].float() and not am[3]
    # The label's own logit is -inf: log p = -inf, like log_softmax.
    labels[1] = 0
    lp, _, _ = token_logprobs(logits, labels)
    assert lp[1] == float("-inf")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,v", [(1, 49152), (33, 50257), (3, 151936)])
def test_backward_matches_reference(device, dtype, n, v):
    logits, labels = make(n, v, dtype, device)
    logits[0, :5] = float("-inf")
    x = logits.clone().requires_grad_()
    xr = logits.double().requires_grad_()
    lp, _, lse = token_logprobs(x, labels)
    rlp, _, rlse = reference.token_logprobs(xr, labels)
    g, h = torch.randn_like(lp), torch.randn_like(lse)
    ((lp * g).sum() + (lse * h).sum()).backward()
    ((rlp * g.double()).sum() + (rlse * h.double()).sum()).backward()
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, **tol)
    assert (x.grad[labels == -100] == 0).all()


@needs_c
def test_gradcheck_float64():
    logits = torch.randn(4, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (4,))
    labels[2] = -100

    def f(x):
        lp, _, lse = torch.ops.pyfast.token_logprobs(x, labels, -100)
        return lp, lse

    assert torch.autograd.gradcheck(f, (logits,))
    lp, am, lse = torch.ops.pyfast.token_logprobs(logits, labels, -100)
    rlp, ram, rlse = reference.token_logprobs(logits, labels)
    torch.testing.assert_close(lp, rlp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, rlse, rtol=1e-12, atol=1e-12)


@needs_c
def test_opcheck():
    logits, labels = make(5, 301)
    torch.library.opcheck(torch.ops.pyfast.token_logprobs.default,
                          (logits.requires_grad_(), labels, -100))  # fmt: skip
    lp, _, lse = torch.ops.pyfast.token_logprobs(logits.detach(), labels, -100)
    args = (torch.randn_like(lp), torch.randn_like(lse), logits.detach(), labels, lse, -100)
    torch.library.opcheck(torch.ops.pyfast.token_logprobs_backward.default, args)
    args = (torch.randn_like(lp), None, logits.detach().bfloat16(), labels, lse, -100)
    torch.library.opcheck(torch.ops.pyfast.token_logprobs_backward.default, args)


@needs_c
def test_torch_compile():
    logits, labels = make(12, 777)

    def loss_fn(x, y):
        return fused_cross_entropy(x, y) * 2.0

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    compiled(x1, labels).backward()
    loss_fn(x2, labels).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("device", devices())
def test_fused_cross_entropy_matches_torch(device):
    logits, labels = make(4 * 37, 1001, device=device)
    logits = logits.view(4, 37, 1001)
    labels = labels.view(4, 37)
    x = logits.clone().requires_grad_()
    xr = logits.clone().requires_grad_()
    loss = fused_cross_entropy(x, labels)
    ref = torch.nn.functional.cross_entropy(xr.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-7)
    assert fused_cross_entropy(logits, torch.full_like(labels, -100)) == 0


@pytest.mark.parametrize("device", devices())
def test_sequence_logprobs(device):
    logits = torch.randn(3, 11, 500, device=device) * 2
    labels = torch.randint(0, 500, (3, 11), device=device)
    labels[2] = logits[2].argmax(-1)  # a greedy continuation
    mask = torch.zeros(3, 11, dtype=torch.bool, device=device)
    mask[:, 6:] = True
    total, greedy = sequence_logprobs(logits, labels, mask)
    ref = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(total, (ref * mask).sum(-1))
    assert greedy.tolist() == [False, False, True]
    with pytest.raises(ValueError, match="mask"):
        sequence_logprobs(logits, labels, mask[:, :5])


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_matches_cuda(dtype):
    logits, labels = make(97, 50257, dtype)
    x_cpu = logits.clone().requires_grad_()
    x_gpu = logits.cuda().requires_grad_()
    out_cpu = token_logprobs(x_cpu, labels)
    out_gpu = token_logprobs(x_gpu, labels.cuda())
    torch.testing.assert_close(out_gpu[0].cpu(), out_cpu[0], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(out_gpu[2].cpu(), out_cpu[2], rtol=1e-5, atol=2e-5)
    assert torch.equal(out_gpu[1].cpu(), out_cpu[1])
    g = torch.randn(97)
    (out_cpu[0] * g).sum().backward()
    (out_gpu[0] * g.cuda()).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-5)
    torch.testing.assert_close(x_gpu.grad.cpu(), x_cpu.grad, **tol)


@pytest.mark.parametrize("device", devices())
def test_bad_inputs_name_the_argument(device):
    logits, labels = make(4, 100, device=device)
    with pytest.raises((RuntimeError, ValueError), match="labels"):
        token_logprobs(logits, torch.tensor([0, 1, 100, 2], device=device))
    with pytest.raises((RuntimeError, ValueError), match="labels"):
        token_logprobs(logits, torch.tensor([0, -1, 3, 2], device=device))
    with pytest.raises(TypeError, match="labels"):
        token_logprobs(logits, labels.int())
    with pytest.raises(ValueError, match="labels"):
        token_logprobs(logits, labels[:3])
    with pytest.raises((RuntimeError, ValueError), match="logits"):
        token_logprobs(logits.half(), labels)
    if pyfast.HAS_C and device == "cpu":
        op = torch.ops.pyfast.token_logprobs
        with pytest.raises(RuntimeError, match="token_logprobs: logits must be 2-D"):
            op(logits[None], labels, -100)
        with pytest.raises(RuntimeError, match="token_logprobs: labels must be int64"):
            op(logits, labels.int(), -100)
        with pytest.raises(RuntimeError, match=r"token_logprobs: labels\[2\] = 100"):
            op(logits, torch.tensor([0, 1, 100, 2]), -100)
