"""rms_norm, swiglu and the SwiGLU MLP against their reference twins and against the stock
transformers modules they replace, forward and backward; opcheck, gradcheck, model swapping."""

import copy
import inspect
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama

import pyfast
from pyfast.hf import swaps as hfs
from pyfast.ops import fused_blocks as fb
from pyfast.ops import reference

needs_c = pytest.mark.skipif(not pyfast.HAS_C, reason="compiled extension not available")
TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


# Awkward shapes: one row, odd widths (SIMD tails), 3-D batches, a width below one SIMD vector.
SHAPES = [(1, 576), (97, 33), (3, 7, 576), (5, 3), (2, 3, 100)]


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference(shape, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
    w = torch.randn(shape[-1], dtype=torch.float64).to(dtype)
    y, rstd = torch.ops.pyfast.rms_norm(x, w, 1e-5)
    y_ref, rstd_ref = reference.rms_norm(x, w, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape and rstd.shape == x.shape[:-1]
    assert _rel(rstd, rstd_ref) < TOL[torch.float32 if dtype == torch.bfloat16 else dtype]
    assert _rel(y, y_ref) <= TOL[dtype]
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    dx, dw = torch.ops.pyfast.rms_norm_backward(dy, x, w, rstd)
    dx_ref, dw_ref = reference.rms_norm_backward(dy, x, w, rstd_ref)
    assert _rel(dx, dx_ref) <= TOL[dtype] * 4 and _rel(dw, dw_ref) <= TOL[dtype] * 4


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_matches_reference(shape, dtype):
    torch.manual_seed(1)
    g, u, d = (torch.randn(shape, dtype=torch.float64).mul(4).to(dtype) for _ in range(3))
    assert _rel(torch.ops.pyfast.swiglu(g, u), reference.swiglu(g, u)) <= TOL[dtype]
    dg, du = torch.ops.pyfast.swiglu_backward(d, g, u)
    dg_ref, du_ref = reference.swiglu_backward(d, g, u)
    assert _rel(dg, dg_ref) <= TOL[dtype] * 4 and _rel(du, du_ref) <= TOL[dtype] * 4
    # in place over gate: the same values (bit for bit), in gate's own storage
    want, into = torch.ops.pyfast.swiglu(g, u), g.clone()
    ptr = into.data_ptr()
    torch.ops.pyfast.swiglu_(into, u)
    assert into.data_ptr() == ptr and torch.equal(into, want)
    assert torch.equal(reference.swiglu_(g.clone(), u), reference.swiglu(g, u))


@needs_c
def test_non_contiguous_inputs_and_zero_rows():
    x = torch.randn(6, 40)[:, ::2]  # strided rows
    w = torch.randn(40)[::2]
    assert torch.allclose(fb.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6)[0], atol=1e-6)
    g, u = torch.randn(20, 6).t(), torch.randn(6, 20)
    assert torch.allclose(fb.swiglu(g, u), reference.swiglu(g, u), atol=1e-6)
    y, rstd = torch.ops.pyfast.rms_norm(torch.empty(0, 8), torch.ones(8), 1e-6)  # no rows
    assert y.shape == (0, 8) and rstd.shape == (0,)
    dx, dw = torch.ops.pyfast.rms_norm_backward(torch.empty(0, 8), torch.empty(0, 8),
                                                torch.ones(8), rstd)  # fmt: skip
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros(8))


@needs_c
def test_opcheck_and_gradcheck():
    x = torch.randn(5, 17, dtype=torch.float64, requires_grad=True)
    w = torch.randn(17, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.pyfast.rms_norm.default, (x, w, 1e-6))
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.pyfast.rms_norm(a, b, 1e-6)[0], (x, w))
    assert torch.autograd.gradcheck(lambda a, b: fb.rms_norm(a, b, 1e-6), (x, w))
    g = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    u = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.pyfast.swiglu.default, (g, u))
    assert torch.autograd.gradcheck(torch.ops.pyfast.swiglu, (g, u))
    assert torch.autograd.gradcheck(fb.swiglu, (g, u))
    for op, args in [
        (torch.ops.pyfast.rms_norm_backward.default, (x.detach(), x.detach(), w.detach(),
                                                      torch.rand(5, dtype=torch.float64))),
        (torch.ops.pyfast.swiglu_backward.default, (g.detach(), g.detach(), u.detach())),
        (torch.ops.pyfast.swiglu_.default, (g.detach().clone(), u.detach())),
        (torch.ops.pyfast.trie_attention.default, (torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8),
                                                   torch.randn(1, 2, 6, 8),
                                                   torch.tensor([6, 3, 3, 6, 6, 6]), 0.5)),
    ]:  # fmt: skip
        torch.library.opcheck(op, args)


def test_swiglu_mlp_gradcheck_with_biases():
    """The MLP function (kernel on CPU, or the twins without _C) in float64, every input."""
    torch.manual_seed(2)
    t = [torch.randn(s, dtype=torch.float64, requires_grad=True)
         for s in [(2, 3, 6), (8, 6), (8, 6), (6, 8), (8,), (8,), (6,)]]  # fmt: skip
    assert torch.autograd.gradcheck(fb.swiglu_mlp, tuple(t))


@needs_c
def test_bad_inputs_name_the_argument():
    with pytest.raises(RuntimeError, match=r"rms_norm: weight must have shape \[8\]"):
        torch.ops.pyfast.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6)
    with pytest.raises(RuntimeError, match=r"rms_norm: weight must have x's dtype"):
        torch.ops.pyfast.rms_norm(torch.randn(2, 8), torch.randn(8, dtype=torch.float64), 1e-6)
    with pytest.raises(RuntimeError, match=r"rms_norm: x must be float32, bfloat16 or float64"):
        torch.ops.pyfast.rms_norm(torch.ones(2, 8, dtype=torch.int32), torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match=r"rms_norm_backward: rstd must be"):
        torch.ops.pyfast.rms_norm_backward(torch.ones(2, 8), torch.ones(2, 8), torch.ones(8),
                                           torch.ones(3))  # fmt: skip
    with pytest.raises(RuntimeError, match=r"swiglu: up must have gate's shape"):
        torch.ops.pyfast.swiglu(torch.randn(2, 8), torch.randn(2, 9))
    with pytest.raises(RuntimeError, match=r"swiglu_: gate must be contiguous"):
        torch.ops.pyfast.swiglu_(torch.randn(8, 2).t(), torch.randn(2, 8))
    with pytest.raises(RuntimeError, match=r"swiglu_backward: grad must have gate's shape"):
        torch.ops.pyfast.swiglu_backward(torch.randn(3), torch.randn(2), torch.randn(2))


# -- the swapped modules against the stock transformers modules ---------------------------------


def _pair(module, dtype):
    torch.manual_seed(3)
    module = module.to(dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * (0.05 if p.dim() > 1 else 1.0))
    fused = copy.deepcopy(module)
    assert hfs.fuse_decoder_blocks(fused) == 1
    return module, fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["norm", "mlp"])
def test_swapped_modules_match_transformers(kind, dtype):
    cfg = LlamaConfig(hidden_size=64, intermediate_size=176)
    if kind == "norm":
        stock = modeling_llama.LlamaRMSNorm(64, 1e-5)
    else:
        stock = modeling_llama.LlamaMLP(cfg)
    stock, fused = _pair(stock, dtype)
    x = torch.randn(3, 11, 64).mul(2).to(dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = stock(x1), fused(x2)
    assert y2.dtype == y1.dtype and _rel(y2, y1) <= TOL[dtype]
    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy)
    tol = 4e-6 if dtype == torch.float32 else 2e-2
    assert _rel(x2.grad, x1.grad) <= tol
    for (name, a), (_, b) in zip(fused.named_parameters(), stock.named_parameters(), strict=True):
        assert a.grad.dtype == b.grad.dtype and _rel(a.grad, b.grad) <= tol, name


def test_mlp_under_bf16_autocast_and_frozen_weights():
    cfg = LlamaConfig(hidden_size=64, intermediate_size=176)
    stock, fused = _pair(modeling_llama.LlamaMLP(cfg), torch.float32)
    for m in (stock, fused):
        m.up_proj.weight.requires_grad_(False)
    x = torch.randn(2, 9, 64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, y2 = stock(x1), fused(x2)
    assert y1.dtype == y2.dtype == torch.bfloat16 and torch.equal(y1, y2)
    y1.float().square().sum().backward()
    y2.float().square().sum().backward()
    assert fused.up_proj.weight.grad is None
    assert x2.grad.dtype == torch.float32 and _rel(x2.grad, x1.grad) < 2e-2
    assert fused.gate_proj.weight.grad.dtype == torch.float32
    assert _rel(fused.down_proj.weight.grad, stock.down_proj.weight.grad) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_mlp_reuses_one_scratch_buffer(dtype):
    """Without autograd, gate(x) and up(x) go into this thread's scratch buffer: the same bits as
    the fused MLP's plain inference path (and the stock MLP's values), the buffer grown to the
    largest call and then reused (no new allocation for smaller calls), its contents never visible
    in an output; calls above the cap, with biases or under autocast take the plain path."""

    def plain(x):
        saved = fb._inference_workspace
        fb._inference_workspace = lambda *args: None
        try:
            return fused(x)
        finally:
            fb._inference_workspace = saved

    cfg = LlamaConfig(hidden_size=64, intermediate_size=176)
    stock, fused = _pair(modeling_llama.LlamaMLP(cfg), dtype)
    fb._WORKSPACE.__dict__.clear()
    with torch.no_grad():
        big = torch.randn(3, 41, 64, dtype=dtype)
        y_big = fused(big)
        buf = fb._WORKSPACE.buf
        assert buf.numel() >= 2 * 3 * 41 * 176 and buf.dtype == dtype
        for shape in [(1, 64), (2, 7, 64), (5, 64)]:
            x = torch.randn(shape, dtype=dtype)
            y = fused(x)
            assert fb._WORKSPACE.buf is buf  # reused, not reallocated
            assert torch.equal(y, plain(x)), shape
            assert _rel(y, stock(x)) <= (4e-6 if dtype == torch.float32 else 1e-2), shape
        assert torch.equal(y_big, plain(big))  # an earlier output is not the scratch memory
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(fused(big.float()), stock(big.float()))
    fb._WORKSPACE.__dict__.clear()
    with torch.inference_mode():  # a buffer made in inference mode serves no_grad calls too
        y_inf = fused(big)
    with torch.no_grad():
        assert torch.equal(fused(big), y_inf)
    assert fb._inference_workspace(big, fused.gate_proj.weight, fused.up_proj.weight,
                                   torch.zeros(176, dtype=dtype), None) is None  # fmt: skip
    cap = fb._WORKSPACE_MAX_ELEMS
    try:
        fb._WORKSPACE_MAX_ELEMS = 2 * 40 * 176 - 1
        assert fb._inference_workspace(torch.randn(40, 64, dtype=dtype), fused.gate_proj.weight,
                                       fused.up_proj.weight, None, None) is None  # fmt: skip
    finally:
        fb._WORKSPACE_MAX_ELEMS = cap


def test_mlp_saves_fewer_activations():
    """What autograd keeps for backward: x, gate(x), up(x) (+ weights), not silu and product."""
    cfg = LlamaConfig(hidden_size=32, intermediate_size=96)
    stock, fused = _pair(modeling_llama.LlamaMLP(cfg), torch.float32)

    def saved_bytes(m):
        seen = {}

        def pack(t):
            if t.dim() > 1 and t.shape[-1] in (32, 96) and t.shape[0] == 40:
                seen[t.data_ptr()] = t.numel() * t.element_size()
            return t

        x = torch.randn(40, 32, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(x).sum().backward()
        return sum(seen.values())

    assert saved_bytes(fused) == 40 * (32 + 96 + 96) * 4
    assert saved_bytes(stock) > saved_bytes(fused) + 40 * 96 * 4


def test_swap_is_per_instance_deepcopy_safe_and_skips_lora():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = modeling_llama.LlamaForCausalLM(cfg)
    # 2 norms + 1 MLP + 1 grouped-query attention per layer, the final norm, the decoder body
    assert hfs.fuse_decoder_blocks(model) == 2 * 4 + 1 + 1
    assert hfs.fuse_decoder_blocks(model) == 10  # idempotent
    assert modeling_llama.LlamaMLP.forward is not hfs._fused_mlp_forward  # class untouched
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.layers[0].mlp.down_proj.weight.zero_()
    ids = torch.randint(0, 64, (1, 5))
    # the copy's swapped forward uses the copy's weights
    assert not torch.allclose(twin(ids).logits, model(ids).logits)
    # a wrapped projection (as LoRA does) falls back to the stock forward
    mlp = model.model.layers[1].mlp
    stock_out = modeling_llama.LlamaMLP.forward(mlp, x := torch.randn(2, 32))
    mlp.up_proj = nn.Sequential(mlp.up_proj)
    assert torch.allclose(mlp(x), stock_out, atol=1e-6)


@pytest.mark.parametrize("autocast", [False, True])
def test_recompute_mlp_gives_the_same_bits_and_keeps_only_the_input(autocast):
    cfg = LlamaConfig(hidden_size=32, intermediate_size=96)
    keep, _ = _pair(modeling_llama.LlamaMLP(cfg), torch.float32)
    lean = copy.deepcopy(keep)
    hfs.fuse_decoder_blocks(keep)
    hfs.fuse_decoder_blocks(lean, recompute_mlp=True)
    x = torch.randn(40, 32)
    saved, grads = [], []
    for m in (keep, lean):
        seen = {}

        def pack(t, seen=seen):
            if t.dim() > 1 and t.shape[0] == 40:  # activations, not weights
                seen[t.data_ptr()] = t.numel() * t.element_size()
            return t

        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = m(xi)
        y.float().square().sum().backward()
        saved.append(sum(seen.values()))
        grads.append([xi.grad, *(p.grad for p in m.parameters())])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
    assert saved == [40 * 32 * 4 + 2 * 40 * 96 * (2 if autocast else 4), 40 * 32 * 4]
    hfs.fuse_decoder_blocks(lean)  # a second call sets the mode anew
    assert lean._pyfast_recompute is False


def _saved_attention_keys(loss) -> list:
    """The key tensors SDPA nodes keep for backward, found by walking the graph from `loss`."""
    keys, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "ScaledDotProduct" in node.name():
            keys.append(node._saved_key)
        stack += [n for n, _ in node.next_functions]
    return keys


def _stock_and_fused(seed: int, **cfg):
    """A random tiny LlamaForCausalLM (2 layers) and a fused deep copy of it."""
    torch.manual_seed(seed)
    stock = modeling_llama.LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **cfg))
    fused = copy.deepcopy(stock)
    hfs.fuse_decoder_blocks(fused)
    return stock, fused


def test_grouped_query_attention_keeps_key_value_heads_and_matches_stock():
    """With a padding mask transformers' SDPA path copies keys and values per query head
    (repeat_kv) and autograd keeps the copies; the fused model's attention keeps the 2 key/value
    heads, gives the stock logits and gradients, and the stock model in the same process keeps
    its own path."""
    stock, fused = _stock_and_fused(6, vocab_size=64, hidden_size=48, intermediate_size=64,
                                    num_attention_heads=6, num_key_value_heads=2)  # fmt: skip
    ids = torch.randint(0, 64, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, :4] = 0  # left padding: a mask reaches attention
    losses = []
    for model in (stock, fused):
        out = model(ids, attention_mask=mask, labels=ids)
        losses.append(out)
        heads = {k.shape[1] for k in _saved_attention_keys(out.loss)}
        assert heads == ({6} if model is stock else {2})
    assert _rel(losses[1].logits, losses[0].logits) < 1e-6
    for out in losses:
        out.loss.backward()
    for (n, a), (_, b) in zip(fused.named_parameters(), stock.named_parameters(), strict=True):
        assert _rel(a.grad, b.grad) < 1e-5, n
    cache = "cache" if "cache" in inspect.signature(fused.forward).parameters else "past_key_values"
    with torch.no_grad():  # the cached decoding step (one query): the stock path
        full = fused(ids, attention_mask=mask).logits
        prefix = fused(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        one = fused(ids[:, -1:], attention_mask=mask, **{cache: prefix.past_key_values}).logits
    assert _rel(one[:, -1], full[:, -1]) < 1e-5


def test_allowlisted_classes_are_llamas_line_for_line():
    """The swap is only sound for modules whose forward is Llama's: check the installed source."""
    import importlib

    def installed(names, suffix):
        """(name, class) of each listed class whose model family transformers has."""
        for name in names:
            family = name.removesuffix(suffix).lower()
            try:
                mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
            except ImportError:
                continue
            yield name, getattr(mod, name)

    def body(cls):
        return inspect.getsource(cls.forward).replace(cls.__name__, "X")

    for names, suffix in [(hfs.RMSNORM_CLASSES, "RMSNorm"), (hfs.MLP_CLASSES, "MLP")]:
        ref = body(getattr(modeling_llama, "Llama" + suffix))
        for name, cls in installed(names, suffix):
            assert body(cls) == ref, name
    # attention: each hands (module, q, k, v, mask, dropout=, scaling=) to the configured
    # attention function, as Llama's does (Qwen3 adds q/k norms before, which the SDPA call
    # does not see)
    for name, cls in installed(hfs.ATTENTION_CLASSES, "Attention"):
        src = inspect.getsource(cls.forward)
        assert "get_interface(\n            self.config._attn_implementation" in src, name
        assert "attention_interface(\n            self,\n            query_states,\n" in src, name


def test_whole_model_logits_and_loss_match():
    stock, fused = _stock_and_fused(4, vocab_size=96, hidden_size=48, intermediate_size=128,
                                    num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    ids = torch.randint(0, 96, (2, 13))
    l1 = stock(ids, labels=ids).loss
    l2 = fused(ids, labels=ids).loss
    assert abs(l1.item() - l2.item()) < 1e-5
    l1.backward()
    l2.backward()
    for (n, a), (_, b) in zip(fused.named_parameters(), stock.named_parameters(), strict=True):
        assert _rel(a.grad, b.grad) < 1e-4, n
    emb_f = fused.model.embed_tokens.weight.grad.flatten()
    emb_s = stock.model.embed_tokens.weight.grad.flatten()
    assert F.cosine_similarity(emb_f, emb_s, 0) > 0.99999


def test_norm_outputs_are_recomputed_not_kept():
    """Between forward and backward the norm outputs are freed (the body's saved-tensor hooks
    keep their recipe); gradients are bit-identical to keeping them."""
    cfg = LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(5)
    lean = modeling_llama.LlamaForCausalLM(cfg)
    hfs.fuse_decoder_blocks(lean)
    keep = copy.deepcopy(lean)
    del keep.model.forward  # the body's stock forward: norm outputs saved as they are
    ids = torch.randint(0, 80, (2, 9))
    grads = []
    for model, expect_alive in ((lean, False), (keep, True)):
        outs: list = []

        def keep_ref(m, i, o, outs=outs):
            outs.append(weakref.ref(o))

        hook = model.model.layers[0].post_attention_layernorm.register_forward_hook(keep_ref)
        loss = model(ids, labels=ids).loss
        hook.remove()
        assert (outs[0]() is not None) == expect_alive
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_body_keeps_its_signature():
    """Callers inspect the body's forward (pyfast.eval picks `cache` vs `past_key_values`)."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = modeling_llama.LlamaForCausalLM(cfg)
    before = inspect.signature(model.model.forward)
    hfs.fuse_decoder_blocks(model)
    assert inspect.signature(model.model.forward) == before
