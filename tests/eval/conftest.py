"""Fixtures for tests/eval: a tiny random Llama and a byte-level BPE tokenizer built offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_llama

DATA = Path(__file__).parent.parent / "data" / "benchmarks"
REFERENCE = Path(__file__).parent.parent / "data" / "lm_eval_reference"


def _corpus() -> list[str]:
    texts = []
    for path in sorted(DATA.glob("*/*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            texts.append(json.dumps(json.loads(line), ensure_ascii=False))
    return texts


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 400-token byte-level BPE trained on the test slices (GPT-2 style pre-tokenisation)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    """A random 2-layer LlamaForCausalLM (hidden 32, GQA 4/2 heads), float32, eval mode."""
    model = tiny_llama(len(tiny_tokenizer))
    with torch.no_grad():  # larger logits than the default init, so choices differ clearly
        model.lm_head.weight.mul_(40.0)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, tiny_tokenizer, tmp_path_factory):
    """The tiny model saved as a Hugging Face folder (for CLI and loader tests)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(path)
    return path


def naive_loglikelihood(model, tokenizer, context: str, continuation: str, max_length: int):
    """lm-eval 0.4.x's HF backend for one request, written out plainly (the test oracle)."""
    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    cont = whole[len(ctx) :]
    inp = torch.tensor([(ctx + cont)[-(max_length + 1) :][:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(inp).logits, dim=-1)[0, -len(cont) :]  # (C, V)
    target = torch.tensor(cont)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())
