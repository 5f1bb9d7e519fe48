"""Task registry: names -> task objects of their kind (see pyfast/eval/task.py: task kinds),
groups (mmlu and its categories), close-match errors."""

from __future__ import annotations

import difflib
import importlib
from functools import cache
from pathlib import Path

import yaml

from pyfast.eval import task as task_module
from pyfast.eval.task import KINDS, Task

_TASK_DIR = Path(__file__).parent / "tasks"

# MMLU subject -> category, as lm-eval 0.4.x tags them (lm_eval/tasks/mmlu/default/*.yaml).
_MMLU_CATEGORY = {
    "stem": "abstract_algebra anatomy astronomy college_biology college_chemistry "
    "college_computer_science college_mathematics college_physics computer_security "
    "conceptual_physics electrical_engineering elementary_mathematics high_school_biology "
    "high_school_chemistry high_school_computer_science high_school_mathematics "
    "high_school_physics high_school_statistics machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history "
    "high_school_world_history international_law jurisprudence logical_fallacies "
    "moral_disputes moral_scenarios philosophy prehistory professional_law world_religions",
    "social_sciences": "econometrics high_school_geography "
    "high_school_government_and_politics high_school_macroeconomics "
    "high_school_microeconomics high_school_psychology human_sexuality "
    "professional_psychology public_relations security_studies sociology us_foreign_policy",
    "other": "business_ethics clinical_knowledge college_medicine global_facts human_aging "
    "management marketing medical_genetics miscellaneous nutrition professional_accounting "
    "professional_medicine virology",
}
MMLU_SUBJECTS = {s: cat for cat, names in _MMLU_CATEGORY.items() for s in names.split()}
MMLU_CATEGORIES = tuple(_MMLU_CATEGORY)


@cache
def _registry() -> tuple[dict[str, Task], dict[str, list[str]]]:
    """(tasks by name, groups: name -> member names, tasks or groups)."""
    for module in task_module.KIND_MODULES:
        importlib.import_module(module)  # each registers its kinds
    tasks: dict = {}
    for path in sorted(_TASK_DIR.glob("*.yaml")):
        for name, spec in yaml.safe_load(path.read_text(encoding="utf-8")).items():
            if name == "mmlu":
                template = spec
                continue
            kind = spec.pop("kind", "multiple_choice")
            if kind not in KINDS:
                raise ValueError(f"{path}: task {name}: unknown kind {kind!r} ({sorted(KINDS)})")
            try:
                tasks[name] = KINDS[kind](name=name, **spec)
            except TypeError as exc:
                raise ValueError(f"{path}: task {name}: {exc}") from None
    groups: dict[str, list[str]] = {f"mmlu_{c}": [] for c in MMLU_CATEGORIES}
    for subject, cat in sorted(MMLU_SUBJECTS.items()):
        name = f"mmlu_{subject}"
        data = {**template["data"], "hf_config": subject}
        spec = {k: v for k, v in template.items() if k != "data"}
        tasks[name] = Task(name=name, data=data, subject=subject, groups=[f"mmlu_{cat}"], **spec)
        groups[f"mmlu_{cat}"].append(name)
    groups["mmlu"] = [f"mmlu_{c}" for c in MMLU_CATEGORIES]
    return tasks, groups


def task_names() -> list[str]:
    """Every task and group name, sorted."""
    tasks, groups = _registry()
    return sorted([*tasks, *groups])


def suggest(name: str) -> str:
    close = difflib.get_close_matches(name, task_names(), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else "; see `pyfast ls tasks`"


def get_task(name: str):
    """The task (a :class:`~pyfast.eval.task.TaskKind`) called `name`; raises ValueError with
    close matches if unknown."""
    tasks, _ = _registry()
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}{suggest(name)}")
    return tasks[name]


def expand(names: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Task and group names -> (leaf task names in order, without repeats; groups involved).

    Raises ValueError naming the first unknown name and its closest matches.
    """
    tasks, groups = _registry()
    leaves: list[str] = []
    used: dict[str, list[str]] = {}

    def visit(n: str) -> None:
        if n in groups:
            used[n] = groups[n]
            for m in groups[n]:
                visit(m)
        elif n in tasks:
            if n not in leaves:
                leaves.append(n)
        else:
            raise ValueError(f"unknown task {n!r}{suggest(n)}")

    for n in names:
        visit(n.strip())
    return leaves, used
