import contextlib
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


HAS_CUDA = torch.cuda.is_available()


def devices():
    """cpu always; cuda where a GPU exists (and then pyfast must have CUDA kernels)."""
    out = ["cpu"]
    out.append(
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"),
        )
    )
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_llama(vocab_size: int, seed: int = 0, max_positions: int = 512, **overrides):
    """A random 2-layer LlamaForCausalLM (hidden 32, 4 heads / 2 key-value heads, tied head), in
    eval mode: the tiny model of the unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=max_positions, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides})).eval()


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to `n` for the block, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
