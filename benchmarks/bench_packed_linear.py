"""nn.Linear on oneDNN-packed weights (pyfast.ops.packed_linear.PackedLinears) against torch's
F.linear, without autograd, CPU float32.

    pytest benchmarks/bench_packed_linear.py --benchmark-enable --benchmark-columns=median,iqr

SmolLM2-135M's linear layers (hidden 576, intermediate 1536, 3 key/value heads of 64, vocabulary
49152) at the row counts evaluation and generation give them: 2048 (a packed scoring pass), 16
and 1 (decoding steps of a batch and of one row); and one whole fused decoder MLP
(gate/up/down with the fused SwiGLU) at 2048 rows. Stock and packed run side by side in one
process on the same module and input (compare medians within a group); extra_info records the
GFLOP/s and the largest difference from the stock output relative to its largest value.
"""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama

from pyfast.hf.swaps import fuse_decoder_blocks
from pyfast.ops.packed_linear import PackedLinears, packing_unavailable

pytestmark = pytest.mark.skipif(
    packing_unavailable() is not None, reason=str(packing_unavailable())
)

SHAPES = {  # name: (in, out)
    "q/o 576->576": (576, 576),
    "k/v 576->192": (576, 192),
    "gate/up 576->1536": (576, 1536),
    "down 1536->576": (1536, 576),
    "lm_head 576->49152": (576, 49152),
}
ROWS = {"2048": 2048, "16": 16, "1": 1}


def _run(benchmark, m: nn.Module, x: torch.Tensor, provider: str, flops: int, rounds: int):
    packs = PackedLinears(m)
    with torch.no_grad():
        ref = m(x)
        with packs:  # entered once, as an evaluation does: the calls are what is timed
            got = m(x)
            if provider == "pyfast":
                benchmark.pedantic(m, (x,), rounds=rounds, warmup_rounds=2)
        if provider == "torch":
            benchmark.pedantic(m, (x,), rounds=rounds, warmup_rounds=2)
    benchmark.extra_info.update(
        provider=provider,
        gflops=flops / benchmark.stats.stats.median / 1e9,
        max_rel_diff=((got - ref).abs().max() / ref.abs().max()).item(),
    )


@pytest.mark.parametrize("provider", ["torch", "pyfast"])
@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_linear(benchmark, shape, rows, provider):
    k, n = SHAPES[shape]
    m_rows = ROWS[rows]
    if shape.startswith("lm_head") and m_rows > 16:
        pytest.skip("scoring reaches the lm_head through linear_token_logprobs, not nn.Linear")
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=False)
    x = torch.randn(m_rows, k)
    benchmark.group = f"linear {shape}, {rows} rows"
    rounds = 30 if m_rows * k * n < 1e8 else 10
    _run(benchmark, lin, x, provider, 2 * m_rows * k * n, rounds)


@pytest.mark.parametrize("provider", ["torch", "pyfast"])
def test_fused_mlp(benchmark, provider):
    torch.manual_seed(0)
    mlp = modeling_llama.LlamaMLP(LlamaConfig(hidden_size=576, intermediate_size=1536))
    fuse_decoder_blocks(mlp)
    x = torch.randn(2048, 576)
    benchmark.group = "fused SwiGLU MLP 576->1536->576, 2048 rows"
    _run(benchmark, mlp, x, provider, 2 * 2048 * 576 * 1536 * 3, 10)
