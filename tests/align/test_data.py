"""Preference data: text and chat pairs, the skip-and-count policy, malformed rows, splits."""

from __future__ import annotations

import json

import pytest
import torch

from pyfast.align.data import (
    IGNORE_INDEX,
    collate_pairs,
    read_pairs,
    split_heldout,
    tokenize_pairs,
)
from tests.align.conftest import PAIRS


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_shipped_pairs_read_and_two_empty_answers_skipped(tokenizer):
    pairs = read_pairs(PAIRS)
    assert len(pairs) == 300
    assert pairs[0].prompt.endswith("\n\nAssistant:") and pairs[0].chosen.startswith(" ")
    kept, report = tokenize_pairs(pairs, tokenizer, max_length=512, max_prompt_length=400)
    assert report.skipped["empty_answer"] == 2  # the README of the data says so
    assert report.kept == len(kept) == 300 - sum(report.skipped.values())


def test_text_pair_tokens_and_eos(tokenizer, tmp_path):
    f = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "Q: hi?", "chosen": " yes", "rejected": " no"}]
    )
    (p,), report = tokenize_pairs(read_pairs(f), tokenizer, 64, 32)
    assert p.prompt_ids == tokenizer("Q: hi?", add_special_tokens=False)["input_ids"]
    assert p.chosen_ids == tokenizer(" yes", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    assert report.as_dict() == {"read": 1, "kept": 1, "skipped": {}}


def test_bad_pairs_skipped_and_counted(tokenizer, tmp_path):
    rows = [
        {"prompt": "A", "chosen": " same", "rejected": " same"},
        {"prompt": "B", "chosen": "   ", "rejected": " fine"},
        {"prompt": "C", "chosen": " fine", "rejected": ""},
        {"prompt": "word " * 40, "chosen": " a", "rejected": " b"},
        {"prompt": "D", "chosen": " same start X", "rejected": " same start Y"},
        {"prompt": "E", "chosen": " good", "rejected": " bad"},
    ]
    f = write_jsonl(tmp_path / "bad.jsonl", rows)
    kept, report = tokenize_pairs(read_pairs(f), tokenizer, max_length=4, max_prompt_length=3)
    assert report.read == 6 and report.kept == len(kept) == 1
    assert dict(report.skipped) == {
        "identical": 1,
        "empty_answer": 2,
        "prompt_too_long": 1,
        "identical_after_truncation": 1,
    }
    assert "1/6 pairs kept" in report.summary() and "2 empty_answer" in report.summary()
    # the same input gives the same decision every time
    assert tokenize_pairs(read_pairs(f), tokenizer, 4, 3)[1].as_dict() == report.as_dict()


def test_chat_pairs_use_the_template(tokenizer, tmp_path):
    prompt = [{"role": "user", "content": "Hello?"}]
    rows = [
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": "Hi."}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
        },  # fmt: skip
        {
            "chosen": prompt + [{"role": "assistant", "content": "Hi."}],
            "rejected": prompt + [{"role": "assistant", "content": "Go away."}],
        },  # fmt: skip
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": " "}],
            "rejected": [{"role": "assistant", "content": "x"}],
        },  # fmt: skip
    ]
    f = write_jsonl(tmp_path / "chat.jsonl", rows)
    pairs = read_pairs(f, tokenizer)
    assert pairs[0].prompt == "<|im_start|>user\nHello?<|im_end|>\n<|im_start|>assistant\n"
    assert pairs[0].chosen == "Hi.<|im_end|>\n"
    assert (pairs[1].prompt, pairs[1].chosen, pairs[1].rejected) == (
        pairs[0].prompt, pairs[0].chosen, pairs[0].rejected)  # fmt: skip
    kept, report = tokenize_pairs(pairs, tokenizer, 64, 32)
    assert report.skipped["empty_answer"] == 1 and len(kept) == 2
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert kept[0].chosen_ids[-2] == end  # the template's end of turn, no extra EOS
    assert tokenizer.eos_token_id not in kept[0].chosen_ids


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"bad\.jsonl:2: malformed JSON"),
        ("[1, 2]", r"bad\.jsonl:2: expected a JSON object"),
        ('{"prompt": "x", "chosen": "a"}', r"bad\.jsonl:2: missing field 'rejected'"),
        ('{"prompt": 3, "chosen": "a", "rejected": "b"}', r"bad\.jsonl:2: field 'prompt'"),
        ('{"chosen": "a", "rejected": [{"role": "user", "content": "b"}]}', "both be strings"),
        (
            '{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}'
            '], "rejected": [{"role": "user", "content": "z"}, '
            '{"role": "assistant", "content": "c"}]}',
            "differ only in their last message",
        ),
    ],
)
def test_malformed_rows_name_file_and_line(tokenizer, tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "ok", "chosen": " a", "rejected": " b"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_pairs(f, tokenizer)


def test_missing_file_and_bad_lengths(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        read_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="max_prompt_length < max_length"):
        tokenize_pairs([], tokenizer, max_length=8, max_prompt_length=8)


def test_split_is_seeded_and_disjoint():
    items = list(range(50))
    train, held = split_heldout(items, 0.2, seed=3)
    assert len(held) == 10 and sorted(train + held) == items
    assert split_heldout(items, 0.2, seed=3) == (train, held)
    assert split_heldout(items, 0.2, seed=4)[1] != held
    with pytest.raises(ValueError, match="eval_fraction"):
        split_heldout(items, 1.0)


def test_collate_layout(tokenizer, tmp_path):
    f = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Q one", "chosen": " a b c", "rejected": " d"},
            {"prompt": "Q", "chosen": " e", "rejected": " f g h i"},
        ],  # fmt: skip
    )
    pairs, _ = tokenize_pairs(read_pairs(f), tokenizer, 64, 32)
    batch = collate_pairs(pairs, pad_id=0)
    assert batch["input_ids"].shape[0] == 4
    for row, (p, which) in enumerate(
        [(p, w) for w in ("chosen_ids", "rejected_ids") for p in pairs]
    ):
        seq = p.prompt_ids + getattr(p, which)
        n = len(seq)
        assert batch["input_ids"][row, :n].tolist() == seq
        assert batch["attention_mask"][row].sum() == n
        labels = batch["labels"][row]
        assert (labels[: len(p.prompt_ids)] == IGNORE_INDEX).all()
        assert labels[len(p.prompt_ids) : n].tolist() == getattr(p, which)
        assert (labels[n:] == IGNORE_INDEX).all()
    assert batch["labels"].dtype == torch.long
