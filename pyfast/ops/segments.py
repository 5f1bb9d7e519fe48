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
a padded row. :func:`pyfast.hf.attention.install_sdpa_dispatcher` routes transformers' "sdpa"
attention here when the keyword is present and nothing but plain attention is asked for
(no softcap, position bias, sliding window or sinks); every call is counted in :attr:`calls`,
so a caller can verify that each attention layer took this path.

A row of prefix tries (:func:`trie_attention`) passes a :class:`TrieAttention` the same way.
Without autograd on the CPU it runs one compiled call per layer
(``torch.ops.pyfast.trie_attention``, csrc/cpu/trie_attention.cpp) that reads the visibility
of every pair from the layout itself, so no mask, key concatenation or per-segment call exists;
elsewhere it runs as segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pyfast._extension import HAS_C


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
        # The query ranges tile the row, so it is split (autograd then joins the pieces'
        # gradients with one cat; a slice per range would zero-fill a full-size gradient each).
        # Where every segment attends to its own range only (padding-free training rows), the
        # keys and values are split the same way.
        self._sizes = [s.end - s.start for s in self.segments]
        self._own_keys = all(s.keys == ((s.start, s.end),) for s in self.segments)

    def __call__(self, query: Tensor, key: Tensor, value: Tensor, scale: float | None = None):
        if query.shape[0] != 1 or query.shape[2] != self.length or key.shape[2] != self.length:
            raise ValueError(
                f"segmented attention over {self.length} tokens got query {tuple(query.shape)} "
                f"and key {tuple(key.shape)} (expected one row of that length)"
            )
        gqa = query.shape[1] != key.shape[1]
        if self._own_keys:
            kv = zip(key.split(self._sizes, 2), value.split(self._sizes, 2), strict=True)
        else:
            kv = (_gather_keys(key, value, s.keys) for s in self.segments)
        outs = []
        for s, q, (k, v) in zip(self.segments, query.split(self._sizes, 2), kv, strict=True):
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=s.mask, is_causal=s.mask is None, scale=scale, enable_gqa=gqa
            )
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


def _gather_keys(key: Tensor, value: Tensor, ranges: tuple[tuple[int, int], ...]):
    """Keys and values of `ranges` of the row, concatenated in order (a view for one range)."""
    if len(ranges) == 1:
        (a, b), = ranges  # fmt: skip
        return key[:, :, a:b], value[:, :, a:b]
    return (torch.cat([key[:, :, a:b] for a, b in ranges], dim=2),
            torch.cat([value[:, :, a:b] for a, b in ranges], dim=2))  # fmt: skip


def _merge(ranges: tuple[tuple[int, int], ...], a: int, b: int) -> tuple[tuple[int, int], ...]:
    """`ranges` followed by a:b, joined to the last range where they touch."""
    if ranges and ranges[-1][1] == a:
        return (*ranges[:-1], (ranges[-1][0], b))
    return (*ranges, (a, b))


def _check_layout(end: list[int]) -> None:
    """Every subtree end lies after its position and within its ancestors' subtrees."""
    T = len(end)
    open_ends: list[int] = []  # subtree ends of the current position's ancestors
    for t, e in enumerate(end):
        while open_ends and open_ends[-1] <= t:
            open_ends.pop()
        if not t < e <= (open_ends[-1] if open_ends else T):
            raise ValueError(
                f"trie layout: position {t} has subtree end {e}, which must lie in {t + 1}.."
                f"{open_ends[-1] if open_ends else T} (within its ancestors' subtrees)"
            )
        open_ends.append(e)


def _trie_segments(end: list[int], cap: int) -> list[Segment]:
    """The segments of a checked trie layout (see :func:`trie_attention`)."""
    T = len(end)

    def segment(a: int, b: int, anc: tuple[tuple[int, int], ...]) -> Segment:
        """Queries a:b over the ancestors' ranges `anc` (all visible) and their own ancestors
        within a:b: plain causal where a:b is a chain without ancestors."""
        if not anc and all(x >= b for x in end[a:b]):
            return Segment(a, b, ((a, b),))
        pos = torch.arange(a, b)
        own = (pos[None, :] <= pos[:, None]) & (pos[:, None] < torch.tensor(end[a:b])[None])
        n_anc = sum(y - x for x, y in anc)
        mask = torch.cat([own.new_ones(b - a, n_anc), own], 1) if n_anc else own
        return Segment(a, b, _merge(anc, a, b), mask)

    segments: list[Segment] = []
    work, root = [], 0
    while root < T:
        work.append((root, ()))
        root = end[root]
    work.reverse()
    while work:
        t0, anc = work.pop()
        e = end[t0]
        if e - t0 <= cap or all(x == e for x in end[t0:e]):  # small, or a chain: one segment
            segments.append(segment(t0, e, anc))
            continue
        b = t0 + 1  # the top chain: t0 .. b - 1, down to its first token with two children
        while end[b] == e:
            b += 1
        segments.append(segment(t0, b, anc))  # causal over its ancestors and itself
        below, c = [], b
        while c < e:
            below.append((c, _merge(anc, t0, b)))
            c = end[c]
        work.extend(reversed(below))
    return segments


class TrieAttention:
    """The attention of one unpadded row of prefix tries (built by :func:`trie_attention`).

    Called like a :class:`SegmentedAttention`. Where no gradient is needed and the compiled CPU
    kernel serves the tensors (float32 or bfloat16 on the CPU), one
    ``torch.ops.pyfast.trie_attention`` call per layer computes exactly the visible pairs
    (``j <= i < end[j]``) from `end` itself; elsewhere (autograd, CUDA, no extension) the row
    runs as the :attr:`segments` below, one SDPA call each."""

    def __init__(self, end: list[int], cap: int, device: torch.device | str = "cpu"):
        self._end = end
        self.end = torch.tensor(end, dtype=torch.long)
        self.cap = cap
        self.device = torch.device(device)
        self.length = len(end)
        self.calls = 0
        self._segmented: SegmentedAttention | None = None

    @property
    def segmented(self) -> SegmentedAttention:
        """The same attention as per-segment SDPA calls (built on first use)."""
        if self._segmented is None:
            self._segmented = SegmentedAttention(
                _trie_segments(self._end, self.cap), self.length, self.device
            )
        return self._segmented

    @property
    def segments(self) -> list[Segment]:
        return self.segmented.segments

    def __call__(self, query: Tensor, key: Tensor, value: Tensor, scale: float | None = None):
        if _kernel_applies(query, key, value) and query.shape[2] == self.length:
            self.calls += 1
            scale = query.shape[-1] ** -0.5 if scale is None else scale
            return torch.ops.pyfast.trie_attention(query, key, value, self.end, scale)
        out = self.segmented(query, key, value, scale)
        self.calls += 1
        return out


def _kernel_applies(query: Tensor, key: Tensor, value: Tensor) -> bool:
    """The compiled trie kernel serves these tensors: CPU, float32 or bfloat16 alike, one row,
    and no gradient wanted (it has no backward)."""
    return (
        HAS_C
        and query.device.type == "cpu"
        and query.dtype in (torch.float32, torch.bfloat16)
        and key.dtype == query.dtype == value.dtype
        and query.dim() == 4
        and query.shape[0] == 1
        and not (
            torch.is_grad_enabled()
            and (query.requires_grad or key.requires_grad or value.requires_grad)
        )
    )


def trie_attention(end, cap: int = 0, device="cpu") -> TrieAttention:
    """The attention of one unpadded row holding prefix tries in depth-first order.

    `end[t]` is where the subtree of position t ends (exclusive): its descendants are the
    positions t + 1 .. end[t] - 1, and position i sees position j exactly when
    ``j <= i < end[j]`` (j is i itself or one of its ancestors). With position ids equal to each
    token's depth, every hidden state is then that of its root-to-token sequence run alone: a
    token shared by many sequences (a few-shot prefix, a question's context, the first words
    its choices have in common) runs once for all of them. A sequence alone is a chain
    (``end[t]`` is the chain's end for all its tokens).

    On the CPU without autograd, the compiled kernel computes exactly those pairs (see
    :class:`TrieAttention`). Otherwise the row runs as segments: a subtree of at most `cap`
    tokens is one segment (its ancestors' ranges, then its own tokens under the ancestor mask);
    a larger one is cut after its top chain of single-child tokens, which attends causally over
    its ancestors and itself, and each child's subtree is handled the same way. `cap` trades
    calls for masked work: 0 cuts at every branch."""
    end = [int(e) for e in (end.tolist() if isinstance(end, Tensor) else end)]
    _check_layout(end)
    return TrieAttention(end, cap, device)
