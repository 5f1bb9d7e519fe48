"""MT-Bench (lm-sys/FastChat ``fastchat/llm_judge``): two-turn answers, single-answer grading.

Answers: each question's two turns go through the model's chat template, the first answer part
of the conversation for the second; temperature by category as FastChat's ``temperature_config``
(writing/roleplay 0.7, stem/humanities 0.1, extraction/math/coding/reasoning 0.0 = greedy), up
to 1024 new tokens, stripped. Grading: the ``single-v1`` judge prompt for turn 1 and
``single-v1-multi-turn`` for turn 2; math, reasoning and coding use ``single-math-v1`` /
``single-math-v1-multi-turn`` with the GPT-4 reference answers. The rating is parsed from
``[[x]]`` (fallback ``[x]``); -1 (unparseable) ratings are left out of the means and counted.

Data: ``<data-dir>/mt_bench/question.jsonl``, ``judge_prompts.jsonl`` and
``reference_answer/gpt-4.jsonl`` (FastChat's files). Answers and judgements are cached in
``<output>/mt_bench_answers.jsonl`` / ``mt_bench_judgements.jsonl`` (rewritten atomically after
each batch), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pyfast.eval import metrics
from pyfast.eval.data import DataStore
from pyfast.eval.judge import JudgeError, parse_rating
from pyfast.io import atomic_write, write_figure

CATEGORIES = (
    "writing",
    "roleplay",
    "reasoning",
    "math",
    "coding",
    "extraction",
    "stem",
    "humanities",
)
TEMPERATURE = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}
NEED_REF = ("math", "reasoning", "coding")
MAX_NEW_TOKENS = 1024
JUDGE_PROMPTS = ("single-v1", "single-v1-multi-turn", "single-math-v1", "single-math-v1-multi-turn")


def load(store: DataStore) -> tuple[list[dict], dict[str, dict], dict[int, list[str]]]:
    """(questions, judge prompts by name, reference turns by question id); validated."""
    if store.data_dir is None:
        raise ValueError(
            "mt_bench reads FastChat's llm_judge files: pass --data-dir DIR holding "
            "mt_bench/question.jsonl, mt_bench/judge_prompts.jsonl and "
            "mt_bench/reference_answer/gpt-4.jsonl"
        )
    base = store.data_dir / "mt_bench"
    questions = store.load({"name": "mt_bench"}, "question", "mt_bench")
    for i, q in enumerate(questions, 1):
        where = f"{base / 'question.jsonl'}:{i}"
        if not isinstance(q.get("question_id"), int):
            raise ValueError(f"{where}: missing or non-integer field 'question_id'")
        if q.get("category") not in TEMPERATURE:
            raise ValueError(
                f"{where}: category {q.get('category')!r} is not one of {', '.join(CATEGORIES)}"
            )
        turns = q.get("turns")
        if not (
            isinstance(turns, list) and len(turns) == 2 and all(isinstance(t, str) for t in turns)
        ):
            raise ValueError(f"{where}: field 'turns' must be a list of two strings")
    prompts = {}
    for i, row in enumerate(store.load({"name": "mt_bench"}, "judge_prompts", "mt_bench"), 1):
        for key in ("name", "system_prompt", "prompt_template"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"{base / 'judge_prompts.jsonl'}:{i}: missing field {key!r}")
        prompts[row["name"]] = row
    missing = [n for n in JUDGE_PROMPTS if n not in prompts]
    if missing:
        raise ValueError(f"{base / 'judge_prompts.jsonl'}: no judge prompt {', '.join(missing)}")
    refs: dict[int, list[str]] = {}
    if any(q["category"] in NEED_REF for q in questions):
        rows = store.load({"name": "mt_bench/reference_answer"}, "gpt-4", "mt_bench")
        for i, row in enumerate(rows, 1):
            try:
                refs[int(row["question_id"])] = list(row["choices"][0]["turns"])
            except (KeyError, IndexError, TypeError, ValueError):
                raise ValueError(
                    f"{base / 'reference_answer' / 'gpt-4.jsonl'}:{i}: expected question_id "
                    "and choices[0].turns"
                ) from None
    for q in questions:
        if q["category"] in NEED_REF and len(refs.get(q["question_id"], [])) < 2:
            raise ValueError(
                f"mt_bench question {q['question_id']} ({q['category']}) needs a two-turn "
                f"reference answer in {base / 'reference_answer' / 'gpt-4.jsonl'}"
            )
    return questions, prompts, refs


class Cache:
    """Records by key in a JSONL file, rewritten whole and atomically on every update."""

    def __init__(self, path: Path, owner_key: str, owner):
        self.path, self.owner_key, self.owner = path, owner_key, owner
        self.rows: dict[str, dict] = {}
        if path.is_file():
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    key = row["key"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{path}:{lineno}: malformed cache row") from None
                if row.get(owner_key) != owner:
                    raise ValueError(
                        f"{path}:{lineno}: cached by {owner_key} {row.get(owner_key)!r}, not "
                        f"{owner!r}; use another --output folder or delete the file"
                    )
                self.rows[key] = row

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def put_many(self, rows: list[dict]) -> None:
        for row in rows:
            self.rows[row["key"]] = {**row, self.owner_key: self.owner}

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in self.rows.values():
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")

        atomic_write(self.path, write)


def _gen_kwargs(category: str, max_new_tokens: int, seed: int) -> dict:
    temp = TEMPERATURE[category]
    if temp < 1e-4:  # FastChat: do_sample only above 1e-4
        return {"until": [], "max_gen_toks": max_new_tokens, "do_sample": False}
    return {
        "until": [],
        "max_gen_toks": max_new_tokens,
        "do_sample": True,
        "temperature": temp,
        "seed": seed,
    }


def generate_answers(
    lm,
    questions: list[dict],
    cache: Cache,
    *,
    max_new_tokens: int,
    seed: int,
    batch: int | None = None,
    overrides: dict | None = None,
    progress: bool = False,
) -> dict[int, list[str]]:
    """Both turns of every question not yet in `cache`, `batch` questions (default: the LM's
    batch size) per generate_until call per turn: every category in the same batch, each row on
    its own temperature and stopping at EOS or its max new tokens (continuous batching, see
    :meth:`pyfast.eval.HFLM.generate_until`); answers cached after each chunk.

    `overrides` (``--gen-kwargs``) replace generation settings of every request.
    """
    from pyfast.eval.progress import Progress

    batch = batch or max(8, int(getattr(lm, "batch_size", 8)))
    todo = [q for q in questions if cache.get(str(q["question_id"])) is None]
    with Progress(progress).bar(2 * len(todo), "mt_bench answers", "turn") as bar:
        for start in range(0, len(todo), batch):
            _answer_chunk(lm, todo[start : start + batch], cache, max_new_tokens, seed, overrides)
            bar.update(2 * len(todo[start : start + batch]))
    return {q["question_id"]: cache.get(str(q["question_id"]))["answers"] for q in questions}


def _answer_chunk(lm, chunk, cache, max_new_tokens, seed, overrides) -> None:
    """Both turns of the questions of `chunk` (one generate_until call per turn), cached."""
    convs: list[list[dict]] = [[] for _ in chunk]
    for turn in range(2):
        requests = []
        for q, conv in zip(chunk, convs, strict=True):
            conv.append({"role": "user", "content": q["turns"][turn]})
            kw = _gen_kwargs(q["category"], max_new_tokens, seed + 2 * q["question_id"] + turn)
            requests.append((lm.apply_chat_template(conv), {**kw, **(overrides or {})}))
        outs = lm.generate_until(requests)
        for conv, text in zip(convs, outs, strict=True):
            conv.append({"role": "assistant", "content": text.strip()})
    cache.put_many(
        [
            {
                "key": str(q["question_id"]),
                "question_id": q["question_id"],
                "category": q["category"],
                "answers": [conv[1]["content"], conv[3]["content"]],
            }
            for q, conv in zip(chunk, convs, strict=True)
        ]
    )


def judge_prompt(
    q: dict, answers: list[str], turn: int, prompts: dict, refs: dict
) -> tuple[str, str, str]:
    """(prompt name, system prompt, user prompt) for judging `turn` (1 or 2) of `q`."""
    ref = q["category"] in NEED_REF
    name = ("single-math-v1" if ref else "single-v1") + ("-multi-turn" if turn == 2 else "")
    if turn == 1:
        kw = {"question": q["turns"][0], "answer": answers[0]}
        if ref:
            kw["ref_answer_1"] = refs[q["question_id"]][0]
    else:
        kw = {
            "question_1": q["turns"][0],
            "question_2": q["turns"][1],
            "answer_1": answers[0],
            "answer_2": answers[1],
        }
        if ref:
            kw["ref_answer_1"], kw["ref_answer_2"] = refs[q["question_id"]][:2]
    tpl = prompts[name]
    return name, tpl["system_prompt"], tpl["prompt_template"].format(**kw)


def judge_answers(
    judge,
    pairs: list[tuple[dict, int]],
    answers: dict,
    prompts: dict,
    refs: dict,
    cache: Cache,
    progress: bool = False,
) -> dict[tuple[int, int], dict]:
    """Judgement record per (question, turn) pair; failures are rated -1 and not cached."""
    from pyfast.eval.progress import Progress

    out = {}
    with Progress(progress).bar(len(pairs), "mt_bench judging", "turn") as bar:
        for q, turn in pairs:
            out[(q["question_id"], turn)] = _judge_one(
                judge, q, turn, answers, prompts, refs, cache
            )
            bar.update(1)
    return out


def _judge_one(judge, q, turn, answers, prompts, refs, cache) -> dict:
    """Judgement record of one (question, turn); from `cache` where it is there."""
    key = f"{q['question_id']}:{turn}"
    row = cache.get(key)
    if row is None:
        name, system, user = judge_prompt(q, answers[q["question_id"]], turn, prompts, refs)
        try:
            text, error = judge.complete(system, user), None
        except JudgeError as exc:
            text, error = "$ERROR$", str(exc)
        row = {
            "key": key,
            "question_id": q["question_id"],
            "turn": turn,
            "category": q["category"],
            "prompt": name,
            "judgement": text,
            "rating": parse_rating(text) if error is None else -1.0,
            "error": error,
        }
        if error is None:
            cache.put_many([row])
    return row


def _summary(ratings: list[float]) -> tuple[float | None, float | None]:
    if not ratings:
        return None, None
    return sum(ratings) / len(ratings), metrics.mean_stderr(ratings)


def summarise(questions: list[dict], judgements: dict) -> tuple[dict, dict]:
    """(results: mt_bench + mt_bench_<category> rows, counts of unparseable/failed judgements)."""

    def row(qs: list[dict]) -> dict:
        valid = {t: [] for t in (1, 2)}
        for q in qs:
            for t in (1, 2):
                r = judgements[(q["question_id"], t)]["rating"]
                if r != -1:
                    valid[t].append(r)
        out: dict = {"n": len(qs)}
        for name, vals in (
            ("score", valid[1] + valid[2]),
            ("turn1", valid[1]),
            ("turn2", valid[2]),
        ):
            out[name], out[f"{name}_stderr"] = _summary(vals)
        return out

    results = {"mt_bench": row(questions)}
    for cat in CATEGORIES:
        qs = [q for q in questions if q["category"] == cat]
        if qs:
            results[f"mt_bench_{cat}"] = row(qs)
    rows = judgements.values()
    counts = {
        "judgements": len(judgements),
        "unparseable": sum(1 for j in rows if j["rating"] == -1 and j.get("error") is None),
        "judge_errors": sum(1 for j in rows if j.get("error") is not None),
    }
    return results, counts


def radar_chart(scores: dict[str, float], path: Path, title: str) -> Path:
    """Mean rating (0-10) per category on a radar chart, saved as PNG atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cats = [c for c in CATEGORIES if scores.get(c) is not None]
    if not cats:
        raise ValueError("mt_bench: no category has a parseable rating to plot")
    values = [float(scores[c]) for c in cats]
    angles = np.linspace(0, 2 * np.pi, len(cats), endpoint=False).tolist()
    fig = plt.figure(figsize=(5, 5))
    ax = fig.add_subplot(111, polar=True)
    ax.plot(angles + angles[:1], values + values[:1], color="#4C72B0", linewidth=2)
    ax.fill(angles + angles[:1], values + values[:1], color="#4C72B0", alpha=0.25)
    ax.set_xticks(angles, cats, fontsize=9)
    ax.set_ylim(0, 10)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return write_figure(path, fig, dpi=120)


def answer_and_judge(
    lm,
    judge,
    pairs: list[tuple[dict, int]],
    prompts,
    refs,
    output,
    *,
    max_new_tokens,
    seed,
    overrides: dict | None = None,
    progress: bool = False,
) -> tuple[dict, dict, dict]:
    """Answers of the pairs' questions and judgements of the pairs, both cached in `output`.

    Returns (answers by question id, judgement by (question id, turn), timings).
    """
    output = Path(output)
    questions = list({q["question_id"]: q for q, _ in pairs}.values())
    model_id = getattr(lm, "identity", {}).get("spec")
    t0 = time.perf_counter()
    answer_cache = Cache(output / "mt_bench_answers.jsonl", "model", model_id)
    answers = generate_answers(
        lm,
        questions,
        answer_cache,
        max_new_tokens=max_new_tokens,
        seed=seed,
        overrides=overrides,
        progress=progress,
    )
    t1 = time.perf_counter()
    judge_cache = Cache(output / "mt_bench_judgements.jsonl", "judge", judge.identity)
    judgements = judge_answers(judge, pairs, answers, prompts, refs, judge_cache, progress)
    timings = {"answer_s": round(t1 - t0, 3), "judge_s": round(time.perf_counter() - t1, 3)}
    return answers, judgements, timings


def run(
    lm,
    judge,
    *,
    data_dir,
    output,
    limit: int | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    seed: int = 1234,
) -> dict:
    """Answers (cached), judgements (cached), summary. Returns results, counts, samples, timings.

    Raises ValueError for a missing --output/--data-dir, malformed data or a cache made by another
    model or judge.
    """
    if output is None:
        raise ValueError(
            "mt_bench needs --output DIR: answers and judgements are cached there so an "
            "interrupted run resumes"
        )
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    output = Path(output)
    store = DataStore(data_dir)
    questions, prompts, refs = load(store)
    questions = questions[:limit] if limit else questions
    pairs = [(q, t) for q in questions for t in (1, 2)]
    answers, judgements, timings = answer_and_judge(
        lm, judge, pairs, prompts, refs, output, max_new_tokens=max_new_tokens, seed=seed
    )
    results, counts = summarise(questions, judgements)
    samples = []
    for doc_id, q in enumerate(questions):
        js = [judgements[(q["question_id"], t)] for t in (1, 2)]
        samples.append(
            {
                "doc_id": doc_id,
                "question_id": q["question_id"],
                "category": q["category"],
                "turns": q["turns"],
                "answers": answers[q["question_id"]],
                "judge_prompts": [j["prompt"] for j in js],
                "judgements": [j["judgement"] for j in js],
                "ratings": [j["rating"] for j in js],
            }
        )
    return {
        "results": results,
        "counts": counts,
        "judge": judge.identity,
        "samples": samples,
        "data": dict(store.hashes),
        "timings": timings,
    }
