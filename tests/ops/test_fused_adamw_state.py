"""FusedAdamW with state that code replaces between steps, and with sparse gradients."""

import pytest
import torch

from pyfast.optim import FusedAdamW
from tests.ops.test_fused_adamw import SHAPES, assert_params_close, clone_params, make_params


def _grads(step, *param_lists):
    gen = torch.Generator().manual_seed(500 + step)
    for ps in zip(*param_lists, strict=True):
        g = torch.randn(ps[0].shape, generator=gen)
        for p in ps:
            p.grad = g.clone()


@pytest.mark.parametrize("clip", [None, 1.0])
def test_replaced_state_tensors_are_used_like_torch_adamw(clip):
    """The common reset pattern ``opt.state[p]["exp_avg"] = torch.zeros_like(p)`` (and of
    exp_avg_sq, and of the step count) between steps: FusedAdamW must update the new tensors,
    as torch.optim.AdamW does, not the ones its cached plan was built on."""
    torch.manual_seed(0)
    ours = make_params(SHAPES)
    theirs = clone_params(ours)
    opt = FusedAdamW(ours, lr=1e-2, weight_decay=0.1, max_grad_norm=clip)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)

    def step(n):
        _grads(n, ours, theirs)
        opt.step()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(theirs, clip)
        ref.step()

    for n in range(3):
        step(n)
    for i in (0, 3, 5):  # reset some moments, as schedules with restarts do
        for o, key in ((opt, "exp_avg"), (ref, "exp_avg")):
            p = (ours if o is opt else theirs)[i]
            o.state[p][key] = torch.zeros_like(p)
    opt.state[ours[2]]["exp_avg_sq"] = torch.zeros_like(ours[2])
    ref.state[theirs[2]]["exp_avg_sq"] = torch.zeros_like(theirs[2])
    for n in range(3, 6):
        step(n)
    # a restarted bias correction: the step count replaced too (a Python-visible new tensor)
    opt.state[ours[4]]["step"] = torch.tensor(0.0)
    ref.state[theirs[4]]["step"] = torch.tensor(0.0)
    opt.state[ours[4]]["exp_avg"] = torch.zeros_like(ours[4])
    ref.state[theirs[4]]["exp_avg"] = torch.zeros_like(theirs[4])
    for n in range(6, 9):
        step(n)
    assert_params_close(ours, theirs, rtol=1e-6, atol=1e-7)
    for p, q in zip(ours, theirs, strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=1e-6, atol=1e-8)
        assert float(opt.state[p]["step"]) == float(ref.state[q]["step"])
    assert float(opt.state[ours[4]]["step"]) == 3.0


def test_a_non_contiguous_replacement_and_a_wrong_shape():
    p = torch.randn(6, 4, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opt = FusedAdamW([p], lr=1e-2)
    ref = torch.optim.AdamW([q], lr=1e-2, foreach=False)
    for n in range(4):
        p.grad = torch.full_like(p, 0.1 * (n + 1))
        q.grad = p.grad.clone()
        opt.step()
        ref.step()
        if n == 1:
            opt.state[p]["exp_avg"] = torch.zeros(4, 6).t()  # a transposed view
            ref.state[q]["exp_avg"] = torch.zeros_like(q)
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    opt.state[p]["exp_avg_sq"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"state\[p\]\['exp_avg_sq'\] of a param of shape"):
        opt.step()


@pytest.mark.parametrize("path", ["plan", "in_backward", "clip"])
def test_sparse_gradients_are_named(path):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = FusedAdamW(emb.parameters(), lr=1e-2, max_grad_norm=1.0 if path == "clip" else None)
    if path == "in_backward":
        opt.update_in_backward()
    with pytest.raises(RuntimeError, match="FusedAdamW does not support sparse gradients"):
        emb(torch.tensor([1, 2, 3])).sum().backward()
        opt.step()
