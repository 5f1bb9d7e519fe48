"""Task kinds ``humaneval`` (code execution) and ``mt_bench`` (judged chat) for the evaluator.

Both drive the LM themselves (``answer_docs``) and take run options through ``configure``
(called by :func:`pyfast.eval.evaluate` with its ``task_options`` before any model loads):

- humaneval: ``allow_code_execution`` (refused without it), ``num_samples`` (1 = greedy pass@1;
  N > 1 = sampled, pass@k for k in 1, 10, 100 up to N), ``completions`` (score a JSONL of
  ``task_id``/``completion`` rows instead of generating: no model is loaded),
  ``sandbox_limits``, ``sandbox`` (strict | namespaces | weak, default strict), ``seed``.
  Documents are the problems.
- mt_bench: ``judge`` (openai:MODEL@BASE_URL or hf:MODEL), ``judge_key_env``,
  ``judge_max_tokens``, ``output`` (the answer/judgement cache), ``judge_loader``, ``seed``.
  Documents are (question, turn) pairs, so the evaluator's means over documents are exactly
  FastChat's: ``score`` over every parseable rating, ``turn1``/``turn2``, and one metric per
  category (both turns); ``unparseable`` is the fraction of judgements without a rating.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pyfast.eval import humaneval, mt_bench
from pyfast.eval.data import DataStore
from pyfast.eval.judge import make_judge, parse_judge_spec
from pyfast.eval.sandbox import MODES, Limits, check_mode
from pyfast.eval.task import register_kind


@register_kind("humaneval")
@dataclass
class HumanEvalTask:
    kind: ClassVar[str]
    request_type: ClassVar[str] = "generate_until"
    needs_fewshot_pool: ClassVar[bool] = False

    name: str
    data: dict
    metrics: list[str] = field(default_factory=lambda: ["pass@1", "pass@10", "pass@100"])
    num_fewshot: int = 0
    subject: str | None = None
    groups: list[str] = field(default_factory=list)
    num_samples: int = 1
    completions: str | None = None
    limits: Limits | None = None
    seed: int = 1234
    workers: int = 2
    sandbox: str = "strict"
    info: dict = field(default_factory=dict)
    _ks: list[int] = field(default_factory=lambda: [1])

    @property
    def needs_lm(self) -> bool:
        return self.completions is None

    def configure(self, options: dict) -> HumanEvalTask:
        if not options.get("allow_code_execution"):
            raise ValueError(humaneval.REFUSAL)
        n = options.get("num_samples") or 1
        if n < 1:
            raise ValueError(f"--num-samples must be >= 1, got {n}")
        return dataclasses.replace(
            self,
            num_samples=n,
            completions=options.get("completions"),
            limits=options.get("sandbox_limits"),
            sandbox=check_mode(options.get("sandbox") or "strict"),
            seed=options.get("seed", 1234),
            info={},
        )

    def docs(self, store: DataStore, split: str) -> list[dict]:
        rows = store.load(self.data, split, self.name)
        for i, row in enumerate(rows, 1):
            for key in self.data["fields"]:
                if not isinstance(row[key], str):
                    raise ValueError(f"task {self.name}: {split} row {i}: {key!r} is not a string")
        return rows

    def contexts(self, docs, pool, num_fewshot, seed, same_split, chat=None) -> list[str]:
        if num_fewshot:
            raise ValueError(f"task {self.name} is zero-shot; drop --num-fewshot")
        if chat is not None:
            raise ValueError(
                f"task {self.name} completes code prompts as lm-eval does; drop "
                "--apply-chat-template"
            )
        return [d["prompt"] for d in docs]

    def requests(self, doc: dict, context: str) -> list[tuple[str, dict]]:
        return humaneval.generation_requests([doc], self.num_samples, self.seed)

    def answer_docs(self, lm, docs: list[dict], contexts: list[str], overrides: dict) -> list:
        """Completions (generated or from the file) run in the sandbox, per problem."""
        if self.completions is not None:
            comps = humaneval.read_completions(self.completions, docs)
        else:
            flat = []
            for d, doc in enumerate(docs):
                for j, (ctx, kw) in enumerate(self.requests(doc, contexts[d])):
                    kw = {**kw, **overrides}
                    if kw.get("do_sample"):
                        kw["seed"] = self.seed + 10000 * d + j
                    flat.append((ctx, kw))
            texts = iter(lm.generate_until(flat))
            comps = {
                doc["task_id"]: [humaneval.truncate(next(texts)) for _ in range(self.num_samples)]
                for doc in docs
            }
        _, samples, execution = humaneval.score(
            docs,
            comps,
            allow_code_execution=True,
            limits=self.limits,
            workers=self.workers,
            sandbox=self.sandbox,
        )
        print(f"humaneval: sandbox mode {self.sandbox} ({_layers(execution['sandbox'])})",
              file=sys.stderr)  # fmt: skip
        self._ks = [k for k in humaneval.PASS_AT_K if k <= execution["num_samples"]]
        self.info = {**execution, "completions_file": self.completions}
        return [
            [
                {"completion": c, "status": st, "error": e, "sandbox": m}
                for c, st, e, m in zip(
                    s["completions"], s["status"], s["error"], s["sandbox"], strict=True
                )
            ]
            for s in samples
        ]

    def metric_names(self) -> list[str]:
        return [f"pass@{k}" for k in self._ks]

    def score(self, doc: dict, answers: list) -> dict[str, float]:
        n, c = len(answers), sum(a["status"] == "passed" for a in answers)
        return {f"pass@{k}": humaneval.pass_at_k(n, c, k) for k in self._ks}

    def sample_log(self, doc: dict, context: str, answers: list, scores: dict) -> dict[str, Any]:
        return {
            "task_id": doc["task_id"],
            "context": context,
            "completions": [a["completion"] for a in answers],
            "status": [a["status"] for a in answers],
            "error": [a["error"] for a in answers],
            "sandbox": [a["sandbox"] for a in answers],
            **scores,
        }

    def run_info(self) -> dict:
        return self.info


def _layers(facts: dict) -> str:
    seccomp = str(facts.get("seccomp", "?")).split(":")[0]
    return (
        f"identity: {facts.get('identity', '?')}; seccomp {seccomp}; "
        f"cgroup {facts.get('limits', {}).get('cgroup', '?')}"
    )


@register_kind("mt_bench")
@dataclass
class MTBenchTask:
    kind: ClassVar[str]
    request_type: ClassVar[str] = "generate_until"
    needs_fewshot_pool: ClassVar[bool] = False
    needs_lm: ClassVar[bool] = True

    name: str
    data: dict
    metrics: list[str] = field(
        default_factory=lambda: ["score", "turn1", "turn2", *mt_bench.CATEGORIES, "unparseable"]
    )
    num_fewshot: int = 0
    subject: str | None = None
    groups: list[str] = field(default_factory=list)
    judge: str | None = None
    judge_key_env: str | None = None
    judge_max_tokens: int = 2048
    judge_loader: Any = None
    output: str | None = None
    seed: int = 1234
    max_new_tokens: int = mt_bench.MAX_NEW_TOKENS
    progress: bool = False
    info: dict = field(default_factory=dict)
    _prompts: dict = field(default_factory=dict)
    _refs: dict = field(default_factory=dict)
    _metrics: list[str] = field(default_factory=list)

    def configure(self, options: dict) -> MTBenchTask:
        judge = options.get("judge")
        if not judge:
            raise ValueError(
                f"task {self.name} needs a judge: --judge openai:MODEL@BASE_URL or --judge hf:MODEL"
            )
        parse_judge_spec(judge)
        if not options.get("output"):
            raise ValueError(
                f"task {self.name} needs --output DIR: answers and judgements are cached there "
                "so an interrupted run resumes"
            )
        return dataclasses.replace(
            self,
            judge=judge,
            judge_key_env=options.get("judge_key_env"),
            judge_max_tokens=options.get("judge_max_tokens") or 2048,
            judge_loader=options.get("judge_loader"),
            output=str(options["output"]),
            seed=options.get("seed", 1234),
            progress=bool(options.get("progress")),
            info={},
        )

    def docs(self, store: DataStore, split: str) -> list[dict]:
        questions, self._prompts, self._refs = mt_bench.load(store)
        return [{"question": q, "turn": t} for q in questions for t in (1, 2)]

    def contexts(self, docs, pool, num_fewshot, seed, same_split, chat=None) -> list[str]:
        if num_fewshot:
            raise ValueError(f"task {self.name} is zero-shot; drop --num-fewshot")
        return [d["question"]["turns"][d["turn"] - 1] for d in docs]

    def requests(self, doc: dict, context: str) -> list[tuple[str, dict]]:
        q = doc["question"]
        return [(context, mt_bench._gen_kwargs(q["category"], self.max_new_tokens, self.seed))]

    def answer_docs(self, lm, docs: list[dict], contexts: list[str], overrides: dict) -> list:
        try:
            lm.apply_chat_template([{"role": "user", "content": "?"}])
        except (ValueError, NotImplementedError) as exc:
            raise ValueError(f"task {self.name} answers through a chat template: {exc}") from None
        judge = make_judge(
            self.judge,
            key_env=self.judge_key_env,
            load_lm=self.judge_loader,
            max_tokens=self.judge_max_tokens,
        )
        pairs = [(d["question"], d["turn"]) for d in docs]
        answers, js, timings = mt_bench.answer_and_judge(
            lm,
            judge,
            pairs,
            self._prompts,
            self._refs,
            self.output,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
            overrides=overrides,
            progress=self.progress,
        )
        records = [
            [{**js[(q["question_id"], t)], "answers": answers[q["question_id"]]}] for q, t in pairs
        ]
        scored = [self.score(d, r) for d, r in zip(docs, records, strict=True)]
        order = ["score", "turn1", "turn2", *mt_bench.CATEGORIES, "unparseable"]
        self._metrics = [m for m in order if any(m in s for s in scored)]
        rows = [r[0] for r in records]
        self.info = {
            "judge": judge.identity,
            "judgements": len(rows),
            "unparseable": sum(1 for r in rows if r["rating"] == -1 and r["error"] is None),
            "judge_errors": sum(1 for r in rows if r["error"] is not None),
            "timings": timings,
        }
        return records

    def metric_names(self) -> list[str]:
        return list(self._metrics)

    def score(self, doc: dict, answers: list) -> dict[str, float]:
        r = answers[0]
        out = {"unparseable": float(r["rating"] == -1 and r["error"] is None)}
        if r["rating"] != -1:
            out["score"] = out[f"turn{doc['turn']}"] = r["rating"]
            out[doc["question"]["category"]] = r["rating"]
        return out

    def sample_log(self, doc: dict, context: str, answers: list, scores: dict) -> dict[str, Any]:
        r, q = answers[0], doc["question"]
        return {
            "question_id": q["question_id"],
            "category": q["category"],
            "turn": doc["turn"],
            "turns": q["turns"],
            "answers": r["answers"],
            "judge_prompt": r["prompt"],
            "judgement": r["judgement"],
            "rating": r["rating"],
            "error": r["error"],
            **scores,
        }

    def run_info(self) -> dict:
        return self.info


def add_arguments(p) -> None:
    """The `pyfast eval` options of these kinds."""
    p.add_argument(
        "--allow-code-execution",
        action="store_true",
        help="humaneval: run model-written programs (in pyfast's sandbox)",
    )
    p.add_argument(
        "--sandbox",
        choices=MODES,
        default="strict",
        help="humaneval: strict (default: every layer or the run is refused), namespaces (no "
        "seccomp / host-root identity accepted), weak (Python audit hook only, not a boundary)",
    )
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="humaneval: samples per problem (1 = greedy pass@1; N > 1 sampled, pass@k, k <= N)",
    )
    p.add_argument(
        "--completions",
        default=None,
        help="humaneval: score this JSONL of task_id/completion rows; no model is loaded",
    )
    p.add_argument(
        "--judge",
        default=None,
        help="mt_bench: openai:MODEL@BASE_URL or hf:MODEL (e.g. hf:default)",
    )
    p.add_argument(
        "--judge-key-env",
        default=None,
        help="mt_bench: environment variable holding the judge API key (default OPENAI_API_KEY)",
    )
    p.add_argument(
        "--judge-max-tokens", type=int, default=2048, help="mt_bench: judge reply length (2048)"
    )


def options_from_args(args) -> dict:
    """task_options for :func:`pyfast.eval.evaluate` from the parsed `pyfast eval` arguments."""
    if args.num_samples is not None and args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.judge_max_tokens < 1:
        raise ValueError(f"--judge-max-tokens must be >= 1, got {args.judge_max_tokens}")

    def judge_loader(spec: str):
        from pyfast.eval.model import HFLM

        return HFLM(spec, batch_size=args.batch_size, device=args.device, dtype=args.dtype)

    return {
        "allow_code_execution": args.allow_code_execution,
        "sandbox": args.sandbox,
        "num_samples": args.num_samples,
        "completions": args.completions,
        "judge": args.judge,
        "judge_key_env": args.judge_key_env,
        "judge_max_tokens": args.judge_max_tokens,
        "judge_loader": judge_loader,
    }
