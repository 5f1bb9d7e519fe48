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
"""

import copy

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama

from pyfast.ops.fused_blocks import fuse_decoder_blocks, rotary

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
