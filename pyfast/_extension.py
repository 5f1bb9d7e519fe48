"""Loading of the compiled extension, with a single warning and a pure-PyTorch fallback."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch

# The distribution name on the package index (the import name stays `pyfast`).
DISTRIBUTION = "pyfast-llm"

# SIMD levels in increasing order; a kernel built for one runs on any CPU at that level or above.
_CPU_LEVELS = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}


def _cpu_level(name: str) -> int:
    name = name.upper()
    if name.startswith("AVX512"):  # AVX512, AVX512_BF16, AMX...
        name = "AVX512"
    return _CPU_LEVELS.get(name, 0)


_MARKER = b"pyfast-build-torch="


class ExtensionMismatch(ImportError):
    """pyfast._C was compiled against another torch than the one running (one line: the fix)."""


def built_torch_of(path: str | os.PathLike) -> str | None:
    """The torch version recorded in the compiled extension file at `path`, read from the file
    without loading it (a _C built against another torch often cannot be loaded)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    at = data.find(_MARKER)
    if at < 0:
        return None
    end = data.find(b"\0", at)
    return data[at + len(_MARKER) : end].decode("ascii", "replace") or None


def rebuild_command() -> str:
    """The command that rebuilds _C against the running torch, for this install's kind."""
    pip = f"{sys.executable} -m pip install --no-build-isolation --no-deps --force-reinstall"
    root = Path(__file__).resolve().parents[1]
    if (root / "setup.py").is_file():  # a source checkout / editable install
        return f"{pip} -e {root}"
    return f"{pip} --no-binary {DISTRIBUTION} {DISTRIBUTION}"


def _mismatch(built: str) -> ExtensionMismatch:
    return ExtensionMismatch(
        f"pyfast._C was built against torch {built} but torch {torch.__version__} is installed; "
        f"rebuild it against this torch: `{rebuild_command()}` (or set PYFAST_DISABLE_C=1 to "
        "run on the slower pure-PyTorch ops)"
    )


def _load():
    """Returns (module or None, reason it could not be used or None).

    Raises:
        ExtensionMismatch: _C was compiled against another torch version (whether or not it
            loads: it then fails or, worse, misbehaves; the message gives the rebuild command).
    """
    if os.environ.get("PYFAST_DISABLE_C") == "1":
        return None, "PYFAST_DISABLE_C=1"
    try:
        mod = importlib.import_module("pyfast._C")
    except (ImportError, OSError) as exc:
        spec = importlib.util.find_spec("pyfast._C")
        built = built_torch_of(spec.origin) if spec and spec.origin else None
        if built not in (None, "unknown", torch.__version__):
            raise _mismatch(built) from None
        return None, f"{type(exc).__name__}: {exc}"
    built_torch = getattr(mod, "torch_version", None)
    if built_torch not in (None, "unknown", torch.__version__):
        raise _mismatch(built_torch)
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
        "back to its pure-PyTorch reference (correct, but slower). Build it with "
        f"`{rebuild_command()}`.",
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
        "built_against_torch": getattr(_C, "torch_version", None),
    }
