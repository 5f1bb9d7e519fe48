"""Checkpoints: a model folder plus everything ``--resume`` needs, written atomically.

Layout of ``<output_dir>/checkpoints/step-000120/``::

    model.safetensors, config.json, tokenizer files   (plain transformers folder; or PEFT's
                                                       adapter_model.safetensors + adapter_config)
    score_head.safetensors                            (when a new scalar head is trained)
    trainer_state.pt    optimizer, scheduler, RNG states
    trainer_state.json  step, epoch, data position, best held-out loss, ...
    config.yaml         the resolved training config

A checkpoint is written into a hidden temporary folder and renamed into place, so a crash during
a save leaves the previous checkpoints untouched and never a half-written ``step-*`` folder.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from pyfast.io import WriteError, apply_umask, write_json, write_text

STATE_JSON = "trainer_state.json"
STATE_PT = "trainer_state.pt"


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def save_model(
    model, tokenizer, path: Path, merge_lora: bool = False, state_dict: dict | None = None
) -> None:
    """Writes `model` as a Hugging Face folder at `path` (not atomic; see :func:`atomic_dir`).

    A PEFT model is saved in PEFT's format (adapter files), or merged into the base weights when
    `merge_lora`. A ``score_head`` attribute is saved beside, as ``score_head.safetensors``.
    `state_dict`: the model's full state dict to write instead of its own (a sharded model's,
    gathered; see :func:`pyfast.train.fsdp.full_model_state`); merging is then not supported.
    """
    from safetensors.torch import save_file

    base = model.get_base_model() if is_peft(model) else model
    if is_peft(model) and merge_lora:
        if state_dict is not None:
            raise ValueError("save_model: merge_lora needs the model itself, not a state_dict")
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(path, safe_serialization=True)
    else:
        model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    head = getattr(base, "score_head", None)
    if head is not None:
        if state_dict is None:
            tensors = head.state_dict()
        else:
            prefix = next(n for n, m in model.named_modules() if m is head) + "."
            tensors = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(path / "score_head.safetensors"),
        )


def atomic_dir(final: Path, fill) -> Path:
    """Calls ``fill(tmp)`` on a hidden folder beside `final`, then swaps it into place.

    On error the temporary folder is removed and an existing `final` stays as it was; an
    OSError (disk full, no permission) is raised as :class:`pyfast.io.WriteError` naming `final`.
    Files and folders get the user's umask (:func:`pyfast.io.apply_umask`).
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        fill(tmp)
        apply_umask(tmp)
        old = final.with_name(f".{final.name}.old{os.getpid()}")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise WriteError.of(final, exc) from exc
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: Path,
    model,
    tokenizer,
    optimizer,
    scheduler,
    trainer_state: dict,
    config: dict,
    model_state: dict | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Writes a complete resumable checkpoint at `path`, atomically.

    `model_state` / `optimizer_state`: full state dicts to write instead of the model's and the
    optimizer's own (gathered from a sharded model).
    """

    def fill(tmp: Path) -> None:
        save_model(model, tokenizer, tmp, state_dict=model_state)
        torch.save(
            {
                "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
            },
            tmp / STATE_PT,
        )
        write_json(tmp / STATE_JSON, trainer_state)
        write_text(tmp / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    return atomic_dir(path, fill)


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete ``step-*`` checkpoints under `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step-*") if (p / STATE_JSON).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(Path(output_dir) / "checkpoints")
    return found[-1] if found else None


def prune_checkpoints(folder: Path, keep: int) -> None:
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def read_state(path: Path) -> tuple[dict, dict]:
    """(trainer_state.json, trainer_state.pt) of checkpoint `path`; ValueError if incomplete."""
    path = Path(path)
    if not (path / STATE_JSON).is_file() or not (path / STATE_PT).is_file():
        raise ValueError(f"{path} is not a complete pyfast checkpoint (no {STATE_JSON})")
    try:
        meta = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
        blob = torch.load(path / STATE_PT, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a damaged file
        raise ValueError(f"{path}: damaged checkpoint ({type(exc).__name__}: {exc})") from None
    return meta, blob


def _load_safetensors(path: Path) -> dict:
    """The tensors of safetensors file `path`; ValueError naming it when it is damaged."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise ValueError(f"{path}: damaged safetensors file ({exc})") from None


def load_weights_into(model, path: Path) -> None:
    """Loads the trained weights of checkpoint `path` into `model` (full, PEFT, scalar head)."""
    load_file = _load_safetensors
    path = Path(path)
    base = model.get_base_model() if is_peft(model) else model
    if is_peft(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    else:
        state = {}
        for f in sorted(path.glob("*.safetensors")):
            if f.name != "score_head.safetensors":
                state.update(load_file(f))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
        if unexpected or set(missing) - tied:
            raise ValueError(
                f"{path}: checkpoint does not match the model (missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]})"
            )
    head = getattr(base, "score_head", None)
    if head is not None and (path / "score_head.safetensors").is_file():
        head.load_state_dict(load_file(path / "score_head.safetensors"))
