"""Packed rows through a Hugging Face decoder: many unrelated (or prefix-sharing) sequences run as
one unpadded row, attention cut per sequence by a :class:`pyfast.ops.segments.SegmentedAttention`
or :class:`~pyfast.ops.segments.TrieAttention` passed as ``pyfast_segments=`` and routed by the
sdpa dispatcher (:func:`pyfast.hf.attention.install_sdpa_dispatcher`).

- :func:`packing_unsupported` / :func:`prepare_segments`: whether a model can take packed rows
  (sdpa attention, no sliding window or ALiBi, position ids taken), and the reason where not;
- :func:`decoder_hidden`: the decoder body's last hidden states over one packed row, verified to
  have run the segments in every attention layer (:class:`SegmentsNotTaken` otherwise).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from pyfast.hf.attention import install_sdpa_dispatcher


class SegmentsNotTaken(RuntimeError):
    """Not every attention layer ran the segments: the row attended across its sequences."""


def decoder_hidden(model, input_ids: Tensor, position_ids: Tensor, attention, remedy: str,
                   rows: Tensor | None = None):  # fmt: skip
    """The last hidden states (T, D) of `model`'s decoder body over one packed row (`input_ids`
    and `position_ids` of shape (T,)) under `attention` (a :class:`SegmentedAttention` or
    :class:`TrieAttention`).

    rows: (R,) distinct positions whose hidden states are wanted (e.g. those that predict a
    scored token); then (R, D) is returned and the last layer's MLP runs at those positions
    only: elsewhere its output would reach no later layer (unless gradient checkpointing
    recomputes the layer in backward: then it runs everywhere).

    Raises :class:`SegmentsNotTaken`, naming `remedy`, when not every attention layer ran the
    segments (a model that drops the keyword, or asks for more than plain attention): the row
    would have attended across its sequences."""
    body = model.get_decoder()
    layers = getattr(body, "layers", None)
    mlp = getattr(layers[-1], "mlp", None) if rows is not None and layers else None
    if getattr(body, "gradient_checkpointing", False) and torch.is_grad_enabled():
        mlp = None
    if mlp is not None:
        own = mlp.__dict__.get("forward")
        full = mlp.forward

        def at_rows(x: Tensor) -> Tensor:  # (1, T, D): the MLP at `rows`, zeros elsewhere
            return torch.zeros_like(x).index_copy(1, rows, full(x[:, rows]))

        mlp.forward = at_rows
    try:
        out = body(
            input_ids=input_ids[None],
            position_ids=position_ids[None],
            use_cache=False,
            pyfast_segments=attention,
        )
    finally:
        if mlp is not None:
            if own is None:
                del mlp.forward
            else:
                mlp.forward = own
    cfg = getattr(model.config, "text_config", None) or model.config
    if attention.calls != cfg.num_hidden_layers:
        raise SegmentsNotTaken(
            f"{attention.calls} of the model's {cfg.num_hidden_layers} attention layers ran "
            "the segmented attention (the model drops the keyword or asks for more than plain "
            f"attention); {remedy}"
        )
    hidden = (out[0] if isinstance(out, tuple) else out.last_hidden_state)[0]
    return hidden if rows is None else hidden[rows]


# Models whose attention bias comes from the mask layout rather than from position ids.
_ALIBI = {"bloom", "mpt", "falcon", "baichuan", "jais"}


def packing_unsupported(model, implementations=("eager", "sdpa")) -> str | None:
    """Why sequences cannot be packed side by side into one row of `model` (None: they can):
    its attention must be one of `implementations` (transformers' names; segments need
    "sdpa"), without sliding windows or ALiBi, and its decoder body must take position ids."""
    cfg = getattr(model.config, "text_config", None) or model.config
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        window = None
    body = getattr(model, model.base_model_prefix, None) or model.get_decoder()
    return (
        f"attention implementation {impl!r}" if impl not in implementations
        else f"sliding-window attention ({window})" if window
        else "ALiBi positions" if getattr(cfg, "alibi", False) or cfg.model_type in _ALIBI
        else "no position_ids argument"
        if "position_ids" not in inspect.signature(body.forward).parameters
        else None
    )  # fmt: skip


def prepare_segments(model) -> str | None:
    """None where `model` can run :class:`SegmentedAttention` (transformers' "sdpa" attention
    without sliding windows or ALiBi, position ids taken), after installing the dispatcher that
    routes it (:func:`pyfast.hf.attention.install_sdpa_dispatcher`); else the reason."""
    why = packing_unsupported(model, implementations=("sdpa",))
    if why is None:
        install_sdpa_dispatcher()
    return why
