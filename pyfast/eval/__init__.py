"""Benchmark evaluation: tasks, the LM API and its HF backend, results.

``pyfast.eval.evaluate(model, tasks="arc_easy,mmlu", ...)`` is the Python entry point; the CLI is
``pyfast eval``. See pyfast/eval/evaluator.py.
"""

from pyfast.eval.evaluator import evaluate
from pyfast.eval.model import HFLM, LM
from pyfast.eval.registry import get_task, task_names

__all__ = ["HFLM", "LM", "evaluate", "get_task", "task_names"]
