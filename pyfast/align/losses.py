"""Preference losses: each a small function of per-sequence log-probs, formula in the docstring.

Notation (all tensors (B,), one entry per preference pair):

- ``pc``, ``pr``: the policy's summed log-probs log pi(y_c | x), log pi(y_r | x) of the chosen and
  rejected answers; ``rc``, ``rr``: the same under the frozen reference model.
- ``h = (pc - rc) - (pr - rr)``: the implicit-reward margin of DPO (Rafailov et al., 2023).
- ``sigma`` the logistic function, ``log sigma(z) = -softplus(-z)`` (computed stably).

Every function returns ``(loss, chosen_rewards, rejected_rewards)`` with ``loss`` the batch mean
(0-dim) and the rewards (B,) detached, as logged under ``rewards/*``; reward-model losses take
the scalar rewards directly. Conventions follow TRL (``DPOTrainer``/``CPOTrainer``/
``ORPOTrainer``/``RewardTrainer``) so that the numbers compare one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def _check_pairs(*tensors: Tensor) -> None:
    shape = tensors[0].shape
    for t in tensors[1:]:
        if t.shape != shape:
            raise ValueError(
                f"preference loss: log-prob tensors differ in shape: {shape} vs {t.shape}"
            )


def dpo_sigmoid_loss(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float = 0.1, label_smoothing: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO with the logistic (Bradley–Terry) link and optional label smoothing (conservative DPO).

    loss = -(1 - eps) * log sigma(beta * h) - eps * log sigma(-beta * h),
    h = (pc - rc) - (pr - rr); rewards: beta * (pc - rc), beta * (pr - rr).

    ``eps = label_smoothing`` in [0, 0.5) is the assumed probability that a label is flipped.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    _check_pairs(pc, pr, rc, rr)
    h = (pc - rc) - (pr - rr)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
        -beta * h
    )
    return losses.mean(), beta * (pc - rc).detach(), beta * (pr - rr).detach()


def dpo_ipo_loss(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float = 0.1
) -> tuple[Tensor, Tensor, Tensor]:
    """IPO (Azar et al., 2023): squared distance of the margin from 1 / (2 beta).

    loss = (h - 1 / (2 beta))^2, h = (pc - rc) - (pr - rr); rewards as in DPO.

    As in the IPO paper and TRL, the log-probs passed here are token-averaged (the recipe divides
    each sum by its answer's length when ``loss_type = ipo``).
    """
    _check_pairs(pc, pr, rc, rr)
    h = (pc - rc) - (pr - rr)
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return losses.mean(), beta * (pc - rc).detach(), beta * (pr - rr).detach()


def dpo_hinge_loss(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float = 0.1
) -> tuple[Tensor, Tensor, Tensor]:
    """Hinge (SLiC, Zhao et al., 2023) on the DPO margin.

    loss = max(0, 1 - beta * h), h = (pc - rc) - (pr - rr); rewards as in DPO.
    """
    _check_pairs(pc, pr, rc, rr)
    h = (pc - rc) - (pr - rr)
    losses = torch.relu(1.0 - beta * h)
    return losses.mean(), beta * (pc - rc).detach(), beta * (pr - rr).detach()


def dpo_loss(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor,
    rr: Tensor,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Dispatches to :func:`dpo_sigmoid_loss`, :func:`dpo_ipo_loss` or :func:`dpo_hinge_loss`."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type == "sigmoid":
        return dpo_sigmoid_loss(pc, pr, rc, rr, beta, label_smoothing)
    if label_smoothing:
        raise ValueError(f"label_smoothing only applies to loss_type sigmoid, not {loss_type!r}")
    if loss_type == "ipo":
        return dpo_ipo_loss(pc, pr, rc, rr, beta)
    if loss_type == "hinge":
        return dpo_hinge_loss(pc, pr, rc, rr, beta)
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; use one of {', '.join(DPO_LOSS_TYPES)}")


def simpo_loss(
    ac: Tensor, ar: Tensor, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng et al., 2024), reference-free: length-normalised log-probs and a target margin.

    loss = -(1 - eps) * log sigma(beta * (ac - ar) - gamma) - eps * log sigma(-(beta * (ac - ar)
    - gamma)); ``ac``, ``ar`` are the token-averaged log-probs log pi(y|x) / |y|; rewards:
    beta * ac, beta * ar.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    _check_pairs(ac, ar)
    z = beta * (ac - ar) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses.mean(), beta * ac.detach(), beta * ar.detach()


def orpo_loss(
    ac: Tensor, ar: Tensor, nll_chosen: Tensor, beta: float = 0.1
) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO (Hong et al., 2024), reference-free: SFT loss plus an odds-ratio penalty.

    loss = nll_chosen - beta * mean(log sigma(log_or)),
    log_or = log(odds(y_c)) - log(odds(y_r)),  odds(y) = p / (1 - p),  log p = a (token-averaged),
    so log_or = (ac - ar) - (log(1 - exp(ac)) - log(1 - exp(ar))); rewards: beta * ac, beta * ar.

    ``nll_chosen`` (0-dim) is the mean next-token NLL over the chosen answers' tokens.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    _check_pairs(ac, ar)
    # log(1 - exp(a)) for a < 0, stable near 0: log(-expm1(a)).
    log_or = (ac - ar) - (torch.log(-torch.expm1(ac)) - torch.log(-torch.expm1(ar)))
    loss = nll_chosen - beta * F.logsigmoid(log_or).mean()
    return loss, beta * ac.detach(), beta * ar.detach()


def bradley_terry_loss(
    reward_chosen: Tensor, reward_rejected: Tensor, margin: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Bradley–Terry reward-model loss: P(y_c > y_r) = sigma(r_c - r_r).

    loss = -mean(log sigma(r_c - r_r - m)), with an optional per-pair margin m (default 0);
    rewards: r_c, r_r themselves.
    """
    _check_pairs(reward_chosen, reward_rejected)
    z = reward_chosen - reward_rejected
    if margin is not None:
        z = z - margin
    return -F.logsigmoid(z).mean(), reward_chosen.detach(), reward_rejected.detach()


def preference_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, float]:
    """rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins (batch means).

    accuracy counts pairs with chosen reward strictly above rejected (TRL's convention).
    """
    c = chosen_rewards.detach().float()
    r = rejected_rewards.detach().float()
    return {
        "rewards/chosen": c.mean().item(),
        "rewards/rejected": r.mean().item(),
        "rewards/accuracies": (c > r).float().mean().item(),
        "rewards/margins": (c - r).mean().item(),
    }
