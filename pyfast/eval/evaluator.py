"""``evaluate``: tasks x model -> metrics with stderr, per-sample logs, timings."""

from __future__ import annotations

import datetime as _dt
import platform
import time

import torch

import pyfast
from pyfast.eval import metrics, registry
from pyfast.eval.data import DataStore
from pyfast.eval.model import HFLM, LM


def _as_lm(model, tokenizer, batch_size, device, dtype, max_length) -> LM:
    if isinstance(model, LM):
        return model
    return HFLM(
        model,
        tokenizer,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        max_length=max_length,
    )


def _world() -> tuple[int, int]:
    """(rank, world size); joins a torchrun job (gloo) when WORLD_SIZE > 1 and none is set up."""
    import os

    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def _sharded_loglikelihood(lm: LM, requests, doc_sizes: list[int]) -> list:
    """Scores documents round-robin across torch.distributed ranks; every rank gets all answers."""
    rank, world = _world()
    if world == 1:
        return lm.loglikelihood(requests)
    import torch.distributed as dist

    starts = [0]
    for n in doc_sizes:
        starts.append(starts[-1] + n)
    mine = [k for k in range(len(doc_sizes)) if k % world == rank]
    answers = lm.loglikelihood([r for k in mine for r in requests[starts[k] : starts[k + 1]]])
    gathered: list = [None] * world
    dist.all_gather_object(gathered, answers)
    out: list = [None] * len(requests)
    for r, part in enumerate(gathered):
        it = iter(part)
        for k in range(r, len(doc_sizes), world):
            for i in range(starts[k], starts[k + 1]):
                out[i] = next(it)
    return out


def parse_split(split: str | None) -> dict[str, str]:
    """'validation,hellaswag=train' -> {'*': 'validation', 'hellaswag': 'train'}."""
    out: dict[str, str] = {}
    for part in (split or "").split(","):
        part = part.strip()
        if not part:
            continue
        task, sep, value = part.rpartition("=")
        if sep and not (task and value):
            raise ValueError(f"--split entry {part!r} must be SPLIT or TASK=SPLIT")
        out[task if sep else "*"] = value
    return out


def _summarise(values: list[float]) -> tuple[float, float | None]:
    return sum(values) / len(values), metrics.mean_stderr(values)


def evaluate(
    model,
    tasks: str | list[str],
    *,
    tokenizer=None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int | str = 16,
    device: str | None = None,
    dtype: str | None = None,
    data_dir: str | None = None,
    split: str | None = None,
    seed: int = 1234,
    log_samples: bool = False,
    max_length: int | None = None,
) -> dict:
    """Evaluates `model` on `tasks` (names or groups, e.g. "arc_easy,mmlu").

    Args:
        model: an :class:`LM`, a spec for :func:`pyfast.models.load_model` ('default', HF folder,
            file.gguf), or an in-memory ``PreTrainedModel`` together with `tokenizer`.
        num_fewshot: shots per prompt (default 0); limit: first N documents per task.
        data_dir: local ``<dir>/<data-name>/<split>.jsonl`` files instead of the HF datasets;
        split: evaluate this split instead of the task's default; per task with
            "validation,hellaswag=train" (a group name such as mmlu applies to its members).
        seed: few-shot sampling seed (lm-eval's default 1234).

    Under torchrun (WORLD_SIZE > 1) documents are scored round-robin across the ranks (gloo) and
    gathered, so every rank returns the same complete result.

    Returns:
        dict with results[task][metric] (+ f"{metric}_stderr", "n"), groups, config, model
        identity, data sha256s, timings; "samples"[task] (list of dicts) when log_samples.

    Raises:
        ValueError: unknown task (with close matches), bad arguments or malformed data.
        FileNotFoundError: a missing data file (naming the expected path).
    """
    names = [t for t in tasks.split(",") if t.strip()] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise ValueError("no task given; see `pyfast ls tasks`")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    leaves, groups = registry.expand(names)
    splits = parse_split(split)
    for key in splits:
        if key != "*":
            registry.expand([key])  # unknown task names in --split fail here, with suggestions
    shots = num_fewshot or 0
    t0 = time.perf_counter()
    store = DataStore(data_dir)

    prepared = []  # (task, split, docs, contexts, first request index)
    requests: list[tuple[str, str]] = []
    doc_sizes: list[int] = []
    for name in leaves:
        task = registry.get_task(name)
        owners = [name, *task.groups, *(["mmlu"] if task.subject else [])]
        eval_split = next((splits[k] for k in owners if k in splits), None)
        eval_split = eval_split or splits.get("*") or task.data["split"]
        docs = task.docs(store, eval_split)
        if limit is not None:
            docs = docs[:limit]
        if not docs:
            if task.subject is not None and len(leaves) > 1:
                continue  # an MMLU subject absent from a local slice: skipped like a 0-size task
            raise ValueError(f"task {name}: split {eval_split!r} has no documents")
        pool, fs_split = [], task.data.get("fewshot_split") or eval_split
        if shots:
            pool = task.docs(store, fs_split)
        ctxs = task.contexts(docs, pool, shots, seed, same_split=fs_split == eval_split)
        prepared.append((task, eval_split, docs, ctxs, len(requests)))
        for doc, ctx in zip(docs, ctxs, strict=True):
            requests += task.requests(doc, ctx)
            doc_sizes.append(len(doc["choices"]))
    if not prepared:
        raise ValueError(f"no documents found for {', '.join(names)}")
    t_prep = time.perf_counter() - t0

    lm = _as_lm(model, tokenizer, batch_size, device, dtype, max_length)
    t1 = time.perf_counter()
    answers = _sharded_loglikelihood(lm, requests, doc_sizes)
    t_score = time.perf_counter() - t1

    results, samples = {}, {}
    for task, eval_split, docs, ctxs, start in prepared:
        per_metric: dict[str, list[float]] = {m: [] for m in task.metrics}
        logs = []
        for doc_id, (doc, ctx) in enumerate(zip(docs, ctxs, strict=True)):
            n = len(doc["choices"])
            ans = answers[start : start + n]
            start += n
            lls = [a[0] for a in ans]
            scores = task.score(doc, lls)
            for m, v in scores.items():
                per_metric[m].append(v)
            if log_samples:
                logs.append(
                    {
                        "doc_id": doc_id,
                        "context": ctx,
                        "choices": doc["choices"],
                        "loglikelihoods": lls,
                        "is_greedy": [bool(a[1]) for a in ans],
                        "gold": doc["labels"] if "labels" in doc else doc["gold"],
                        "prediction": task.prediction(lls),
                        **scores,
                    }
                )
        res: dict = {"n": len(docs), "split": eval_split}
        for m, vals in per_metric.items():
            res[m], res[f"{m}_stderr"] = _summarise(vals)
        results[task.name] = res
        if log_samples:
            samples[task.name] = logs

    out_groups = _aggregate_groups(groups, results)
    out = {
        "results": {**results, **out_groups},
        "groups": {g: groups[g] for g in out_groups},
        "config": {
            "tasks": names,
            "num_fewshot": shots,
            "limit": limit,
            "batch_size": getattr(lm, "batch_size", batch_size),
            "device": str(getattr(lm, "device", device)),
            "dtype": dtype or "float32",
            "data_dir": str(data_dir) if data_dir else None,
            "split": split,
            "seed": seed,
            "max_length": getattr(lm, "max_length", max_length),
            "world_size": _world()[1],
        },
        "model": getattr(lm, "identity", {"spec": type(lm).__name__}),
        "data": {"sha256": dict(store.hashes)},
        "pyfast_version": pyfast.__version__,
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
        },
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "timings": {
            "prepare_s": round(t_prep, 3),
            "score_s": round(t_score, 3),
            "requests": len(requests),
            "requests_per_s": round(len(requests) / t_score, 2) if t_score > 0 else None,
        },
    }
    if log_samples:
        out["samples"] = samples
    return out


def _aggregate_groups(groups: dict[str, list[str]], results: dict) -> dict:
    """Group means weighted by document count, stderr pooled like lm-eval (inner groups first)."""
    done: dict[str, dict] = {}

    def visit(g: str) -> dict | None:
        if g in done:
            return done[g]
        parts = []
        for m in groups[g]:
            r = visit(m) if m in groups else results.get(m)
            if r is not None:
                parts.append(r)
        if not parts:
            return None
        common = set.intersection(*(set(p) for p in parts)) - {"n", "split"}
        agg: dict = {"n": sum(p["n"] for p in parts)}
        for m in sorted(k for k in common if not k.endswith("_stderr")):
            sizes = [p["n"] for p in parts]
            agg[m] = sum(p[m] * n for p, n in zip(parts, sizes, strict=True)) / agg["n"]
            agg[f"{m}_stderr"] = metrics.pooled_stderr([p[f"{m}_stderr"] for p in parts], sizes)
        done[g] = agg
        return agg

    for g in groups:
        visit(g)
    return {g: r for g, r in done.items() if r is not None}
