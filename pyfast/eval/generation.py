"""Generation requests: their keyword arguments and how a generated text is cut at stop strings.

A generation request is ``(context, gen_kwargs)`` as in lm-evaluation-harness 0.4.x; the keys
understood are:

- ``until``: stop string or list of stop strings; the text is cut at the first occurrence of any
  of them (lm-eval also adds the tokenizer's EOS string, and so does :class:`pyfast.eval.HFLM`);
- ``max_gen_toks`` (alias ``max_new_tokens``): most new tokens, default 256 like lm-eval;
- ``do_sample`` / ``temperature`` / ``top_p`` / ``top_k``: greedy when ``do_sample`` is false or
  the temperature is 0 (the default); otherwise sampling at that temperature (1.0 when only
  ``do_sample: true`` is given, as transformers does), nucleus-filtered by ``top_p`` and
  ``top_k`` (0 = off) when given;
- ``seed``: seed of the sampling generator of this request (sampled requests with the same
  seed, context and kwargs produce the same text whatever else is in the batch).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_GEN_TOKS = 256
_KEYS = {"until", "max_gen_toks", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
         "seed"}  # fmt: skip


@dataclass(frozen=True)
class GenKwargs:
    """Normalised generation settings of one request."""

    until: tuple[str, ...]
    max_gen_toks: int
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    seed: int | None


def _bool(value, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"generation kwarg {key!r} must be true or false, got {value!r}")


def _number(value, key: str, kind=float):
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"generation kwarg {key!r} must be a {kind.__name__}, got {value!r}"
        ) from None


def normalize_gen_kwargs(
    kwargs: dict | None, default_max_gen_toks: int = DEFAULT_MAX_GEN_TOKS
) -> GenKwargs:
    """Validates a request's gen_kwargs (see the module docstring); raises ValueError naming the
    offending key."""
    kwargs = dict(kwargs or {})
    unknown = sorted(set(kwargs) - _KEYS)
    if unknown:
        raise ValueError(
            f"unknown generation kwarg(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(sorted(_KEYS))}"
        )
    until = kwargs.get("until")
    if until is None:
        until = []
    elif isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
        raise ValueError(f"generation kwarg 'until' must be a string or list of strings: {until!r}")
    max_gen = kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", default_max_gen_toks))
    max_gen = _number(max_gen, "max_gen_toks", int)
    if max_gen < 1:
        raise ValueError(f"generation kwarg 'max_gen_toks' must be >= 1, got {max_gen}")
    temperature = kwargs.get("temperature")
    do_sample = kwargs.get("do_sample")
    do_sample = None if do_sample is None else _bool(do_sample, "do_sample")
    temperature = None if temperature is None else _number(temperature, "temperature")
    if temperature is not None and temperature < 0:
        raise ValueError(f"generation kwarg 'temperature' must be >= 0, got {temperature}")
    if do_sample is None:
        do_sample = bool(temperature)
    if do_sample and temperature is None:
        temperature = 1.0
    if do_sample and temperature == 0:
        raise ValueError("generation kwargs: do_sample=true needs a temperature > 0")
    top_p = _number(kwargs.get("top_p", 1.0), "top_p")
    if not 0 < top_p <= 1:
        raise ValueError(f"generation kwarg 'top_p' must be in (0, 1], got {top_p}")
    top_k = _number(kwargs.get("top_k", 0), "top_k", int)
    if top_k < 0:
        raise ValueError(f"generation kwarg 'top_k' must be >= 0, got {top_k}")
    seed = kwargs.get("seed")
    seed = None if seed is None else _number(seed, "seed", int)
    return GenKwargs(
        until=tuple(until),
        max_gen_toks=max_gen,
        do_sample=do_sample,
        temperature=float(temperature) if do_sample else 0.0,
        top_p=top_p if do_sample else 1.0,
        top_k=top_k if do_sample else 0,
        seed=seed,
    )


def cut_at_stop(text: str, until) -> str:
    """The text before the first occurrence of any non-empty stop string (lm-eval's rule)."""
    end = len(text)
    for stop in until:
        if stop:
            i = text.find(stop)
            if i != -1:
                end = min(end, i)
    return text[:end]


def parse_gen_kwargs(text: str | None) -> dict:
    """'temperature=0.7,top_p=0.9,max_gen_toks=64,do_sample=true' -> typed dict.

    Raises ValueError for an entry that is not KEY=VALUE, an unknown key or a bad value.
    """
    out: dict = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ValueError(f"--gen-kwargs entry {part!r} must be KEY=VALUE")
        if key not in _KEYS - {"until"}:
            raise ValueError(
                f"--gen-kwargs: unknown key {key!r}; known: {', '.join(sorted(_KEYS - {'until'}))}"
            )
        if key == "do_sample":
            out[key] = _bool(value, key)
        else:
            out[key] = _number(value, key, float if key in ("temperature", "top_p") else int)
    normalize_gen_kwargs(out)  # bad values fail here, naming the key
    return out
