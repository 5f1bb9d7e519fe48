"""The alignment recipe: the fine-tuning loop (:class:`pyfast.train.Recipe`) on preference pairs.

Everything the fine-tuning recipe does (freezing/LoRA, FusedAdamW, schedule, accumulation,
checkpoints and ``--resume``, held-out evaluation, early stopping, metrics.jsonl) is reused; this
subclass changes the data (pairs, :mod:`pyfast.align.data`), the loss (:mod:`pyfast.align.losses`)
and the metrics. For DPO the reference log-probs are computed in :meth:`AlignRecipe.load_model`,
on the model as loaded (before LoRA adapters are attached or a checkpoint is restored, which is
the model with its adapters disabled), cached on disk, and the training never holds a second model.

Logged per step (``metrics.jsonl``) and on held-out pairs (``eval_`` prefix): loss,
rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
logps/rejected (summed answer log-probs) and preference_accuracy: the fraction of pairs where the
model itself prefers the chosen answer (log pi(chosen) > log pi(rejected); for the reward model,
r(chosen) > r(rejected)). DPO's rewards/accuracies is 0 before the first step by definition
(policy = reference), so the before/after report uses preference_accuracy as well.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from pyfast.align.config import AlignConfig
from pyfast.align.data import (
    PairReport,
    TokenizedPair,
    _is_messages,
    _row_to_pair,
    collate_pairs,
    collate_shared_prompt,
    read_pairs,
    split_heldout,
    tokenize_pairs,
)
from pyfast.align.logps import pair_logps, pair_rewards
from pyfast.align.losses import (
    bradley_terry_loss,
    dpo_loss,
    orpo_loss,
    preference_metrics,
    simpo_loss,
)
from pyfast.align.reference import model_fingerprint, reference_logps
from pyfast.io import write_json
from pyfast.ops.packed_linear import packed_for_inference
from pyfast.train.data import pad_id_of, read_jsonl
from pyfast.train.recipe import Recipe

PLOTTED = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
           "logps/chosen", "logps/rejected")  # fmt: skip


@dataclass
class AlignExample:
    """A tokenised pair with its reference log-probs (0 for reference-free methods)."""

    pair: TokenizedPair
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0


class _Means:
    """Pair-weighted means of per-batch statistics (summed over ranks by the caller)."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.weight = 0.0

    def add(self, stats: dict[str, float], weight: int) -> None:
        for k, v in stats.items():
            self.sums[k] += v * weight
        self.weight += weight

    def means(self, all_sum) -> dict[str, float]:
        keys = sorted(self.sums)
        *sums, weight = all_sum([self.sums[k] for k in keys] + [self.weight])
        return {k: s / max(weight, 1.0) for k, s in zip(keys, sums, strict=True)}


class AlignRecipe(Recipe):
    """DPO (sigmoid/IPO/hinge), SimPO, ORPO or a Bradley–Terry reward model (``align.method``)."""

    cfg: AlignConfig

    def __init__(self, cfg: AlignConfig, resume=None, overwrite: bool = False):
        super().__init__(cfg, resume, overwrite)
        self._means: _Means | None = None

    # -- data ----------------------------------------------------------------------------------
    def load_model(self, spec: str):
        model, tok = super().load_model(spec)
        self.tokenizer = tok
        self._examples = self._prepare_pairs(model, tok)
        return model, tok

    def _read(self, paths: list[str], tok) -> tuple[list[TokenizedPair], PairReport]:
        pairs = [p for path in paths for p in read_pairs(path, tok)]
        return tokenize_pairs(
            pairs, tok, self.cfg.data.max_length, self.cfg.align.max_prompt_length,
            append_eos=self.cfg.data.add_eos,
        )  # fmt: skip

    def _prepare_pairs(self, model, tok) -> tuple[list[AlignExample], list[AlignExample]]:
        d, a = self.cfg.data, self.cfg.align
        if not d.path:
            raise ValueError("no preference data: set data.path (prompt/chosen/rejected JSONL)")
        train, report = self._read(d.path, tok)
        held, held_report = [], None
        if d.eval_path:
            held, held_report = self._read(d.eval_path, tok)
        elif d.eval_fraction > 0 and train:
            train, held = split_heldout(train, d.eval_fraction, self.cfg.seed)
        train = train[: d.max_rows] if d.max_rows is not None else train
        held = held[: d.eval_max_rows] if d.eval_max_rows is not None else held
        if not train:
            raise ValueError(f"no usable training pairs in {', '.join(d.path)}: {report.summary()}")
        self.data_stats = {
            "train": {**report.as_dict(), "pairs": len(train), "sources": list(d.path)},
            "eval": {**(held_report.as_dict() if held_report else {}), "pairs": len(held)},
        }
        self._reports = (report, held_report)
        if a.method != "dpo":
            return [AlignExample(p) for p in train], [AlignExample(p) for p in held]
        return self._with_reference(model, train), self._with_reference(model, held)

    def _with_reference(self, model, pairs: list[TokenizedPair]) -> list[AlignExample]:
        if not pairs:
            return []
        from pyfast.models import cache_dir

        a = self.cfg.align
        folder = Path(a.reference_cache) if a.reference_cache else cache_dir() / "reference_logps"
        if not hasattr(self, "_model_key"):
            self._model_key = f"{model_fingerprint(model)}|{self.cfg.precision}"
        self.log(f"reference log-probs of {len(pairs)} pairs (computed once, then cached) ...")
        with self.autocast():
            chosen, rejected, path, cached = reference_logps(
                model, pairs, pad_id_of(self.tokenizer), folder, a.reference_batch_size,
                self._model_key, self._pack, self.cfg.progress and self.rank == 0,
            )  # fmt: skip
        how = "read from" if cached else "computed, cached in"
        self.log(f"reference log-probs of {len(pairs)} pairs {how} {path}")
        return [
            AlignExample(p, float(c), float(r))
            for p, c, r in zip(pairs, chosen.tolist(), rejected.tolist(), strict=True)
        ]

    def check_data(self) -> None:
        """Reads the pair files before the model loads: a missing file, malformed JSONL, or a row
        that is not a text or chat pair fails here, naming file and line (a chat pair's template
        is applied, and checked, once the tokenizer has loaded)."""
        d = self.cfg.data
        if not d.path:
            raise ValueError("no preference data: set data.path (prompt/chosen/rejected JSONL)")
        for path in [*d.path, *d.eval_path]:
            rows = read_jsonl(path)
            if not rows:
                raise ValueError(f"{path}: no preference pairs")
            for row in rows:
                chosen, rejected = row.data.get("chosen"), row.data.get("rejected")
                if (
                    isinstance(chosen, str)
                    or isinstance(rejected, str)
                    or not (_is_messages(chosen) and _is_messages(rejected))
                ):
                    _row_to_pair(row.data, None, row.where)  # raises naming the field

    def load_data(self):
        return self._examples

    def _log_data(self) -> None:
        train, held = self._reports
        extra = f" ({held.summary()})" if held else ""
        self.log(
            f"data: {train.summary()} -> {len(self.train_examples)} training pairs, "
            f"{len(self.eval_examples)} held-out{extra}"
        )

    def collate(self, examples: list[AlignExample]) -> dict:
        pairs, pad = [e.pair for e in examples], pad_id_of(self.tokenizer)
        if self.cfg.align.method == "reward":  # rewards read each row's last token
            batch = collate_pairs(pairs, pad)
        elif self.cfg.model.gradient_checkpointing:
            # checkpointed layers drop the key/value cache that the shared-prompt layout needs
            batch = collate_pairs(pairs, pad)
        else:  # each prompt runs once for both answers
            batch = collate_shared_prompt(pairs, pad)
            # the loop counts the tokens a step processes as attention_mask.sum()
            batch["attention_mask"] = torch.cat(
                [batch["prompt_mask"].flatten(), batch["answer_mask"].flatten()]
            )
        batch["ref_chosen"] = torch.tensor([e.ref_chosen for e in examples], dtype=torch.float32)
        batch["ref_rejected"] = torch.tensor([e.ref_rejected for e in examples])
        return batch

    def batch_weight(self, batch: dict) -> int:
        return batch["ref_chosen"].shape[0]  # pairs

    # -- loss ----------------------------------------------------------------------------------
    def compute_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """The configured preference loss of one micro-batch (mean over its pairs) and stats."""
        a = self.cfg.align
        with self.autocast():
            if a.method == "reward":
                rc, rr = pair_rewards(model, batch)
                loss, cr, rj = bradley_terry_loss(rc, rr)
                stats = preference_metrics(cr, rj)
                stats["preference_accuracy"] = stats["rewards/accuracies"]
            else:
                lp = pair_logps(model, batch)
                loss, cr, rj = self._lm_loss(lp, batch)
                stats = preference_metrics(cr, rj)
                stats["logps/chosen"] = lp.chosen.detach().mean().item()
                stats["logps/rejected"] = lp.rejected.detach().mean().item()
                stats["preference_accuracy"] = (lp.chosen > lp.rejected).float().mean().item()
        stats["loss"] = loss.item()
        if self._means is not None:
            self._means.add(stats, self.batch_weight(batch))
        return loss, stats

    def _lm_loss(self, lp, batch):
        a = self.cfg.align
        if a.method == "dpo":
            pc, pr = lp.chosen, lp.rejected
            rc, rr = batch["ref_chosen"], batch["ref_rejected"]
            if a.loss_type == "ipo":  # token-averaged log-probs (IPO paper; TRL)
                pc, pr = lp.averaged()
                rc = rc / lp.chosen_tokens.clamp(min=1)
                rr = rr / lp.rejected_tokens.clamp(min=1)
            return dpo_loss(pc, pr, rc, rr, a.loss_type, a.beta, a.label_smoothing)
        ac, ar = lp.averaged()
        if a.method == "simpo":
            return simpo_loss(ac, ar, a.beta, a.gamma, a.label_smoothing)
        return orpo_loss(ac, ar, lp.nll_chosen(), a.beta)

    # -- loop hooks ----------------------------------------------------------------------------
    def train_step(self) -> dict:
        self._means = _Means()
        try:
            m = super().train_step()
            stats = self._means.means(self._all_sum)
        finally:
            self._means = None
        stats.pop("loss", None)  # the loop's own, identical, unit-weighted loss stays
        return {**m, **stats}

    @torch.no_grad()
    def evaluate_heldout(self) -> dict:
        """Held-out loss and preference metrics over every held-out pair (``eval_`` keys)."""
        result: dict = {}
        if self.eval_examples:
            self.model.eval()
            means = _Means()
            try:
                with packed_for_inference(self.model, self._pack):  # float32 CPU: packed
                    for batch, counted in self.heldout_batches():
                        self._means = means if counted else None  # padding batches: not counted
                        self.heldout_loss(batch)
                result = {f"eval_{k}": v for k, v in means.means(self._all_sum).items()}
            finally:
                self._means = None
                self.model.train()
        if self.cfg.eval.tasks:
            result.update(self.evaluate_tasks())
        return result

    def train(self) -> dict:
        # Always measure the held-out pairs before the first step (the "before" of the report).
        if self.step == 0 and self.eval_examples and not self.cfg.eval.every:
            entry = {"step": 0, **self.evaluate_heldout()}
            self.record(entry)
            self.after_eval(entry)
        return super().train()

    def finish(self, seconds: float, tokens: int) -> dict:
        summary = super().finish(seconds, tokens)
        evals = [h for h in self.history if "eval_preference_accuracy" in h]
        if evals:
            keys = ("eval_preference_accuracy", "eval_rewards/accuracies",
                    "eval_rewards/margins", "eval_loss")  # fmt: skip
            summary["heldout"] = {
                "method": self.cfg.align.method,
                "before": {"step": evals[0]["step"], **{k: evals[0][k] for k in keys}},
                "after": {"step": evals[-1]["step"], **{k: evals[-1][k] for k in keys}},
            }
        if self.rank == 0:
            write_json(self.out / "summary.json", summary)
        return summary

    def plot(self) -> Path | None:
        """loss_curve.png (the fine-tuning plot) and preference_metrics.png."""
        path = super().plot()
        if self.rank == 0 and self.history:
            plot_preference_metrics(self.history, self.out / "preference_metrics.png")
        return path


def plot_preference_metrics(history: list[dict], path: Path) -> Path | None:
    """A 2 x 3 grid: each of PLOTTED per training step, and its held-out value per evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyfast.io import write_figure

    if not any(k in h or f"eval_{k}" in h for h in history for k in PLOTTED):
        return None
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, key in zip(axes.flat, PLOTTED, strict=True):
        for name, style, label in ((key, "-", "train"), (f"eval_{key}", "o-", "held-out")):
            pts = [(h["step"], h[name]) for h in history if name in h]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=label, lw=1.2)
        ax.set_title(key)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return write_figure(path, fig, dpi=100)
