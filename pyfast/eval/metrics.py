"""Per-document metrics and their aggregation, as lm-evaluation-harness 0.4.x computes them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def multiple_choice(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """acc and acc_norm of one document.

    acc: argmax of the summed log-likelihoods is gold; acc_norm: argmax of log-likelihood divided
    by the character length of the choice (without the target delimiter). Ties go to the first.
    """
    lls = np.asarray(lls, dtype=np.float64)
    lengths = np.asarray([float(len(c)) for c in choices])
    return {
        "acc": float(int(np.argmax(lls)) == gold),
        "acc_norm": float(int(np.argmax(lls / lengths)) == gold),
    }


def mc2(lls: Sequence[float], labels: Sequence[int]) -> float:
    """TruthfulQA MC2: probability mass on the true answers, normalised over all answers."""
    probs = np.exp(np.asarray(lls, dtype=np.float64))
    probs = probs / probs.sum()
    return float(probs[np.asarray(labels) == 1].sum())


def mean_stderr(values: Sequence[float]) -> float | None:
    """Sample standard error of the mean, sqrt(var(ddof=1) / n); None for n < 2."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    var = sum((v - mu) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


def pooled_stderr(stderrs: Sequence[float | None], sizes: Sequence[int]) -> float | None:
    """lm-eval's pooled_sample_stderr for size-weighted group means; None if any part lacks one."""
    if any(s is None for s in stderrs) or sum(sizes) - len(sizes) <= 0:
        return None
    var = sum((n - 1) * s**2 * n for n, s in zip(sizes, stderrs, strict=True))
    var /= sum(sizes) - len(sizes)
    return math.sqrt(var / sum(sizes))
