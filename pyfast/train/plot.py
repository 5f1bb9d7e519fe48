"""Loss-curve plot of a training run (train loss per step, held-out loss per evaluation)."""

from __future__ import annotations

from pathlib import Path

from pyfast.io import write_figure


def plot_losses(history: list[dict], path: Path, title: str = "training loss") -> Path | None:
    """Writes a PNG of `history` (metrics.jsonl entries) at `path`; None without any loss."""
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    held = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not train and not held:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1.2)
    if held:
        ax.plot(*zip(*held, strict=True), "o-", label="held-out loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean NLL per target token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return write_figure(path, fig, dpi=110)
