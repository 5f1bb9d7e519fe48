"""The transformers releases pyfast's integration is tested with.

pyproject.toml pins the same range. Outside it nothing is assumed: the fused head and every
block swap still decide by their numeric self-checks (and the attention swap by its source
check), so a changed release costs speed, not correctness; :func:`check_transformers` says so
once per process.
"""

from __future__ import annotations

import functools
import warnings

# lower bound inclusive, upper bound exclusive: (major, minor)
TRANSFORMERS_TESTED = ((5, 24), (5, 26))


def _version(text: str) -> tuple[int, int]:
    parts = text.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def tested_range() -> str:
    (a, b), (c, d) = TRANSFORMERS_TESTED
    return f">={a}.{b},<{c}.{d}"


@functools.cache
def check_transformers() -> bool:
    """True where the installed transformers is in :data:`TRANSFORMERS_TESTED`; else one
    warning naming both and False."""
    import transformers

    v = _version(transformers.__version__)
    low, high = TRANSFORMERS_TESTED
    if low <= v < high:
        return True
    warnings.warn(
        f"pyfast: transformers {transformers.__version__} is outside the tested range "
        f"{tested_range()}; pyfast's fused parts decide by their self-checks at load "
        "(see pyfast.hf.supports(model))",
        UserWarning,
        stacklevel=2,
    )
    return False
