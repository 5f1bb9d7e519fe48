"""The generative task kind (``kind: generate_until``): prompt -> generated text -> filters ->
metrics, as lm-evaluation-harness 0.4.x's ``output_type: generate_until`` tasks work.

YAML fields (see pyfast/eval/tasks/generation.yaml):

- ``data``, ``process``, ``description``, ``fewshot`` (random | first_n), ``num_fewshot`` (the
  default shots) as for multiple-choice tasks;
- ``text``: the prompt of a document, ``target``: its answer (both ``str.format`` templates over
  the processed document); few-shot examples are ``text + " " + target + "\\n\\n"``;
- ``fewshot_samples``: fixed few-shot documents (lm-eval's ``fewshot_config.samples``) used
  instead of the ``fewshot_split``;
- ``generation_kwargs``: ``until``, ``max_gen_toks``, ``do_sample``, ``temperature``, ...
  (:mod:`pyfast.eval.generation`);
- ``filters``: ``{name: [steps]}``, each a pipeline applied to the generation; steps are
  ``{function: regex, regex_pattern, group_select (0), fallback ("[invalid]")}`` and
  ``{function: take_first}`` (one generation per document, so it keeps it);
- ``metrics``: metric names; ``exact_match`` (options in ``exact_match:``, compared with the
  target after each filter and reported as ``exact_match,<filter>``) or the names returned by
  a ``scorer`` (a function of :data:`SCORERS`, e.g. TruthfulQA's BLEU/ROUGE).

With a chat template (``--apply-chat-template``) the prompt is a conversation, like lm-eval's
``--apply_chat_template --fewshot_as_multiturn``: the description as the system message, each
few-shot example as a user turn (text) and an assistant turn (target), the document as the last
user turn, then the assistant header.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from pyfast.eval import metrics
from pyfast.eval.data import DataStore
from pyfast.eval.generation import normalize_gen_kwargs
from pyfast.eval.task import (
    FEWSHOT_DELIMITER,
    TARGET_DELIMITER,
    format_prompt,
    process_rows,
    register_kind,
    sample_fewshot,
)
from pyfast.eval.tasks.processors import PROCESSORS


def _truthfulqa_scorer(doc: dict, completion: str) -> dict[str, float]:
    return metrics.truthfulqa_gen(completion, doc["correct_answers"], doc["incorrect_answers"])


SCORERS: dict[str, Callable[[dict, str], dict[str, float]]] = {"truthfulqa_gen": _truthfulqa_scorer}
_EXACT_MATCH_OPTIONS = {"ignore_case", "ignore_punctuation", "ignore_numbers", "regexes_to_ignore"}


class _Regex:
    """lm-eval's regex filter: ``findall``; the match at `group_select`; for several groups the
    first non-empty one; stripped; `fallback` when nothing matches."""

    def __init__(self, regex_pattern: str, group_select: int = 0, fallback: str = "[invalid]"):
        self.regex = re.compile(regex_pattern)
        self.group_select = int(group_select)
        self.fallback = fallback

    def __call__(self, texts: list[str]) -> list[str]:
        out = []
        for text in texts:
            found = self.regex.findall(text if isinstance(text, str) else "")
            if not found:
                out.append(self.fallback)
                continue
            match = found[self.group_select]
            if isinstance(match, tuple):
                match = next((m for m in match if m), self.fallback)
            out.append(match.strip())
        return out


def _take_first(texts: list[str]) -> list[str]:
    return texts[:1]


def _build_filter(task: str, name: str, steps) -> list[Callable[[list[str]], list[str]]]:
    if not isinstance(steps, list) or not steps:
        raise ValueError(f"task {task}: filter {name!r} must be a non-empty list of steps")
    out = []
    for step in steps:
        step = {"function": step} if isinstance(step, str) else dict(step)
        fn = step.pop("function", None)
        try:
            if fn == "regex":
                out.append(_Regex(**step))
            elif fn == "take_first" and not step:
                out.append(_take_first)
            else:
                raise ValueError(f"unknown step {fn!r} (known: regex, take_first)")
        except (TypeError, re.error, ValueError) as exc:
            raise ValueError(f"task {task}: filter {name!r}: {exc}") from None
    return out


@register_kind("generate_until")
@dataclass
class GenerateTask:
    """A generative task (fields in the module docstring)."""

    kind: ClassVar[str]
    request_type: ClassVar[str] = "generate_until"

    name: str
    data: dict
    text: str
    target: str
    metrics: list[str]
    generation_kwargs: dict = field(default_factory=dict)
    process: str | None = None
    description: str = ""
    fewshot: str = "random"
    fewshot_samples: list[dict] | None = None
    num_fewshot: int = 0
    filters: dict | None = None
    exact_match: dict = field(default_factory=dict)
    scorer: str | None = None
    subject: str | None = None
    groups: list[str] = field(default_factory=list)

    def __post_init__(self):
        normalize_gen_kwargs(self.generation_kwargs)  # a bad YAML fails at registry load
        if self.process is not None and self.process not in PROCESSORS:
            raise ValueError(f"task {self.name}: unknown processor {self.process!r}")
        bad = set(self.exact_match) - _EXACT_MATCH_OPTIONS
        if bad:
            raise ValueError(f"task {self.name}: unknown exact_match option(s) {sorted(bad)}")
        if self.scorer is not None and self.scorer not in SCORERS:
            raise ValueError(f"task {self.name}: unknown scorer {self.scorer!r}")
        self._filters = {
            name: _build_filter(self.name, name, steps)
            for name, steps in (self.filters or {"none": ["take_first"]}).items()
        }

    @property
    def needs_fewshot_pool(self) -> bool:
        return self.fewshot_samples is None

    def _format(self, template: str, doc: dict) -> str:
        return format_prompt(self.name, template, doc)

    def docs(self, store: DataStore, split: str) -> list[dict]:
        rows = store.load(self.data, split, self.name)
        if self.process is None:
            return [dict(r) for r in rows]
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
        """Prompts in plain text (lm-eval's layout) or rendered by `chat` (multi-turn shots)."""
        if self.fewshot_samples is not None:
            pool, same_split = list(self.fewshot_samples), False
        try:
            all_shots = sample_fewshot(pool, docs, num_fewshot, seed, same_split, self.fewshot)
        except ValueError as exc:
            raise ValueError(f"task {self.name}: {exc}") from None
        out = []
        for doc, shots in zip(docs, all_shots, strict=True):
            desc = self._format(self.description, doc) if self.description else ""
            pairs = [(self._format(self.text, s), self._format(self.target, s)) for s in shots]
            question = self._format(self.text, doc)
            if chat is None:
                ctx = desc + "".join(q + TARGET_DELIMITER + a + FEWSHOT_DELIMITER for q, a in pairs)
                out.append(ctx + question)
                continue
            messages = [{"role": "system", "content": desc}] if desc else []
            for q, a in pairs:
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            messages.append({"role": "user", "content": question})
            out.append(chat(messages))
        return out

    def requests(self, doc: dict, context: str) -> list[tuple[str, dict]]:
        return [(context, dict(self.generation_kwargs))]

    def metric_names(self) -> list[str]:
        if self.scorer is not None:
            return list(self.metrics)
        return [f"{m},{f}" for m in self.metrics for f in self._filters]

    def extract(self, generation: str) -> dict[str, str]:
        """The generation after each filter pipeline: {filter name: extracted answer}."""
        out = {}
        for name, steps in self._filters.items():
            texts = [generation]
            for step in steps:
                texts = step(texts)
            out[name] = texts[0] if texts else ""
        return out

    def score(self, doc: dict, answers: list) -> dict[str, float]:
        generation = answers[0]
        if self.scorer is not None:
            scores = SCORERS[self.scorer](doc, generation)
            return {m: scores[m] for m in self.metrics}
        target = self._format(self.target, doc)
        out = {}
        for m in self.metrics:
            if m != "exact_match":
                raise ValueError(f"task {self.name}: unknown metric {m!r} (exact_match)")
            for f, pred in self.extract(generation).items():
                out[f"{m},{f}"] = metrics.exact_match(pred, target, **self.exact_match)
        return out

    def sample_log(self, doc: dict, context: str, answers: list, scores: dict) -> dict:
        log = {"context": context, "generation": answers[0]}
        if self.scorer is None:
            log["target"] = self._format(self.target, doc)
            log["extracted"] = self.extract(answers[0])
        else:
            log["true_answers"] = doc.get("correct_answers")
            log["false_answers"] = doc.get("incorrect_answers")
        return {**log, **scores}
