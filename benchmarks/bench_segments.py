"""Attention over packed sequences: pyfast's SegmentedAttention against padded rows + a dense mask.

    pytest benchmarks/bench_segments.py --benchmark-enable --benchmark-columns=median,iqr

SmolLM2-135M's attention shapes (9 query heads, 3 key/value heads, head dim 64), float32, CPU,
the q/k/v of one layer, side by side in one process (compare medians within a group):

- "eval trees": 24 HellaSwag-shaped prefix trees (a 25-60-token context and four endings of
  6-16 tokens). stock: the trees packed into rows of 128 tokens as pyfast's row path packs them
  (``pyfast.eval.model._rows``), padded to the longest, under
  the dense (rows, 1, L, L) tree mask with keys repeated per query head (what transformers' sdpa
  path does with a 4-D mask); pyfast: one unpadded row, one call per tree part
  (:func:`pyfast.ops.segments.tree_attention`). Forward only, as evaluation runs it.
- "training rows": 4 rows of 256, 241, 230 and 212 tokens (a batch cut after each row's last
  target). stock: the (4, 256) padded batch, causal; pyfast: the 939 real tokens as one row, one
  causal call per row (:meth:`SegmentedAttention.causal`). Forward + backward.

extra_info records the query tokens each provider computes (padding included).
"""

import pytest
import torch
import torch.nn.functional as F

from pyfast.ops.segments import SegmentedAttention

HEADS, KV, DIM = 9, 3, 64


class _Tree:
    def __init__(self, start: int, length: int):
        self.start, self.length = start, length


def _trees(n=24, seed=0):
    """(real tokens, the unpadded row's SegmentedAttention, the padded rows' dense mask).

    Trees: a 25-60-token context and four endings of 6-16 tokens (each but its last token fed),
    HellaSwag's shape. The rows are what pyfast's row path packs (``_rows``, 128 tokens)."""
    from pyfast.eval.model import _rows
    from pyfast.ops.segments import tree_attention

    g = torch.Generator().manual_seed(seed)
    parts, cont, trees, t = [], [], [], 0
    for _ in range(n):
        ctx = int(torch.randint(25, 61, (1,), generator=g))
        ends = torch.randint(6, 17, (4,), generator=g).tolist()
        parts.append((t, ctx, t + ctx, t + ctx + sum(e - 1 for e in ends)))
        cont += [-1] * ctx + [k for k, e in enumerate(ends) for _ in range(e - 1)]
        trees.append(_Tree(t, parts[-1][3] - t))
        t = parts[-1][3]
    segments = tree_attention(parts, torch.tensor(cont), t, "cpu")
    rows = _rows(trees, 128)
    L = max(sum(tr.length for tr in r) for r in rows)
    where = {}  # tree start -> (row, offset in the row)
    for r, row in enumerate(rows):
        off = 0
        for tr in row:
            where[tr.start] = (r, off)
            off += tr.length
    allowed = torch.zeros(len(rows), L, L, dtype=torch.bool)
    tree_of = {}
    for tr in trees:
        for i in range(tr.start, tr.start + tr.length):
            tree_of[i] = tr.start
    for s in segments.segments:  # the same visibility, tree by tree, in row coordinates
        t0 = tree_of[s.start]
        r, off = where[t0]
        cols = torch.cat([torch.arange(a, b) for a, b in s.keys]) - t0 + off
        n = s.end - s.start
        block = s.mask if s.mask is not None else torch.ones(n, n, dtype=torch.bool).tril()
        allowed[r, s.start - t0 + off : s.end - t0 + off, cols] = block
    allowed |= torch.eye(L, dtype=torch.bool)  # padding sees itself
    mask = torch.zeros(len(rows), 1, L, L).masked_fill_(~allowed.unsqueeze(1), torch.finfo().min)
    return t, segments, mask


@pytest.mark.parametrize("provider", ["stock", "pyfast"])
def test_eval_trees(benchmark, provider):
    torch.manual_seed(0)
    T, segments, mask = _trees()
    rows, L = mask.shape[0], mask.shape[-1]
    benchmark.group = f"eval trees forward [{T} tokens, {HEADS}/{KV} heads x {DIM}]"
    if provider == "pyfast":
        q, k, v = (
            torch.randn(1, HEADS, T, DIM),
            torch.randn(1, KV, T, DIM),
            torch.randn(1, KV, T, DIM),
        )

        def fn():
            with torch.no_grad():
                segments(q, k, v)

        computed = T
    else:
        q = torch.randn(rows, HEADS, L, DIM)
        k, v = torch.randn(rows, KV, L, DIM), torch.randn(rows, KV, L, DIM)

        def fn():
            with torch.no_grad():
                kk, vv = k.repeat_interleave(HEADS // KV, 1), v.repeat_interleave(HEADS // KV, 1)
                F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)

        computed = rows * L
    benchmark.pedantic(fn, rounds=15, warmup_rounds=2)
    benchmark.extra_info.update(provider=provider, query_tokens=computed, real_tokens=T)


@pytest.mark.parametrize("provider", ["stock", "pyfast"])
def test_training_rows(benchmark, provider):
    torch.manual_seed(0)
    lengths = [256, 241, 230, 212]
    T = sum(lengths)
    benchmark.group = f"training rows forward+backward [{T} of 1024 tokens]"
    if provider == "pyfast":
        attn = SegmentedAttention.causal(lengths)
        shape_q, shape_kv = (1, HEADS, T, DIM), (1, KV, T, DIM)

        def run(q, k, v):
            return attn(q, k, v)

        computed = T
    else:
        shape_q, shape_kv = (4, HEADS, 256, DIM), (4, KV, 256, DIM)

        def run(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        computed = 1024
    q = torch.randn(shape_q, requires_grad=True)
    k, v = torch.randn(shape_kv, requires_grad=True), torch.randn(shape_kv, requires_grad=True)

    def fn():
        run(q, k, v).sum().backward()

    benchmark.pedantic(fn, rounds=15, warmup_rounds=2)
    benchmark.extra_info.update(provider=provider, query_tokens=computed, real_tokens=T)
