"""Regenerates tests/data/lm_eval_reference/*.json by running lm-evaluation-harness itself.

    pip install lm-eval==0.4.13          # development dependency only
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python scripts/make_lm_eval_reference.py \
        [--data-dir tests/data/benchmarks] [--limit N] [--out tests/data/lm_eval_reference] \
        [--only mc|gsm8k|gen] [--gsm8k-docs 4]

Generation facts (``generation.json``, no model needed): the prompts lm-eval builds for gsm8k_cot
(8 fixed exemplars) and truthfulqa_gen; its regex filters and exact_match on sample strings;
TruthfulQA's processed answers and BLEU/ROUGE values for sample completions.

GSM8K (``gsm8k.json``): lm-eval's own gsm8k.yaml (5-shot, greedy, max_gen_toks 256) on the first
``--gsm8k-docs`` rows of ``gsm8k/train.jsonl``, the few-shot examples drawn from the same file
(lm-eval then excludes the document itself, as pyfast does with ``--split train``), batch size 1;
stored per document: the prompt, the generation, the strict-match and flexible-extract answers
and exact_match values.

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


def run_lm_eval_gsm8k(
    model_folder: str, data_dir: Path, limit: int | None, batch_size: int = 1
) -> dict:
    """lm-eval's gsm8k task on ``data_dir/gsm8k/train.jsonl`` (eval docs and few-shot pool);
    returns {"docs": [{doc_id, context, generation, extracted, exact_match}], "metrics",
    "seconds"}."""
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.__file__).parent / "tasks"
    train = str((data_dir / "gsm8k" / "train.jsonl").resolve())
    spec = {
        "include": str(root / "gsm8k" / "gsm8k.yaml"),
        "task": "ref_gsm8k",
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"train": train}},
        "training_split": "train",
        "fewshot_split": "train",
        "test_split": "train",
    }
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "ref_gsm8k.yaml").write_text(yaml.safe_dump(spec))
        start = time.perf_counter()
        res = simple_evaluate(
            model="hf",
            model_args=f"pretrained={model_folder},dtype=float32",
            tasks=["ref_gsm8k"],
            batch_size=batch_size,
            limit=limit,
            log_samples=True,
            task_manager=TaskManager(include_path=tmp),
            device="cpu",
        )
        seconds = time.perf_counter() - start
    docs: dict[int, dict] = {}
    for s in sorted(res["samples"]["ref_gsm8k"], key=lambda s: s["doc_id"]):
        arg = s["arguments"]
        ctx = _args(arg)[0] if isinstance(arg, dict) else arg[0][0]
        d = docs.setdefault(
            s["doc_id"],
            {"doc_id": s["doc_id"], "context": ctx, "generation": s["resps"][0][0],
             "target": s["target"], "extracted": {}, "exact_match": {}},
        )  # fmt: skip
        d["extracted"][s["filter"]] = s["filtered_resps"][0]
        d["exact_match"][s["filter"]] = float(s["exact_match"])
    metrics = {k: v for k, v in res["results"]["ref_gsm8k"].items() if isinstance(v, float)}
    return {"docs": list(docs.values()), "metrics": metrics, "seconds": seconds,
            "batch_size": batch_size, "num_fewshot": 5}  # fmt: skip


FILTER_TEXTS = [
    " so #### -3.5, then 7",
    "The answer is 12.",
    "$1,234.50 total",
    "none",
    "#### 5\n",
    "Natalia sold 48/2 = 24 clips.\n#### 72",
    "It is 1,000. The answer is 9.",
]
MATCH_REFS = ["1,234.50", "#### 12", "-3.5", "[invalid]", "5.", "9", "Some text\n#### 72"]


def _lm_eval_prompts(data_dir: Path, tmp: Path) -> dict:
    """Prompts of the first 2 documents of gsm8k_cot (on the train slice) and truthfulqa_gen."""
    import lm_eval
    from lm_eval.tasks import TaskManager, get_task_dict

    root = Path(lm_eval.__file__).parent / "tasks"
    specs = {
        "gsm8k_cot": {"include": str(root / "gsm8k" / "gsm8k-cot.yaml"),
                      "dataset_kwargs": {"data_files": {"test": str(
                          (data_dir / "gsm8k" / "train.jsonl").resolve())}}},
        "truthfulqa_gen": {"include": str(root / "truthfulqa" / "truthfulqa_gen.yaml"),
                           "dataset_kwargs": {"data_files": {"validation": str(
                               (data_dir / "truthfulqa_gen" / "validation.jsonl").resolve())}}},
    }  # fmt: skip
    for name, spec in specs.items():
        spec.update({"task": f"ref_{name}", "dataset_path": "json", "dataset_name": None})
        spec.pop("tag", None)
        (tmp / f"ref_{name}.yaml").write_text(yaml.safe_dump(spec))
    tasks = get_task_dict([f"ref_{n}" for n in specs], TaskManager(include_path=str(tmp)))
    out = {}
    for name in specs:
        task = tasks[f"ref_{name}"]
        task.build_all_requests(limit=2, rank=0, world_size=1)
        out[name] = [inst.args[0] for inst in sorted(task.instances, key=lambda i: i.doc_id)]
    return out


def lm_eval_generation_facts(data_dir: Path) -> dict:
    """What lm-eval's filters, exact_match and TruthfulQA scoring return on sample inputs."""
    import lm_eval
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter
    from lm_eval.tasks.truthfulqa.utils import preprocess_function, process_results_gen

    root = Path(lm_eval.__file__).parent / "tasks" / "gsm8k"
    filters = {}
    for name, fname in (("gsm8k", "gsm8k.yaml"), ("gsm8k_cot", "gsm8k-cot.yaml")):
        spec = yaml.safe_load((root / fname).read_text())
        for f in spec["filter_list"]:
            step = {k: v for k, v in f["filter"][0].items() if k != "function"}
            got = RegexFilter(**step).apply([[t] for t in FILTER_TEXTS], None)
            filters[f"{name}/{f['name']}"] = [g[0] for g in got]
        opts = {k: v for k, v in spec["metric_list"][0].items()
                if k in ("ignore_case", "ignore_punctuation", "regexes_to_ignore")}  # fmt: skip
    matches = [[p, r, float(exact_match_hf_evaluate([p], [r], **opts)["exact_match"])]
               for p in FILTER_TEXTS + MATCH_REFS for r in MATCH_REFS]  # fmt: skip
    rows = [
        json.loads(line)
        for line in (data_dir / "truthfulqa_gen" / "validation.jsonl").read_text().splitlines()[:3]
    ]
    tqa = []
    for row in rows:
        doc = {**row, **preprocess_function(row)}
        for completion in (" " + doc["correct_answers"][0], "\nA: I have no comment.", " x y"):
            scores = process_results_gen(doc, [completion])
            tqa.append({"question": row["question"], "completion": completion,
                        "correct_answers": doc["correct_answers"],
                        "incorrect_answers": doc["incorrect_answers"],
                        "scores": {k: float(v) for k, v in scores.items()}})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        prompts = _lm_eval_prompts(data_dir, Path(tmp))
    return {"filter_texts": FILTER_TEXTS, "filters": filters, "exact_match": matches,
            "truthfulqa_gen": tqa, "prompts": prompts}  # fmt: skip


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
    p.add_argument("--only", choices=["mc", "gsm8k", "gen"], default=None, help="one part only")
    p.add_argument("--gsm8k-docs", type=int, default=4, help="GSM8K documents (slow on CPU)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    import torch

    from pyfast.io import write_json
    from pyfast.models import default_model_folder

    folder = str(default_model_folder())
    header = {
        "generated_by": "scripts/make_lm_eval_reference.py",
        "lm_eval": getattr(lm_eval, "__version__", "0.4.13"),
        "torch": torch.__version__,
        "model": "default (SmolLM2-135M-Instruct, float32)",
        "data_dir": args.data_dir,
    }
    if args.only in (None, "gen"):
        facts = lm_eval_generation_facts(Path(args.data_dir))
        write_json(Path(args.out) / "generation.json", {**header, **facts})
        print("generation facts written")
        if args.only == "gen":
            return
    if args.only in (None, "gsm8k"):
        ref = run_lm_eval_gsm8k(folder, Path(args.data_dir), args.gsm8k_docs)
        write_json(Path(args.out) / "gsm8k.json", {**header, **ref})
        print(f"gsm8k: {len(ref['docs'])} documents written ({ref['seconds']:.1f} s)")
        if args.only == "gsm8k":
            return
    names = [*TASKS, *(f"mmlu_{s}" for s in MMLU_SUBJECTS)]
    ref = run_lm_eval(folder, names, Path(args.data_dir), args.limit)
    for name, data in ref["tasks"].items():
        write_json(
            Path(args.out) / f"{name}.json",
            {**header, "num_fewshot": 0, **data},
        )
    print(f"{len(ref['tasks'])} tasks written to {args.out} ({ref['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
