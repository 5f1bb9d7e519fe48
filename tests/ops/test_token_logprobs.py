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


# ---- Non-finite logits: the semantics of log_softmax(x.float()).gather / logsumexp / argmax ----

NAN, INF = float("nan"), float("inf")


def nonfinite_logits(v, dtype, device):
    """Rows with NaN / +inf / -inf at the places where lane folding could drop them: column 0,
    column 1, the last lane of the first AVX2 (7) and AVX-512 (15) vector, the last column of the
    first 1024-column block and the first of the next, the middle, the scalar tail (V - 1);
    several NaNs, +inf twice, +inf with NaN, -inf mixed, all -inf. Returns logits, labels (some
    on the special column, some elsewhere) and the row count."""
    cols = sorted({c for c in (0, 1, 7, 15, 1023, 1024, v // 2, v - 1) if c < v})
    rows, labels = [], []
    gen = torch.Generator().manual_seed(v)

    def add(row, label):
        rows.append(row)
        labels.append(label % v)

    for c in cols:
        base = torch.randn(v, generator=gen) * 3
        for _put, val in (("nan", NAN), ("pinf", INF), ("ninf", -INF)):
            r = base.clone()
            r[c] = val
            add(r, c)
            add(r.clone(), c + 1)
        r = base.clone()
        r[c], r[(c + 5) % v], r[v - 1] = NAN, NAN, NAN  # several NaNs
        add(r, (c + 5) % v)
        r = base.clone()
        r[c], r[(c + 3) % v] = INF, INF  # +inf twice: the first is the argmax
        add(r, (c + 3) % v)
        r = base.clone()
        r[c], r[(c + 2) % v] = INF, NAN  # NaN beats +inf
        add(r, c)
        r = base.clone()
        r[::2] = -INF
        r[c] = -INF
        add(r, c)
        add(r.clone(), 1)
    add(torch.full((v,), -INF), 0)  # all -inf: argmax 0, lse -inf, log p NaN
    add(torch.full((v,), -INF), v - 1)
    add(torch.randn(v, generator=gen), 3)  # an ordinary row stays ordinary
    logits = torch.stack(rows).to(dtype=dtype, device=device)
    return logits, torch.tensor(labels, device=device)


def assert_same_with_nan(got, want, tol):
    assert torch.equal(got.isnan(), want.isnan()), (got.isnan().nonzero(), want.isnan().nonzero())
    finite = ~want.isnan()
    torch.testing.assert_close(got[finite].double(), want[finite].double(), **tol)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [3, 17, 1000, 4099, 50257, 151936])
def test_nonfinite_logits_match_log_softmax(device, dtype, v):
    logits, labels = nonfinite_logits(v, dtype, device)
    labels[-1] = -100  # an ignored ordinary row keeps 0, False, 0
    lp, am, lse = token_logprobs(logits, labels)
    x = logits.float()
    safe = labels.clamp(min=0)
    want_lp = torch.log_softmax(x, -1).gather(-1, safe[:, None])[:, 0]
    want_lse = torch.logsumexp(x, -1)
    want_am = logits.argmax(-1) == labels  # torch's argmax: the first NaN, else the first max
    valid = labels != -100
    tol = dict(rtol=1e-5, atol=2e-5)
    assert_same_with_nan(lp[valid], want_lp[valid], tol)
    assert_same_with_nan(lse[valid], want_lse[valid], tol)
    assert torch.equal(am, want_am & valid)
    assert lp[-1] == 0 and lse[-1] == 0 and not am[-1]
    # The reference twin agrees (it is the fallback without the extension).
    rlp, ram, rlse = reference.token_logprobs(logits, labels)
    assert_same_with_nan(lp, rlp, tol)
    assert_same_with_nan(lse, rlse, tol)
    assert torch.equal(am, ram)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [17, 1000, 50257])
def test_nonfinite_logits_backward(device, dtype, v):
    """NaN gradients on the rows autograd through log_softmax makes NaN (NaN, +inf, all -inf
    rows), the reference's values elsewhere; ignored rows get zeros whatever their logits."""
    logits, labels = nonfinite_logits(v, dtype, device)
    labels[0] = -100  # an ignored NaN row
    x = logits.clone().requires_grad_()
    lp, _, lse = token_logprobs(x, labels)
    g = torch.randn(lp.shape, device=device)
    h = torch.randn(lp.shape, device=device)
    (lp * g).sum().backward()
    xr = logits.float().requires_grad_()
    valid = labels != -100
    safe = labels.clamp(min=0)
    rlp = torch.log_softmax(xr, -1).gather(-1, safe[:, None])[:, 0]
    (rlp[valid] * g[valid]).sum().backward()
    want = xr.grad
    want[~valid] = 0
    assert torch.equal(x.grad.isnan(), want.isnan())
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
    fin = ~want.isnan()
    torch.testing.assert_close(x.grad.float()[fin], want[fin], **tol)
    assert (x.grad[0] == 0).all()
    # Through lse as well: a NaN row's gradient is NaN, an ordinary row's is the softmax.
    x.grad = None
    lp, _, lse = token_logprobs(x, labels)
    ((lp * g).sum() + (lse * h).sum()).backward()
    nan_rows = ~torch.isfinite(lse) & valid
    assert x.grad[nan_rows].isnan().all()
    ok = valid & torch.isfinite(lse)
    assert not x.grad[ok].isnan().any()


@needs_c
def test_nonfinite_gradcheck_rows_float64():
    """float64 (the scalar kernel): the same values as the reference on non-finite rows."""
    logits, labels = nonfinite_logits(1000, torch.float64, "cpu")
    lp, am, lse = torch.ops.pyfast.token_logprobs(logits, labels, -100)
    rlp, ram, rlse = reference.token_logprobs(logits, labels)
    tol = dict(rtol=1e-12, atol=1e-12)
    assert_same_with_nan(lp, rlp, tol)
    assert_same_with_nan(lse, rlse, tol)
    assert torch.equal(am, ram)
