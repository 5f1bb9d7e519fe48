"""The log-prob benchmark: token_logprobs / linear_cross_entropy against stock PyTorch.

Cases (each timed side by side in one process, on the same inputs):
  logits-fp32, logits-bf16   token_logprobs over logits (16, 256, 49152) against
                             log_softmax + gather + argmax and cross_entropy(reduction="none")
  hidden-fwd, hidden-fwd+bwd linear_cross_entropy from hidden states (4096, 576) and an lm_head
                             (49152, 576) against matmul + cross_entropy, with and without backward
  hidden-fwd+bwd-frozen      the same with a frozen head (weight.requires_grad False, as the
                             shipped training configs have it): only grad_hidden is wanted
"""

from __future__ import annotations

import gc

import torch
import torch.nn.functional as F

from pyfast.bench.common import PeakMemory, Result, add_back_to_back, time_fn
from pyfast.ops import linear_cross_entropy, token_logprobs

B, T, V = 16, 256, 49152
N, D = 4096, 576
CASES = ("logits-fp32", "logits-bf16", "hidden-fwd", "hidden-fwd+bwd", "hidden-fwd+bwd-frozen")


def _logits_case(dtype: torch.dtype, device: torch.device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(B, T, V, generator=gen).to(device=device, dtype=dtype)
    labels = torch.randint(0, V, (B, T), generator=gen).to(device)

    def lsm_gather_argmax():
        lsm = torch.log_softmax(logits.float(), dim=-1)
        return lsm.gather(-1, labels[..., None])[..., 0], lsm.argmax(-1) == labels

    def cross_entropy():
        return -F.cross_entropy(logits.view(-1, V).float(), labels.view(-1), reduction="none")

    providers = {
        "torch-logsoftmax-gather-argmax": lsm_gather_argmax,
        "torch-cross-entropy": cross_entropy,
        "pyfast": lambda: token_logprobs(logits, labels),
    }
    moved = logits.numel() * logits.element_size()  # one read of the logits
    return providers, ["torch-logsoftmax-gather-argmax", "torch-cross-entropy"], moved, 0, 0, None


def _hidden_case(backward: bool, device: torch.device, frozen_head: bool = False):
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(N, D, generator=gen).to(device).requires_grad_(backward)
    weight = (torch.randn(V, D, generator=gen) / D**0.5).to(device)
    weight.requires_grad_(backward and not frozen_head)
    labels = torch.randint(0, V, (N,), generator=gen).to(device)

    def make(loss_fn):
        def run():
            if not backward:
                with torch.no_grad():
                    return loss_fn()
            hidden.grad = weight.grad = None
            loss_fn().backward()

        return run

    providers = {
        "torch-matmul-cross-entropy": make(lambda: F.cross_entropy(hidden @ weight.t(), labels)),
        "pyfast": make(lambda: linear_cross_entropy(hidden, weight, labels)),
    }
    # The matmuls a loss (and its grads) need: logits, grad_hidden, grad_weight when not frozen.
    flops = 2 * N * D * V * ((2 if frozen_head else 3) if backward else 1)
    outputs = (N * D + (0 if frozen_head else V * D)) * 4 if backward else 0  # the gradients

    def drop_grads():  # so that the memory window starts without the previous round's grads
        hidden.grad = weight.grad = None

    return providers, ["torch-matmul-cross-entropy"], 0, flops, outputs, drop_grads


def case_setup(case: str, device: torch.device):
    """(providers, baselines, bytes that must move, flops that must run, output bytes, reset)."""
    if case == "logits-fp32":
        return _logits_case(torch.float32, device)
    if case == "logits-bf16":
        return _logits_case(torch.bfloat16, device)
    if case in ("hidden-fwd", "hidden-fwd+bwd", "hidden-fwd+bwd-frozen"):
        return _hidden_case("bwd" in case, device, frozen_head=case.endswith("frozen"))
    raise ValueError(f"unknown log-prob benchmark case {case!r}; known: {CASES}")


def run(device: str | torch.device = "cpu", rounds: int = 5, cases=CASES, log=print):
    device = torch.device(device)
    results: list[Result] = []
    for case in cases:
        providers, baselines, moved, flops, outputs, reset = case_setup(case, device)
        case_results = []
        for name, fn in providers.items():
            fn()  # warm-up outside the memory window (allocator, BLAS init)
            if reset is not None:
                reset()
            with PeakMemory(device) as mem:
                fn()
            t = time_fn(fn, device, rounds=rounds if "logits" in case else max(2, rounds // 2))
            extra_mb = (mem.peak_bytes - outputs) / 2**20
            r = Result(
                case, name, t.median_s * 1e3, t.iqr_s * 1e3, moved,
                moved / t.median_s / 1e9, mem.peak_bytes / 2**20,
            )  # fmt: skip
            r.extra["extra_mb_beyond_outputs"] = extra_mb
            if flops:
                r.extra["tflops"] = flops / t.median_s / 1e12
            if case.startswith("hidden"):
                r.extra["extra_vs_NxV_fp32_logits"] = extra_mb * 2**20 / (N * V * 4)
            add_back_to_back(r, fn, device, flops)
            case_results.append(r)
            log(f"  {case:16s} {name:32s} {r.median_ms:9.1f} ms  (IQR {r.iqr_ms:.1f})")
        for r in case_results:
            for b in case_results:
                if b.provider in baselines and r.provider not in baselines:
                    r.ratios[b.provider] = b.median_ms / r.median_ms
        results.extend(case_results)
        del providers
        gc.collect()
    return results
