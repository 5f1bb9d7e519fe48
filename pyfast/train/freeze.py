"""Freezing policies for transfer learning -> ``requires_grad`` flags and optimizer masks.

Whole tensors that are frozen get ``requires_grad=False`` (no gradient is even computed for them);
partially trainable tensors (chosen embedding rows) get a per-row bool mask, which FusedAdamW folds
into its update (frozen rows are never read) and which ``grad_mask_`` applies for other optimizers.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from pyfast.train.config import FreezeConfig


@dataclass
class FreezePlan:
    """The result of a policy: what the optimizer gets, and counts for the log."""

    model: nn.Module  # the model to train (a PEFT wrapper when LoRA is on)
    params: list[tuple[str, nn.Parameter]]  # trainable (name, param), in model order
    masks: dict[nn.Parameter, torch.Tensor] = field(default_factory=dict)  # partial params
    trainable: int = 0  # trainable scalar count (masked rows counted as trained rows only)
    total: int = 0
    description: str = ""

    def summary(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        return (
            f"trainable parameters: {self.trainable:,} of {self.total:,} ({pct:.2f}%) "
            f"- {self.description}"
        )


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of transformer blocks (``model.model.layers`` for Llama-style models)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 0
            and (n is None or len(module) == n)
        ):
            return module
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")


def final_norm(model: nn.Module) -> nn.Module:
    body = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in ("norm", "final_layernorm", "ln_f"):
        if isinstance(getattr(body, name, None), nn.Module):
            return getattr(body, name)
    raise ValueError(f"cannot find the final norm of {type(model).__name__}")


def add_scalar_head(model: nn.Module) -> nn.Linear:
    """Attaches ``model.score_head = Linear(hidden, 1)`` (zero bias, small init): reward heads."""
    hidden = model.config.hidden_size
    head = nn.Linear(hidden, 1, bias=True)
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / (hidden + 1) ** 0.5)
        head.bias.zero_()
    ref = next(model.parameters())
    model.score_head = head.to(device=ref.device, dtype=ref.dtype)
    return model.score_head


def _apply_lora(model: nn.Module, cfg) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - peft is a dependency
        raise ValueError("freeze.lora needs the peft package: pip install peft") from exc
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in cfg.target_modules if t not in names]
    if missing:
        raise ValueError(
            f"freeze.lora.target_modules: {missing} match no module of {type(model).__name__}"
        )
    lcfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lcfg)


def apply_freeze(model: nn.Module, cfg: FreezeConfig) -> FreezePlan:
    """Applies `cfg` to `model` (in place; LoRA wraps it) and returns the :class:`FreezePlan`.

    ``cfg.full`` trains everything unless a selector (top_blocks, norm, head, patterns,
    embedding_rows, lora, new_head) is set, in which case only the selection trains.

    Raises:
        ValueError: a selector that matches nothing (pattern, too many blocks, row out of range).
    """
    selective = bool(
        cfg.top_blocks
        or cfg.norm
        or cfg.head
        or cfg.patterns
        or cfg.embedding_rows
        or cfg.lora.enabled
        or cfg.new_head != "none"
    )
    if cfg.new_head == "scalar":
        add_scalar_head(model)
    total_base = sum(p.numel() for p in model.parameters())
    if not selective:
        for p in model.parameters():
            p.requires_grad_(True)
        params = [(n, p) for n, p in model.named_parameters()]
        return FreezePlan(model, params, {}, total_base, total_base, "full fine-tuning")

    chosen: set[int] = set()
    parts = []

    def take(module: nn.Module):
        for p in module.parameters():
            chosen.add(id(p))

    if cfg.top_blocks:
        blocks = decoder_blocks(model)
        if cfg.top_blocks > len(blocks):
            raise ValueError(
                f"freeze.top_blocks={cfg.top_blocks} but the model has {len(blocks)} blocks"
            )
        for block in list(blocks)[-cfg.top_blocks :]:
            take(block)
        parts.append(f"top {cfg.top_blocks} of {len(blocks)} blocks")
    if cfg.norm:
        take(final_norm(model))
        parts.append("final norm")
    if cfg.head:
        head = model.get_output_embeddings()
        take(head)
        tied = head.weight is model.get_input_embeddings().weight
        parts.append("head (tied to the input embeddings)" if tied else "head")
    for pattern in cfg.patterns:
        hits = [p for n, p in model.named_parameters() if fnmatch.fnmatch(n, pattern)]
        if not hits:
            raise ValueError(f"freeze.patterns: {pattern!r} matches no parameter name")
        chosen.update(id(p) for p in hits)
        parts.append(f"pattern {pattern!r} ({len(hits)} tensors)")
    if cfg.new_head == "scalar":
        take(model.score_head)
        parts.append("new scalar head")

    masks: dict[nn.Parameter, torch.Tensor] = {}
    emb = model.get_input_embeddings().weight
    if cfg.embedding_rows and id(emb) not in chosen:
        rows = torch.tensor(sorted(set(cfg.embedding_rows)), dtype=torch.long)
        if rows.min() < 0 or rows.max() >= emb.shape[0]:
            raise ValueError(
                f"freeze.embedding_rows: rows must be in [0, {emb.shape[0]}), got "
                f"{int(rows.min())}..{int(rows.max())}"
            )
        mask = torch.zeros(emb.shape[0], dtype=torch.bool, device=emb.device)
        mask[rows.to(emb.device)] = True
        masks[emb] = mask
        chosen.add(id(emb))
        parts.append(f"{len(rows)} embedding rows")

    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    if cfg.lora.enabled:
        model = _apply_lora(model, cfg.lora)  # freezes the base, adds trainable adapters
        for p in model.parameters():  # selections above stay trainable next to the adapters
            if id(p) in chosen:
                p.requires_grad_(True)
        parts.append(f"LoRA r={cfg.lora.r} on {', '.join(cfg.lora.target_modules)}")

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trainable = 0
    for _, p in params:
        m = masks.get(p)
        trainable += p.numel() if m is None else int(m.sum()) * (p.numel() // p.shape[0])
    total = sum(p.numel() for p in model.parameters())
    return FreezePlan(model, params, masks, trainable, total, ", ".join(parts))
