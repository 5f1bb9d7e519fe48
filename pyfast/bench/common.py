"""Timing, peak memory, device ceilings and reporting shared by the kernel benchmarks."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pyfast.io import write_figure


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _release_freed_memory() -> None:
    """Returns freed heap memory to the OS (glibc), so that RSS baselines are not inflated."""
    from pyfast.heap import trim

    gc.collect()
    trim()


class PeakMemory:
    """Peak memory added while the block runs, in bytes.

    CUDA: torch's allocator peak above what was allocated at entry. CPU (Linux): the process's
    peak resident set (VmHWM, reset through /proc/self/clear_refs) above the resident set at entry,
    which counts every allocation torch makes, temporaries included.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _release_freed_memory()
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self._base = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _rss_kib("VmHWM") * 1024
        self.peak_bytes = max(0, peak - self._base)
        return False


@dataclass
class Timing:
    median_s: float
    iqr_s: float
    min_s: float
    rounds: int
    times_s: list[float] = field(repr=False)


def time_fn(
    fn: Callable[[], object], device: torch.device, rounds: int = 7, warmup: int = 1
) -> Timing:
    """Median and interquartile range of `rounds` calls of `fn` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return Timing(statistics.median(times), q[2] - q[0], min(times), rounds, times)


def time_back_to_back(
    fn: Callable[[], object], device: torch.device, calls: int = 10, rounds: int = 3
) -> float:
    """Seconds per call of `calls` calls issued back to back between two device
    synchronisations, the best of `rounds`. On a GPU one call's kernels then overlap the host
    work of the next, so where the host keeps ahead this is the device time of a call, while
    :func:`time_fn` times each call to a synchronisation (its launch and host time included)."""
    best = float("inf")
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def add_back_to_back(r: Result, fn: Callable[[], object], device: torch.device, flops: int = 0):
    """On a GPU, records :func:`time_back_to_back` in ``r.extra`` (ms, and GB/s or TFLOP/s for
    the work `r` counts); elsewhere a call's host time is its device time and nothing is added."""
    if device.type != "cuda":
        return
    s = time_back_to_back(fn, device)
    r.extra["back_to_back_ms"] = s * 1e3
    if r.bytes_moved:
        r.extra["back_to_back_gbps"] = r.bytes_moved / s / 1e9
    if flops:
        r.extra["back_to_back_tflops"] = flops / s / 1e12


def copy_bandwidth(device: torch.device, nbytes: int = 512 << 20, rounds: int = 5) -> float:
    """The device's measured memory bandwidth in GB/s (bytes read + bytes written per second).

    The better of a plain copy (``dst.copy_(src)``) and an in-place update (``x.add_(1)``, which,
    like an optimizer step, writes back the lines it read and so pays no write-allocate reads).
    """
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy = time_fn(lambda: dst.copy_(src), device, rounds=rounds)
    inplace = time_fn(lambda: dst.add_(1.0), device, rounds=rounds)
    return 2 * nbytes / min(copy.min_s, inplace.min_s) / 1e9  # a ceiling: the best round


def matmul_tflops(device: torch.device, n: int = 3072, dtype=torch.float32) -> float:
    """The device's measured dense matmul throughput in TFLOP/s (n x n x n)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device, rounds=5)
    return 2 * n**3 / t.min_s / 1e12  # a ceiling: the best round


@dataclass
class Result:
    """One (case, provider) measurement."""

    case: str
    provider: str
    median_ms: float
    iqr_ms: float
    bytes_moved: int  # bytes the work must move at the least (0: not memory-bound)
    gbps: float
    peak_mem_mb: float
    ratios: dict[str, float] = field(default_factory=dict)  # speed-up against each baseline
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def speedup(self) -> float | None:
        """The speed-up against the fastest baseline of the case."""
        return min(self.ratios.values()) if self.ratios else None


def _throughput(r: Result, ceilings: dict) -> str:
    if r.bytes_moved:
        pct = f" ({100 * r.gbps / ceilings['copy_gbps']:.0f}%)" if ceilings.get("copy_gbps") else ""
        return f"{r.gbps:.1f} GB/s{pct}"
    if "tflops" in r.extra:
        peak = ceilings.get("matmul_tflops_fp32")
        pct = f" ({100 * r.extra['tflops'] / peak:.0f}%)" if peak else ""
        return f"{r.extra['tflops']:.2f} TFLOP/s{pct}"
    return "—"


def _back_to_back(r: Result, ceilings: dict) -> str:
    ms = r.extra.get("back_to_back_ms")
    if ms is None:
        return "—"
    if "back_to_back_gbps" in r.extra and ceilings.get("copy_gbps"):
        gbps = r.extra["back_to_back_gbps"]
        return f"{ms:.2f} ({gbps:.0f} GB/s, {100 * gbps / ceilings['copy_gbps']:.0f}%)"
    if "back_to_back_tflops" in r.extra and ceilings.get("matmul_tflops_fp32"):
        tf = r.extra["back_to_back_tflops"]
        return f"{ms:.2f} ({tf:.1f} TFLOP/s, {100 * tf / ceilings['matmul_tflops_fp32']:.0f}%)"
    return f"{ms:.2f}"


def markdown_table(results: list[Result], ceilings: dict) -> str:
    """One row per (case, provider): time, speed-ups, throughput against the device's ceiling;
    on a GPU also the back-to-back time per call (:func:`time_back_to_back`) and its
    throughput."""
    b2b = any("back_to_back_ms" in r.extra for r in results)
    head = "| case | provider | median ms | IQR ms | speed-up | throughput (% of ceiling) "
    head += "| back-to-back ms (throughput) " if b2b else ""
    lines = [head + "| peak extra MB |", "|---" * (8 if b2b else 7) + "|"]
    for r in results:
        ratio = ", ".join(f"{v:.2f}x vs {k}" for k, v in r.ratios.items()) or "—"
        extra = f"| {_back_to_back(r, ceilings)} " if b2b else ""
        lines.append(
            f"| {r.case} | {r.provider} | {r.median_ms:.1f} | {r.iqr_ms:.1f} | {ratio} "
            f"| {_throughput(r, ceilings)} {extra}| {r.peak_mem_mb:.0f} |"
        )
    return "\n".join(lines)


def plot_speedups(results: list[Result], path: Path, title: str) -> Path | None:
    """A horizontal bar chart of the speed-ups against stock PyTorch (PNG, written atomically)."""
    rows = [r for r in results if r.speedup is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.case}: {r.provider}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    bars = ax.barh(labels, [r.speedup for r in rows], color="#3b7dd8")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.bar_label(bars, fmt="%.2fx", padding=3)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over the fastest baseline of each case (higher is better)")
    ax.set_title(title)
    fig.tight_layout()
    return write_figure(path, fig, dpi=110)
