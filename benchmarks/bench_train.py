"""pyfast's training loop vs a plain transformers + torch loop: tokens/s, peak memory, losses.

    HF_HUB_OFFLINE=1 python benchmarks/bench_train.py [--model default] [--batch 4] [--seq 256]
        [--steps 6] [--warmup 1] [--precision float32] [--loss full|completion]
        [--data packed|padded] [--trim-heap-every N] [--repeat 2] [--output results/bench_train]

Both loops do full fine-tuning of the same model (same initial weights, float32 master weights)
on the same batches (see `--data` below), at the
same batch size, sequence length and precision, with the same optimizer hyper-parameters and the
same loss: `--loss full` (the default) on every next token, as language-model training on plain
text; `--loss completion` on the answers only ("Question: ...\nAnswer:" targets -100, as
`pyfast train` does by default for prompt/completion data and as the `make demo` config trains),
given to Hugging Face as `labels` with -100 and to pyfast's fused loss as the same targets.

* plain: ``model(input_ids, labels=labels).loss`` (Hugging Face's loss over the full logits),
  ``torch.optim.AdamW(fused=True)``, ``torch.nn.utils.clip_grad_norm_``;
* pyfast: the :class:`pyfast.train.Recipe` step: padding-free rows (each row cut after its last
  target, the rows run end to end as one sequence with attention kept within rows:
  :func:`pyfast.train.recipe.padding_free_hidden`), decoder body with pyfast's fused RMSNorm and
  SwiGLU MLP (:mod:`pyfast.ops.fused_blocks`, norm outputs recomputed in backward) +
  ``linear_cross_entropy`` (no logits tensor), :class:`pyfast.optim.FusedAdamW` (state allocated
  up front) with fused clipping.

In one invocation, `--repeat` rounds of one fresh subprocess per loop, alternating (plain,
pyfast, plain, pyfast, ...), so that both see the same load on a shared CPU; each runs all
`--steps` steps. Reported: the median seconds per optimizer step over the steps after `--warmup`
of every round -> tokens/s (real tokens: padding not counted), the peak memory of the first
round (the process's peak resident memory added by training: VmHWM above the resident set after
the model is loaded, just before the optimizer is built; later rounds' in results.json), and the
largest relative difference of the per-step losses.

`--data packed` (default) fills every (batch, seq) row with ARC-Easy text end to end; `--data
padded` is chat SFT without packing: one HH-RLHF harmless dialogue + chosen answer per row (the
300 pairs in data/), right-padded to the longest row of its batch (Hugging Face gets the
attention mask; pyfast the same batch). `--trim-heap-every N` runs pyfast's loop with the
`trim_heap_every: N` memory option (:class:`pyfast.heap.HeapTrimmer`), as `pyfast train` does.
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


def _examples(tokenizer, data: str, loss: str, enough) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) examples until `enough(examples)`: ARC-Easy train question + answer for
    "packed", HH-RLHF harmless dialogue + chosen answer for "padded"; the prompt's labels are
    -100 for `loss` "completion"."""
    path = {
        "packed": ROOT / "data" / "arc_easy" / "train.jsonl",
        "padded": ROOT / "data" / "hh_rlhf_harmless_base" / "pairs_300.jsonl",
    }[data]  # noqa: E501 fmt: skip
    examples: list[tuple[list[int], list[int]]] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if data == "packed":
                answer = row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
                prompt, completion = f"Question: {row['question']}\nAnswer:", f" {answer}\n\n"
            else:
                prompt, completion = row["prompt"], row["chosen"]
            if not completion.strip():
                continue
            if loss == "full":
                ids = tokenizer(prompt + completion)["input_ids"]
                examples.append((ids, list(ids)))
            else:
                p, c = tokenizer(prompt)["input_ids"], tokenizer(completion)["input_ids"]
                examples.append((p + c, [-100] * len(p) + c))
            if enough(examples):
                return examples
    raise ValueError(f"{path} has too few rows for the requested steps")


def batches(
    tokenizer, batch: int, seq: int, steps: int, loss: str = "full", data: str = "packed"
) -> list[tuple]:
    """`steps` (ids, labels, attention_mask) batches; labels are the ids, -100 on padding and,
    for `loss` "completion", on the prompts.

    `data` "packed": ARC-Easy train text end to end in full (batch, seq) rows (mask all ones);
    "padded": one HH-RLHF harmless dialogue + chosen answer per row (chat SFT), cut at `seq`
    tokens, right-padded to the longest row of its batch (what Hugging Face's padding collators
    do)."""
    if data == "packed":
        need = batch * seq * steps
        ex = _examples(tokenizer, data, loss, lambda e: sum(len(i) for i, _ in e) >= need)
        ids = torch.tensor([t for e in ex for t in e[0]][:need]).view(steps, batch, seq)
        lab = torch.tensor([t for e in ex for t in e[1]][:need]).view(steps, batch, seq)
        return [(i, x, torch.ones_like(i)) for i, x in zip(ids, lab, strict=True)]
    ex = _examples(tokenizer, data, loss, lambda e: len(e) >= batch * steps)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for k in range(steps):
        rows = [(i[:seq], x[:seq]) for i, x in ex[k * batch : (k + 1) * batch]]
        width = max(len(i) for i, _ in rows)
        ids = torch.full((batch, width), pad, dtype=torch.long)
        lab = torch.full((batch, width), -100, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for r, (i, x) in enumerate(rows):
            ids[r, : len(i)], lab[r, : len(x)] = torch.tensor(i), torch.tensor(x)
            mask[r, : len(i)] = 1
        out.append((ids, lab, mask))
    return out


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

        def step(ids, labels, mask):
            with autocast:
                padded = not bool(mask.all())
                loss = model(input_ids=ids, attention_mask=mask if padded else None,
                             labels=labels).loss  # fmt: skip
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)

    else:
        from pyfast.hf.packing import prepare_segments
        from pyfast.ops import linear_cross_entropy
        from pyfast.optim import FusedAdamW
        from pyfast.train.recipe import padding_free_hidden

        why = prepare_segments(model)  # as pyfast.train.Recipe does for model.padding_free
        if why:
            raise SystemExit(f"bench_train: padding-free batches unsupported: {why}")

        opt = FusedAdamW(params, lr=LR, weight_decay=WD, max_grad_norm=CLIP)
        opt.allocate_state()  # as pyfast.train.Recipe does
        if args.trim_heap_every:  # as pyfast.train.Recipe does for trim_heap_every
            from pyfast.heap import HeapTrimmer

            HeapTrimmer(model, args.trim_heap_every)
        head = model.get_output_embeddings()

        def step(ids, labels, mask):
            with autocast:
                hidden, targets = padding_free_hidden(model, ids, labels, mask)
            loss = linear_cross_entropy(hidden.to(head.weight.dtype), head.weight, targets)
            loss.backward()
            opt.step()  # clipping fused into the update
            opt.zero_grad(set_to_none=True)
            return float(loss)

    return step, mem, tok


def run_provider(args) -> dict:
    """One provider alone in this process: its losses, step times and peak memory."""
    step, mem, tok = build_step(args.provider, args)
    data = batches(tok, args.batch, args.seq, args.steps, args.loss, args.data)
    losses, times = [], []
    for ids, labels, mask in data:
        t0 = time.perf_counter()
        losses.append(step(ids, labels, mask))
        times.append(time.perf_counter() - t0)
    mem.__exit__(None, None, None)
    return {
        "provider": args.provider,
        "losses": losses,
        "step_s": times,
        "peak_added_bytes": mem.peak_bytes,
        "tokens_per_step": [int(mask.sum()) for _, _, mask in data],
        # next-token targets per step
        "targets_per_step": [int((labels[:, 1:] != -100).sum()) for _, labels, _ in data],
    }


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
    p.add_argument("--data", choices=["packed", "padded"], default="packed",
                   help="full rows of text, or one example per row, padded")  # fmt: skip
    p.add_argument("--repeat", type=int, default=2,
                   help="rounds of one process per loop, alternating")  # fmt: skip
    p.add_argument("--output", default="results/bench_train")
    p.add_argument("--trim-heap-every", type=int, default=0,
                   help="pyfast's loop: trim_heap_every (0: off)")  # fmt: skip
    p.add_argument("--provider", choices=["plain", "pyfast"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.provider:  # child process: JSON on the last stdout line
        print(json.dumps(run_provider(args)))
        return 0
    runs: dict[str, list[dict]] = {"plain": [], "pyfast": []}
    for _ in range(args.repeat):
        for provider in runs:
            cmd = [sys.executable, __file__, "--provider", provider, *sys.argv[1:]]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return proc.returncode
            runs[provider].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    results = {}
    for provider, rounds in runs.items():
        r = dict(rounds[0])
        r["step_s"] = [t for x in rounds for t in x["step_s"][args.warmup :] or x["step_s"]]
        r["rounds"] = [{"step_s": x["step_s"], "peak_added_bytes": x["peak_added_bytes"]}
                       for x in rounds]  # fmt: skip
        r["median_step_s"] = statistics.median(r["step_s"])
        r["tokens_per_s"] = statistics.mean(r["tokens_per_step"]) / r["median_step_s"]
        results[provider] = r
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
        f"{rel:.2e} (relative); {args.data} rows, loss on {args.loss} "
        f"({fast['targets_per_step'][0]} targets in the first step's "
        f"{fast['tokens_per_step'][0]} tokens); load average "
        f"{os.getloadavg()[0]:.1f}\n"
        f"written to {out / 'results.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
