"""The swap guards of pyfast.hf: a class of an allow-listed name whose forward is not the one pyfast
reproduces is kept (numeric self-check at swap time, one warning), supports() names what was
kept and why, and the transformers range pyfast pins is the one it checks."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama

from pyfast.hf import apply, compat, supports, swaps

ROOT = Path(__file__).resolve().parents[2]


def _llama(**kw):
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, **kw)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _impostor(base, forward):
    """A subclass with the allow-listed class's name and another forward."""
    return type(base.__name__, (base,), {"forward": forward})


@pytest.mark.parametrize("kind", ["norm", "mlp"])
def test_self_check_keeps_a_module_whose_forward_differs(kind):
    model = _llama()
    ids = torch.randint(0, 64, (2, 7))
    if kind == "norm":
        stock = modeling_llama.LlamaRMSNorm.forward
        cls = _impostor(modeling_llama.LlamaRMSNorm, lambda self, x: stock(self, x) + 0.01)
        mods = [layer.input_layernorm for layer in model.model.layers]
    else:
        stock = modeling_llama.LlamaMLP.forward
        cls = _impostor(modeling_llama.LlamaMLP, lambda self, x: stock(self, x * 1.001))
        mods = [layer.mlp for layer in model.model.layers]
    for m in mods:
        m.__class__ = cls
    with torch.no_grad():
        want = model(ids).logits
    with pytest.warns(UserWarning, match="keeps its stock forward .*forward differs"):
        apply(model)
    assert all("forward" not in vars(m) for m in mods)  # kept: the impostors' own forward
    report = supports(model)
    part = "fused_norm" if kind == "norm" else "fused_mlp"
    assert not report[part].taken and "forward differs" in report[part].why
    assert report["fused_attention"].taken  # the other parts are unaffected
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_self_check_compares_gradients_too():
    """A forward equal to the stock one whose gradient is not (a detached term) is kept."""
    stock = modeling_llama.LlamaRMSNorm.forward

    def forward(self, x):
        y = stock(self, x)
        return y.detach() + (y - y.detach()) * 0.5  # same values, half the gradient

    model = _llama()
    for layer in model.model.layers:
        layer.post_attention_layernorm.__class__ = _impostor(modeling_llama.LlamaRMSNorm, forward)
    with pytest.warns(UserWarning, match="gradient of the input differs"):
        apply(model)
    assert not supports(model)["fused_norm"].taken


def test_supports_names_classes_it_does_not_know():
    model = _llama()

    class FancyMLP(nn.Module):  # an MLP of a family pyfast has no swap for
        def __init__(self, mlp):
            super().__init__()
            self.inner = mlp

        def forward(self, x):
            return self.inner(x)

    layer = model.model.layers[1]
    layer.mlp = FancyMLP(layer.mlp)
    report = supports(model)
    assert not report["fused_mlp"].taken
    assert "swapped: LlamaMLP" in report["fused_mlp"].why
    assert "FancyMLP kept: not a class pyfast reproduces" in report["fused_mlp"].why
    assert report["fused_norm"].taken
    # supports() swaps nothing; apply() does
    assert all("forward" not in vars(m) for m in model.modules())
    apply(model)
    assert "forward" in vars(model.model.layers[0].mlp)


def test_sliding_window_and_eager_attention_are_reported():
    model = _llama()
    model.config._attn_implementation = "eager"
    report = supports(model)
    assert not report["segment_attention"].taken
    assert "attention implementation 'eager'" in report["segment_attention"].why
    assert "needs packed rows" in report["trie_attention"].why


def test_offset_norm_is_the_stock_olmo2_and_gemma2_norm_in_bf16():
    """OLMo-2's norm rounds once after the weight (offset 0 of rms_norm_offset), Gemma-2's adds
    1 to the weight: the swapped forward gives the stock module's bits in bfloat16."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    for cls, offset in ((Olmo2RMSNorm, 0.0), (Gemma2RMSNorm, 1.0)):
        m = cls(48).to(torch.bfloat16)
        with torch.no_grad():
            m.weight.normal_()
        x = torch.randn(3, 5, 48).to(torch.bfloat16)
        want = m(x)
        container = nn.Sequential(m)
        swaps.fuse_decoder_blocks(container)
        assert "forward" in vars(m) and m._pyfast_offset == offset
        assert torch.equal(m(x), want)


def test_transformers_pin_is_the_tested_range():
    """pyproject.toml's requirement is pyfast.hf.compat's range, and the installed transformers
    (what CI installs from that requirement) is inside it: the run-time verdict is asserted."""
    text = (ROOT / "pyproject.toml").read_text()
    reqs = re.findall(r'^\s*"(transformers[^"]*)"', text, flags=re.M)  # Python 3.10: no tomllib
    assert [r.replace(" ", "") for r in reqs] == ["transformers" + compat.tested_range()]
    assert compat.check_transformers()
    assert compat._version("5.25.0") == (5, 25) and compat._version("5.3.0.dev0") == (5, 3)
