"""Task kinds, and the multiple-choice kind.

A task turns documents into prompts (with few-shot examples), prompts into requests to the LM,
and the LM's answers into per-document metrics. Every task YAML entry under
``pyfast/eval/tasks/`` names its ``kind`` (default ``multiple_choice``); the kind is a class
registered with :func:`register_kind` and built as ``cls(name=..., **yaml_fields)``.

Adding a task kind (e.g. code execution, judged chat):

1. write a class (a dataclass is easiest) with the attributes and methods of :class:`TaskKind`
   below and decorate it with ``@register_kind("my_kind")``;
2. add its module to :data:`KIND_MODULES` so the registry imports it before reading the YAMLs;
3. add a YAML file (or entries) under ``pyfast/eval/tasks/`` with ``kind: my_kind``.

:func:`pyfast.eval.evaluate` then runs it like any other task: it loads the documents
(``docs``), builds the contexts (``contexts``), sends ``requests(doc, context)`` to
``lm.loglikelihood`` or ``lm.generate_until`` (by ``request_type``; generation requests are
cached per document for ``--resume`` and sharded under torchrun), and aggregates the dicts of
``score(doc, answers)`` into mean and stderr per metric. A kind whose later requests depend on
earlier answers (multi-turn chat) defines ``answer_docs(lm, docs, contexts, gen_overrides)``
returning the answers of every document itself, and the evaluator calls that instead.

Multiple-choice prompts are built as lm-evaluation-harness 0.4.x builds them in plain-text mode:
``description + sum(shot_text + " " + shot_answer + "\\n\\n") + text``, one request per choice
``(context, " " + choice)``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pyfast.eval import metrics
from pyfast.eval.data import DataStore
from pyfast.eval.tasks.processors import PROCESSORS

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"

# Modules that define task kinds; the registry imports them before reading the task YAMLs.
KIND_MODULES = ["pyfast.eval.task", "pyfast.eval.gen_task", "pyfast.eval.bench_tasks"]
KINDS: dict[str, type] = {}


def register_kind(name: str) -> Callable[[type], type]:
    """Class decorator: makes `cls` the implementation of ``kind: name`` in task YAMLs."""

    def deco(cls: type) -> type:
        cls.kind = name
        KINDS[name] = cls
        return cls

    return deco


class TaskKind(Protocol):
    """What the evaluator needs from a task (see the module docstring)."""

    name: str
    data: dict  # name, hf_path, hf_config, split, fewshot_split, fields (see data.py)
    groups: list[str]
    subject: str | None
    num_fewshot: int  # default shots when --num-fewshot is not given
    request_type: ClassVar[str]  # "loglikelihood" or "generate_until"
    needs_fewshot_pool: ClassVar[bool]  # whether contexts() needs the fewshot_split's docs

    def docs(self, store: DataStore, split: str) -> list[dict]: ...

    def contexts(
        self,
        docs: list[dict],
        pool: list[dict],
        num_fewshot: int,
        seed: int,
        same_split: bool,
        chat: Callable[[list[dict]], str] | None = None,
    ) -> list[str]: ...

    def requests(self, doc: dict, context: str) -> list[tuple]: ...

    def metric_names(self) -> list[str]: ...

    def score(self, doc: dict, answers: list) -> dict[str, float]: ...

    def sample_log(
        self, doc: dict, context: str, answers: list, scores: dict
    ) -> dict[str, Any]: ...


def sample_fewshot(
    pool: list[dict], docs: list[dict], n: int, seed: int, same_split: bool, sampler: str
) -> list[list[dict]]:
    """The few-shot examples of each doc, drawn like lm-eval 0.4.x's samplers.

    random: one ``random.Random(seed)`` per task, ``sample(pool, n)`` per document in order
    (n + 1 then dropping the document itself when the pool is the evaluated split);
    first_n: the first n of the pool (excluding the document itself).
    """
    if n and n > len(pool) - int(same_split):
        raise ValueError(f"--num-fewshot {n} exceeds the {len(pool)} few-shot examples available")
    rnd = random.Random(seed)
    out = []
    for doc in docs:
        if n == 0:
            out.append([])
        elif sampler == "first_n":
            out.append([d for d in pool if not (same_split and d == doc)][:n])
        elif same_split:
            out.append([d for d in rnd.sample(pool, n + 1) if d != doc][:n])
        else:
            out.append(rnd.sample(pool, n))
    return out


def format_prompt(task: str, template: str, doc: dict) -> str:
    """``template.format(**doc)``; a missing field raises ValueError naming task and field."""
    try:
        return template.format(**doc)
    except (KeyError, IndexError) as exc:
        raise ValueError(f"task {task}: prompt needs field {exc} missing in a row") from None


def process_rows(task: str, split: str, rows: list[dict], process: str) -> list[dict]:
    """Rows through the doc processor `process`; a bad row raises ValueError naming task,
    split and row number."""
    fn, out = PROCESSORS[process], []
    for i, row in enumerate(rows):
        try:
            out.append(fn(row))
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"task {task}: {split} row {i + 1}: {exc}") from None
    return out


@register_kind("multiple_choice")
@dataclass
class Task:
    """A multiple-choice task (see pyfast/eval/tasks/multiple_choice.yaml for the fields)."""

    kind: ClassVar[str]
    request_type: ClassVar[str] = "loglikelihood"
    needs_fewshot_pool: ClassVar[bool] = True

    name: str
    data: dict
    process: str
    text: str
    metrics: list[str]
    fewshot: str = "random"
    description: str = ""
    subject: str | None = None  # MMLU: rows of a shared file that belong to this task
    groups: list[str] = field(default_factory=list)
    num_fewshot: int = 0

    def _format(self, template: str, doc: dict) -> str:
        return format_prompt(self.name, template, doc)

    def docs(self, store: DataStore, split: str) -> list[dict]:
        """Processed rows of `split` (only this subject's rows for MMLU subjects)."""
        rows = store.load(self.data, split, self.name)
        if self.subject is not None:
            rows = [r for r in rows if r.get("subject", self.subject) == self.subject]
        return process_rows(self.name, split, rows, self.process)

    def contexts(
        self,
        docs: list[dict],
        pool: list[dict],
        num_fewshot: int,
        seed: int,
        same_split: bool,
        chat: Callable[[list[dict]], str] | None = None,
    ) -> list[str]:
        """The context string of each doc, few-shot examples from :func:`sample_fewshot`."""
        if chat is not None:
            raise ValueError(
                f"task {self.name}: --apply-chat-template is supported for generation tasks only"
            )
        try:
            all_shots = sample_fewshot(pool, docs, num_fewshot, seed, same_split, self.fewshot)
        except ValueError as exc:
            raise ValueError(f"task {self.name}: {exc}") from None
        out = []
        for doc, shots in zip(docs, all_shots, strict=True):
            ctx = self._format(self.description, doc) if self.description else ""
            for s in shots:
                answer = s["choices"][s["gold"]]
                ctx += self._format(self.text, s) + TARGET_DELIMITER + answer + FEWSHOT_DELIMITER
            out.append(ctx + self._format(self.text, doc))
        return out

    def requests(self, doc: dict, context: str) -> list[tuple[str, str]]:
        return [(context, TARGET_DELIMITER + c) for c in doc["choices"]]

    def score(self, doc: dict, answers: list) -> dict[str, float]:
        """Per-document metric values from the per-choice (log-likelihood, is_greedy)."""
        lls = [a[0] if isinstance(a, (tuple, list)) else a for a in answers]
        out = {}
        if "acc" in self.metrics or "acc_norm" in self.metrics:
            mc = metrics.multiple_choice(lls, doc["choices"], doc["gold"])
            out.update({k: v for k, v in mc.items() if k in self.metrics})
        if "mc2" in self.metrics:
            out["mc2"] = metrics.mc2(lls, doc["labels"])
        return out

    def prediction(self, lls: list[float]) -> int:
        return max(range(len(lls)), key=lambda i: (lls[i], -i))

    def metric_names(self) -> list[str]:
        return list(self.metrics)

    def sample_log(self, doc: dict, context: str, answers: list, scores: dict) -> dict:
        lls = [a[0] for a in answers]
        return {
            "context": context,
            "choices": doc["choices"],
            "loglikelihoods": lls,
            "is_greedy": [bool(a[1]) for a in answers],
            "gold": doc["labels"] if "labels" in doc else doc["gold"],
            "prediction": self.prediction(lls),
            **scores,
        }
