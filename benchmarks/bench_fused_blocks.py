"""pyfast's fused RMSNorm and SwiGLU MLP against the stock transformers modules they replace.

    pytest benchmarks/bench_fused_blocks.py --benchmark-enable --benchmark-columns=median,iqr

One SmolLM2-135M layer's shapes (hidden 576, intermediate 1536) at 4 x 256 tokens, float32, CPU:
forward only (evaluation) and forward + backward (training), stock module vs the same module after
``fuse_decoder_blocks``, side by side in one process on the same tensors (compare medians within a
group). extra_info records the bytes autograd keeps for backward (saved tensors, counted once
each), the memory side of the fusion.
"""

import copy

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama

from pyfast.ops.fused_blocks import fuse_decoder_blocks

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
