"""Document processors: raw dataset row -> row the task's templates read.

One function per task family, named by the ``process:`` key of the task YAML. Each reproduces the
lm-evaluation-harness 0.4.x template of that task (doc_to_choice, doc_to_target, process_docs).
Multiple-choice processors add ``choices`` (list[str]) and ``gold``; generation processors add
the fields their ``text``/``target`` templates use.
"""

from __future__ import annotations

import re


def arc(doc: dict) -> dict:
    """choices = choices.text; gold = index of answerKey in choices.label."""
    labels = list(doc["choices"]["label"])
    if doc["answerKey"] not in labels:
        raise ValueError(f"answerKey {doc['answerKey']!r} is not one of the labels {labels}")
    return {**doc, "choices": list(doc["choices"]["text"]), "gold": labels.index(doc["answerKey"])}


def _hellaswag_clean(text: str) -> str:
    text = text.strip()
    # Brackets are artefacts of the WikiHow part of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag(doc: dict) -> dict:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        **doc,
        "query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
        "choices": [_hellaswag_clean(e) for e in doc["endings"]],
        "gold": int(doc["label"]),
    }


def mmlu(doc: dict) -> dict:
    """The question's options go into the prompt; the scored choices are the letters A-D."""
    if len(doc["choices"]) != 4:
        raise ValueError(f"MMLU rows need 4 choices, got {len(doc['choices'])}")
    return {
        **doc,
        "question": doc["question"].strip(),
        "options": list(doc["choices"]),
        "choices": ["A", "B", "C", "D"],
        "gold": int(doc["answer"]),
        "subject_text": doc.get("subject", "").replace("_", " "),
    }


def truthfulqa_mc1(doc: dict) -> dict:
    """The correct MC1 answer is always first."""
    return {**doc, "choices": list(doc["mc1_targets"]["choices"]), "gold": 0}


def truthfulqa_mc2(doc: dict) -> dict:
    """gold = labels (1 = true); the few-shot target (if any) is choice 0 like lm-eval."""
    return {
        **doc,
        "choices": list(doc["mc2_targets"]["choices"]),
        "gold": 0,
        "labels": [int(x) for x in doc["mc2_targets"]["labels"]],
    }


def gsm8k_final(doc: dict) -> dict:
    """gsm8k_cot: the target is the final number, ``answer.split('####')[-1].strip()``."""
    return {**doc, "target": doc["answer"].split("####")[-1].strip()}


def _tqa_answers(answers: list) -> list[str]:
    """Stripped, non-empty answers, each ending with a period (lm-eval's _format_answers)."""
    out = []
    for a in answers:
        a = str(a).strip()
        if a:
            out.append(a if a.endswith(".") else a + ".")
    return out


def truthfulqa_gen(doc: dict) -> dict:
    """The question stripped; true answers (+ "I have no comment.") and false answers."""
    if not isinstance(doc["correct_answers"], list) or not isinstance(
        doc["incorrect_answers"], list
    ):
        raise ValueError("correct_answers and incorrect_answers must be lists")
    correct = _tqa_answers(doc["correct_answers"])
    if "I have no comment." not in correct:
        correct.append("I have no comment.")
    incorrect = _tqa_answers(doc["incorrect_answers"])
    if not incorrect:
        raise ValueError("incorrect_answers has no non-empty answer")
    return {
        **doc,
        "question": doc["question"].strip(),
        "correct_answers": correct,
        "incorrect_answers": incorrect,
    }


PROCESSORS = {
    f.__name__: f
    for f in (arc, hellaswag, mmlu, truthfulqa_mc1, truthfulqa_mc2, gsm8k_final, truthfulqa_gen)
}
