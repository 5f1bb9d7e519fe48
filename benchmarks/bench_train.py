"""pyfast's training loop vs a plain transformers + torch loop: tokens/s, peak memory, losses.

    HF_HUB_OFFLINE=1 python benchmarks/bench_train.py [--model default] [--batch 4] [--seq 256]
        [--steps 6] [--warmup 1] [--precision float32] [--loss full|completion]
        [--output results/bench_train]

Both loops do full fine-tuning of the same model (same initial weights, float32 master weights)
on the same batches (ARC-Easy train questions from data/, packed into `--seq`-token rows), at the
same batch size, sequence length and precision, with the same optimizer hyper-parameters and the
same loss: `--loss full` (the default) on every next token, as language-model training on plain
text; `--loss completion` on the answers only ("Question: ...\nAnswer:" targets -100, as
`pyfast train` does by default for prompt/completion data and as the `make demo` config trains),
given to Hugging Face as `labels` with -100 and to pyfast's fused loss as the same targets.

* plain: ``model(input_ids, labels=labels).loss`` (Hugging Face's loss over the full logits),
  ``torch.optim.AdamW(fused=True)``, ``torch.nn.utils.clip_grad_norm_``;
* pyfast: the :class:`pyfast.train.Recipe` step: decoder body with pyfast's fused RMSNorm and
  SwiGLU MLP (:mod:`pyfast.ops.fused_blocks`, norm outputs recomputed in backward) +
  ``linear_cross_entropy`` (no logits tensor), :class:`pyfast.optim.FusedAdamW` (state allocated
  up front) with fused clipping.

In one invocation: each provider runs alone in a fresh subprocess for its losses and peak memory
(the process's peak resident memory added by training: VmHWM above the resident set after the
model is loaded, just before the optimizer is built), then a third subprocess holds both and
alternates their steps on the same batches for the times, so that both see the same load on a
shared CPU. Reported: median seconds per optimizer step after `--warmup` steps -> tokens/s, the
peak memory, and the largest relative difference of the per-step losses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LR, WD, CLIP = 1e-5, 0.0, 1.0


def batches(tokenizer, batch: int, seq: int, steps: int, loss: str = "full") -> list[tuple]:
    """`steps` (ids, labels) pairs of (batch, seq) tensors: packed ARC-Easy train text (question
    + answer); labels are the ids, with -100 on the questions for `loss` "completion"."""
    ids: list[int] = []
    labels: list[int] = []
    need = batch * seq * steps
    with open(ROOT / "data" / "arc_easy" / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            answer = row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
            if loss == "full":
                new = tokenizer(f"Question: {row['question']}\nAnswer: {answer}\n\n")["input_ids"]
                ids += new
                labels += new
            else:
                prompt = tokenizer(f"Question: {row['question']}\nAnswer:")["input_ids"]
                completion = tokenizer(f" {answer}\n\n")["input_ids"]
                ids += prompt + completion
                labels += [-100] * len(prompt) + completion
            if len(ids) >= need:
                break
    flat = torch.tensor(ids[:need]).view(steps, batch, seq)
    flat_labels = torch.tensor(labels[:need]).view(steps, batch, seq)
    return list(zip(flat, flat_labels, strict=True))


def build_step(provider: str, args):
    """(step function -> loss, memory-window context): `provider`'s model, optimizer and step.
    The memory window opens just before the optimizer is built."""
    from pyfast.bench.common import PeakMemory
    from pyfast.models import load_model

    torch.manual_seed(0)
    # the plain loop runs the stock transformers modules; pyfast its fused RMSNorm / SwiGLU MLP
    model, tok, _ = load_model(args.model, fuse_blocks=provider == "pyfast")
    model.train()
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if args.precision == "bf16"
        else torch.autocast("cpu", enabled=False)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    # Memory is counted from here: optimizer state (allocated up front by pyfast, inside the
    # first step by torch), gradients, activations and temporaries of every step.
    mem = PeakMemory(torch.device("cpu")).__enter__()
    if provider == "plain":
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, fused=True)

        def step(ids, labels):
            with autocast:
                loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)

    else:
        from pyfast.ops import linear_cross_entropy
        from pyfast.optim import FusedAdamW
        from pyfast.train.recipe import causal_lm_hidden, shifted_labels

        opt = FusedAdamW(params, lr=LR, weight_decay=WD, max_grad_norm=CLIP)
        opt.allocate_state()  # as pyfast.train.Recipe does
        head = model.get_output_embeddings()

        def step(ids, labels):
            with autocast:
                hidden = causal_lm_hidden(model, ids)
            loss = linear_cross_entropy(
                hidden.to(head.weight.dtype), head.weight, shifted_labels(labels)
            )
            loss.backward()
            opt.step()  # clipping fused into the update
            opt.zero_grad(set_to_none=True)
            return float(loss)

    return step, mem, tok


def run_provider(args) -> dict:
    """One provider alone in this process: its losses and peak memory (and its own times)."""
    step, mem, tok = build_step(args.provider, args)
    data = batches(tok, args.batch, args.seq, args.steps, args.loss)
    losses, times = [], []
    for ids, labels in data:
        t0 = time.perf_counter()
        losses.append(step(ids, labels))
        times.append(time.perf_counter() - t0)
    mem.__exit__(None, None, None)
    return {
        "provider": args.provider,
        "losses": losses,
        "separate_step_s": times,
        "peak_added_bytes": mem.peak_bytes,
        # next-token targets per step (of batch * (seq - 1))
        "targets_per_step": [int((labels[:, 1:] != -100).sum()) for _, labels in data],
    }


def run_interleaved(args) -> dict:
    """Both providers in one process, alternating steps on the same batches, so that both see
    the same machine load: per-step times of each."""
    steps = {name: build_step(name, args) for name in ("plain", "pyfast")}
    data = batches(steps["plain"][2], args.batch, args.seq, args.steps, args.loss)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for ids, labels in data:
        for name, (step, _, _) in steps.items():
            t0 = time.perf_counter()
            step(ids, labels)
            times[name].append(time.perf_counter() - t0)
    return {"provider": "interleaved", "step_s": times}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", choices=["float32", "bf16"], default="float32")
    p.add_argument("--loss", choices=["full", "completion"], default="full",
                   help="targets: every next token, or answers only")  # fmt: skip
    p.add_argument("--output", default="results/bench_train")
    p.add_argument("--provider", choices=["plain", "pyfast", "interleaved"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.provider:  # child process: JSON on the last stdout line
        worker = run_interleaved if args.provider == "interleaved" else run_provider
        print(json.dumps(worker(args)))
        return 0
    results = {}
    for provider in ("plain", "pyfast", "interleaved"):
        cmd = [sys.executable, __file__, "--provider", provider, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        results[provider] = json.loads(proc.stdout.strip().splitlines()[-1])
    for provider in ("plain", "pyfast"):
        r = results[provider]
        r["step_s"] = results["interleaved"]["step_s"][provider]
        r["median_step_s"] = statistics.median(r["step_s"][args.warmup :] or r["step_s"])
        r["tokens_per_s"] = args.batch * args.seq / r["median_step_s"]
        print(
            f"{provider:>6}: {r['tokens_per_s']:.0f} tokens/s, median step "
            f"{r['median_step_s']:.2f} s, peak +{r['peak_added_bytes'] / 2**20:.0f} MiB, "
            f"losses {[round(x, 4) for x in r['losses']]}"
        )
    plain, fast = results["plain"], results["pyfast"]
    rel = max(abs(a - b) / abs(a) for a, b in zip(plain["losses"], fast["losses"], strict=True))
    summary = {
        "config": {k: v for k, v in vars(args).items() if k != "provider"},
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "load_avg_at_end": os.getloadavg(),
        },
        "speedup_tokens_per_s": fast["tokens_per_s"] / plain["tokens_per_s"],
        "peak_memory_ratio": fast["peak_added_bytes"] / max(plain["peak_added_bytes"], 1),
        "max_rel_loss_diff": rel,
        "results": results,
    }
    out = Path(args.output)
    from pyfast.io import write_json

    write_json(out / "results.json", summary)
    print(
        f"\npyfast / plain: {summary['speedup_tokens_per_s']:.2f}x tokens/s, "
        f"{summary['peak_memory_ratio']:.2f}x peak memory; losses agree within "
        f"{rel:.2e} (relative); loss on {args.loss} ({fast['targets_per_step'][0]} targets in "
        f"the first step's {args.batch * args.seq} tokens); load average "
        f"{os.getloadavg()[0]:.1f}\n"
        f"written to {out / 'results.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
