"""Training data: rows from JSONL files or Hugging Face datasets, formats, tokenisation, batches.

Row formats (``data.format``, or ``auto`` from the first row's keys):

=====================  =====================================================================
``instruction``        ``instruction``, optional ``input``, ``output`` (Alpaca); chat template
                       when the model has one, else Alpaca's "### Instruction/Response" layout
``prompt_completion``  ``prompt``, ``completion`` (plain strings, concatenated as they are)
``chat``               ``messages`` = [{role, content}, ...]; loss on assistant turns
``text``               ``text``; loss on every token
``arc``                ARC rows (``question``, ``choices``, ``answerKey``) -> prompt
                       "Question: {question}\\nAnswer:", completion " {correct choice}"
                       (lm-evaluation-harness's ARC format, so training matches ``pyfast eval``)
``gsm8k``              GSM8K rows (``question``, ``answer``) -> "Question: {question}\\nAnswer:"
                       and " {answer}" (lm-evaluation-harness's GSM8K format)
=====================  =====================================================================

Each example becomes ``input_ids`` and ``labels`` (-100 on prompt tokens unless
``completion_only=false``); examples longer than ``max_length`` are truncated and counted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pyfast.io import parse_jsonl
from pyfast.train.config import DataConfig

IGNORE_INDEX = -100

FORMAT_FIELDS = {
    "instruction": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
    "text": ("text",),
    "arc": ("question", "choices", "answerKey"),
    "gsm8k": ("question", "answer"),
}
# auto-detection order: the first format whose fields the first row has
_DETECT = ["chat", "prompt_completion", "instruction", "arc", "gsm8k", "text"]

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n"
)


@dataclass
class Row:
    """One raw row and where it came from (for error messages)."""

    data: dict
    where: str  # "file.jsonl:12" or "hf:name[split]:row 12"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class DatasetStats:
    rows: int = 0
    examples: int = 0
    tokens: int = 0
    target_tokens: int = 0
    truncated: int = 0  # examples longer than max_length (cut)
    empty_targets: int = 0  # examples left with no token to learn after truncation (dropped)
    format: str = ""
    sources: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# -- reading rows ------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> list[Row]:
    """Rows of a JSONL file; raises ValueError naming file and line for malformed lines."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    return [Row(obj, f"{path}:{lineno}") for lineno, obj in parse_jsonl(text, path)]


def read_hf(name: str, config: str | None, split: str) -> list[Row]:
    """Rows of a Hugging Face dataset (``datasets.load_dataset``; offline uses the local cache)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; one message for all
        raise ValueError(f"cannot load Hugging Face dataset {name!r} ({split}): {exc}") from None
    return [Row(dict(r), f"hf:{name}[{split}]:row {i + 1}") for i, r in enumerate(ds)]


def read_rows(paths: list[str], hf_config: str | None = None, split: str = "train") -> list[Row]:
    """Rows of every source in `paths` (``.jsonl`` files, or ``hf:NAME`` / dataset ids)."""
    rows: list[Row] = []
    for spec in paths:
        if spec.startswith("hf:"):
            rows += read_hf(spec[3:], hf_config, split)
        elif _is_local(spec):
            rows += read_jsonl(spec)
        else:
            rows += read_hf(spec, hf_config, split)
    return rows


def _is_local(spec: str) -> bool:
    """Whether a data source is a local file (as :func:`read_rows` decides)."""
    return not spec.startswith("hf:") and (spec.endswith(".jsonl") or Path(spec).exists())


def check_data_files(cfg: DataConfig) -> None:
    """Reads every local data file of `cfg` (dataset ids are left to the loader): a missing
    file, malformed JSONL, an empty file, or a row without the fields of the format (data.format,
    or the one the first row shows) raises here, before a model is loaded.

    Raises:
        FileNotFoundError: a missing data file.
        ValueError: naming ``file:line`` and the field.
    """
    if not cfg.path:
        raise ValueError("no training data: set data.path (a .jsonl file or a dataset id)")
    fmt = None if cfg.format == "auto" else cfg.format
    for spec in [*cfg.path, *cfg.eval_path]:
        if not _is_local(spec):
            continue
        rows = read_jsonl(spec)
        if not rows:
            raise ValueError(f"empty dataset: {spec} has no rows")
        fmt = fmt or detect_format(rows)
        for row in rows:
            missing = [k for k in FORMAT_FIELDS[fmt] if k not in row.data]
            if missing:
                has = ", ".join(sorted(row.data)) or "no fields"
                raise ValueError(
                    f"{row.where}: missing field {missing[0]!r} of data format {fmt} "
                    f"(row has {has})"
                )


def detect_format(rows: list[Row]) -> str:
    first = rows[0]
    for name in _DETECT:
        if all(k in first.data for k in FORMAT_FIELDS[name]):
            return name
    raise ValueError(
        f"{first.where}: cannot tell the data format from the fields "
        f"({', '.join(sorted(first.data)) or 'none'}); set data.format to one of "
        f"{', '.join(FORMAT_FIELDS)}"
    )


def _field(row: Row, name: str, kind=str):
    if name not in row.data:
        has = ", ".join(sorted(row.data)) or "no fields"
        raise ValueError(f"{row.where}: missing field {name!r} (row has {has})")
    value = row.data[name]
    if not isinstance(value, kind):
        raise ValueError(
            f"{row.where}: field {name!r} must be {getattr(kind, '__name__', kind)}, "
            f"got {type(value).__name__}"
        )
    return value


# -- formats -> (prompt, completion) or messages -------------------------------------------------


def arc_pair(row: Row) -> tuple[str, str]:
    question = _field(row, "question")
    choices = _field(row, "choices", dict)
    key = str(_field(row, "answerKey", (str, int)))
    labels, texts = choices.get("label"), choices.get("text")
    if not isinstance(labels, list) or not isinstance(texts, list) or len(labels) != len(texts):
        raise ValueError(f"{row.where}: field 'choices' must have equal-length 'label' and 'text'")
    labels = [str(x) for x in labels]
    if key not in labels:
        raise ValueError(f"{row.where}: answerKey {key!r} is not among the labels {labels}")
    return f"Question: {question}\nAnswer:", " " + str(texts[labels.index(key)])


def gsm8k_pair(row: Row) -> tuple[str, str]:
    return f"Question: {_field(row, 'question')}\nAnswer:", " " + _field(row, "answer")


def _messages(row: Row) -> list[dict]:
    msgs = _field(row, "messages", list)
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{row.where}: messages[{i}] needs 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError(f"{row.where}: field 'messages' has no assistant turn to learn")
    return msgs


class Formatter:
    """Turns rows into :class:`Example` token lists with the tokenizer's conventions.

    Args:
        tokenizer: a Hugging Face tokenizer (fast, for chat rows: offsets are used).
        use_chat_template: apply ``tokenizer.chat_template`` to chat/instruction rows when set.
    """

    def __init__(self, tokenizer, cfg: DataConfig, use_chat_template: bool = True):
        self.tok = tokenizer
        self.cfg = cfg
        self.chat = bool(use_chat_template and getattr(tokenizer, "chat_template", None))
        self.eos = (
            [tokenizer.eos_token_id] if cfg.add_eos and tokenizer.eos_token_id is not None else []
        )

    def _encode(self, text: str, special: bool) -> list[int]:
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def pair(self, prompt: str, completion: str) -> Example:
        p = self._encode(prompt, True)
        c = self._encode(completion, False) + self.eos
        labels = ([IGNORE_INDEX] * len(p) if self.cfg.completion_only else list(p)) + c
        return Example(p + c, labels)

    def messages(self, msgs: list[dict]) -> Example:
        """Chat rows: loss on each assistant turn (character spans -> token offsets)."""
        if not self.chat:
            text, spans = "", []
            for m in msgs:
                head = f"{m['role']}: "
                text += head
                if m["role"] == "assistant":
                    spans.append((len(text), len(text) + len(m["content"]) + 1))
                text += m["content"] + "\n"
        else:
            render = self.tok.apply_chat_template
            text = render(msgs, tokenize=False)
            spans = []
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                start = len(render(msgs[:i], tokenize=False, add_generation_prompt=True))
                end = len(render(msgs[: i + 1], tokenize=False))
                spans.append((start, end))
        enc = self.tok(text, add_special_tokens=not self.chat, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = []
        for tid, (a, _) in zip(ids, enc["offset_mapping"], strict=True):
            inside = any(s <= a < e for s, e in spans)
            labels.append(tid if inside or not self.cfg.completion_only else IGNORE_INDEX)
        if self.eos and ids[-1:] != self.eos:
            ids += self.eos
            labels += self.eos
        return Example(ids, labels)

    def example(self, row: Row, fmt: str) -> Example:
        if fmt == "text":
            ids = self._encode(_field(row, "text"), True) + self.eos
            return Example(ids, list(ids))
        if fmt == "chat":
            return self.messages(_messages(row))
        if fmt == "arc":
            return self.pair(*arc_pair(row))
        if fmt == "gsm8k":
            return self.pair(*gsm8k_pair(row))
        if fmt == "prompt_completion":
            return self.pair(_field(row, "prompt"), _field(row, "completion"))
        if fmt == "instruction":
            instruction, output = _field(row, "instruction"), _field(row, "output")
            extra = row.data.get("input") or ""
            if not isinstance(extra, str):
                raise ValueError(
                    f"{row.where}: field 'input' must be str, got {type(extra).__name__}"
                )
            if self.chat:
                user = instruction + (f"\n\n{extra}" if extra else "")
                return self.messages(
                    [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
                )
            prompt = ALPACA_PROMPT.format(
                ctx=", paired with an input that provides further context" if extra else "",
                instruction=instruction,
                input=f"### Input:\n{extra}\n\n" if extra else "",
            )
            return self.pair(prompt, output)
        raise ValueError(f"unknown data format {fmt!r}; use one of {', '.join(FORMAT_FIELDS)}")


def tokenize_rows(
    rows: list[Row], formatter: Formatter, fmt: str
) -> tuple[list[Example], DatasetStats]:
    """Examples of `rows`, truncated to max_length (counted) or packed into blocks."""
    max_len = formatter.cfg.max_length
    stats = DatasetStats(rows=len(rows), format=fmt)
    examples = []
    for row in rows:
        ex = formatter.example(row, fmt)
        if not formatter.cfg.packing and len(ex.input_ids) > max_len:
            stats.truncated += 1
            ex = Example(ex.input_ids[:max_len], ex.labels[:max_len])
        if all(x == IGNORE_INDEX for x in ex.labels[1:]):
            stats.empty_targets += 1
            continue
        examples.append(ex)
    if formatter.cfg.packing:
        examples, stats.truncated = pack(examples, max_len), 0
    stats.examples = len(examples)
    stats.tokens = sum(len(e.input_ids) for e in examples)
    stats.target_tokens = sum(sum(x != IGNORE_INDEX for x in e.labels[1:]) for e in examples)
    return examples, stats


def pack(examples: list[Example], block: int) -> list[Example]:
    """Concatenates examples and cuts the stream into `block`-token pieces (the tail is kept)."""
    ids, labels = [], []
    for e in examples:
        ids += e.input_ids
        # the first token of an example is never predicted from the previous example's tail
        labels += [IGNORE_INDEX] + e.labels[1:]
    out = [Example(ids[i : i + block], labels[i : i + block]) for i in range(0, len(ids), block)]
    return [e for e in out if any(x != IGNORE_INDEX for x in e.labels[1:])]


def load_examples(cfg: DataConfig, tokenizer, use_chat_template: bool = True, seed: int = 0):
    """(train examples, held-out examples, stats dict) for a :class:`DataConfig`.

    Raises:
        ValueError: no data source, an empty dataset, a row missing a field (file:line, field).
        FileNotFoundError: a missing data file.
    """
    if not cfg.path:
        raise ValueError("no training data: set data.path (a .jsonl file or a dataset id)")
    rows = read_rows(cfg.path, cfg.hf_config, cfg.split)
    if not rows:
        raise ValueError(f"empty dataset: {', '.join(cfg.path)} has no rows")
    fmt = detect_format(rows) if cfg.format == "auto" else cfg.format
    eval_rows: list[Row] = []
    if cfg.eval_path:
        eval_rows = read_rows(cfg.eval_path, cfg.hf_config, "validation")
        if not eval_rows:
            raise ValueError(f"empty held-out dataset: {', '.join(cfg.eval_path)} has no rows")
    elif cfg.eval_fraction > 0:
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(rows) * cfg.eval_fraction))
        held = set(order[:n_eval])
        eval_rows = [r for i, r in enumerate(rows) if i in held]
        rows = [r for i, r in enumerate(rows) if i not in held]
    if cfg.max_rows is not None:
        rows = rows[: cfg.max_rows]
    if cfg.eval_max_rows is not None:
        eval_rows = eval_rows[: cfg.eval_max_rows]
    formatter = Formatter(tokenizer, cfg, use_chat_template)
    train, stats = tokenize_rows(rows, formatter, fmt)
    if not train:
        raise ValueError(
            f"empty dataset: no example of {', '.join(cfg.path)} has a token to learn "
            f"({stats.empty_targets} had none after truncation to {cfg.max_length})"
        )
    stats.sources = list(cfg.path)
    held, held_stats = tokenize_rows(eval_rows, formatter, fmt) if eval_rows else ([], None)
    return (
        train,
        held,
        {"train": stats.as_dict(), "eval": held_stats.as_dict() if held_stats else None},
    )


# -- batches -------------------------------------------------------------------------------------


def pad_id_of(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``labels`` (-100 on padding) and ``attention_mask``."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """The example order of `epoch`: a permutation seeded by (seed, epoch), same on every rank."""
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()
