"""The supported-models matrix: for each family pyfast accepts (tiny random configs of the real
architectures, built with transformers), the model with every part pyfast takes
(:func:`pyfast.hf.apply`) against an untouched copy of the same weights — training loss and
gradients (padded and packed rows), DPO log-probs, eval log-likelihoods and greedy generation
— and which parts were taken. docs/models.md holds the table these tests assert."""

import copy
from types import SimpleNamespace

import pytest
import torch

from pyfast.align.logps import pair_logps
from pyfast.eval.model import HFLM
from pyfast.hf import PARTS, apply, supports
from pyfast.hf.packing import prepare_segments
from pyfast.train.recipe import Recipe
from tests.eval.conftest import tiny_tokenizer  # noqa: F401 - fixture
from tests.hf.oracles import assert_loglikelihoods, sft_batch, stock_sums

V = 400  # the tiny tokenizer's vocabulary
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.2, pad_token_id=0, bos_token_id=0, eos_token_id=0)  # fmt: skip


def _config(family: str):
    import transformers as tf

    if family == "llama3":  # Llama-3.x: GQA, llama3 rope scaling, untied head
        return tf.LlamaConfig(**COMMON, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})  # fmt: skip
    if family == "qwen2.5":  # q/k/v biases, tied embeddings
        return tf.Qwen2Config(**COMMON, tie_word_embeddings=True)
    if family == "qwen3":  # q/k norms, explicit head_dim
        return tf.Qwen3Config(**COMMON, head_dim=8)
    if family == "mistral":  # v0.3: no sliding window
        return tf.MistralConfig(**COMMON, sliding_window=None)
    if family == "gemma2":  # (1 + w) norms, GELU-tanh, attention and final soft-capping
        return tf.Gemma2Config(**COMMON, head_dim=8, query_pre_attn_scalar=8,
                               final_logit_softcapping=5.0, attn_logit_softcapping=50.0,
                               sliding_window=16)  # fmt: skip
    if family == "gemma3":  # Gemma-3 text: q/k norms, local and global layers
        return tf.Gemma3TextConfig(**COMMON, head_dim=8, query_pre_attn_scalar=8,
                                   sliding_window=16)  # fmt: skip
    if family == "phi3":  # fused qkv and gate_up projections
        return tf.Phi3Config(**COMMON)
    if family == "granite":  # embedding / residual / attention multipliers, logits scaling
        return tf.GraniteConfig(**COMMON, embedding_multiplier=4.0, residual_multiplier=0.5,
                                attention_multiplier=0.2, logits_scaling=4.0)  # fmt: skip
    if family == "olmo2":  # post-norms, q/k norms over all heads
        return tf.Olmo2Config(**COMMON)
    raise AssertionError(family)


# Family -> the parts pyfast takes in full (the rest partly or not; supports() says why).
TAKEN = {
    "llama3": {"fused_head", "fused_norm", "fused_mlp", "fused_attention", "segment_attention",
               "trie_attention"},
    "qwen2.5": {"fused_head", "fused_norm", "fused_mlp", "fused_attention", "segment_attention",
                "trie_attention"},
    "qwen3": {"fused_head", "fused_norm", "fused_mlp", "fused_attention", "segment_attention",
              "trie_attention"},
    "mistral": {"fused_head", "fused_norm", "fused_mlp", "fused_attention", "segment_attention",
                "trie_attention"},
    "gemma2": {"fused_head", "fused_norm", "fused_mlp"},
    "gemma3": {"fused_head", "fused_norm", "fused_mlp"},
    "phi3": {"fused_head", "fused_norm", "fused_mlp", "segment_attention", "trie_attention"},
    "granite": {"fused_head", "fused_norm", "fused_mlp", "fused_attention", "segment_attention",
                "trie_attention"},
    "olmo2": {"fused_head", "fused_norm", "fused_mlp", "segment_attention", "trie_attention"},
}  # fmt: skip
FAMILIES = list(TAKEN)


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    """(family, stock model, the same weights with pyfast's parts applied, supports report)."""
    import transformers as tf

    torch.manual_seed(0)
    stock = tf.AutoModelForCausalLM.from_config(_config(request.param)).eval()
    fused = copy.deepcopy(stock)
    report = apply(fused)
    return request.param, stock, fused, report


def _batch(seed=1, b=2, t=14):
    return sft_batch(V, seed, b, t)


def test_parts_taken(pair):
    family, _, fused, report = pair
    assert list(report) == list(PARTS)
    taken = {part for part, s in report.items() if s.taken}
    assert taken == TAKEN[family], {p: str(s) for p, s in report.items()}
    assert supports(fused) == report  # asking again changes nothing
    for part, s in report.items():
        assert s.why, part


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_training_loss_and_grads_equal_stock(pair, packed):
    family, stock, fused, _ = pair
    if packed and prepare_segments(fused) is not None:
        pytest.skip(f"{family}: {prepare_segments(fused)} (the recipe runs padded rows)")
    ids, mask, labels = _batch()
    stock.zero_grad()
    ref = stock(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref.backward()
    recipe = Recipe.__new__(Recipe)  # the real compute_loss, without a whole run's setup
    recipe.cfg, recipe.device, recipe.padding_free = (
        SimpleNamespace(precision="fp32"), torch.device("cpu"), packed,
    )  # fmt: skip
    fused.zero_grad()
    fused.train()  # as in training (these configs have no dropout)
    try:
        loss, _ = recipe.compute_loss(
            fused, {"input_ids": ids, "attention_mask": mask, "labels": labels}
        )
        loss.backward()
    finally:
        fused.eval()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    grads = dict(stock.named_parameters())
    for name, p in fused.named_parameters():
        want = grads[name].grad
        scale = float(want.abs().max()) or 1.0
        err = float((p.grad - want).abs().max()) / scale
        assert err < 1e-5, (name, err)


def test_dpo_logps_equal_stock(pair):
    _, stock, fused, _ = pair
    ids, mask, labels = _batch(b=4)
    mask[3, -2:] = 0
    labels[3, -2:] = -100
    with torch.no_grad():
        out = pair_logps(fused, {"input_ids": ids, "attention_mask": mask, "labels": labels})
        ref = stock_sums(stock, ids, mask, labels)
    torch.testing.assert_close(out.chosen, ref[:2], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.rejected, ref[2:], rtol=1e-5, atol=1e-4)


REQUESTS = [("Question: what is the sun?\nAnswer:", " a star"),
            ("Question: what is the sun?\nAnswer:", " a planet"),
            ("The cat sat on", " the mat"),
            ("The cat sat on", " a hat with a long brim")]  # fmt: skip


def test_eval_loglikelihoods_equal_stock(pair, tiny_tokenizer):  # noqa: F811
    _, stock, fused, _ = pair
    lm = HFLM(fused, tokenizer=tiny_tokenizer, batch_size=4, pack_weights=False)
    got = lm.loglikelihood(REQUESTS)
    assert_loglikelihoods(got, REQUESTS, stock, tiny_tokenizer, 1e-5)


def test_greedy_generation_equals_stock_generate(pair, tiny_tokenizer):  # noqa: F811
    _, stock, fused, _ = pair
    lm = HFLM(fused, tokenizer=tiny_tokenizer, batch_size=2, pack_weights=False)
    contexts = ["Question: what is the sun?\nAnswer:", "The cat sat on"]
    got = lm.generate_until([(c, {"max_gen_toks": 10}) for c in contexts])
    for ctx, text in zip(contexts, got, strict=True):
        ids = torch.tensor([tiny_tokenizer(ctx)["input_ids"]])
        out = stock.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        want = tiny_tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert text == want
