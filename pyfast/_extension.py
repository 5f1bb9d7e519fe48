"""Loading of the compiled extension, with a single warning and a pure-PyTorch fallback."""

from __future__ import annotations

import importlib
import os
import warnings

import torch

# SIMD levels in increasing order; a kernel built for one runs on any CPU at that level or above.
_CPU_LEVELS = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}


def _cpu_level(name: str) -> int:
    name = name.upper()
    if name.startswith("AVX512"):  # AVX512, AVX512_BF16, AMX...
        name = "AVX512"
    return _CPU_LEVELS.get(name, 0)


def _load():
    """Returns (module or None, reason it could not be used or None)."""
    if os.environ.get("PYFAST_DISABLE_C") == "1":
        return None, "PYFAST_DISABLE_C=1"
    try:
        mod = importlib.import_module("pyfast._C")
    except (ImportError, OSError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    built = getattr(mod, "cpu_capability", "DEFAULT")
    host = torch.backends.cpu.get_cpu_capability()
    if _cpu_level(built) > _cpu_level(host):
        return None, f"its CPU kernels were compiled for {built} but this CPU supports {host}"
    return mod, None


_C, _REASON = _load()
HAS_C: bool = _C is not None
HAS_CUDA_KERNELS: bool = bool(HAS_C and getattr(_C, "with_cuda", 0))

if not HAS_C:
    warnings.warn(
        f"pyfast: the compiled extension pyfast._C is unavailable ({_REASON}); every op falls "
        "back to its pure-PyTorch reference (correct, but slower). Reinstall with "
        "`pip install --no-build-isolation -e .` to build it.",
        RuntimeWarning,
        stacklevel=2,
    )


def extension_info() -> dict:
    """What was loaded: whether _C is in use, its SIMD level, and whether CUDA kernels exist."""
    return {
        "compiled": HAS_C,
        "reason_unavailable": _REASON,
        "cpu_capability": getattr(_C, "cpu_capability", None),
        "cuda_kernels": HAS_CUDA_KERNELS,
        "torch": torch.__version__,
    }
