"""A multiple-choice task: documents -> prompts (with few-shot examples) -> requests -> metrics.

Prompts are built as lm-evaluation-harness 0.4.x builds them in plain-text mode:
``description + sum(shot_text + " " + shot_answer + "\\n\\n") + text``, one request per choice
``(context, " " + choice)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from pyfast.eval import metrics
from pyfast.eval.data import DataStore
from pyfast.eval.tasks.processors import PROCESSORS

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


@dataclass
class Task:
    """One registered task (see pyfast/eval/tasks/multiple_choice.yaml for the fields)."""

    name: str
    data: dict
    process: str
    text: str
    metrics: list[str]
    fewshot: str = "random"
    description: str = ""
    subject: str | None = None  # MMLU: rows of a shared file that belong to this task
    groups: list[str] = field(default_factory=list)

    def _format(self, template: str, doc: dict) -> str:
        try:
            return template.format(**doc)
        except (KeyError, IndexError) as exc:
            raise ValueError(
                f"task {self.name}: prompt needs field {exc} missing in a row"
            ) from None

    def docs(self, store: DataStore, split: str) -> list[dict]:
        """Processed rows of `split` (only this subject's rows for MMLU subjects)."""
        rows = store.load(self.data, split, self.name)
        if self.subject is not None:
            rows = [r for r in rows if r.get("subject", self.subject) == self.subject]
        process = PROCESSORS[self.process]
        out = []
        for i, row in enumerate(rows):
            try:
                out.append(process(row))
            except (KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"task {self.name}: {split} row {i + 1}: {exc}") from None
        return out

    def contexts(
        self, docs: list[dict], pool: list[dict], num_fewshot: int, seed: int, same_split: bool
    ) -> list[str]:
        """The context string of each doc, few-shot examples drawn like lm-eval's samplers.

        random: one ``random.Random(seed)`` per task, ``sample(pool, n)`` per document in order
        (n + 1 then dropping the document itself when the pool is the evaluated split);
        first_n: the first n of the pool (excluding the document itself).
        """
        if num_fewshot and num_fewshot > len(pool) - int(same_split):
            raise ValueError(
                f"task {self.name}: --num-fewshot {num_fewshot} exceeds the {len(pool)} "
                "few-shot examples available"
            )
        rnd = random.Random(seed)
        out = []
        for doc in docs:
            if num_fewshot == 0:
                shots = []
            elif self.fewshot == "first_n":
                shots = [d for d in pool if not (same_split and d == doc)][:num_fewshot]
            elif same_split:
                shots = [d for d in rnd.sample(pool, num_fewshot + 1) if d != doc][:num_fewshot]
            else:
                shots = rnd.sample(pool, num_fewshot)
            ctx = self._format(self.description, doc) if self.description else ""
            for s in shots:
                answer = s["choices"][s["gold"]]
                ctx += self._format(self.text, s) + TARGET_DELIMITER + answer + FEWSHOT_DELIMITER
            out.append(ctx + self._format(self.text, doc))
        return out

    def requests(self, doc: dict, context: str) -> list[tuple[str, str]]:
        return [(context, TARGET_DELIMITER + c) for c in doc["choices"]]

    def score(self, doc: dict, lls: list[float]) -> dict[str, float]:
        """Per-document metric values from the per-choice log-likelihoods."""
        out = {}
        if "acc" in self.metrics or "acc_norm" in self.metrics:
            mc = metrics.multiple_choice(lls, doc["choices"], doc["gold"])
            out.update({k: v for k, v in mc.items() if k in self.metrics})
        if "mc2" in self.metrics:
            out["mc2"] = metrics.mc2(lls, doc["labels"])
        return out

    def prediction(self, lls: list[float]) -> int:
        return max(range(len(lls)), key=lambda i: (lls[i], -i))
