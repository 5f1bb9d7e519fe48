"""The optimizer benchmark: pyfast's fused AdamW against torch.optim.AdamW and DeepSpeed.

Cases (each timed side by side in one process, on the same parameter set):
  step            one optimizer step: torch for-loop / foreach / fused=True, DeepSpeedCPUAdam
                  (adamw_mode, when installed), pyfast FusedAdamW
  clip+step       clip_grad_norm_(max_norm=1) then the step, against FusedAdamW(max_grad_norm=1)
  frozen90        FusedAdamW with 90% of the rows of every matrix frozen (per-row masks), against
                  the unmasked FusedAdamW step
  bf16-state      FusedAdamW(state_dtype=bfloat16) against the float32-state step
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from pyfast.bench.common import PeakMemory, Result, add_back_to_back, time_fn
from pyfast.optim import FusedAdamW

Tensor = torch.Tensor


def smollm2_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of SmolLM2-135M (tied embeddings): 134,515,008 parameters."""
    d, kv, ff, vocab, layers = 576, 192, 1536, 49152, 30
    block = [(d,), (d, d), (kv, d), (kv, d), (d, d), (d,), (ff, d), (ff, d), (d, ff)]
    return [(vocab, d)] + block * layers + [(d,)]


def small_shapes() -> list[tuple[int, ...]]:
    """A 4-layer, 256-wide toy model with a 4096-token vocabulary: 2.2M parameters."""
    d, ff, vocab = 256, 688, 4096
    block = [(d,), (d, d), (d, d), (d, d), (d, d), (d,), (ff, d), (ff, d), (d, ff)]
    return [(vocab, d)] + block * 4 + [(d,)]


SIZES = {"smollm2-135m": smollm2_shapes, "small": small_shapes}


def make_params(shapes, device: torch.device, dtype=torch.float32, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.randn(s, generator=gen, dtype=dtype).to(device).requires_grad_()
        p.grad = torch.randn(s, generator=gen, dtype=dtype).to(device) * 1e-2
        params.append(p)
    return params


def numel(params) -> int:
    return sum(p.numel() for p in params)


def row_masks(params, trainable_fraction: float, seed: int = 0) -> dict[Tensor, Tensor]:
    """Per-row masks freezing all but `trainable_fraction` of the rows of every matrix."""
    gen = torch.Generator().manual_seed(seed)
    return {
        p: (torch.rand(p.shape[0], generator=gen) < trainable_fraction).to(p.device)
        for p in params
        if p.dim() == 2
    }


def deepspeed_cpu_adam():
    """DeepSpeedCPUAdam if deepspeed is installed and its CPU op builds, else None."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception:  # noqa: BLE001 - any import/build failure means "not available"
        return None
    return DeepSpeedCPUAdam


def optimizer_steps(device: torch.device) -> dict[str, Callable[[list[Tensor]], Callable]]:
    """provider name -> (params -> step function) for the plain `step` case."""
    lr, wd = 1e-4, 0.01

    def torch_adamw(**kw):
        return lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=wd, **kw).step

    out = {
        "torch-forloop": torch_adamw(foreach=False),
        "torch-foreach": torch_adamw(foreach=True),
        "torch-fused": torch_adamw(fused=True),
    }
    ds = deepspeed_cpu_adam() if device.type == "cpu" else None
    if ds is not None:
        out["deepspeed-cpuadam"] = lambda ps: ds(ps, lr=lr, weight_decay=wd, adamw_mode=True).step
    out["pyfast"] = lambda ps: FusedAdamW(ps, lr=lr, weight_decay=wd).step
    return out


def clip_then(step: Callable, params) -> Callable:
    def run():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        step()

    return run


def case_providers(case: str, device: torch.device):
    """provider -> (params -> callable) for `case`, and the provider(s) the speed-up is against."""
    lr, wd = 1e-4, 0.01
    steps = optimizer_steps(device)
    if case == "step":
        baselines = [p for p in ("torch-fused", "deepspeed-cpuadam") if p in steps]
        return steps, baselines
    if case == "clip+step":
        out = {
            name: (lambda ps, f=f: clip_then(f(ps), ps))
            for name, f in steps.items()
            if name != "pyfast"
        }
        out["pyfast"] = lambda ps: FusedAdamW(ps, lr=lr, weight_decay=wd, max_grad_norm=1.0).step
        return out, [p for p in ("torch-fused", "deepspeed-cpuadam") if p in out]
    if case == "frozen90":
        out = {
            "pyfast-unmasked": steps["pyfast"],
            "pyfast-masked": lambda ps: (
                FusedAdamW(ps, lr=lr, weight_decay=wd, masks=row_masks(ps, 0.1)).step
            ),
        }
        return out, ["pyfast-unmasked"]
    if case == "bf16-state":
        out = {
            "pyfast-fp32-state": steps["pyfast"],
            "pyfast-bf16-state": lambda ps: (
                FusedAdamW(ps, lr=lr, weight_decay=wd, state_dtype=torch.bfloat16).step
            ),
        }
        return out, ["pyfast-fp32-state"]
    raise ValueError(f"unknown optimizer benchmark case {case!r}; known: {CASES}")


CASES = ("step", "clip+step", "frozen90", "bf16-state")


def bytes_moved(case: str, provider: str, n: int, trainable: float = 0.1) -> int:
    """The bytes the update must move per step (reads + writes), fp32 params and grads."""
    per = 28  # read p, g, m, v; write p, m, v
    if provider.endswith("bf16-state"):
        per = 20
    if case == "clip+step":
        per += 4 if provider == "pyfast" else 12  # norm read (+ the scaling's read and write)
    if provider == "pyfast-masked":
        return int(n * per * trainable)
    return n * per


def run(
    size: str = "smollm2-135m",
    device: str | torch.device = "cpu",
    rounds: int = 7,
    cases=CASES,
    log=print,
) -> list[Result]:
    """Times every provider of every case on one parameter set; returns the results."""
    device = torch.device(device)
    params = make_params(SIZES[size](), device)
    n = numel(params)
    results: list[Result] = []
    for case in cases:
        providers, baselines = case_providers(case, device)
        case_results = []
        for name, factory in providers.items():
            for p in params:  # every provider starts from the same state
                p.grad.normal_(0, 1e-2)
            fn = factory(params)
            with PeakMemory(device) as mem:
                t = time_fn(fn, device, rounds=rounds, warmup=1)
            moved = bytes_moved(case, name, n)
            r = Result(
                f"{case} [{size}]",
                name,
                t.median_s * 1e3,
                t.iqr_s * 1e3,
                moved,
                moved / t.median_s / 1e9,
                mem.peak_bytes / 2**20,
            )
            add_back_to_back(r, fn, device)
            case_results.append(r)
            log(f"  {r.case:28s} {name:20s} {r.median_ms:9.1f} ms  (IQR {r.iqr_ms:.1f})")
            del fn
            gc.collect()
        for r in case_results:
            for b in case_results:
                if b.provider in baselines and r.provider not in baselines:
                    r.ratios[b.provider] = b.median_ms / r.median_ms
        results.extend(case_results)
    return results
