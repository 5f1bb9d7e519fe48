"""The fused rotary embedding (torch.ops.pyfast.rotary / pyfast.ops.rotary) against transformers'
apply_rotary_pos_emb, values and gradients, and the attention forward that fuse_decoder_blocks
swaps in against the installed stock forwards (source and results)."""

import copy
import inspect
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, Qwen2Config, Qwen3Config
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import pyfast
from pyfast.hf import attention as hfa
from pyfast.hf import swaps as hfs
from pyfast.ops import fused_blocks as fb
from pyfast.ops import reference

needs_c = pytest.mark.skipif(not pyfast.HAS_C, reason="compiled extension not available")

# (B, H, KV, T, D): SmolLM2's heads (9 / 3, D 64), odd T, head dims that leave SIMD tails (40 =
# one float32 vector + 4 per half, 24 = under one vector), plain multi-head, a single token.
SHAPES = [(2, 9, 3, 13, 64), (1, 6, 2, 7, 40), (3, 4, 4, 5, 24), (2, 2, 1, 1, 8)]
LAYOUTS = ["projection", "strided", "contiguous"]


def _inputs(shape, dtype, layout, cos_batch, seed=0):
    """q and k as the attention forward makes them (transposed views of a projection output),
    as row-strided slices, or contiguous; cos / sin of batch 1 or B."""
    B, H, KV, T, D = shape
    g = torch.Generator().manual_seed(seed)

    def x(n):
        if layout == "projection":
            base = torch.randn(B, T, n * D, generator=g).to(dtype)
            return base.view(B, T, n, D).transpose(1, 2)
        if layout == "strided":
            return torch.randn(B, n, T, D + 6, generator=g).to(dtype)[..., 3 : D + 3]
        return torch.randn(B, n, T, D, generator=g).to(dtype)

    q, k = x(H), x(KV)
    angle = torch.rand(cos_batch, T, D // 2, generator=g) * 6
    emb = torch.cat((angle, angle), dim=-1)  # as LlamaRotaryEmbedding builds them
    return q, k, emb.cos().to(dtype), emb.sin().to(dtype)


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_values_and_gradients_are_transformers_bits(shape, layout, dtype):
    """Same rounding order as the eager ops, so the same bits in every dtype, forward and
    backward (autograd through transformers' function vs the fused op's backward)."""
    cos_batch = shape[0] if layout == "strided" else 1
    q, k, cos, sin = _inputs(shape, dtype, layout, cos_batch)
    if shape[3] > 1:  # (one token: every layout is contiguous)
        assert (q.is_contiguous(), k.is_contiguous()) == ((layout == "contiguous"),) * 2
    q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
    q2, k2 = q.clone().requires_grad_(), k.clone().requires_grad_()
    ref = apply_rotary_pos_emb(q1, k1, cos, sin)
    out = fb.rotary(q2, k2, cos, sin)
    for a, b in zip(out, ref, strict=True):
        assert a.dtype == dtype and a.is_contiguous() and torch.equal(a, b)
    gq, gk = torch.randn(ref[0].shape).to(dtype), torch.randn(ref[1].shape).to(dtype)
    grads_ref = torch.autograd.grad(ref, (q1, k1), (gq, gk))
    grads = torch.autograd.grad(
        out, (q2, k2), (gq.transpose(1, 2).contiguous().transpose(1, 2), gk)
    )
    for a, b in zip(grads, grads_ref, strict=True):
        assert torch.equal(a, b)
    # the twins (non-CPU devices, no _C) give the same bits too
    for a, b in zip(reference.rotary(q, k, cos, sin), ref, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(reference.rotary_backward(gq, gk, cos, sin), grads_ref, strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():  # evaluation: the kernel without autograd
        assert all(torch.equal(a, b) for a, b in zip(fb.rotary(q, k, cos, sin), ref, strict=True))


@needs_c
def test_broadcasting_and_layouts_of_cos_and_sin():
    """cos / sin of batch B, expanded from batch 1 (stride 0), or with different strides."""
    q, k, cos, sin = _inputs((3, 4, 2, 6, 16), torch.float32, "projection", 3, seed=1)
    ref = apply_rotary_pos_emb(q, k, cos, sin)
    c1, s1 = cos[:1].expand(3, -1, -1), sin[:1].expand(3, -1, -1)
    for c, s in [
        (cos, sin),
        (c1, s1),
        (cos, s1),
        (cos.transpose(0, 1).contiguous().transpose(0, 1), sin),
    ]:
        expect = apply_rotary_pos_emb(q, k, c, s)
        assert all(
            torch.equal(a, b)
            for a, b in zip(torch.ops.pyfast.rotary(q, k, c, s), expect, strict=True)
        )
    assert all(
        torch.equal(a, b) for a, b in zip(torch.ops.pyfast.rotary(q, k, cos, sin), ref, strict=True)
    )
    q0 = torch.empty(2, 3, 0, 8)  # no tokens
    out = torch.ops.pyfast.rotary(
        q0, torch.empty(2, 1, 0, 8), torch.empty(1, 0, 8), torch.empty(1, 0, 8)
    )
    assert out[0].shape == (2, 3, 0, 8) and out[1].shape == (2, 1, 0, 8)


def test_mixed_dtypes_and_differentiable_cos_take_the_stock_formula():
    """bfloat16 q / k with float32 cos / sin (autocast) promote as transformers does; cos / sin
    that require grad get the stock gradients."""
    q, k, cos, sin = _inputs((2, 4, 2, 5, 16), torch.float32, "projection", 1, seed=2)
    qb, kb = q.bfloat16(), k.bfloat16()
    out, ref = fb.rotary(qb, kb, cos, sin), apply_rotary_pos_emb(qb, kb, cos, sin)
    assert out[0].dtype == torch.float32 and all(
        torch.equal(a, b) for a, b in zip(out, ref, strict=True)
    )
    c1, s1 = cos.clone().requires_grad_(), sin.clone().requires_grad_()
    c2, s2 = cos.clone().requires_grad_(), sin.clone().requires_grad_()
    sum(t.square().sum() for t in apply_rotary_pos_emb(q, k, c1, s1)).backward()
    sum(t.square().sum() for t in fb.rotary(q, k, c2, s2)).backward()
    assert torch.equal(c1.grad, c2.grad) and torch.equal(s1.grad, s2.grad)


@needs_c
def test_opcheck_and_gradcheck():
    q, k, cos, sin = _inputs((2, 3, 1, 4, 8), torch.float64, "projection", 1, seed=3)
    q, k = q.requires_grad_(), k.requires_grad_()
    torch.library.opcheck(torch.ops.pyfast.rotary.default, (q, k, cos, sin))
    torch.library.opcheck(
        torch.ops.pyfast.rotary_backward.default, (q.detach(), k.detach(), cos, sin)
    )
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.pyfast.rotary(a, b, cos, sin), (q, k))
    assert torch.autograd.gradcheck(lambda a, b: fb.rotary(a, b, cos, sin), (q, k))
    only_q = fb.rotary(q, k, cos, sin)[0].sum()  # k's output unused: its gradient is zero
    only_q.backward()
    assert torch.equal(k.grad, torch.zeros_like(k))
    with pytest.raises(ValueError, match=r"pyfast.rotary: no gradient for cos / sin"):
        torch.ops.pyfast.rotary(q, k, cos.clone().requires_grad_(), sin)


@needs_c
def test_bad_inputs_name_the_argument():
    q, k, cos, sin = (
        torch.randn(2, 4, 5, 8),
        torch.randn(2, 2, 5, 8),
        torch.randn(1, 5, 8),
        torch.randn(1, 5, 8),
    )
    cases = [
        (
            (q, k[:, :, :4], cos, sin),
            r"rotary: k must have q's batch, tokens and head_dim \(2, \*, 5, 8\)",
        ),
        ((q, k, cos[:, :4], sin), r"rotary: cos must have shape \(2 or 1, 5, 8\)"),
        ((q, k, cos, torch.randn(2, 5, 8)), r"rotary: sin must have cos's shape"),
        ((q, k.double(), cos, sin), r"rotary: k must have q's dtype Float, got Double"),
        ((q, k, cos.bfloat16(), sin), r"rotary: cos must have q's dtype Float, got BFloat16"),
        (
            (q.int(), k.int(), cos.int(), sin.int()),
            r"rotary: q must be float32, bfloat16 or float64",
        ),
        ((q[0], k, cos, sin), r"rotary: q must be 4-D \(batch, heads, tokens, head_dim\)"),
        ((q[..., :7], k[..., :7], cos[..., :7], sin[..., :7]), r"rotary: head_dim must be even"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            torch.ops.pyfast.rotary(*args)
    with pytest.raises(RuntimeError, match=r"rotary_backward: grad_k must have grad_q's"):
        torch.ops.pyfast.rotary_backward(q, k[:, :, :4], cos, sin)


# -- the swapped attention forward ---------------------------------------------------------------


def _installed_attention_classes():
    import importlib

    for name in hfs.ATTENTION_CLASSES:
        family = name.removesuffix("Attention").lower()
        try:
            mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ImportError:
            continue
        yield name, getattr(mod, name)


def test_fused_attention_forward_is_the_installed_stock_forward():
    """Each allowlisted class's forward is Llama's but for its sliding-window argument and, for
    Qwen3, q/k norms; the fused forward holds every statement of it in order, with
    apply_rotary_pos_emb replaced and nothing else added but its own bookkeeping
    (hfa.stock_attention_matches). On the transformers range pyfast pins (pyfast.hf.compat),
    every installed class must match, so an upgrade that changes a forward fails here; outside
    it the verdict decides at run time, and the swap follows it."""
    from pyfast.hf.compat import check_transformers

    assert set(hfa._SLIDING_WINDOW) == set(hfa._SLIDING_WINDOW_SOURCE)
    module = types.SimpleNamespace(config=types.SimpleNamespace(sliding_window=3), sliding_window=5)
    for name, expr in hfa._SLIDING_WINDOW_SOURCE.items():  # the lambda is the source expression
        assert hfa._SLIDING_WINDOW[name](module) == eval(expr, {}, {"self": module})
    verdicts = {
        name: hfa.stock_attention_matches(cls) for name, cls in _installed_attention_classes()
    }
    assert "LlamaAttention" in verdicts
    if check_transformers():  # the pinned range: every class is the one reproduced
        assert all(verdicts.values()), verdicts
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=6, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    hfs.fuse_decoder_blocks(model)
    swapped = "forward" in vars(model.model.layers[0].self_attn)
    assert swapped == verdicts["LlamaAttention"]


def test_attention_with_another_forward_keeps_it():
    """A class of an allowlisted name whose forward is not the one pyfast reproduces (here a
    wrapper around the stock one) is declined, with one warning, and keeps its forward; norms and
    MLPs are still fused, and the model's output is unchanged."""
    from transformers.models.llama import modeling_llama

    stock = modeling_llama.LlamaAttention.forward

    def forward(self, hidden_states, *args, **kwargs):
        return stock(self, hidden_states * 1.0, *args, **kwargs)

    other = type("LlamaAttention", (modeling_llama.LlamaAttention,), {"forward": forward})
    assert hfa.stock_attention_matches(modeling_llama.LlamaAttention)
    assert not hfa.stock_attention_matches(other)
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    for layer in model.model.layers:
        layer.self_attn.__class__ = other
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        want = model(ids).logits
    with pytest.warns(UserWarning, match="keeps its stock forward"):
        swapped = hfs.fuse_decoder_blocks(model)
    assert all("forward" not in vars(layer.self_attn) for layer in model.model.layers)
    assert swapped == 2 * 3 + 2  # per layer two norms and the MLP; the final norm, the body
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)


def _families():
    small = dict(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=6, num_key_value_heads=2)  # fmt: skip
    yield "llama", LlamaConfig(**small)
    yield "llama-mha", LlamaConfig(**{**small, "num_key_value_heads": 6})
    yield "mistral", MistralConfig(**small, sliding_window=5)
    yield (
        "qwen2",
        Qwen2Config(**small, use_sliding_window=True, sliding_window=5, max_window_layers=1),
    )
    yield "qwen3", Qwen3Config(**small, head_dim=8)


@pytest.mark.parametrize("family", [f for f, _ in _families()])
def test_fused_models_match_stock_and_use_the_fused_rotary(family, monkeypatch):
    from transformers import AutoModelForCausalLM

    cfg = dict(_families())[family]
    torch.manual_seed(7)
    stock = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    fused = copy.deepcopy(stock)
    hfs.fuse_decoder_blocks(fused)
    calls = []
    real = fb._rotary_fwd
    monkeypatch.setattr(fb, "_rotary_fwd", lambda *a: calls.append(a[0].shape) or real(*a))
    ids = torch.randint(0, 64, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    out_s = stock(ids, attention_mask=mask, labels=ids)
    assert calls == []  # the stock model in the same process stays stock
    out_f = fused(ids, attention_mask=mask, labels=ids)
    assert len(calls) == 2  # one per layer
    assert torch.allclose(out_f.logits, out_s.logits, rtol=0, atol=1e-5)
    out_s.loss.backward()
    out_f.loss.backward()
    for (n, a), (_, b) in zip(fused.named_parameters(), stock.named_parameters(), strict=True):
        assert (a.grad - b.grad).abs().max() <= 1e-4 * b.grad.abs().max() + 1e-7, n
    with torch.no_grad():  # cached decoding (cache.update after the fused rotary) = full forward
        full = fused(ids, attention_mask=mask).logits
        prefix = fused(ids[:, :-2], attention_mask=mask[:, :-2], use_cache=True)
        cache = (
            "cache" if "cache" in inspect.signature(fused.forward).parameters else "past_key_values"
        )
        step = fused(ids[:, -2:], attention_mask=mask, **{cache: prefix.past_key_values})
    assert torch.allclose(step.logits, full[:, -2:], rtol=0, atol=1e-5)


def test_fused_attention_under_gradient_checkpointing():
    """transformers' checkpointing re-runs each decoder layer's forward in backward: the fused
    rotary recomputes and gives the stock gradients."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(8)
    stock = AutoModelForCausalLM.from_config(dict(_families())["llama"], attn_implementation="sdpa")
    fused = copy.deepcopy(stock)
    hfs.fuse_decoder_blocks(fused)
    ids = torch.randint(0, 64, (2, 9))
    for m in (stock, fused):
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m(ids, labels=ids).loss.backward()
    for (n, a), (_, b) in zip(fused.named_parameters(), stock.named_parameters(), strict=True):
        assert (a.grad - b.grad).abs().max() <= 1e-4 * b.grad.abs().max() + 1e-7, n


@pytest.mark.parametrize("compiled", [True, False], ids=["op", "twin"])
def test_one_autograd_path_op_or_twin(monkeypatch, compiled):
    """With _C, pyfast.ops.rotary is the op and its registered autograd (the only one; on CUDA
    the twins are the op's kernels); without it, the reference twin under torch's autograd.
    Both give the stock bits, forward and backward."""
    if not compiled:
        monkeypatch.setattr(fb, "HAS_C", False)
    q, k, cos, sin = _inputs((2, 6, 2, 5, 40), torch.bfloat16, "projection", 1, seed=9)
    q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
    q2, k2 = q.clone().requires_grad_(), k.clone().requires_grad_()
    ref, out = apply_rotary_pos_emb(q1, k1, cos, sin), fb.rotary(q2, k2, cos, sin)
    assert ("pyfast_rotary" in type(out[0].grad_fn).__name__) == (compiled and fb.HAS_C)
    grads = [torch.randn(t.shape).bfloat16() for t in ref]
    want = torch.autograd.grad(ref, (q1, k1), grads)
    got = torch.autograd.grad(out, (q2, k2), grads)
    assert all(torch.equal(a, b) for a, b in zip((*out, *got), (*ref, *want), strict=True))
