"""Training data: formats, completion-only labels, truncation, packing and input errors."""

from __future__ import annotations

import pytest

from pyfast.train.config import DataConfig
from pyfast.train.data import (
    IGNORE_INDEX,
    Formatter,
    Row,
    collate,
    detect_format,
    load_examples,
    pack,
    tokenize_rows,
)
from tests.train.conftest import ARC_TRAIN, write_jsonl

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _targets(tok, ex) -> str:
    return tok.decode([t for t in ex.labels if t != IGNORE_INDEX])


@pytest.fixture
def fmt(tiny_tokenizer):
    return Formatter(tiny_tokenizer, DataConfig(add_eos=False))


def test_prompt_completion_labels_only_the_completion(fmt, tiny_tokenizer):
    ex = fmt.example(
        Row({"prompt": "Question: why?\nAnswer:", "completion": " because"}, "x"),
        "prompt_completion",
    )
    prompt_len = len(tiny_tokenizer("Question: why?\nAnswer:")["input_ids"])
    assert ex.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert ex.labels[prompt_len:] == ex.input_ids[prompt_len:]
    assert _targets(tiny_tokenizer, ex) == " because"


def test_completion_only_off_and_eos(tiny_tokenizer):
    f = Formatter(tiny_tokenizer, DataConfig(completion_only=False, add_eos=True))
    ex = f.example(Row({"prompt": "a b", "completion": " c"}, "x"), "prompt_completion")
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == tiny_tokenizer.eos_token_id


def test_arc_and_gsm8k_templates_match_the_eval_prompt(fmt, tiny_tokenizer):
    arc = {
        "question": "Which is a gas?",
        "answerKey": "B",
        "choices": {"label": ["A", "B"], "text": ["rock", "steam"]},
    }
    ex = fmt.example(Row(arc, "x"), "arc")
    assert tiny_tokenizer.decode(ex.input_ids) == "Question: Which is a gas?\nAnswer: steam"
    assert _targets(tiny_tokenizer, ex) == " steam"
    ex = fmt.example(Row({"question": "1+1?", "answer": "2 #### 2"}, "x"), "gsm8k")
    assert tiny_tokenizer.decode(ex.input_ids) == "Question: 1+1?\nAnswer: 2 #### 2"
    assert _targets(tiny_tokenizer, ex) == " 2 #### 2"


def test_instruction_without_chat_template_uses_alpaca(fmt, tiny_tokenizer):
    ex = fmt.example(
        Row({"instruction": "Add.", "input": "1 2", "output": "3"}, "x"), "instruction"
    )
    text = tiny_tokenizer.decode(ex.input_ids)
    assert "### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:\n3" in text
    assert _targets(tiny_tokenizer, ex) == "3"


def test_chat_with_template_trains_assistant_turns_only(tiny_tokenizer):
    tok = tiny_tokenizer
    old = tok.chat_template
    tok.chat_template = CHAT_TEMPLATE
    try:
        f = Formatter(tok, DataConfig(add_eos=False))
        msgs = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "ciao"},
        ]
        ex = f.example(Row({"messages": msgs}, "x"), "chat")
        assert tok.decode(ex.input_ids) == tok.apply_chat_template(msgs, tokenize=False)
        target = _targets(tok, ex)
        assert "hello" in target and "ciao" in target
        assert "hi" not in target and "bye" not in target and "user" not in target
    finally:
        tok.chat_template = old


def test_chat_without_template(fmt, tiny_tokenizer):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ex = fmt.example(Row({"messages": msgs}, "x"), "chat")
    assert tiny_tokenizer.decode(ex.input_ids) == "user: hi\nassistant: hello\n"
    assert _targets(tiny_tokenizer, ex).strip() == "hello"


def test_text_trains_every_token(fmt):
    ex = fmt.example(Row({"text": "plain words here"}, "x"), "text")
    assert ex.labels == ex.input_ids


@pytest.mark.parametrize(
    "row, name",
    [
        ({"messages": []}, "chat"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"instruction": "a", "output": "b"}, "instruction"),
        ({"question": "q", "choices": {}, "answerKey": "A"}, "arc"),
        ({"question": "q", "answer": "a"}, "gsm8k"),
        ({"text": "t"}, "text"),
    ],
)
def test_auto_detection(row, name):
    assert detect_format([Row(row, "x")]) == name


def test_missing_field_names_file_line_and_field(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(ValueError, match=r"d\.jsonl:2: missing field 'completion'"):
        load_examples(DataConfig(path=[str(path)]), tiny_tokenizer)


def test_malformed_line_and_empty_dataset(tmp_path, tiny_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        load_examples(DataConfig(path=[str(bad)]), tiny_tokenizer)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty dataset: .*empty\.jsonl has no rows"):
        load_examples(DataConfig(path=[str(empty)]), tiny_tokenizer)
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_examples(DataConfig(path=[str(tmp_path / "none.jsonl")]), tiny_tokenizer)


def test_truncation_is_counted_and_held_out_split(tiny_tokenizer):
    cfg = DataConfig(path=[str(ARC_TRAIN)], format="arc", max_length=40, eval_fraction=0.2)
    train, held, stats = load_examples(cfg, tiny_tokenizer)
    s = stats["train"]
    assert s["truncated"] > 0 and s["rows"] == 24 and stats["eval"]["rows"] == 6
    assert all(len(e.input_ids) <= 40 for e in train + held)
    assert s["examples"] == len(train) == s["rows"] - s["empty_targets"]
    long = DataConfig(path=[str(ARC_TRAIN)], format="arc", max_length=4096)
    assert load_examples(long, tiny_tokenizer)[2]["train"]["truncated"] == 0


def test_packing_blocks(tiny_tokenizer):
    f = Formatter(tiny_tokenizer, DataConfig(packing=True, max_length=16, add_eos=True))
    rows = [Row({"prompt": f"prompt {i}", "completion": f" answer {i}"}, "x") for i in range(9)]
    examples, stats = tokenize_rows(rows, f, "prompt_completion")
    assert all(len(e.input_ids) == 16 for e in examples[:-1])
    unpacked = [f.example(r, "prompt_completion") for r in rows]
    stream = [t for e in unpacked for t in e.input_ids]
    packed = [t for e in examples for t in e.input_ids]
    assert packed == stream[: len(packed)] and len(stream) - len(packed) < 16  # a target-less tail
    assert pack(unpacked, 16)[0].labels[0] == IGNORE_INDEX


def test_collate_pads_right(fmt):
    a = fmt.example(Row({"text": "a b c d e f"}, "x"), "text")
    b = fmt.example(Row({"text": "a"}, "x"), "text")
    batch = collate([a, b], pad_id=0)
    n = len(b.input_ids)
    assert batch["input_ids"].shape == (2, len(a.input_ids))
    assert batch["attention_mask"][1].tolist() == [1] * n + [0] * (len(a.input_ids) - n)
    assert (batch["labels"][1, n:] == IGNORE_INDEX).all()
