"""Per-document metrics and their aggregation, as lm-evaluation-harness 0.4.x computes them."""

from __future__ import annotations

import functools
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


def exact_match(
    prediction: str,
    reference: str,
    *,
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
    ignore_numbers: bool = False,
    regexes_to_ignore: Sequence[str] = (),
) -> float:
    """lm-eval's ``exact_match`` (HF evaluate's): both strings get every regex of
    `regexes_to_ignore` removed (in order, ``re.sub``), then optionally lower-cased and stripped
    of punctuation / digits; 1.0 if they are then equal."""
    import re
    import string

    texts = [prediction, reference]
    for pattern in regexes_to_ignore:
        texts = [re.sub(pattern, "", t) for t in texts]
    if ignore_case:
        texts = [t.lower() for t in texts]
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        texts = [t.translate(table) for t in texts]
    if ignore_numbers:
        table = str.maketrans("", "", string.digits)
        texts = [t.translate(table) for t in texts]
    return float(texts[0] == texts[1])


_ROUGE_TYPES = ("rouge1", "rouge2", "rougeLsum")


def _need(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(
            f"TruthfulQA generation metrics need {package}: pip install sacrebleu rouge_score"
        ) from None


@functools.cache
def _rouge_scorer():
    rouge_scorer = _need("rouge_score.rouge_scorer", "rouge_score")

    return rouge_scorer.RougeScorer(list(_ROUGE_TYPES))


def bleu(reference: str, prediction: str) -> float:
    """Sentence BLEU as lm-eval's TruthfulQA computes it (T5 style, sacrebleu corpus_bleu with
    exp smoothing 0.0, intl tokenisation, no lower-casing, no effective order)."""
    sacrebleu = _need("sacrebleu", "sacrebleu")
    return sacrebleu.corpus_bleu(
        [prediction],
        [[reference]],
        smooth_method="exp",
        smooth_value=0.0,
        force=False,
        lowercase=False,
        tokenize="intl",
        use_effective_order=False,
    ).score


def rouge(reference: str, prediction: str) -> dict[str, float]:
    """ROUGE-1/2/Lsum F-measure x 100 (rouge_score, no stemming), " . " turned into sentence
    breaks as lm-eval's TruthfulQA does (one pair: the bootstrap "mid" is the score itself)."""
    ref, pred = (t.replace(" . ", ".\n") for t in (reference, prediction))
    scores = _rouge_scorer().score(ref, pred)
    return {k: scores[k].fmeasure * 100 for k in _ROUGE_TYPES}


def truthfulqa_gen(completion: str, true_refs: Sequence[str], false_refs: Sequence[str]) -> dict:
    """BLEU and ROUGE-1/2/L of a completion against the true and false references:
    ``*_max`` = best score over true refs, ``*_diff`` = that minus the best over false refs,
    ``*_acc`` = 1 if the best true ref beats the best false one (lm-eval's process_results_gen).
    """
    n = len(true_refs)
    refs = [*true_refs, *false_refs]
    per_ref = {"bleu": [bleu(r, completion) for r in refs]}
    rouges = [rouge(r, completion) for r in refs]
    for name, key in (("rouge1", "rouge1"), ("rouge2", "rouge2"), ("rougeL", "rougeLsum")):
        per_ref[name] = [s[key] for s in rouges]
    out = {}
    for name, scores in per_ref.items():
        best_true = float(np.nanmax(scores[:n]))
        best_false = float(np.nanmax(scores[n:]))
        out[f"{name}_max"] = best_true
        out[f"{name}_acc"] = float(best_true > best_false)
        out[f"{name}_diff"] = best_true - best_false
    return out
