"""Each preference loss against its closed form on hand-made numbers."""

from __future__ import annotations

import math

import pytest
import torch

from pyfast.align.losses import (
    bradley_terry_loss,
    dpo_loss,
    orpo_loss,
    preference_metrics,
    simpo_loss,
)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64, requires_grad=True)


def softplus(x):
    return math.log1p(math.exp(x))


# pc, pr, rc, rr: h = (pc - rc) - (pr - rr) = (-1 + 2) - (-3 + 2) = 2 for pair 0,
# (-4 + 1) - (-2 + 3) = -4 for pair 1.
PC, PR, RC, RR = (-1.0, -4.0), (-3.0, -2.0), (-2.0, -1.0), (-2.0, -3.0)
H = (2.0, -4.0)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_dpo_sigmoid_closed_form(eps):
    beta = 0.5
    loss, rc_, rr_ = dpo_loss(t(*PC), t(*PR), t(*RC), t(*RR), "sigmoid", beta, eps)
    # -log sigma(z) = softplus(-z)
    want = sum((1 - eps) * softplus(-beta * h) + eps * softplus(beta * h) for h in H) / 2
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert rc_.tolist() == pytest.approx([0.5 * 1.0, 0.5 * -3.0])
    assert rr_.tolist() == pytest.approx([0.5 * -1.0, 0.5 * 1.0])
    assert not rc_.requires_grad


def test_dpo_sigmoid_gradient_closed_form():
    beta, eps = 0.5, 0.1
    pc = t(*PC)
    loss, _, _ = dpo_loss(pc, t(*PR), t(*RC), t(*RR), "sigmoid", beta, eps)
    loss.backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # d/dh [(1-e) softplus(-b h) + e softplus(b h)] = -b (1-e) sig(-b h) + b e sig(b h); mean /2
    want = [(-beta * (1 - eps) * sig(-beta * h) + beta * eps * sig(beta * h)) / 2 for h in H]
    assert pc.grad.tolist() == pytest.approx(want, rel=1e-12)


def test_dpo_ipo_closed_form():
    beta = 0.5  # target margin 1 / (2 beta) = 1
    loss, _, _ = dpo_loss(t(*PC), t(*PR), t(*RC), t(*RR), "ipo", beta)
    assert loss.item() == pytest.approx(((2 - 1) ** 2 + (-4 - 1) ** 2) / 2)


def test_dpo_hinge_closed_form():
    loss, _, _ = dpo_loss(t(*PC), t(*PR), t(*RC), t(*RR), "hinge", 0.25)
    assert loss.item() == pytest.approx((max(0, 1 - 0.5) + max(0, 1 + 1.0)) / 2)
    loss, _, _ = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), "hinge", 1.0)
    assert loss.item() == 0.0  # margin beta * h = 2 beyond the hinge


def test_simpo_closed_form():
    loss, c, r = simpo_loss(t(-0.5, -2.0), t(-1.5, -1.0), beta=2.0, gamma=0.5)
    # z = 2 * (ac - ar) - 0.5 = 1.5 and -2.5
    assert loss.item() == pytest.approx((softplus(-1.5) + softplus(2.5)) / 2)
    assert c.tolist() == pytest.approx([-1.0, -4.0])
    loss, _, _ = simpo_loss(t(-0.5), t(-1.5), beta=2.0, gamma=0.5, label_smoothing=0.2)
    assert loss.item() == pytest.approx(0.8 * softplus(-1.5) + 0.2 * softplus(1.5))


def test_orpo_closed_form():
    # p(chosen) = 1/2 -> odds 1; p(rejected) = 1/4 -> odds 1/3; log odds ratio = log 3
    ac, ar, nll = t(math.log(0.5)), t(math.log(0.25)), torch.tensor(1.25, dtype=torch.float64)
    loss, c, r = orpo_loss(ac, ar, nll, beta=0.1)
    assert loss.item() == pytest.approx(1.25 - 0.1 * math.log(3 / 4), rel=1e-12)
    assert c.item() == pytest.approx(0.1 * math.log(0.5))


def test_bradley_terry_closed_form():
    loss, c, r = bradley_terry_loss(t(2.0, 0.0), t(0.0, 1.0))
    assert loss.item() == pytest.approx((softplus(-2.0) + softplus(1.0)) / 2)
    loss, _, _ = bradley_terry_loss(t(2.0), t(0.0), margin=torch.tensor([1.0], dtype=torch.float64))
    assert loss.item() == pytest.approx(softplus(-1.0))


def test_metrics_closed_form():
    m = preference_metrics(torch.tensor([1.0, -1.0, 0.5]), torch.tensor([0.0, 2.0, 0.5]))
    assert m["rewards/accuracies"] == pytest.approx(1 / 3)  # ties are not wins
    assert m["rewards/margins"] == pytest.approx((1 - 3 + 0) / 3)
    assert m["rewards/chosen"] == pytest.approx(0.5 / 3)


def test_bad_arguments():
    a = t(-1.0)
    with pytest.raises(ValueError, match="unknown DPO loss_type 'kto'"):
        dpo_loss(a, a, a, a, "kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(a, a, a, a, "sigmoid", 0.1, 0.5)
    with pytest.raises(ValueError, match="only applies to loss_type sigmoid"):
        dpo_loss(a, a, a, a, "ipo", 0.1, 0.1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(a, a, a, a, "hinge", 0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        dpo_loss(t(-1.0, -2.0), a, a, a)
