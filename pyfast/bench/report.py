"""`pyfast bench`: run kernel suites side by side with stock PyTorch; print and save the report."""

from __future__ import annotations

import datetime as _dt
import platform
from pathlib import Path

import torch

import pyfast
from pyfast.bench import common
from pyfast.io import write_json, write_text


def _suite_optim(device, args, log):
    from pyfast.bench import optim

    sizes = ["small", "smollm2-135m"] if args.size == "all" else [args.size]
    out = []
    for size in sizes:
        log(f"optim: {size} parameter set on {device}")
        out += optim.run(size=size, device=device, rounds=args.rounds, log=log)
    return out


def _suite_logprobs(device, args, log):
    from pyfast.bench import logprobs

    log(f"logprobs: token_logprobs / linear_cross_entropy on {device}")
    return logprobs.run(device=device, rounds=args.rounds, log=log)


SUITES = {"optim": _suite_optim, "logprobs": _suite_logprobs}


def run_bench(args, log=print) -> dict:
    """Runs the chosen suites; writes results.json, results.md and speedups.png to args.output."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("pyfast bench: --device cuda was asked for but no CUDA device is visible")
    names = list(SUITES) if args.suite == "all" else [args.suite]
    torch.manual_seed(0)
    ceilings = {
        "copy_gbps": common.copy_bandwidth(device),
        "matmul_tflops_fp32": common.matmul_tflops(device),
    }
    log(
        f"device ceilings: copy {ceilings['copy_gbps']:.1f} GB/s, "
        f"fp32 matmul {ceilings['matmul_tflops_fp32']:.2f} TFLOP/s"
    )
    results = []
    for name in names:
        results += SUITES[name](device, args, log)
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "pyfast": pyfast.__version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)",
        "extension": pyfast.extension_info(),
        "ceilings": ceilings,
    }
    table = common.markdown_table(results, ceilings)
    log("")
    log(table)
    out = Path(args.output)
    write_json(out / "results.json", {"meta": meta, "results": [r.as_dict() for r in results]})
    header = (
        f"# pyfast bench ({', '.join(names)}) on {meta['device']}\n\n{meta['date']}, "
        f"torch {meta['torch']}, copy bandwidth {ceilings['copy_gbps']:.1f} GB/s\n\n"
    )
    write_text(out / "results.md", header + table + "\n")
    common.plot_speedups(results, out / "speedups.png", f"pyfast bench on {meta['device']}")
    log(f"\nwrote {out / 'results.json'}, {out / 'results.md'}, {out / 'speedups.png'}")
    return {"meta": meta, "results": results}
