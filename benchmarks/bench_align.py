"""One DPO step, pyfast vs TRL's DPOTrainer: time, peak memory and loss on the same batch.

    pip install trl          # the `dev` extra; benchmark only
    HF_HUB_OFFLINE=1 python benchmarks/bench_align.py [--model default] [--pairs 4]
        [--max-length 256] [--rounds 3] [--output results/bench_align]

Both sides get the same model (the embedded SmolLM2-135M unless --model), float32, no gradient
checkpointing, DPO sigmoid with beta 0.1, AdamW (lr 1e-6, weight decay 0), and the *same batch*:
TRL tokenises and collates the first --pairs pairs of data/hh_rlhf_harmless_base/pairs_300.jsonl
and pyfast trains on exactly those token ids. The reference model is the model as loaded; the
policy is that model with seeded noise added to its weights (so the loss is not the trivial
log 2 of policy == reference).

- TRL (`DPOTrainer`, default `precompute_ref_log_probs=False`): the reference model is held in
  memory and runs a no-grad forward every step; one step is `trainer.training_step` (its own
  forward/backward) plus `trainer.optimizer.step()`.
- pyfast: as its alignment recipe, one model is loaded; its log-probs of the batch are computed
  once (the reference, as pyfast.align.reference caches them), then it becomes the policy (the
  noise is added in place). One step is the pair log-probs (each prompt runs once and its
  key/value cache serves both answers; the fused head scores answer tokens only; RMSNorm and MLP
  through pyfast.ops.fused_blocks), :func:`pyfast.align.losses.dpo_loss`, backward and
  FusedAdamW.step() (no clipping: TRL's training_step + optimizer.step does not clip either).
  TRL runs the stock transformers modules.

Further rows (ROWS) switch on pyfast's memory options, each measured in its own worker:
"update in backward" (FusedAdamW.update_in_backward: each gradient used and freed as soon as it
is complete; the same update, so the same work and its time is not re-measured),
"recompute_mlp" (`model.recompute_mlp`: each MLP keeps only its input for backward and
recomputes its gate and up projections there), and "heap trimmed every 6 blocks"
(`trim_heap_every`, pyfast.heap: freed heap memory handed back to the OS after the
forward and every 6 decoder blocks of backward). The trimming is not specific to pyfast, so TRL
also gets a row with the same hooks on its policy model.

Memory: each side runs in its own fresh subprocess (one after the other, in this one invocation),
so peak memories do not mix: the peak resident memory of the whole job above the process's
memory before the models load ("job peak": models, optimizer state, activations), the peak above
the memory held just before a step ("step peak"), and the first step's loss. Time: a further
subprocess holds both and alternates TRL and pyfast steps (one warm-up each, then --rounds each),
so that both see the same load on a shared CPU; reported: median and fastest step, pairs/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "hh_rlhf_harmless_base" / "pairs_300.jsonl"
BETA = 0.1
LR = 1e-6


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _load(model_spec: str, noise: bool, fuse_blocks: bool, recompute_mlp: bool = False):
    from pyfast.models import load_model

    model, tok, _ = load_model(model_spec, fuse_blocks=fuse_blocks, recompute_mlp=recompute_mlp)
    if noise:
        _add_noise(model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _add_noise(model) -> None:
    """The policy: the loaded weights plus seeded noise (the same for every caller)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (0.05 * p.float().std().item()))


def _measure(setup_and_warm, step, rounds: int) -> dict:
    """Runs setup + one warm-up step, then `rounds` timed steps; returns times and peaks."""
    import time

    from pyfast.bench.common import PeakMemory

    base = _rss_bytes("VmRSS")
    first_loss = setup_and_warm()
    job_peak = _rss_bytes("VmHWM") - base
    times, step_peak = [], 0
    for _ in range(rounds):
        with PeakMemory(torch.device("cpu")) as pm:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        step_peak = max(step_peak, pm.peak_bytes)
        job_peak = max(job_peak, pm._base + pm.peak_bytes - base)
    times.sort()
    return {
        "median_s": times[len(times) // 2],
        "min_s": times[0],
        "times_s": times,
        "job_peak_mb": job_peak / 2**20,
        "step_peak_mb": step_peak / 2**20,
        "first_loss": first_loss,
    }


def _trl_trainer(args):
    """(trainer, batch): TRL's DPOTrainer on the noisy policy + reference, and its first batch."""
    import datasets
    import trl

    rows = [json.loads(x) for x in DATA.read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if r["chosen"].strip() and r["rejected"].strip()][: args.pairs]
    ref, tok = _load(args.model, noise=False, fuse_blocks=False)
    policy, _ = _load(args.model, noise=True, fuse_blocks=False)
    cfg = trl.DPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.pairs,
        max_length=args.max_length,
        beta=BETA,
        loss_type=["sigmoid"],
        learning_rate=LR,
        weight_decay=0.0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to=[],
        dataloader_num_workers=0,
    )
    trainer = trl.DPOTrainer(
        model=policy,
        ref_model=ref,
        args=cfg,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.create_optimizer_and_scheduler(num_training_steps=2 * args.rounds + 2)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, used by its step
    if args.trim_every:  # the same heap trimming as pyfast's row, on TRL's policy
        _trimmer(trainer.model, args.trim_every)
    torch.save({k: v.cpu() for k, v in batch.items()}, args.batch_file)
    return trainer, batch


def _trimmer(model, every: int):
    from pyfast.heap import HeapTrimmer

    return HeapTrimmer(model, every)


def _trl_step(trainer, batch) -> float:
    loss = trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return loss.item()


def worker_trl(args) -> dict:
    import trl

    state = {}

    def setup():
        state["trainer"], state["batch"] = _trl_trainer(args)
        return step()

    def step():
        return _trl_step(state["trainer"], state["batch"])

    out = _measure(setup, step, args.rounds)
    out["optimizer"] = str(state["trainer"].args.optim)
    out["version"] = trl.__version__
    return out


def _pairs_of(saved: dict) -> list:
    """TokenizedPairs holding exactly the token ids of TRL's collated (2B, T) batch."""
    from pyfast.align.data import TokenizedPair

    ids, attn, comp = saved["input_ids"], saved["attention_mask"].bool(), saved["completion_mask"]
    b = ids.shape[0] // 2
    out = []
    for i in range(b):
        c, r = i, b + i
        prompt = ids[c][attn[c] & (comp[c] == 0)].tolist()
        assert prompt == ids[r][attn[r] & (comp[r] == 0)].tolist()
        out.append(
            TokenizedPair(prompt, ids[c][comp[c] == 1].tolist(), ids[r][comp[r] == 1].tolist())
        )
    return out


def _pyfast_state(args, ref=None) -> dict:
    """Reference log-probs of TRL's batch, then the policy and FusedAdamW.

    As the alignment recipe does, one model is loaded: its log-probs are the reference (computed
    once, before training), then it becomes the policy (here: plus the benchmark's noise). With
    `ref` (the interleaved timing worker, which holds TRL's reference anyway) that model serves
    as the reference and the policy is loaded separately.
    """
    from pyfast.align.data import collate_shared_prompt
    from pyfast.align.logps import pair_logps
    from pyfast.optim import FusedAdamW

    batch = collate_shared_prompt(_pairs_of(torch.load(args.batch_file)), pad_id=0)
    model = ref
    if ref is None:
        model = _load(args.model, False, fuse_blocks=True, recompute_mlp=args.recompute_mlp)[0]
    with torch.no_grad():
        lp = pair_logps(model.eval(), batch)
    ref_logps = (lp.chosen.float(), lp.rejected.float())
    if ref is None:
        policy = model
        _add_noise(policy)
    else:
        policy, _ = _load(args.model, True, fuse_blocks=True, recompute_mlp=args.recompute_mlp)
    del model, lp
    policy.train()
    opt = FusedAdamW(policy.parameters(), lr=LR, weight_decay=0.0, state_dtype=args.state_dtype)
    opt.allocate_state()  # as the recipes do
    if args.in_backward:
        opt.update_in_backward()  # no clipping (as TRL's step): the same update
    if args.trim_every:
        _trimmer(policy, args.trim_every)  # as trim_heap_every in a config
    return {"policy": policy, "batch": batch, "ref": ref_logps, "opt": opt}


def _pyfast_step(state: dict) -> float:
    from pyfast.align.logps import pair_logps
    from pyfast.align.losses import dpo_loss

    lp = pair_logps(state["policy"], state["batch"])
    loss, _, _ = dpo_loss(lp.chosen, lp.rejected, *state["ref"], "sigmoid", BETA)
    loss.backward()
    state["opt"].step()
    state["opt"].zero_grad(set_to_none=True)
    return loss.item()


def worker_pyfast(args) -> dict:
    state = {}

    def setup():
        state.update(_pyfast_state(args))
        return _pyfast_step(state)

    return _measure(setup, lambda: _pyfast_step(state), args.rounds)


def worker_interleaved(args) -> dict:
    """Times both in one process, alternating TRL and pyfast steps, so that both see the same
    load on a shared CPU (memory comes from the separate workers)."""
    import time

    from pyfast.hf.swaps import fuse_decoder_blocks

    trainer, batch = _trl_trainer(args)
    state = _pyfast_state(args, ref=trainer.ref_model)

    def run(name: str):
        """One step of the row `name`: its modes switched on for this step only."""
        provider, opts = ROWS[name]
        trimmer = _trimmer(trainer.model if provider == "trl" else state["policy"],
                           opts["trim_every"]) if opts.get("trim_every") else None  # fmt: skip
        try:
            if provider == "trl":
                return _trl_step(trainer, batch)
            # sets the MLP mode anew (update in backward does the same work as step(): not timed)
            fuse_decoder_blocks(state["policy"], recompute_mlp=opts.get("recompute_mlp", False))
            return _pyfast_step(state)
        finally:
            if trimmer is not None:
                trimmer.remove()

    timed = [name for name, (_, opts) in ROWS.items() if "time_of" not in opts]
    times = {name: [] for name in timed}
    for i in range(args.rounds + 1):  # round 0: warm-up (optimizer state allocation)
        for name in timed:
            t0 = time.perf_counter()
            run(name)
            if i:
                times[name].append(time.perf_counter() - t0)
    out = {}
    for name, ts in times.items():
        ts.sort()
        out[name] = {"median_s": ts[len(ts) // 2], "min_s": ts[0], "times_s": ts}
    return out


# row -> (worker, options): every row's memory comes from its own worker process; a row that
# does the same work as another ("time_of": update in backward is the same update, inside
# backward) takes that row's time.
TRIM_EVERY = 6
ROWS = {
    "trl": ("trl", {}),
    f"trl, heap trimmed every {TRIM_EVERY} blocks": ("trl", {"trim_every": TRIM_EVERY}),
    "pyfast": ("pyfast", {}),
    "pyfast, update in backward": ("pyfast", {"in_backward": True, "time_of": "pyfast"}),
    "pyfast, recompute_mlp": ("pyfast", {"recompute_mlp": True}),
    f"pyfast, heap trimmed every {TRIM_EVERY} blocks": ("pyfast", {"trim_every": TRIM_EVERY}),
    f"pyfast, recompute_mlp + update in backward + heap trimmed every {TRIM_EVERY} blocks":
        ("pyfast", {"recompute_mlp": True, "in_backward": True, "trim_every": TRIM_EVERY}),
}  # fmt: skip


def _run_worker(
    provider: str,
    args,
    batch_file: str,
    state_dtype: str | None = None,
    in_backward: bool = False,
    recompute_mlp: bool = False,
    trim_every: int = 0,
) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, __file__, "--worker", provider, "--worker-out", out,
           "--batch-file", batch_file, "--model", args.model, "--pairs", str(args.pairs),
           "--max-length", str(args.max_length), "--rounds", str(args.rounds)]  # fmt: skip
    if state_dtype:
        cmd += ["--state-dtype", state_dtype]
    cmd += ["--in-backward", str(int(in_backward)), "--recompute-mlp", str(int(recompute_mlp)),
            "--trim-every", str(trim_every)]  # fmt: skip
    subprocess.run(cmd, check=True)
    return json.loads(Path(out).read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per step")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output", default="results/bench_align")
    p.add_argument("--bf16-state", action="store_true", help="also pyfast with bf16 Adam state")
    p.add_argument("--worker", choices=["trl", "pyfast", "interleaved"], help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--batch-file", help=argparse.SUPPRESS)
    p.add_argument("--state-dtype", default=None, help=argparse.SUPPRESS)
    p.add_argument("--in-backward", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--recompute-mlp", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--trim-every", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.worker:
        if args.state_dtype:
            args.state_dtype = getattr(torch, args.state_dtype)
        workers = {"trl": worker_trl, "pyfast": worker_pyfast, "interleaved": worker_interleaved}
        res = workers[args.worker](args)
        Path(args.worker_out).write_text(json.dumps(res))
        return 0

    from pyfast.io import write_json, write_text

    batch_file = os.path.join(tempfile.mkdtemp(), "batch.pt")
    rows = {}
    for name, (provider, opts) in ROWS.items():  # the first (TRL) writes the batch the rest use
        rows[name] = _run_worker(
            provider, args, batch_file, **{k: v for k, v in opts.items() if k != "time_of"}
        )
    if args.bf16_state:
        rows["pyfast (bf16 optimizer state)"] = _run_worker("pyfast", args, batch_file, "bfloat16")
    # Times: both providers alternating in one process (the separate workers' times are kept in
    # results.json as "separate_*" but a shared CPU's load changes between them).
    timing = _run_worker("interleaved", args, batch_file)
    for name, r in rows.items():
        r["separate_median_s"], r["separate_min_s"] = r.pop("median_s"), r.pop("min_s")
        # the bf16 state does the same work as plain pyfast
        t = timing[ROWS[name][1].get("time_of", name) if name in ROWS else "pyfast"]
        r["median_s"], r["min_s"], r["times_s"] = t["median_s"], t["min_s"], t["times_s"]
    saved = torch.load(batch_file)
    trl_row = rows["trl"]
    lines = [
        f"DPO step, {args.model}, float32, {args.pairs} pairs/step, batch "
        f"{tuple(saved['input_ids'].shape)} (chosen+rejected rows x tokens), "
        f"{int(saved['completion_mask'].sum())} answer tokens; {platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, TRL {trl_row['version']}",
        "",
        "| provider | step s (median / min) | pairs/s | speed-up (median / min) | job peak MB "
        "| vs TRL | step peak MB | first-step loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        r["pairs_per_s"] = args.pairs / r["median_s"]
        r["speedup_vs_trl"] = trl_row["median_s"] / r["median_s"]
        r["speedup_vs_trl_min"] = trl_row["min_s"] / r["min_s"]
        r["job_peak_vs_trl"] = r["job_peak_mb"] / trl_row["job_peak_mb"]
        r["loss_diff_vs_trl"] = abs(r["first_loss"] - trl_row["first_loss"])
        lines.append(
            f"| {name} | {r['median_s']:.2f} / {r['min_s']:.2f} | {r['pairs_per_s']:.2f} | "
            f"{r['speedup_vs_trl']:.2f}x / {r['speedup_vs_trl_min']:.2f}x | {r['job_peak_mb']:.0f} "
            f"| {r['job_peak_vs_trl']:.2f}x | "
            f"{r['step_peak_mb']:.0f} | {r['first_loss']:.6f} |"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(args.output)
    write_json(out / "results.json", {"config": vars(args), "rows": rows})
    write_text(out / "results.md", table + "\n")
    print(f"\nwritten to {out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
