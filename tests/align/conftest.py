"""Fixtures for tests/align: a tiny random Llama and a byte-level BPE tokenizer, built offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import tiny_llama, torch_threads

PAIRS = Path(__file__).parents[2] / "data" / "hh_rlhf_harmless_base" / "pairs_300.jsonl"

# A minimal ChatML template (the format SmolLM2-Instruct uses).
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls run much faster on one thread of a shared CPU; restored afterwards."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def build_tokenizer():
    """A 300-token byte-level BPE trained on the shipped preference pairs, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for line in PAIRS.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts += [row["prompt"], row["chosen"], row["rejected"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    out.chat_template = CHATML
    return out


def make_tiny_llama(vocab_size: int, seed: int = 0):
    return tiny_llama(vocab_size, seed, max_positions=1024)


@pytest.fixture
def tiny_model(tokenizer):
    """A fresh random 2-layer LlamaForCausalLM (hidden 32), float32, eval mode."""
    return make_tiny_llama(len(tokenizer))
