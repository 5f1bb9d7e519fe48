"""The main job (``make demo``): evaluate, fine-tune, evaluate again, report.

1. evaluate the model on held-out benchmark items (ARC-Easy / ARC-Challenge validation slices
   shipped in ``data/``), 2. fine-tune it with a transfer-learning config on the ARC train splits
(also in ``data/``), 3. evaluate the fine-tuned model folder on the same items, 4. write
``report.md`` (before/after table, training summary, loss curve) and ``report.json``.

Usage: ``python -m pyfast.train.demo [--config configs/arc_transfer.yaml] [--output DIR]
[key=value ...]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

from pyfast.io import write_json, write_text

TASKS = "arc_easy,arc_challenge"


def _scores(result: dict) -> dict:
    out = {}
    for task, metrics in result["results"].items():
        for name in ("acc", "acc_norm"):
            if name in metrics:
                out[(task, name)] = (metrics[name], metrics.get(f"{name}_stderr"), metrics["n"])
    return out


def _evaluate(model_spec: str, data_dir: str, limit: int | None, batch_size: int) -> dict:
    from pyfast.eval import evaluate

    return evaluate(
        model_spec, TASKS, data_dir=data_dir, split="validation", limit=limit, batch_size=batch_size
    )


def _before_key(model: str, data_dir: str, limit: int | None) -> dict:
    """What the 'before' scores depend on: model, items (by sha256), limit."""
    files = {}
    for task in TASKS.split(","):
        path = Path(data_dir) / task / "validation.jsonl"
        files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return {"model": model, "tasks": TASKS, "files": files, "limit": limit}


def evaluate_before(model: str, data_dir: str, limit, batch_size: int, out: Path) -> dict:
    """The base model's scores, reused from ``out/before.json`` when model and items match
    (the base model does not change between demo runs; only the fine-tuning does)."""
    key = _before_key(model, data_dir, limit)
    cache = out / "before.json"
    if cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            print(f"      (reusing {cache}: same model and items)")
            return saved["result"]
    result = _evaluate(model, data_dir, limit, batch_size)
    write_json(cache, {"key": key, "result": result})
    return result


def report_markdown(
    before: dict, after: dict, summary: dict, cfg_path: str, timings: dict, command: str
) -> str:
    """The Markdown report: before/after table, training summary, timings, loss curve."""
    b, a = _scores(before), _scores(after)
    lines = [
        "# pyfast demo: transfer learning on ARC",
        "",
        f"Command: `{command}`  ",
        f"Config: `{cfg_path}`",
        "",
        "## Held-out benchmark scores (validation items, never trained on)",
        "",
        "| task | metric | n | before | after | change |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for key in b:
        (vb, sb, n), (va, sa, _) = b[key], a[key]
        lines.append(
            f"| {key[0]} | {key[1]} | {n} | {vb:.4f} ± {sb:.4f} | {va:.4f} ± {sa:.4f} "
            f"| {va - vb:+.4f} |"
        )
    mean_b = sum(v[0] for k, v in b.items() if k[1] == "acc") / max(
        1, sum(k[1] == "acc" for k in b)
    )
    mean_a = sum(v[0] for k, v in a.items() if k[1] == "acc") / max(
        1, sum(k[1] == "acc" for k in a)
    )
    lines += [
        "",
        f"Mean acc over the tasks: {mean_b:.4f} -> {mean_a:.4f} ({mean_a - mean_b:+.4f}).",
        "",
        "## Training",
        "",
        f"- steps: {summary['steps']} of {summary['total_steps']} ({summary['stop_reason']})",
        f"- trainable parameters: {summary['trainable_parameters']:,} of "
        f"{summary['total_parameters']:,}",
        f"- training examples: {summary['data']['train']['examples']} "
        f"({summary['data']['train']['target_tokens']:,} target tokens); held-out examples for "
        f"the loss: {(summary['data'].get('eval') or {}).get('examples', 0)}",
        f"- final train loss: {summary['final_loss']:.4f}; best held-out loss: "
        + (
            f"{summary['best_eval_loss']:.4f} (step {summary['best_step']})"
            if summary["best_eval_loss"] is not None
            else "n/a"
        ),
        f"- throughput: {summary['tokens_per_s']:.0f} tokens/s",
        "",
        "## Time",
        "",
        "| phase | seconds |",
        "|---|---:|",
        *[f"| {k} | {v:.0f} |" for k, v in timings.items()],
        "",
        "![loss curve](loss_curve.png)",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyfast.train.demo", description=__doc__)
    p.add_argument("--config", default="configs/arc_transfer.yaml")
    p.add_argument("--output", default="results/demo")
    p.add_argument("--data-dir", default="data", help="<dir>/arc_*/validation.jsonl items")
    p.add_argument("--limit", type=int, default=None, help="first N items per task")
    p.add_argument("--batch-size", type=int, default=16, help="evaluation batch size")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the training config")
    args = p.parse_args(argv)
    from pyfast.train import Recipe, load_config

    out = Path(args.output)
    cfg = load_config(args.config, [f"output_dir={out / 'run'}", *args.overrides])
    timings = {}
    t = time.perf_counter()
    print(f"[1/3] evaluating {cfg.model.name} on {TASKS} (validation items in {args.data_dir})")
    before = evaluate_before(cfg.model.name, args.data_dir, args.limit, args.batch_size, out)
    timings["evaluate before"] = time.perf_counter() - t
    t = time.perf_counter()
    print(f"[2/3] fine-tuning with {args.config}")
    summary = Recipe(cfg, overwrite=True).run()  # the demo's own folder: a rerun replaces it
    timings["fine-tune"] = time.perf_counter() - t
    t = time.perf_counter()
    final = Path(cfg.output_dir) / ("best" if summary["best_step"] is not None else "final")
    if not (final / "config.json").is_file():
        final = Path(cfg.output_dir) / "final"
    print(f"[3/3] evaluating the fine-tuned model ({final})")
    after = _evaluate(str(final), args.data_dir, args.limit, args.batch_size)
    timings["evaluate after"] = time.perf_counter() - t
    timings["total"] = sum(timings.values())
    command = "python -m pyfast.train.demo " + " ".join(argv if argv is not None else sys.argv[1:])
    png = Path(cfg.output_dir) / "loss_curve.png"
    if png.is_file():
        shutil.copyfile(png, out / "loss_curve.png")
    text = report_markdown(before, after, summary, args.config, timings, command.strip())
    write_text(out / "report.md", text)
    write_json(
        out / "report.json",
        {
            "before": {f"{k[0]}/{k[1]}": v[0] for k, v in _scores(before).items()},
            "after": {f"{k[0]}/{k[1]}": v[0] for k, v in _scores(after).items()},
            "training": summary,
            "timings_s": timings,
            "model": str(final),
        },
    )
    print(text)
    print(f"written to {out}/report.md")
    if not all(math.isfinite(v) for v in timings.values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
