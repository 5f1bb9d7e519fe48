"""pyfast eval vs lm-evaluation-harness's HF backend: requests/s on the same requests.

    pip install lm-eval==0.4.13
    HF_HUB_OFFLINE=1 python benchmarks/bench_eval.py [--data-dir ../shared/benchmarks]
        [--tasks arc_easy,hellaswag,mmlu] [--batch-size 16] [--limit N] [--repeat 2]
        [--num-fewshot N | arc_easy=25,hellaswag=10,mmlu=5]
        [--output results/bench_eval]

Both sides get the same model (the embedded SmolLM2-135M, float32, from the same safetensors
folder), the same (context, continuation) requests (built by pyfast's tasks, which
tests/eval/test_fidelity.py checks equal lm-eval's) and the same batch size; each first scores a
few warm-up requests, then the timed set, alternating lm-eval and pyfast `--repeat` times and
keeping each side's fastest run (the CPU here is shared, so the minimum is the least noisy
estimate). Reported: requests/s of both, speedup, the largest
relative difference of log-likelihoods, and how many documents get the same prediction.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

SPLITS = {"arc_easy": "validation", "arc_challenge": "validation", "hellaswag": "train",
          "mmlu": "validation"}  # fmt: skip


def _requests(task_name: str, data_dir: str, limit: int | None, shots: int = 0):
    """[(task, doc, [(ctx, cont)])] for every leaf task of `task_name`, `shots`-shot prompts
    drawn as `pyfast eval` (and lm-eval) draw them, seed 1234."""
    from pyfast.eval.data import DataStore
    from pyfast.eval.registry import expand, get_task

    store = DataStore(data_dir)
    out = []
    for leaf in expand([task_name])[0]:
        task = get_task(leaf)
        split = SPLITS.get(task_name, "validation")
        docs = task.docs(store, split)[:limit]
        fs_split = task.data.get("fewshot_split") or split
        pool = task.docs(store, fs_split) if shots else []
        ctxs = task.contexts(docs, pool, shots, 1234, same_split=fs_split == split)
        for doc, ctx in zip(docs, ctxs, strict=True):
            out.append((task, doc, task.requests(doc, ctx)))
    return out


def _lm_eval_model(folder: str, batch_size: int):
    from lm_eval.models.huggingface import HFLM as LmEvalHFLM

    return LmEvalHFLM(pretrained=folder, dtype="float32", batch_size=batch_size, device="cpu")


def _lm_eval_score(lm, reqs):
    from lm_eval.api.instance import Instance

    inst = [
        Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i)
        for i, r in enumerate(reqs)
    ]
    return lm.loglikelihood(inst, disable_tqdm=True)


def _timed(fn, reqs):
    start = time.perf_counter()
    out = fn(reqs)
    return out, time.perf_counter() - start


def _predictions(items, lls):
    preds, i = [], 0
    for _, _doc, reqs in items:
        doc_lls = [x[0] for x in lls[i : i + len(reqs)]]
        i += len(reqs)
        preds.append(max(range(len(doc_lls)), key=lambda k: (doc_lls[k], -k)))
    return preds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(Path(__file__).parents[2] / "shared/benchmarks"))
    p.add_argument("--tasks", default="arc_easy,hellaswag,mmlu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument(
        "--num-fewshot",
        default="0",
        help="shots for every task (N) or per task (arc_easy=25,hellaswag=10,mmlu=5)",
    )
    p.add_argument("--repeat", type=int, default=2, help="alternating timed runs per side")
    p.add_argument("--output", default="results/bench_eval")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    from pyfast.eval import HFLM
    from pyfast.io import write_json, write_text
    from pyfast.models import default_model_folder

    folder = str(default_model_folder())
    ours = HFLM(folder, batch_size=args.batch_size)
    theirs = _lm_eval_model(folder, args.batch_size)
    warm = [r for _, _, rs in _requests("arc_easy", args.data_dir, 4) for r in rs]
    ours.loglikelihood(warm)
    _lm_eval_score(theirs, warm)

    per_task = dict(x.split("=") for x in args.num_fewshot.split(",") if "=" in x)
    rows = []
    for name in args.tasks.split(","):
        shots = int(per_task.get(name, 0 if per_task else args.num_fewshot))
        items = _requests(name, args.data_dir, args.limit, shots)
        reqs = [r for _, _, rs in items for r in rs]
        t_ref = t_got = float("inf")
        for _ in range(args.repeat):
            ref, t = _timed(lambda r: _lm_eval_score(theirs, r), reqs)
            t_ref = min(t_ref, t)
            got, t = _timed(ours.loglikelihood, reqs)
            t_got = min(t_got, t)
        rel = max(abs(a[0] - b[0]) / max(abs(b[0]), 1e-9) for a, b in zip(got, ref, strict=True))
        same = sum(
            x == y for x, y in zip(_predictions(items, got), _predictions(items, ref), strict=True)
        )
        acc = sum(
            int(pred == doc["gold"])
            for pred, (_, doc, _) in zip(_predictions(items, got), items, strict=True)
        ) / len(items)
        row = {
            "task": name,
            "shots": shots,
            "docs": len(items),
            "requests": len(reqs),
            "lm_eval_s": round(t_ref, 2),
            "pyfast_s": round(t_got, 2),
            "lm_eval_rps": round(len(reqs) / t_ref, 2),
            "pyfast_rps": round(len(reqs) / t_got, 2),
            "speedup": round(t_ref / t_got, 2),
            "max_rel_diff": rel,
            "same_predictions": f"{same}/{len(items)}",
            "acc": round(acc, 4),
        }
        print(row, flush=True)
        rows.append(row)

    head = "| task | shots | docs | requests | lm-eval req/s | pyfast req/s | speedup "
    lines = [head + "| max rel diff | same pred | acc |", "|---" + "|---:" * 9 + "|"]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['shots']} | {r['docs']} | {r['requests']} | {r['lm_eval_rps']} | "
            f"{r['pyfast_rps']} | {r['speedup']}x | {r['max_rel_diff']:.1e} | "
            f"{r['same_predictions']} | {r['acc']} |"
        )
    table = "\n".join(lines)
    print(table)
    meta = {
        "batch_size": args.batch_size,
        "repeat": args.repeat,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "model": folder,
    }
    write_json(Path(args.output) / "results.json", {"meta": meta, "rows": rows})
    write_text(Path(args.output) / "results.md", table + "\n")


if __name__ == "__main__":
    main()
