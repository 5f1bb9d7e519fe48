"""Regenerates tests/data/lm_eval_reference/*.json by running lm-evaluation-harness itself.

    pip install lm-eval==0.4.13          # development dependency only
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python scripts/make_lm_eval_reference.py \
        [--data-dir tests/data/benchmarks] [--limit N] [--out tests/data/lm_eval_reference]

The model is the embedded default (SmolLM2-135M-Instruct, its cached safetensors folder) loaded by
lm-eval's HF backend in float32. Each task is lm-eval's own YAML (``include:``), only pointed at the
local JSONL files (``dataset_path: json``), so prompts and metrics are lm-eval's. For every
request the output stores (context, continuation, loglikelihood, is_greedy), and per task the
metrics and the scoring time — the ground truth of tests/eval/test_fidelity.py and the lm-eval side
of benchmarks/bench_eval.py (which imports :func:`run_lm_eval`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import yaml

# pyfast task -> (lm-eval yaml relative to lm_eval/tasks, data-name, split of the local file)
TASKS = {
    "arc_easy": ("arc/arc_easy.yaml", "arc_easy", "validation"),
    "arc_challenge": ("arc/arc_challenge.yaml", "arc_challenge", "validation"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag", "train"),
    "truthfulqa_mc1": ("truthfulqa/truthfulqa_mc1.yaml", "truthfulqa_mc", "validation"),
    "truthfulqa_mc2": ("truthfulqa/truthfulqa_mc2.yaml", "truthfulqa_mc", "validation"),
}
MMLU_SUBJECTS = ["abstract_algebra", "high_school_biology", "philosophy", "marketing"]


def _task_yamls(data_dir: Path, tmp: Path, names: list[str]) -> dict[str, str]:
    """Writes one YAML per task into `tmp`; returns pyfast name -> lm-eval task name."""
    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks"
    out = {}
    for name in names:
        if name.startswith("mmlu_"):
            subject = name.removeprefix("mmlu_")
            rows = [
                json.loads(line)
                for line in (data_dir / "mmlu" / "validation.jsonl").read_text().splitlines()
            ]
            part = tmp / f"{name}.jsonl"
            part.write_text("".join(json.dumps(r) + "\n" for r in rows if r["subject"] == subject))
            dev = [
                json.loads(line)
                for line in (data_dir / "mmlu" / "dev.jsonl").read_text().splitlines()
            ]
            dev_part = tmp / f"{name}_dev.jsonl"
            dev_part.write_text(
                "".join(json.dumps(r) + "\n" for r in dev if r["subject"] == subject)
            )
            spec = {
                "include": str(root / "mmlu/default" / f"mmlu_{subject}.yaml"),
                "dataset_kwargs": {"data_files": {"test": str(part), "dev": str(dev_part)}},
            }
        else:
            rel, data_name, split = TASKS[name]
            path = str((data_dir / data_name / f"{split}.jsonl").resolve())
            files = {"validation": path}
            spec = {"include": str(root / rel), "validation_split": "validation"}
            if name.startswith("arc"):
                train = data_dir / data_name / "train.jsonl"
                files["train"] = str(train.resolve())
                spec["test_split"] = None
            if name == "hellaswag":
                spec["training_split"] = None
            spec["dataset_kwargs"] = {"data_files": files}
        spec.update({"task": f"ref_{name}", "dataset_path": "json", "dataset_name": None})
        spec.pop("tag", None)
        (tmp / f"ref_{name}.yaml").write_text(yaml.safe_dump(spec))
        out[name] = f"ref_{name}"
    return out


def run_lm_eval(
    model_folder: str, names: list[str], data_dir: Path, limit: int | None, batch_size: int = 16
) -> dict:
    """Runs lm-eval's HF backend; returns {task: {requests, metrics, seconds}} and the total."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        mapping = _task_yamls(data_dir, Path(tmp), names)
        manager = TaskManager(include_path=tmp)
        start = time.perf_counter()
        res = simple_evaluate(
            model="hf",
            model_args=f"pretrained={model_folder},dtype=float32",
            tasks=list(mapping.values()),
            num_fewshot=0,
            batch_size=batch_size,
            limit=limit,
            log_samples=True,
            task_manager=manager,
            device="cpu",
        )
        seconds = time.perf_counter() - start
    out = {"tasks": {}, "seconds": seconds}
    for name, ref in mapping.items():
        reqs = []
        for s in sorted(res["samples"][ref], key=lambda s: s["doc_id"]):
            for arg, resp in zip(s["arguments"], s["resps"], strict=True):
                ctx, cont = _args(arg)
                ll, greedy = resp[0]
                reqs.append(
                    {
                        "doc_id": s["doc_id"],
                        "context": ctx,
                        "continuation": cont,
                        "loglikelihood": float(ll),
                        "is_greedy": bool(greedy),
                    }
                )
        metrics = {
            k.split(",")[0]: v
            for k, v in res["results"][ref].items()
            if "," in k and isinstance(v, float)
        }
        out["tasks"][name] = {"requests": reqs, "metrics": metrics}
    return out


def _args(arg) -> tuple[str, str]:
    if isinstance(arg, dict):  # lm-eval >= 0.4.5 logs {"gen_args_0": {"arg_0": ..., "arg_1": ...}}
        arg = list(arg.values()) if "arg_0" in arg else list(arg.values())[0]
        if isinstance(arg, dict):
            arg = [arg["arg_0"], arg["arg_1"]]
    return arg[0], arg[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="tests/data/benchmarks")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", default="tests/data/lm_eval_reference")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    import torch

    from pyfast.io import write_json
    from pyfast.models import default_model_folder

    folder = str(default_model_folder())
    names = [*TASKS, *(f"mmlu_{s}" for s in MMLU_SUBJECTS)]
    ref = run_lm_eval(folder, names, Path(args.data_dir), args.limit)
    for name, data in ref["tasks"].items():
        write_json(
            Path(args.out) / f"{name}.json",
            {
                "generated_by": "scripts/make_lm_eval_reference.py",
                "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "0.4.13",
                "torch": torch.__version__,
                "model": "default (SmolLM2-135M-Instruct, float32)",
                "data_dir": args.data_dir,
                "num_fewshot": 0,
                **data,
            },
        )
    print(f"{len(ref['tasks'])} tasks written to {args.out} ({ref['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
