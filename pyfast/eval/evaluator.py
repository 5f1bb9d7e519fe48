"""``evaluate``: tasks x model -> metrics with stderr, per-sample logs, timings."""

from __future__ import annotations

import datetime as _dt
import inspect
import math
import platform
import time
import warnings

import torch

import pyfast
from pyfast.eval import metrics, registry
from pyfast.eval.data import DataStore
from pyfast.eval.gen_cache import GenerationCache, LoglikelihoodCache, ll_chunks, request_key
from pyfast.eval.gen_cache import sharded_generate as _sharded_generate
from pyfast.eval.generation import normalize_gen_kwargs, parse_gen_kwargs
from pyfast.eval.model import HFLM, LM
from pyfast.eval.progress import Progress


def _as_lm(model, tokenizer, batch_size, device, dtype, max_length, pack_weights) -> LM:
    if isinstance(model, LM):
        return model
    return HFLM(
        model,
        tokenizer,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        max_length=max_length,
        pack_weights=pack_weights,
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


def _nan_documents(doc_answers: list) -> list[int]:
    """Ids of the documents with a NaN among their (log-likelihood, is_greedy) answers."""
    return [
        i
        for i, ans in enumerate(doc_answers)
        if any(math.isnan(a[0] if isinstance(a, (tuple, list)) else a) for a in ans)
    ]


def _loglikelihood(lm: LM, requests, on_batch=None) -> list:
    """lm.loglikelihood, reporting (requests, tokens) per batch to `on_batch` where it can."""
    if on_batch is not None and "progress" in inspect.signature(lm.loglikelihood).parameters:
        return lm.loglikelihood(requests, progress=on_batch)
    answers = lm.loglikelihood(requests)
    if on_batch is not None:
        on_batch(len(requests), 0)
    return answers


def _sharded_loglikelihood(lm: LM, requests, doc_sizes: list[int], on_batch=None) -> list:
    """Scores documents round-robin across torch.distributed ranks; every rank gets all answers.
    `on_batch(requests, tokens)` is called after each scored batch of this rank."""
    rank, world = _world()
    if world == 1:
        return _loglikelihood(lm, requests, on_batch)
    import torch.distributed as dist

    starts = [0]
    for n in doc_sizes:
        starts.append(starts[-1] + n)
    mine = [k for k in range(len(doc_sizes)) if k % world == rank]
    mine_reqs = [r for k in mine for r in requests[starts[k] : starts[k + 1]]]
    answers = _loglikelihood(lm, mine_reqs, on_batch) if mine_reqs else []
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
    apply_chat_template: bool = False,
    gen_kwargs: dict | str | None = None,
    output: str | None = None,
    resume: bool = False,
    task_options: dict | None = None,
    pack_weights: bool | None = None,
    progress: bool = False,
) -> dict:
    """Evaluates `model` on `tasks` (names or groups, e.g. "arc_easy,mmlu,gsm8k").

    Args:
        model: an :class:`LM`, a spec for :func:`pyfast.models.load_model` ('default', HF folder,
            file.gguf), or an in-memory ``PreTrainedModel`` together with `tokenizer`.
        num_fewshot: shots per prompt (default: each task's own, 0 for multiple choice, 5 for
            gsm8k, 8 for gsm8k_cot); limit: first N documents per task.
        data_dir: local ``<dir>/<data-name>/<split>.jsonl`` files instead of the HF datasets;
        split: evaluate this split instead of the task's default; per task with
            "validation,hellaswag=train" (a group name such as mmlu applies to its members).
        seed: few-shot sampling seed (lm-eval's default 1234); sampled generations of document
            d use seed ``seed + 10000 * d + j`` for its j-th request.
        apply_chat_template: generation tasks render their prompts with the model's chat
            template (few-shot examples as turns).
        gen_kwargs: overrides of every generation task's kwargs ("temperature=0.7,top_p=0.9"
            or a dict: temperature, top_p, top_k, max_gen_toks, do_sample).
        output: run folder; generations are cached there per document
            (``generations_<task>.jsonl``, one line appended per finished document);
        task_options: run options of the task kinds that take them (``configure``): humaneval's
            allow_code_execution, num_samples, completions, sandbox_limits; mt_bench's judge,
            judge_key_env, judge_max_tokens, judge_loader (see pyfast/eval/bench_tasks.py).
        resume: reuse the cached generations of `output` whose prompt and kwargs are unchanged
            (an interrupted run continues where it stopped); without it the cache restarts.
        pack_weights: float32 CPU linear layers on oneDNN-packed weights (see :class:`HFLM`):
            None decides by itself, True insists, False keeps torch's F.linear.
        progress: progress bars on stderr (where it is a terminal) for every long pass and one
            line per finished task (``pyfast eval`` turns it on).

    With `output`, the run folder is kept up to date as the run goes (see
    :class:`pyfast.eval.report.RunWriter`): results.json is written before any work (status
    "running"), then after every finished task together with its samples, and last with status
    "complete" (or "interrupted"/"failed"); log-likelihood answers are cached per chunk of
    documents (``loglikelihood_<task>.jsonl``) so that `resume` continues an interrupted run
    with the same results.

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
    if resume and not output:
        raise ValueError("--resume needs --output DIR (the folder of the interrupted run)")
    if isinstance(gen_kwargs, str):
        overrides = parse_gen_kwargs(gen_kwargs)
    else:
        overrides = dict(gen_kwargs or {})
        normalize_gen_kwargs(overrides)
    leaves, groups = registry.expand(names)
    splits = parse_split(split)
    for key in splits:
        if key != "*":
            registry.expand([key])  # unknown task names in --split fail here, with suggestions
    writer = None
    if output and _world()[0] == 0:  # the output path is checked (and results.json begun) first
        from pyfast.eval.report import RunWriter

        writer = RunWriter(output, log_samples=log_samples)
        writer.begin(
            {
                "tasks": names,
                "num_fewshot": num_fewshot,
                "limit": limit,
                "seed": seed,
                "data_dir": str(data_dir) if data_dir else None,
                "split": split,
                "model": model if isinstance(model, str) else type(model).__name__,
            }  # fmt: skip
        )
    try:
        return _evaluate(
            model, tokenizer, names, leaves, groups, splits, writer, num_fewshot=num_fewshot,
            limit=limit, batch_size=batch_size, device=device, dtype=dtype, data_dir=data_dir,
            split=split, seed=seed, log_samples=log_samples, max_length=max_length,
            apply_chat_template=apply_chat_template, overrides=overrides, output=output,
            resume=resume, task_options=task_options, pack_weights=pack_weights,
            progress=progress,
        )  # fmt: skip
    except BaseException as exc:
        if writer is not None:
            writer.abort(exc)
        raise


def _evaluate(model, tokenizer, names, leaves, groups, splits, writer, **kw) -> dict:
    """The body of :func:`evaluate` once its arguments are checked (see there)."""
    num_fewshot, limit, seed = kw["num_fewshot"], kw["limit"], kw["seed"]
    output, resume, overrides, log_samples = kw["output"], kw["resume"], kw["overrides"], kw[
        "log_samples"]  # fmt: skip
    apply_chat_template, task_options = kw["apply_chat_template"], kw["task_options"]
    lm_args = [kw[k] for k in ("batch_size", "device", "dtype", "max_length", "pack_weights")]
    show = Progress(kw["progress"])
    t0 = time.perf_counter()
    store = DataStore(kw["data_dir"])
    lm = None
    if apply_chat_template:  # the prompts need the tokenizer's template
        lm = _as_lm(model, tokenizer, *lm_args)

    prepared = []  # (task, split, docs, contexts, per-doc requests, shots)
    for name in leaves:
        task = registry.get_task(name)
        if hasattr(task, "configure"):  # kinds with run options (humaneval, mt_bench)
            task = task.configure(
                {"seed": seed, "output": output, "progress": show.enabled, **(task_options or {})}
            )
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
        shots = task.num_fewshot if num_fewshot is None else num_fewshot
        pool, fs_split = [], task.data.get("fewshot_split") or eval_split
        if shots and task.needs_fewshot_pool:
            pool = task.docs(store, fs_split)
        chat = lm.apply_chat_template if apply_chat_template else None
        ctxs = task.contexts(docs, pool, shots, seed, fs_split == eval_split, chat=chat)
        reqs = [task.requests(doc, ctx) for doc, ctx in zip(docs, ctxs, strict=True)]
        if task.request_type == "generate_until":
            reqs = [_with_overrides(r, overrides, seed, d) for d, r in enumerate(reqs)]
        prepared.append((task, eval_split, docs, ctxs, reqs, shots))
    if not prepared:
        raise ValueError(f"no documents found for {', '.join(names)}")
    t_prep = time.perf_counter() - t0

    if lm is None and any(getattr(p[0], "needs_lm", True) for p in prepared):
        lm = _as_lm(model, tokenizer, *lm_args)
    t1 = time.perf_counter()
    n_requests = 0
    results, samples, task_info, task_seconds = {}, {}, {}, {}

    def assemble(status: str) -> dict:
        t_score = time.perf_counter() - t1
        out = _run_record(kw, names, prepared, lm, groups, results, store, task_info)
        out["status"] = status
        out["timings"] = {
            "prepare_s": round(t_prep, 3),
            "score_s": round(t_score, 3),
            "requests": n_requests,
            "requests_per_s": round(n_requests / t_score, 2) if t_score > 0 else None,
            "task_s": dict(task_seconds),
        }
        return out

    for task, eval_split, docs, ctxs, reqs, _shots in prepared:
        t_task = time.perf_counter()
        if hasattr(task, "answer_docs"):  # kinds that drive the LM themselves (multi-turn)
            ans = task.answer_docs(lm, docs, ctxs, overrides)
        elif task.request_type == "loglikelihood":
            cache = LoglikelihoodCache.for_task(output, task.name, lm, resume) if output else None
            ans = _loglikelihood_task(lm, task.name, reqs, cache, show)
            n_requests += sum(map(len, reqs))
        elif task.request_type == "generate_until":
            cache = GenerationCache.for_task(output, task.name, lm, resume) if output else None
            with show.bar(sum(map(len, reqs)), f"{task.name} generate", "req") as bar:
                ans = _sharded_generate(lm, reqs, cache, on_request=bar.requests_done(lm))
            n_requests += sum(map(len, reqs))
        else:
            raise ValueError(f"task {task.name}: unknown request type {task.request_type!r}")
        res, logs = _score_task(task, eval_split, docs, ctxs, ans, log_samples)
        results[task.name] = res
        task_seconds[task.name] = round(time.perf_counter() - t_task, 3)
        if hasattr(task, "run_info"):  # e.g. the sandbox of humaneval, the judge of mt_bench
            task_info[task.name] = task.run_info()
        if log_samples:
            samples[task.name] = logs
        if writer is not None:
            writer.task_done(task.name, logs if log_samples else None, assemble("running"))
        show.task_line(task.name, res, time.perf_counter() - t_task)

    out = assemble("complete")
    if writer is not None:
        writer.finish(out)
    if log_samples:
        out["samples"] = samples
    return out


def _loglikelihood_task(lm: LM, name: str, reqs: list[list], cache, show) -> list[list]:
    """Per-document answers of a log-likelihood task, scored chunk by chunk (fixed document
    ranges, :func:`pyfast.eval.gen_cache.ll_chunks`); chunks in `cache` are reused, each newly
    scored chunk is appended to it at once."""
    sizes = [len(d) for d in reqs]
    flat = [r for d in reqs for r in d]
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + n)
    answers: list = [None] * len(flat)
    with show.bar(len(flat), f"{name} loglikelihood", "req") as bar:
        for c, (a, b) in enumerate(ll_chunks(sizes)):
            chunk = flat[starts[a] : starts[b]]
            key = request_key([list(r) for r in chunk])
            got = cache.get(c, key) if cache is not None else None
            if got is None:
                got = _sharded_loglikelihood(lm, chunk, sizes[a:b], bar.tokens_done)
                if cache is not None:
                    cache.append(c, key, got)
            else:
                bar.update(len(chunk))
            answers[starts[a] : starts[b]] = got
    return [answers[starts[d] : starts[d + 1]] for d in range(len(reqs))]


def _score_task(task, eval_split, docs, ctxs, answers, log_samples) -> tuple[dict, list]:
    """(results row of one task, its per-sample logs)."""
    per_metric: dict[str, list[float]] = {m: [] for m in task.metric_names()}
    logs = []
    for doc_id, (doc, ctx, ans) in enumerate(zip(docs, ctxs, answers, strict=True)):
        scores = task.score(doc, ans)
        for m, v in scores.items():
            per_metric.setdefault(m, []).append(v)
        if log_samples:
            logs.append({"doc_id": doc_id, **task.sample_log(doc, ctx, ans, scores)})
    res: dict = {"n": len(docs), "split": eval_split}
    if task.request_type == "loglikelihood":
        nan_docs = _nan_documents(answers)
        if nan_docs:  # a model that overflowed: its choices cannot be compared
            res["nan_documents"] = nan_docs
            warnings.warn(
                f"pyfast eval: {task.name}: {len(nan_docs)} of {len(docs)} documents have "
                f"NaN log-likelihoods (doc_id {', '.join(map(str, nan_docs[:10]))}"
                f"{', ...' if len(nan_docs) > 10 else ''}); their scores are meaningless",
                stacklevel=3,
            )
    for m, vals in per_metric.items():
        res[m], res[f"{m}_stderr"] = _summarise(vals)
    return res, logs


def _run_record(kw, names, prepared, lm, groups, results, store, task_info) -> dict:
    """The results.json record of the tasks finished so far (without timings and samples)."""
    out_groups = _aggregate_groups(groups, results)
    out = {
        "results": {**results, **out_groups},
        "groups": {g: groups[g] for g in out_groups},
        "config": {
            "tasks": names,
            "num_fewshot": kw["num_fewshot"] if kw["num_fewshot"] is not None else 0,
            "task_num_fewshot": {p[0].name: p[5] for p in prepared},
            "limit": kw["limit"],
            "batch_size": getattr(lm, "batch_size", kw["batch_size"]),
            "device": str(getattr(lm, "device", kw["device"])),
            "dtype": kw["dtype"] or "float32",
            "data_dir": str(kw["data_dir"]) if kw["data_dir"] else None,
            "split": kw["split"],
            "seed": kw["seed"],
            "max_length": getattr(lm, "max_length", kw["max_length"]),
            "world_size": _world()[1],
            "apply_chat_template": kw["apply_chat_template"],
            "gen_kwargs": kw["overrides"],
            "pack_weights": kw["pack_weights"],
        },
        "model": getattr(lm, "identity", {"spec": type(lm).__name__})
        if lm is not None
        else {"spec": None, "note": "no model loaded: scored completions given as files"},
        "data": {"sha256": dict(store.hashes)},
        "pyfast_version": pyfast.__version__,
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
        },
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if task_info:
        out["task_info"] = dict(task_info)
    return out


def _with_overrides(requests: list, overrides: dict, seed: int, doc_id: int) -> list:
    """Generation requests of one document with the --gen-kwargs overrides and, when sampling,
    a per-request seed (so results do not depend on batching, sharding or resuming)."""
    out = []
    for j, (ctx, kw) in enumerate(requests):
        kw = {**kw, **overrides}
        if normalize_gen_kwargs(kw).do_sample and "seed" not in kw:
            kw["seed"] = seed + 10000 * doc_id + j
        out.append((ctx, kw))
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
