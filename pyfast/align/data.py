"""Preference pairs: reading, chat templating, tokenising, bad-pair policy, held-out split, batches.

Accepted JSONL rows (one object per line):

- text pairs: ``{"prompt": str, "chosen": str, "rejected": str}`` (the answers are the text that
  follows the prompt, as in ``hh_rlhf_harmless_base/test_dpo.jsonl``);
- chat pairs: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`` where the
  answers are the assistant turn(s) after the prompt, or ``{"chosen": [messages], "rejected":
  [messages]}`` holding two whole conversations that differ only in their last (assistant) turn.
  Messages are ``{"role": ..., "content": ...}``; the tokenizer's chat template is applied.

Bad pairs are **skipped and counted, the same way every time** (:class:`PairReport`): answers that
are equal (``identical``), an empty or whitespace-only answer (``empty_answer``), a prompt longer
than ``max_prompt_length`` tokens (``prompt_too_long``), and answers that become equal once cut to
``max_length`` (``identical_after_truncation``). Rows that are not valid input at all (bad JSON,
missing field, wrong type) raise ``ValueError`` naming the file, line and field.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pyfast.train.data import IGNORE_INDEX, read_jsonl

SKIP_REASONS = ("identical", "empty_answer", "prompt_too_long", "identical_after_truncation")


@dataclass
class PreferencePair:
    """One pair as text: the answers follow the prompt directly (prompt + chosen is the text)."""

    prompt: str
    chosen: str
    rejected: str
    source: str = ""  # "file:line", for messages
    chat: bool = False  # answers rendered by a chat template (they end with its end-of-turn)


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str = ""


@dataclass
class PairReport:
    """How many rows were read and kept, and how many were skipped for each reason."""

    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "skipped": dict(self.skipped)}

    def summary(self) -> str:
        parts = [f"{self.skipped[r]} {r}" for r in SKIP_REASONS if self.skipped[r]]
        return f"{self.kept}/{self.read} pairs kept" + (
            f" (skipped: {', '.join(parts)})" if parts else ""
        )


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    )


def _chat_text(tokenizer, where: str, prompt: list, answer: list) -> tuple[str, str]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{where}: chat-format pair but the tokenizer has no chat template")
    if not answer or any(m["role"] != "assistant" for m in answer):
        raise ValueError(f"{where}: the answer must be one or more assistant messages")
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
    if not whole.startswith(head):
        raise ValueError(
            f"{where}: the chat template does not render the prompt as a prefix of the "
            "conversation; cannot separate the answer"
        )
    return head, whole[len(head) :]


def _row_to_pair(row: dict, tokenizer, where: str) -> PreferencePair:
    for key in ("chosen", "rejected"):
        if key not in row:
            raise ValueError(f"{where}: missing field {key!r}")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            raise ValueError(f"{where}: field 'prompt' must be a string for text pairs")
        return PreferencePair(prompt, chosen, rejected, where)
    if not (_is_messages(chosen) and _is_messages(rejected)):
        raise ValueError(
            f"{where}: fields 'chosen'/'rejected' must both be strings or both be lists of "
            "{'role', 'content'} messages"
        )
    if prompt is None:  # two whole conversations: the prompt is everything but the last turn
        if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
            raise ValueError(
                f"{where}: without 'prompt', 'chosen' and 'rejected' must be conversations that "
                "differ only in their last message"
            )
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    elif not _is_messages(prompt):
        raise ValueError(f"{where}: field 'prompt' must be a list of messages for chat pairs")
    head, c = _chat_text(tokenizer, where, prompt, chosen)
    _, r = _chat_text(tokenizer, where, prompt, rejected)
    # The empty-answer check looks at the message contents, not at the template's decorations.
    c = c if any(m["content"].strip() for m in chosen) else ""
    r = r if any(m["content"].strip() for m in rejected) else ""
    return PreferencePair(head, c, r, where, chat=True)


def read_pairs(path: str | Path, tokenizer=None) -> list[PreferencePair]:
    """Reads a JSONL file of text or chat pairs (chat pairs need `tokenizer` for its template).

    Raises FileNotFoundError for a missing file and ValueError naming file, line and field for
    a row that is not a pair.
    """
    pairs = []
    for row in read_jsonl(path):
        if tokenizer is None and isinstance(row.data.get("chosen"), list):
            raise ValueError(f"{row.where}: chat-format pair needs a tokenizer")
        pairs.append(_row_to_pair(row.data, tokenizer, row.where))
    if not pairs:
        raise ValueError(f"{path}: no preference pairs")
    return pairs


def tokenize_pairs(
    pairs: list[PreferencePair],
    tokenizer,
    max_length: int = 512,
    max_prompt_length: int = 384,
    append_eos: bool = True,
) -> tuple[list[TokenizedPair], PairReport]:
    """Tokenises pairs and applies the bad-pair policy (skip and count; see the module docstring).

    The prompt and each answer are tokenised separately (no special tokens added) and joined, so
    the answer tokens are exactly the scored ones. Text answers get the EOS token appended
    (``append_eos``); chat answers end with the template's end-of-turn already. Answers are cut
    so that prompt + answer fits ``max_length``.
    """
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"need 0 < max_prompt_length < max_length, got {max_prompt_length} and {max_length}"
        )
    eos = tokenizer.eos_token_id
    report = PairReport(read=len(pairs))
    out = []
    for p in pairs:
        if p.chosen == p.rejected:
            report.skipped["identical"] += 1
            continue
        if not p.chosen.strip() or not p.rejected.strip():
            report.skipped["empty_answer"] += 1
            continue
        prompt = tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
        if len(prompt) > max_prompt_length:
            report.skipped["prompt_too_long"] += 1
            continue
        room = max_length - len(prompt)
        answers = []
        for text in (p.chosen, p.rejected):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if append_eos and eos is not None and not p.chat:
                ids = ids + [eos]
            answers.append(ids[:room])
        if answers[0] == answers[1]:
            report.skipped["identical_after_truncation"] += 1
            continue
        out.append(TokenizedPair(prompt, answers[0], answers[1], p.source))
    report.kept = len(out)
    return out, report


def split_heldout(pairs: list, eval_fraction: float, seed: int = 0) -> tuple[list, list]:
    """A seeded random split: (train, held_out) with round(fraction * n) held-out pairs (>= 1)."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(pairs)))
    if n_eval >= len(pairs):
        raise ValueError(f"eval_fraction {eval_fraction} leaves no training pairs of {len(pairs)}")
    held = sorted(order[:n_eval])
    keep = sorted(order[n_eval:])
    return [pairs[i] for i in keep], [pairs[i] for i in held]


def pairs_fingerprint(pairs: list[TokenizedPair]) -> str:
    """sha256 of the token ids of every pair, in order (the data half of cache keys)."""
    h = hashlib.sha256()
    for p in pairs:
        for ids in (p.prompt_ids, p.chosen_ids, p.rejected_ids):
            h.update(len(ids).to_bytes(4, "little"))
            h.update(torch.tensor(ids, dtype=torch.int32).numpy().tobytes())
    return h.hexdigest()


def collate_pairs(pairs: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """One (2B, T) batch: rows 0..B-1 are prompt + chosen, rows B..2B-1 prompt + rejected.

    Right-padded with ``pad_id``; ``labels`` equal input_ids on answer tokens and IGNORE_INDEX on
    prompt and padding (Hugging Face convention: labels[t] is token t, the shift comes later).
    """
    seqs, answer_starts = [], []
    for which in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            seqs.append(p.prompt_ids + getattr(p, which))
            answer_starts.append(len(p.prompt_ids))
    width = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, (s, a) in enumerate(zip(seqs, answer_starts, strict=True)):
        ids = torch.tensor(s, dtype=torch.long)
        input_ids[i, : len(s)] = ids
        attention_mask[i, : len(s)] = 1
        labels[i, a : len(s)] = ids[a:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_shared_prompt(pairs: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """A pair batch whose prompts run once for both answers (see pyfast.align.logps).

    ``prompt_ids``/``prompt_mask`` (B, P): prompts left-padded, so that every prompt ends at the
    last column; ``answer_ids``/``answer_mask`` (2B, A): answers right-padded, interleaved
    chosen_0, rejected_0, chosen_1, ... (row 2i and 2i + 1 continue prompt i).
    """
    width = max(len(p.prompt_ids) for p in pairs)
    b = len(pairs)
    prompt_ids = torch.full((b, width), pad_id, dtype=torch.long)  # (B, P)
    prompt_mask = torch.zeros((b, width), dtype=torch.long)
    answers = [a for p in pairs for a in (p.chosen_ids, p.rejected_ids)]
    a_width = max(len(a) for a in answers)
    answer_ids = torch.full((2 * b, a_width), pad_id, dtype=torch.long)  # (2B, A)
    answer_mask = torch.zeros((2 * b, a_width), dtype=torch.long)
    for i, p in enumerate(pairs):
        n = len(p.prompt_ids)
        prompt_ids[i, width - n :] = torch.tensor(p.prompt_ids, dtype=torch.long)
        prompt_mask[i, width - n :] = 1
    for i, a in enumerate(answers):
        answer_ids[i, : len(a)] = torch.tensor(a, dtype=torch.long)
        answer_mask[i, : len(a)] = 1
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "answer_ids": answer_ids,
            "answer_mask": answer_mask}  # fmt: skip
