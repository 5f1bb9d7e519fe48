"""token_logprobs / linear_token_logprobs against stock PyTorch: time and peak memory.

    python -m pytest benchmarks/bench_token_logprobs.py --benchmark-enable -q

provider = torch | pyfast. From logits (16, 256, 49152), fp32 and bf16: pyfast.token_logprobs
against log_softmax + gather + argmax and against cross_entropy(reduction="none"). From hidden
states (N = 4096, D = 576, V = 49152): pyfast.linear_cross_entropy against matmul +
cross_entropy, forward and forward+backward. Peak memory (CPU: VmHWM after resetting it through
/proc/self/clear_refs; CUDA: max_memory_allocated) goes into benchmark.extra_info, with the part
beyond inputs and outputs ("extra") as a fraction of the (N, V) fp32 logits.

On a small, shared CPU the timings swing by +-30% from run to run, and the chunked ops (many
matmul calls with OpenMP row passes in between) are the more sensitive to other processes:
compare with OMP_WAIT_POLICY=PASSIVE as well, and prefer the min over rounds.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import pyfast
from pyfast.bench.common import PeakMemory
from pyfast.ops import linear_cross_entropy, token_logprobs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
B, T, V = 16, 256, 49152
N, D = 4096, 576
ROUNDS = int(os.environ.get("PYFAST_BENCH_ROUNDS", "3"))


def peak_memory_mb(fn, device: str) -> float:
    """Peak memory above the starting point while fn() runs, in MB."""
    with PeakMemory(torch.device(device)) as mem:
        fn()
    return mem.peak_bytes / 1e6


def run(benchmark, fn, device, extra: dict, setup=None):
    """Times fn (setup, e.g. dropping old gradients, runs untimed before each call) and records
    its peak memory. Old gradients are dropped before the memory is measured, so that freeing
    them inside fn cannot hide the new allocations."""
    setup = setup or (lambda: None)

    def call():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    setup()
    fn()  # warm-up (first-touch of allocator pages, oneDNN/MKL init)
    setup()
    peak = peak_memory_mb(fn, device)
    benchmark.extra_info.update(extra)
    benchmark.extra_info["peak_mb"] = round(peak, 1)
    benchmark.pedantic(call, setup=setup, rounds=ROUNDS, iterations=1)
    return peak


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("baseline", ["log_softmax_gather_argmax", "cross_entropy"])
@pytest.mark.parametrize("provider", ["torch", "pyfast"])
def test_from_logits(benchmark, provider, baseline, dtype, device):
    if provider == "pyfast" and not pyfast.HAS_C:
        pytest.skip("pyfast._C not built")
    benchmark.group = f"from-logits {dtype} {device} vs {baseline}"
    torch.manual_seed(0)
    logits = torch.randn(B, T, V, device=device).to(getattr(torch, dtype))
    labels = torch.randint(0, V, (B, T), device=device)

    if provider == "pyfast":

        def fn():
            return token_logprobs(logits, labels)
    elif baseline == "cross_entropy":

        def fn():
            return -F.cross_entropy(logits.view(-1, V).float(), labels.view(-1), reduction="none")
    else:

        def fn():
            lsm = torch.log_softmax(logits.float(), dim=-1)
            return lsm.gather(-1, labels[..., None])[..., 0], lsm.argmax(-1) == labels

    with torch.no_grad():
        run(benchmark, fn, device, {"provider": provider, "shape": [B, T, V]})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32"])
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("provider", ["torch", "pyfast"])
def test_from_hidden(benchmark, provider, mode, dtype, device):
    if provider == "pyfast" and not pyfast.HAS_C:
        pytest.skip("pyfast._C not built")
    benchmark.group = f"from-hidden {mode} {dtype} {device}"
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    hidden = torch.randn(N, D, device=device).to(dt).requires_grad_(mode == "forward_backward")
    weight = (torch.randn(V, D, device=device) / D**0.5).to(dt)
    weight.requires_grad_(mode == "forward_backward")
    labels = torch.randint(0, V, (N,), device=device)

    def loss():
        if provider == "pyfast":
            return linear_cross_entropy(hidden, weight, labels)
        return F.cross_entropy((hidden @ weight.t()).float(), labels)

    def drop_grads():
        hidden.grad = weight.grad = None

    if mode == "forward":

        def fn():
            with torch.no_grad():
                return loss()

        outputs = 0
    else:

        def fn():
            loss().backward()

        outputs = (N * D + V * D) * hidden.element_size()  # the two gradients
    extra = {"provider": provider, "N": N, "D": D, "V": V}
    peak = run(benchmark, fn, device, extra, setup=drop_grads)
    extra = peak - outputs / 1e6
    benchmark.extra_info["extra_mb"] = round(extra, 1)
    benchmark.extra_info["extra_vs_logits"] = round(extra / (N * V * 4 / 1e6), 4)
