"""Attention over packed sequences: pyfast's SegmentedAttention against padded rows + a dense mask.

    pytest benchmarks/bench_segments.py --benchmark-enable --benchmark-columns=median,iqr

SmolLM2-135M's attention shapes (9 query heads, 3 key/value heads, head dim 64), float32, CPU,
the q/k/v of one layer, side by side in one process (compare medians within a group):

- "eval trees": 24 HellaSwag-shaped prefix trees (a 25-60-token context and four endings of
  6-16 tokens). stock: the trees packed into rows of 128 tokens, padded to the longest, under
  the dense (rows, 1, L, L) tree mask with keys repeated per query head (what transformers' sdpa
  path does with a 4-D mask); pyfast: one unpadded row through
  :func:`pyfast.ops.segments.trie_attention` as pyfast eval runs it, i.e. the compiled
  ``torch.ops.pyfast.trie_attention`` kernel (one call, visibility read from the layout);
  segments: the same row as per-subtree SDPA calls (subtrees of up to 256 tokens in one call:
  the path autograd and non-CPU devices take). Forward only, as evaluation runs it.
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


def _trees(n=24, seed=0):
    """(real tokens, the unpadded row's SegmentedAttention, the padded rows' dense mask).

    Trees: a 25-60-token context and four endings of 6-16 tokens (each but its last token fed),
    HellaSwag's shape, as token tries in depth-first order (``end``: where each position's
    subtree ends). The rows take whole trees in order up to 128 tokens, as pyfast's row path
    packs them."""
    from pyfast.ops.segments import trie_attention

    g = torch.Generator().manual_seed(seed)
    trees = []  # per tree: its end list, relative to its first token
    for _ in range(n):
        ctx = int(torch.randint(25, 61, (1,), generator=g))
        ends = torch.randint(6, 17, (4,), generator=g).tolist()
        size = ctx + sum(e - 1 for e in ends)
        end, t = [size] * ctx, ctx
        for e in ends:
            end += [t + e - 1] * (e - 1)
            t += e - 1
        trees.append(end)
    row_end, t = [], 0
    for end in trees:
        row_end += [t + e for e in end]
        t += len(end)
    segments = trie_attention(row_end, 256, "cpu")
    rows: list[list[int]] = [[]]
    for end in trees:
        if rows[-1] and len(rows[-1]) + len(end) > 128:
            rows.append([])
        rows[-1] += [len(rows[-1]) + e for e in end]
    L = max(map(len, rows))
    ends = torch.tensor([r + list(range(len(r) + 1, L + 1)) for r in rows])  # padding: itself
    j = torch.arange(L)
    allowed = (j[None, None, :] <= j[None, :, None]) & (j[None, :, None] < ends[:, None, :])
    mask = torch.zeros(len(rows), 1, L, L).masked_fill_(~allowed.unsqueeze(1), torch.finfo().min)
    return t, segments, mask


@pytest.mark.parametrize("provider", ["stock", "segments", "pyfast"])
def test_eval_trees(benchmark, provider):
    torch.manual_seed(0)
    T, segments, mask = _trees()
    rows, L = mask.shape[0], mask.shape[-1]
    benchmark.group = f"eval trees forward [{T} tokens, {HEADS}/{KV} heads x {DIM}]"
    if provider != "stock":
        q, k, v = (
            torch.randn(1, HEADS, T, DIM),
            torch.randn(1, KV, T, DIM),
            torch.randn(1, KV, T, DIM),
        )
        attn = segments if provider == "pyfast" else segments.segmented

        def fn():
            with torch.no_grad():
                attn(q, k, v)

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
