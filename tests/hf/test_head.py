"""The head map of pyfast.hf.head: models that transform their logits (Gemma-2 softcap, Granite
and Cohere scaling) give the stock model's loss, DPO log-probs and eval log-likelihoods through
the fused head, and a head pyfast cannot reproduce is refused."""

from types import SimpleNamespace

import pytest
import torch

from pyfast.align.logps import pair_logps
from pyfast.eval.model import HFLM
from pyfast.hf import PLAIN, LogitMap, causal_lm_loss, check_head, logit_map
from pyfast.train.recipe import Recipe
from tests.eval.conftest import tiny_tokenizer  # noqa: F401 - fixture
from tests.hf.oracles import assert_loglikelihoods, sft_batch, stock_sums

V = 400  # the tiny tokenizer's vocabulary


def _tiny(kind: str):
    import transformers as tf

    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  initializer_range=0.5)  # fmt: skip
    if kind == "llama":
        cfg = tf.LlamaConfig(**common)
    elif kind == "gemma2":
        cfg = tf.Gemma2Config(**common, head_dim=8, final_logit_softcapping=5.0,
                              query_pre_attn_scalar=8)  # fmt: skip
    elif kind == "granite":
        cfg = tf.GraniteConfig(**common, logits_scaling=8.0)
    elif kind == "cohere":
        cfg = tf.CohereConfig(**common, logit_scale=0.0625)
    else:
        raise AssertionError(kind)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


EXPECTED = {
    "llama": PLAIN,
    "gemma2": LogitMap(softcap=5.0),
    "granite": LogitMap(scale=0.125),
    "cohere": LogitMap(scale=0.0625),
}
FAMILIES = list(EXPECTED)


def _batch(seed=1, b=2, t=12):
    return sft_batch(V, seed, b, t)


@pytest.mark.parametrize("kind", FAMILIES)
def test_map_is_read_and_checked(kind):
    model = _tiny(kind)
    assert logit_map(model) == EXPECTED[kind]
    assert check_head(model) == EXPECTED[kind]
    if kind != "llama":  # the map matters on these logits: the plain head is measurably off
        ids = _batch()[0]
        logits = model(input_ids=ids).logits
        plain = model.get_output_embeddings()(model.get_decoder()(input_ids=ids)[0])
        assert (logits - plain).abs().max() > 1e-2


@pytest.mark.parametrize("kind", FAMILIES)
def test_training_loss_and_grads_equal_stock(kind):
    model = _tiny(kind)
    ids, mask, labels = _batch()
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    recipe = Recipe.__new__(Recipe)  # the real compute_loss, without a whole run's setup
    recipe.cfg, recipe.device, recipe.padding_free = (
        SimpleNamespace(precision="fp32"), torch.device("cpu"), False,
    )  # fmt: skip
    loss, _ = recipe.compute_loss(model, {"input_ids": ids, "attention_mask": mask,
                                          "labels": labels})  # fmt: skip
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    torch.testing.assert_close(causal_lm_loss(model, ids, labels, mask), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", FAMILIES)
def test_dpo_logps_equal_stock(kind):
    model = _tiny(kind)
    ids, mask, labels = _batch(b=4)
    mask[3, -2:] = 0
    labels[3, -2:] = -100
    with torch.no_grad():
        out = pair_logps(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
        ref = stock_sums(model, ids, mask, labels)
    torch.testing.assert_close(out.chosen, ref[:2], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.rejected, ref[2:], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", FAMILIES)
def test_eval_loglikelihoods_equal_stock(kind, tiny_tokenizer):  # noqa: F811
    model = _tiny(kind)
    lm = HFLM(model, tokenizer=tiny_tokenizer, batch_size=4, pack_weights=False)
    requests = [("Question: what is the sun?\nAnswer:", " a star"),
                ("Question: what is the sun?\nAnswer:", " a planet"),
                ("The cat sat on", " the mat")]  # fmt: skip
    got = lm.loglikelihood(requests)
    assert_loglikelihoods(got, requests, model, tiny_tokenizer, 1e-4)


def test_a_head_pyfast_cannot_reproduce_is_refused():
    model = _tiny("llama")
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: o * 3 + 1)
    with pytest.raises(ValueError, match="refused"):
        check_head(model)


def test_unknown_family_with_a_logit_transform_is_refused():
    model = _tiny("llama")
    model.config.model_type = "hyperclovax_like"
    model.config.logits_scaling = 4.0  # multiplied by one family, divided by another
    with pytest.raises(ValueError, match="logits_scaling=4.0"):
        logit_map(model)
    model.config.logits_scaling = None
    assert logit_map(model) == PLAIN  # unknown type, no transform key: plain, then checked
    assert check_head(model) == PLAIN
