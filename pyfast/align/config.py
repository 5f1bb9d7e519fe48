"""Alignment config: the fine-tuning config (:class:`pyfast.train.config.TrainConfig`) plus an
``align`` section. Same YAML files and ``key=value`` overrides, same checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pyfast.train.config import TrainConfig
from pyfast.train.config import load_config as _load_config

METHODS = ("dpo", "simpo", "orpo", "reward")


@dataclass
class PreferenceConfig:
    """What to optimise on preference pairs (``data.path``: prompt/chosen/rejected JSONL).

    method: dpo (loss_type sigmoid | ipo | hinge, beta, label_smoothing; reference log-probs
    cached), simpo (beta, gamma, label_smoothing; reference-free), orpo (beta = lambda;
    reference-free), reward (Bradley–Terry reward model on a new scalar head:
    ``freeze.new_head=scalar``).

    Of the ``data`` section, alignment uses path, eval_path, eval_fraction, max_rows,
    eval_max_rows, max_length, add_eos and shuffle. Chat-format pairs always go through the
    tokenizer's chat template; text pairs are used as they are (``model.chat_template`` does not
    rewrite them).
    """

    method: Literal["dpo", "simpo", "orpo", "reward"] = "dpo"
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.5  # SimPO's target reward margin
    max_prompt_length: int = 384  # pairs with longer prompts are skipped (and counted)
    # folder of cached reference log-probs ("" = <pyfast cache>/reference_logps)
    reference_cache: str = ""
    reference_batch_size: int = 8


@dataclass
class AlignConfig(TrainConfig):
    """Root of an alignment config (configs/align/*.yaml)."""

    align: PreferenceConfig = field(default_factory=PreferenceConfig)
    output_dir: str = "runs/align"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> AlignConfig:
    """Loads an :class:`AlignConfig` from YAML + overrides; raises ValueError naming the key."""
    cfg = _load_config(path, overrides, cls=AlignConfig)
    validate(cfg)
    return cfg


def validate(cfg: AlignConfig) -> None:
    a = cfg.align
    where = "align."
    if a.beta <= 0:
        raise ValueError(f"{where}beta must be > 0, got {a.beta}")
    if not 0.0 <= a.label_smoothing < 0.5:
        raise ValueError(f"{where}label_smoothing must be in [0, 0.5), got {a.label_smoothing}")
    if a.label_smoothing and not (
        (a.method == "dpo" and a.loss_type == "sigmoid") or a.method == "simpo"
    ):
        raise ValueError(
            f"{where}label_smoothing applies to method dpo with loss_type sigmoid, and simpo"
        )
    if not 0 < a.max_prompt_length < cfg.data.max_length:
        raise ValueError(
            f"{where}max_prompt_length must be in (0, data.max_length={cfg.data.max_length}), "
            f"got {a.max_prompt_length}"
        )
    if a.reference_batch_size < 1:
        raise ValueError(f"{where}reference_batch_size must be >= 1")
    if a.method == "reward" and cfg.freeze.new_head != "scalar":
        raise ValueError("align.method=reward trains a new scalar head: set freeze.new_head=scalar")
    if a.method != "reward" and cfg.freeze.new_head != "none":
        raise ValueError(
            f"freeze.new_head={cfg.freeze.new_head} only applies to align.method=reward"
        )
    if cfg.data.format != "auto":
        raise ValueError(
            "data.format does not apply to alignment (each row is a text or chat pair)"
        )
    if cfg.data.packing:
        raise ValueError("data.packing does not apply to alignment (pairs are never packed)")
