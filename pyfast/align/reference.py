"""Reference-model log-probs, computed once before training and cached on disk.

DPO's reference model never changes, so its log-probs of every pair are computed in one no-grad
pass before the first step and saved (safetensors, atomic write) under a key made of the model's
identity (class, config, a hash of its base weights) and the tokenised data's hash; training then
needs no second model in memory. For a LoRA (peft) policy the reference is the same model with its
adapters disabled (``disable_adapter()``), so no copy is made at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch

from pyfast.align.data import TokenizedPair, collate_shared_prompt, pairs_fingerprint
from pyfast.align.logps import pair_logps
from pyfast.io import atomic_write
from pyfast.ops.packed_linear import packed_for_inference

CACHE_VERSION = "2"


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model class, its config and its base weights (LoRA adapter weights excluded,
    since the reference runs with adapters disabled)."""
    h = hashlib.sha256()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    h.update(type(base).__name__.encode())
    cfg = getattr(base, "config", None)
    if cfg is not None:
        d = cfg.to_dict()
        for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
            d.pop(volatile, None)
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        # peft renames wrapped weights: base_model.model.<name> with .base_layer inserted.
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        h.update(name.encode())
        h.update(str(p.dtype).encode())
        t = p.detach().to("cpu").contiguous()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _adapters_off(model: torch.nn.Module):
    return (
        model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    )


@torch.no_grad()
def compute_reference_logps(
    model: torch.nn.Module,
    pairs: list[TokenizedPair],
    pad_id: int,
    batch_size: int = 8,
    pack_weights: bool | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs (N,) float32 of every chosen and rejected answer under `model` in eval
    mode (adapters disabled for peft models; float32 CPU linear layers on packed weights,
    :func:`pyfast.ops.packed_linear.packed_for_inference`; `pack_weights` False: off). With
    `progress`, a bar on stderr (a terminal only) counts the pairs."""
    from pyfast.eval.progress import Progress

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected = [], []
    try:
        bar = Progress(progress).bar(len(pairs), "reference pass", "pair")
        with _adapters_off(model), packed_for_inference(model, pack_weights), bar:
            for i in range(0, len(pairs), batch_size):
                batch = collate_shared_prompt(pairs[i : i + batch_size], pad_id)
                lp = pair_logps(model, {k: v.to(device) for k, v in batch.items()})
                chosen.append(lp.chosen.float().cpu())
                rejected.append(lp.rejected.float().cpu())
                tokens = int(batch["prompt_mask"].sum() + batch["answer_mask"].sum())
                bar.tokens_done(len(lp.chosen), tokens)
    finally:
        model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def reference_logps(
    model: torch.nn.Module,
    pairs: list[TokenizedPair],
    pad_id: int,
    cache_dir: str | Path,
    batch_size: int = 8,
    model_key: str | None = None,
    pack_weights: bool | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, Path, bool]:
    """Cached :func:`compute_reference_logps`: returns (chosen, rejected, cache file, was_cached).

    The file is ``<cache_dir>/<sha256(model, data)>.safetensors``; a model or data change gives a
    new key, so a stale cache is never read.
    """
    from safetensors.torch import load_file, save_file

    model_key = model_key or model_fingerprint(model)
    key = hashlib.sha256(
        f"{CACHE_VERSION}|{model_key}|{pairs_fingerprint(pairs)}".encode()
    ).hexdigest()[:32]
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        if t["chosen"].shape[0] == len(pairs):
            return t["chosen"], t["rejected"], path, True
    chosen, rejected = compute_reference_logps(
        model, pairs, pad_id, batch_size, pack_weights, progress
    )
    meta = {"model": model_key, "pairs": str(len(pairs)), "version": CACHE_VERSION}
    atomic_write(
        path,
        lambda tmp: save_file({"chosen": chosen, "rejected": rejected}, tmp, metadata=meta),
    )
    return chosen, rejected, path, False
