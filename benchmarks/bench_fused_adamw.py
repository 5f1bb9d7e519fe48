"""pyfast's fused AdamW against torch.optim.AdamW (for-loop, foreach, fused=True) and
DeepSpeedCPUAdam, on a SmolLM2-135M-shaped parameter set and a small one.

    make bench        # or: pytest benchmarks/bench_fused_adamw.py --benchmark-enable

Every provider of a group runs in the same process on the same parameter set; compare medians
within a group (`pyfast bench optim` prints the same comparison with ratios). extra_info records
the bytes the update must move, the achieved GB/s and the peak extra memory.
"""

import pytest
import torch

from pyfast.bench import optim
from pyfast.bench.common import PeakMemory

DEVICE = torch.device("cpu")
_PARAMS: dict[str, list] = {}


def param_set(size):
    if size not in _PARAMS:
        _PARAMS.clear()  # one large set in memory at a time
        _PARAMS[size] = optim.make_params(optim.SIZES[size](), DEVICE)
    return _PARAMS[size]


def cases():
    for case in optim.CASES:
        providers, _ = optim.case_providers(case, DEVICE)
        for provider in providers:
            for size in ("small", "smollm2-135m"):
                yield pytest.param(case, provider, size, id=f"{case}-{size}-{provider}")


@pytest.mark.parametrize("case, provider, size", list(cases()))
def test_optimizer(benchmark, case, provider, size):
    params = param_set(size)
    providers, baselines = optim.case_providers(case, DEVICE)
    benchmark.group = f"{case} [{size}]"
    fn = providers[provider](params)
    with PeakMemory(DEVICE) as mem:
        fn()  # creates the optimizer state
    rounds = 3 if provider == "torch-forloop" and size != "small" else 7
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
    n = optim.numel(params)
    moved = optim.bytes_moved(case, provider, n)
    benchmark.extra_info.update(
        provider=provider,
        baseline=provider in baselines,
        params=n,
        bytes_moved=moved,
        gbps=moved / benchmark.stats.stats.median / 1e9,
        peak_extra_mb=mem.peak_bytes / 2**20,
    )
