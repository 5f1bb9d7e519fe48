"""SegmentedAttention: per-segment attention over one packed row equals dense masked attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pyfast
from pyfast.hf.packing import packing_unsupported
from pyfast.ops.segments import Segment, SegmentedAttention, trie_attention
from tests.conftest import HAS_CUDA


def _dense_reference(segments, q, k, v, scale=None):
    """The same attention through one (T, T) mask over the whole row (keys repeated per group)."""
    T = q.shape[2]
    allowed = torch.zeros(T, T, dtype=torch.bool, device=q.device)
    for s in segments:
        cols = torch.cat([torch.arange(a, b) for a, b in s.keys])
        if s.mask is None:
            block = torch.ones(s.end - s.start, s.end - s.start, dtype=torch.bool).tril()
        else:
            block = s.mask
        allowed[s.start : s.end, cols.to(q.device)] = block.to(q.device)
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed, scale=scale)
    return o.transpose(1, 2)


def _tree_segments():
    """A row of 14 tokens: a causal sequence (0..4), then a tree whose 3 shared tokens (4..7)
    are read by a group (7..14) made of 2 context tokens and two 2-token continuations."""
    cont = torch.tensor([-1, -1, 0, 0, 1, 1, 1])  # 7 own tokens of the group
    own = torch.ones(7, 7, dtype=torch.bool).tril()
    own &= (cont[None] == -1) | (cont[None] == cont[:, None])
    return [
        Segment(0, 4, ((0, 4),)),
        Segment(4, 7, ((4, 7),)),
        Segment(7, 14, ((4, 7), (7, 14)), torch.cat([torch.ones(7, 3, dtype=torch.bool), own], 1)),
    ]


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_dense_masked_attention_forward_and_backward(heads, kv_heads, dtype, device):
    torch.manual_seed(0)
    segments = _tree_segments()
    q = torch.randn(1, heads, 14, 8, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(1, kv_heads, 14, 8, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(1, kv_heads, 14, 8, dtype=dtype, device=device, requires_grad=True)
    attn = SegmentedAttention(list(reversed(segments)), 14, device)  # any order
    out = attn(q, k, v, scale=0.3)
    assert out.shape == (1, 14, heads, 8) and attn.calls == 1
    ref = _dense_reference(segments, q, k, v, scale=0.3)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_causal_rows_equal_separate_sequences():
    torch.manual_seed(1)
    lengths = [5, 1, 9]
    q, k, v = torch.randn(1, 4, 15, 8), torch.randn(1, 2, 15, 8), torch.randn(1, 2, 15, 8)
    out = SegmentedAttention.causal(lengths)(q, k, v)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        want = F.scaled_dot_product_attention(
            q[:, :, sl], k[:, :, sl].repeat_interleave(2, 1), v[:, :, sl].repeat_interleave(2, 1),
            is_causal=True,
        )  # fmt: skip
        torch.testing.assert_close(out[:, sl], want.transpose(1, 2))
        start += n


def _forest():
    """Subtree ends of a row of 27 tokens: a trie whose root chain (0..3) branches into a
    subtree that branches again (3..15) and a chain (15..18), then a lone sequence (18..22),
    then a trie with four leaves under one token (22..27)."""
    end = [15 + 3] * 3 + [15] * 2 + [10] * 2 + [8, 10] + [10] + [15] * 2 + [13] + [15, 15]
    end += [18] * 3 + [22] * 4 + [27, 24, 25, 26, 27]
    return end


@pytest.mark.parametrize("cap", [0, 3, 6, 100])
def test_trie_attention_sees_exactly_the_ancestors(cap):
    """Every position attends to itself and its ancestors (j <= i < end[j]) and nothing else,
    forward and backward, however the trie is cut into segments."""
    torch.manual_seed(2)
    end = _forest()
    T = len(end)
    attn = trie_attention(end, cap)
    q = torch.randn(1, 4, T, 8, requires_grad=True)
    k, v = torch.randn(1, 2, T, 8, requires_grad=True), torch.randn(1, 2, T, 8, requires_grad=True)
    out = attn(q, k, v)
    j = torch.arange(T)
    allowed = (j[None] <= j[:, None]) & (j[:, None] < torch.tensor(end)[None])
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=allowed
    ).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g),
                    torch.autograd.grad(ref, (q, k, v), g), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b)
    sizes = [s.end - s.start for s in attn.segments]
    if cap == 0:  # cut at every branch: chains only
        assert max(sizes) <= 4 and len(sizes) == 15
    if cap == 100:  # one segment per root, the lone sequence plain causal
        assert sizes == [18, 4, 5] and attn.segments[1].mask is None


def test_trie_attention_refuses_a_bad_layout():
    with pytest.raises(ValueError, match="position 1 has subtree end 5, which must lie in 2..3"):
        trie_attention([1, 5, 3])
    with pytest.raises(ValueError, match=r"position 1 has subtree end 4, which must lie in 2..3 "):
        trie_attention([3, 4, 4, 4])  # a child reaching past its parent's subtree
    with pytest.raises(ValueError, match="position 2 has subtree end 4, which must lie in 3..3"):
        trie_attention([3, 2, 4, 4])  # a later child reaching past it


needs_c = pytest.mark.skipif(not pyfast.HAS_C, reason="compiled extension not available")


def _random_trie(seed: int, size: int, prefix: int) -> list[int]:
    """Subtree ends of a random depth-first trie row: a root chain of `prefix` tokens whose last
    token heads `size` - `prefix` tokens of random subtrees (mostly chains, some branching),
    then a lone 45-token sequence."""
    rng = torch.Generator().manual_seed(seed)
    end: list[int] = []

    def subtree(start: int, n: int) -> None:  # positions start .. start + n - 1
        end.append(start + n)
        t, left = start + 1, n - 1
        while left:
            branch = int(torch.randint(1, 4, (), generator=rng))  # children sizes: few, uneven
            k = left if branch == 1 else int(torch.randint(1, left + 1, (), generator=rng))
            subtree(t, k)
            t, left = t + k, left - k

    end += [size] * (prefix - 1)
    subtree(prefix - 1, size - prefix + 1)
    subtree(size, 45)  # a chain longer than one work item (32 positions)
    return end


def _visible(end: list[int]) -> torch.Tensor:
    j = torch.arange(len(end))
    return (j[None] <= j[:, None]) & (j[:, None] < torch.tensor(end)[None])


@needs_c
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 40), (6, 2, 16)])
def test_trie_kernel_matches_dense_masked_attention(heads, kv_heads, dim):
    """torch.ops.pyfast.trie_attention equals SDPA under the dense j <= i < end[j] mask: a
    prefix longer than one key chunk (128), runs longer than one work item (32), branching
    subtrees, grouped heads, a head dim with a scalar tail, keys/values as the transposed views
    transformers passes, a non-default scale."""
    torch.manual_seed(3)
    end = _random_trie(heads, 330, 170)
    T = len(end)
    q = torch.randn(1, heads, T, dim)
    k = torch.randn(1, T, kv_heads, dim).transpose(1, 2)
    v = torch.randn(1, T, kv_heads, dim).transpose(1, 2)
    out = torch.ops.pyfast.trie_attention(q, k, v, torch.tensor(end), 0.3)
    g = heads // kv_heads
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=_visible(end),
        scale=0.3,
    ).transpose(1, 2)  # fmt: skip
    assert out.shape == (1, T, heads, dim) and out.is_contiguous()
    torch.testing.assert_close(out, ref)


@needs_c
def test_trie_kernel_bfloat16():
    torch.manual_seed(4)
    end = _random_trie(1, 120, 40)
    T = len(end)
    q, k, v = (torch.randn(1, h, T, 32).bfloat16() for h in (6, 2, 2))
    out = torch.ops.pyfast.trie_attention(q, k, v, torch.tensor(end), 32**-0.5)
    ref = F.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(3, 1), v.float().repeat_interleave(3, 1),
        attn_mask=_visible(end),
    ).transpose(1, 2)  # fmt: skip
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.bfloat16())


@needs_c
def test_trie_attention_runs_the_kernel_without_autograd_and_segments_with_it():
    """Same outputs either way; without autograd no segment is ever built."""
    torch.manual_seed(5)
    end = _forest()
    T = len(end)
    q = torch.randn(1, 4, T, 16, requires_grad=True)
    k, v = torch.randn(1, 2, T, 16), torch.randn(1, 2, T, 16)
    fast = trie_attention(end, 6)
    with torch.no_grad():
        a = fast(q, k, v)
    assert fast._segmented is None and fast.calls == 1
    slow = trie_attention(end, 6)
    b = slow(q, k, v)
    assert slow._segmented is not None and slow.calls == 1 and b.requires_grad
    torch.testing.assert_close(a, b.detach())


@needs_c
def test_trie_kernel_refuses_bad_input():
    q, kv, end = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.tensor([3, 3, 3])
    op = torch.ops.pyfast.trie_attention
    with pytest.raises(RuntimeError, match="position 1 has subtree end 5, which must lie in 2..3"):
        op(q, kv, kv, torch.tensor([3, 5, 3]), 1.0)
    with pytest.raises(RuntimeError, match="must be float32 or bfloat16, got Double"):
        op(q.double(), kv.double(), kv.double(), end, 1.0)
    with pytest.raises(RuntimeError, match="4 query heads are not a multiple of 3"):
        op(q, torch.randn(1, 3, 3, 8), torch.randn(1, 3, 3, 8), end, 1.0)
    with pytest.raises(RuntimeError, match="end must be a CPU int64 tensor of 3 entries"):
        op(q, kv, kv, torch.tensor([3, 3]), 1.0)
    with pytest.raises(RuntimeError, match="value must have key's shape"):
        op(q, kv, torch.randn(1, 2, 3, 4), end, 1.0)


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="starts at 5 where 4 was expected"):
        SegmentedAttention([Segment(0, 4, ((0, 4),)), Segment(5, 6, ((5, 6),))], 6)
    with pytest.raises(ValueError, match="cover positions 0..4, the row has 6"):
        SegmentedAttention([Segment(0, 4, ((0, 4),))], 6)
    with pytest.raises(ValueError, match="mask of shape"):
        SegmentedAttention([Segment(0, 2, ((0, 2),), torch.ones(2, 3, dtype=torch.bool))], 2)
    with pytest.raises(ValueError, match="without a mask must attend causally"):
        SegmentedAttention([Segment(0, 2, ((0, 1), (1, 2)))], 2)
    attn = SegmentedAttention.causal([3])
    with pytest.raises(ValueError, match="one row of that length"):
        attn(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))


def test_packing_unsupported_names_the_reason(monkeypatch):
    from tests.conftest import tiny_llama

    model = tiny_llama(64)
    assert packing_unsupported(model) is None
    assert "'sdpa'" not in (packing_unsupported(model, ("sdpa",)) or "")
    monkeypatch.setattr(model.config, "_attn_implementation", "eager")
    assert packing_unsupported(model, ("sdpa",)) == "attention implementation 'eager'"
    monkeypatch.setattr(model.config, "_attn_implementation", "sdpa")
    monkeypatch.setattr(model.config, "sliding_window", 32, raising=False)
    assert packing_unsupported(model) == "sliding-window attention (32)"


def test_decoder_hidden_at_rows_runs_the_last_mlp_there_only():
    """With `rows`, the hidden states there equal the full pass's (forward and backward) and the
    last layer's MLP saw only those rows; under gradient checkpointing it runs everywhere."""
    from pyfast.hf.packing import decoder_hidden, prepare_segments
    from tests.conftest import tiny_llama

    model = tiny_llama(64)
    assert prepare_segments(model) is None
    ids = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(3))
    pos = torch.cat([torch.arange(7), torch.arange(5)])
    rows = torch.tensor([0, 6, 9])
    full = decoder_hidden(model, ids, pos, SegmentedAttention.causal([7, 5]), "-")
    mlp, seen = model.get_decoder().layers[-1].mlp, []
    forward = mlp.forward

    def spy(x):
        seen.append(x.shape[1])
        return forward(x)

    mlp.forward = spy
    try:
        got = decoder_hidden(model, ids, pos, SegmentedAttention.causal([7, 5]), "-", rows)
        assert seen == [3] and mlp.forward is spy  # restored
        torch.testing.assert_close(got, full[rows])
        g = torch.randn_like(got)
        params = [p for p in model.parameters() if p.requires_grad]
        want = torch.autograd.grad(full[rows], params, g, allow_unused=True)
        for a, b in zip(torch.autograd.grad(got, params, g, allow_unused=True), want, strict=True):
            if b is not None:
                torch.testing.assert_close(a, b)
        model.gradient_checkpointing_enable()
        model.train()
        decoder_hidden(model, ids, pos, SegmentedAttention.causal([7, 5]), "-", rows)
        assert seen[-1] == 12
    finally:
        del mlp.forward
        model.gradient_checkpointing_disable()
        model.eval()
