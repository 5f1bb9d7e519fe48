"""Attention over one packed sequence cut into segments, each with its own keys and mask.

A batch of many short, unrelated (or prefix-sharing) sequences can run through a model as one
unpadded row: every linear layer then works on exactly the real tokens. Attention is the only
part that must not mix them; a :class:`SegmentedAttention` passed through a transformers model's
forward as ``pyfast_segments=`` (keyword arguments reach the attention function) replaces the
row's attention by one ``scaled_dot_product_attention`` call per segment:

- a segment's queries are a contiguous range of the row;
- its keys (and values) are one or more ranges of the row, concatenated in order — e.g. a shared
  few-shot prefix followed by the segment's own tokens (cascade attention: the prefix is stored
  and computed once, and every segment reads it);
- its mask is a boolean ``(queries, keys)`` matrix (True: attend), or None for plain causal
  attention over its own range.

The cost of attention is then the sum over segments of queries x keys, instead of the square of
a padded row. :func:`pyfast.ops.fused_blocks.install_sdpa_dispatcher` routes transformers' "sdpa"
attention here when the keyword is present and nothing but plain attention is asked for
(no softcap, position bias, sliding window or sinks); every call is counted in :attr:`calls`,
so a caller can verify that each attention layer took this path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Segment:
    """Queries ``start:end`` of the row attend to the keys of ``keys`` (ranges of the row,
    concatenated) under ``mask`` ((end - start, total key length) bool, True: attend), or
    causally over ``start:end`` itself when ``mask`` is None."""

    start: int
    end: int
    keys: tuple[tuple[int, int], ...]
    mask: Tensor | None = None


class SegmentedAttention:
    """The attention of one packed row of `length` tokens, as a list of :class:`Segment` whose
    query ranges cover the row exactly once. Call with the projected ``(1, heads, length, dim)``
    query and ``(1, kv_heads, length, dim)`` key/value; returns ``(1, length, heads, dim)`` (the
    layout transformers' attention functions return)."""

    def __init__(self, segments: list[Segment], length: int, device: torch.device | str = "cpu"):
        segments = sorted(segments, key=lambda s: s.start)
        covered = 0
        for s in segments:
            if s.start != covered or s.end <= s.start:
                raise ValueError(
                    f"segments must cover positions 0..{length} once: a segment starts at "
                    f"{s.start} where {covered} was expected (or is empty)"
                )
            n_keys = sum(b - a for a, b in s.keys)
            if s.mask is None and s.keys != ((s.start, s.end),):
                raise ValueError("a segment without a mask must attend causally over itself")
            if s.mask is not None and tuple(s.mask.shape) != (s.end - s.start, n_keys):
                raise ValueError(
                    f"segment {s.start}:{s.end}: mask of shape {tuple(s.mask.shape)}, expected "
                    f"({s.end - s.start}, {n_keys})"
                )
            covered = s.end
        if covered != length:
            raise ValueError(f"segments cover positions 0..{covered}, the row has {length}")
        dev = torch.device(device)
        self.segments = [
            s if s.mask is None else Segment(s.start, s.end, s.keys, s.mask.to(dev))
            for s in segments
        ]
        self.length = length
        self.calls = 0

    def __call__(self, query: Tensor, key: Tensor, value: Tensor, scale: float | None = None):
        if query.shape[0] != 1 or query.shape[2] != self.length or key.shape[2] != self.length:
            raise ValueError(
                f"segmented attention over {self.length} tokens got query {tuple(query.shape)} "
                f"and key {tuple(key.shape)} (expected one row of that length)"
            )
        gqa = query.shape[1] != key.shape[1]
        outs = []
        for s in self.segments:
            if len(s.keys) == 1:
                (a, b), = s.keys  # fmt: skip
                k, v = key[:, :, a:b], value[:, :, a:b]
            else:
                k = torch.cat([key[:, :, a:b] for a, b in s.keys], dim=2)
                v = torch.cat([value[:, :, a:b] for a, b in s.keys], dim=2)
            o = F.scaled_dot_product_attention(
                query[:, :, s.start : s.end], k, v, attn_mask=s.mask, is_causal=s.mask is None,
                scale=scale, enable_gqa=gqa,
            )  # fmt: skip
            outs.append(o.transpose(1, 2))
        self.calls += 1
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0].contiguous()

    @classmethod
    def causal(cls, lengths: list[int], device: torch.device | str = "cpu") -> SegmentedAttention:
        """Consecutive sequences of `lengths` tokens, each attending causally over itself."""
        segments, start = [], 0
        for n in lengths:
            segments.append(Segment(start, start + n, ((start, start + n),)))
            start += n
        return cls(segments, start, device)


def tree_attention(parts, cont: Tensor, length: int, device="cpu") -> SegmentedAttention:
    """The attention of one unpadded row of prefix trees, from its `parts` (shared start, shared
    length, group start, group end; a tree's shared part once, whatever number of its groups
    name it) and the row's continuation index per token (-1: context): each tree's shared tokens
    attend causally over themselves; each group's own tokens (context, then continuations)
    attend to all shared tokens and, among their own, to earlier context and earlier tokens of
    their own continuation."""
    segments, shared_done = [], set()
    for t0, S, g0, g1 in parts:
        if S and t0 not in shared_done:
            segments.append(Segment(t0, t0 + S, ((t0, t0 + S),)))
            shared_done.add(t0)
        if g1 > g0:
            n, c = g1 - g0, cont[g0:g1]
            own = torch.ones(n, n, dtype=torch.bool).tril_()
            own &= (c.unsqueeze(0) == -1) | (c.unsqueeze(0) == c.unsqueeze(1))
            if S:
                segments.append(Segment(g0, g1, ((t0, t0 + S), (g0, g1)),
                                        torch.cat([own.new_ones(n, S), own], 1)))  # fmt: skip
            else:
                segments.append(Segment(g0, g1, ((g0, g1),), own))
    return SegmentedAttention(segments, length, device)


class SegmentsNotTaken(RuntimeError):
    """Not every attention layer ran the segments: the row attended across its sequences."""


def decoder_hidden(model, input_ids: Tensor, position_ids: Tensor, attention, remedy: str):
    """The last hidden states (T, D) of `model`'s decoder body over one packed row (`input_ids`
    and `position_ids` of shape (T,)) under `attention` (a :class:`SegmentedAttention`).

    Raises :class:`SegmentsNotTaken`, naming `remedy`, when not every attention layer ran the
    segments (a model that drops the keyword, or asks for more than plain attention): the row
    would have attended across its sequences."""
    out = model.get_decoder()(
        input_ids=input_ids[None],
        position_ids=position_ids[None],
        use_cache=False,
        pyfast_segments=attention,
    )
    cfg = getattr(model.config, "text_config", None) or model.config
    if attention.calls != cfg.num_hidden_layers:
        raise SegmentsNotTaken(
            f"{attention.calls} of the model's {cfg.num_hidden_layers} attention layers ran "
            "the segmented attention (the model drops the keyword or asks for more than plain "
            f"attention); {remedy}"
        )
    return (out[0] if isinstance(out, tuple) else out.last_hidden_state)[0]


# Models whose attention bias comes from the mask layout rather than from position ids.
_ALIBI = {"bloom", "mpt", "falcon", "baichuan", "jais"}


def packing_unsupported(model, implementations=("eager", "sdpa")) -> str | None:
    """Why sequences cannot be packed side by side into one row of `model` (None: they can):
    its attention must be one of `implementations` (transformers' names; segments need
    "sdpa"), without sliding windows or ALiBi, and its decoder body must take position ids."""
    import inspect

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
    routes it (:func:`pyfast.ops.fused_blocks.install_sdpa_dispatcher`); else the reason."""
    why = packing_unsupported(model, implementations=("sdpa",))
    if why is None:
        from pyfast.ops.fused_blocks import install_sdpa_dispatcher

        install_sdpa_dispatcher()
    return why
