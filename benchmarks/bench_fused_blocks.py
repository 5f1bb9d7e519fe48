"""pyfast's fused RMSNorm, SwiGLU MLP and rotary embedding against the stock transformers code
they replace.

    pytest benchmarks/bench_fused_blocks.py --benchmark-enable --benchmark-columns=median,iqr

One SmolLM2-135M layer's shapes (hidden 576, intermediate 1536) at 4 x 256 tokens, float32, CPU:
forward only (evaluation) and forward + backward (training), stock module vs the same module after
``fuse_decoder_blocks``, side by side in one process on the same tensors (compare medians within a
group). extra_info records the bytes autograd keeps for backward (saved tensors, counted once
each), the memory side of the fusion.

The rotary embedding: ``pyfast.ops.rotary`` vs transformers' ``apply_rotary_pos_emb`` on SmolLM2's
attention shapes (9 query heads, 3 key/value heads, head_dim 64), q and k as the attention forward
makes them (transposed views of the projection outputs), for one packed row of 966 tokens and for
4 x 256 tokens.

The Gemma / Phi-3 ops (``-k gemma``): Gemma-2-2B's shapes (hidden 2304, intermediate 9216) at
2048 tokens, float32, CPU — transformers' Gemma2RMSNorm vs ``rms_norm_offset`` on its weight,
Gemma2MLP (gelu_pytorch_tanh) vs ``gated_mlp(activation="gelu_tanh")`` on its weights, Phi3MLP
(fused gate_up_proj, silu) at the same shapes vs ``gated_mlp(w_gate_up=...)``:

    pytest benchmarks/bench_fused_blocks.py -k gemma --benchmark-enable \
        --benchmark-columns=median,iqr
"""

import copy

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama

from pyfast.hf.swaps import fuse_decoder_blocks
from pyfast.ops.fused_blocks import gated_mlp, rms_norm_offset, rotary

TOKENS, HIDDEN, INTER = 4 * 256, 576, 1536


def module(kind: str, provider: str):
    torch.manual_seed(0)
    if kind == "rmsnorm":
        m = modeling_llama.LlamaRMSNorm(HIDDEN, 1e-5)
    else:
        m = modeling_llama.LlamaMLP(LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER))
    if provider == "pyfast":
        m = copy.deepcopy(m)
        fuse_decoder_blocks(m)
    return m


def saved_bytes(m, x) -> int:
    """Bytes of the activation tensors autograd saves for backward (weights excluded)."""
    seen: dict[int, int] = {}
    params = {p.data_ptr() for p in m.parameters()}

    def pack(t):
        if t.data_ptr() not in params:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x.clone().requires_grad_()).sum().backward()
    return sum(seen.values())


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("provider", ["stock", "pyfast"])
@pytest.mark.parametrize("kind", ["rmsnorm", "mlp"])
def test_block(benchmark, kind, provider, mode):
    m = module(kind, provider)
    x = torch.randn(4, 256, HIDDEN)
    benchmark.group = f"{kind} {mode} [{TOKENS} x {HIDDEN}]"
    if mode == "forward":

        def fn():
            with torch.no_grad():
                m(x)

    else:
        xg = x.clone().requires_grad_()
        grad = torch.ones(4, 256, HIDDEN)

        def fn():
            m(xg).backward(grad)

    benchmark.pedantic(fn, rounds=15 if kind == "rmsnorm" else 7, warmup_rounds=2)
    benchmark.extra_info.update(provider=provider, saved_mb=saved_bytes(m, x) / 2**20)


HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("provider", ["stock", "pyfast"])
@pytest.mark.parametrize("rows", [(1, 966), (4, 256)], ids=["1x966", "4x256"])
def test_rotary(benchmark, rows, provider, mode):
    batch, tokens = rows
    torch.manual_seed(0)
    fn_rotary = rotary if provider == "pyfast" else modeling_llama.apply_rotary_pos_emb
    q_proj = torch.randn(batch, tokens, HEADS * HEAD_DIM, requires_grad=mode != "forward")
    k_proj = torch.randn(batch, tokens, KV_HEADS * HEAD_DIM, requires_grad=mode != "forward")
    angle = torch.arange(tokens, dtype=torch.float32)[:, None] * torch.rand(HEAD_DIM // 2)
    emb = torch.cat((angle, angle), -1)[None]  # (1, T, D), as LlamaRotaryEmbedding gives it
    cos, sin = emb.cos(), emb.sin()

    def qk():
        shape = (batch, tokens, -1, HEAD_DIM)
        return q_proj.view(shape).transpose(1, 2), k_proj.view(shape).transpose(1, 2)

    benchmark.group = f"rotary {mode} [{batch} x {tokens}, {HEADS}/{KV_HEADS} heads x {HEAD_DIM}]"
    if mode == "forward":

        def fn():
            with torch.no_grad():
                fn_rotary(*qk(), cos, sin)

    else:
        grads = (torch.ones(batch, HEADS, tokens, HEAD_DIM),
                 torch.ones(batch, KV_HEADS, tokens, HEAD_DIM))  # fmt: skip

        def fn():
            q_proj.grad = k_proj.grad = (
                None  # no accumulation: the gradients flow on, as in a model
            )
            torch.autograd.backward(fn_rotary(*qk(), cos, sin), grads)

    benchmark.pedantic(fn, rounds=20, warmup_rounds=3)
    benchmark.extra_info.update(provider=provider)


G_TOKENS, G_HIDDEN, G_INTER = 2048, 2304, 9216  # Gemma-2-2B


def gemma_module(kind: str):
    from transformers import Gemma2Config, Phi3Config
    from transformers.models.gemma2 import modeling_gemma2
    from transformers.models.phi3 import modeling_phi3

    torch.manual_seed(0)
    if kind == "rmsnorm":
        m = modeling_gemma2.Gemma2RMSNorm(G_HIDDEN, 1e-6)
        torch.nn.init.normal_(m.weight, std=0.3)
        return m
    if kind == "mlp":
        cfg = Gemma2Config(hidden_size=G_HIDDEN, intermediate_size=G_INTER,
                           hidden_activation="gelu_pytorch_tanh")  # fmt: skip
        return modeling_gemma2.Gemma2MLP(cfg)
    return modeling_phi3.Phi3MLP(Phi3Config(hidden_size=G_HIDDEN, intermediate_size=G_INTER))


def pyfast_call(kind: str, m):
    """The op on the stock module's own weights."""
    if kind == "rmsnorm":
        return lambda x: rms_norm_offset(x, m.weight, m.eps, 1.0)
    if kind == "mlp":
        return lambda x: gated_mlp(x, m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight,
                                   activation="gelu_tanh")  # fmt: skip
    return lambda x: gated_mlp(x, None, None, m.down_proj.weight, w_gate_up=m.gate_up_proj.weight)


def saved_bytes_fn(fn, x, params) -> int:
    seen: dict[int, int] = {}
    ptrs = {p.data_ptr() for p in params}

    def pack(t):
        if t.data_ptr() not in ptrs:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x.clone().requires_grad_()).sum().backward()
    return sum(seen.values())


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("provider", ["stock", "pyfast"])
@pytest.mark.parametrize("kind", ["rmsnorm", "mlp", "phi3mlp"])
def test_gemma_block(benchmark, kind, provider, mode):
    m = gemma_module(kind)
    fn = m if provider == "stock" else pyfast_call(kind, m)
    x = torch.randn(1, G_TOKENS, G_HIDDEN)
    name = {"rmsnorm": "Gemma2RMSNorm", "mlp": "Gemma2MLP", "phi3mlp": "Phi3MLP"}[kind]
    benchmark.group = f"gemma {name} {mode} [{G_TOKENS} x {G_HIDDEN} / {G_INTER}]"
    if mode == "forward":

        def run():
            with torch.no_grad():
                fn(x)

    else:
        xg = x.clone().requires_grad_()
        grad = torch.ones(1, G_TOKENS, G_HIDDEN)

        def run():
            for p in m.parameters():
                p.grad = None
            fn(xg).backward(grad)

    small = kind == "rmsnorm"
    benchmark.pedantic(run, rounds=15 if small else 3, warmup_rounds=2 if small else 1)
    info = {"provider": provider}
    if mode != "forward":
        info["saved_mb"] = saved_bytes_fn(fn, x, list(m.parameters())) / 2**20
    benchmark.extra_info.update(info)
