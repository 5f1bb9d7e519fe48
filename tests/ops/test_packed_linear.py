"""PackedLinears: nn.Linear on oneDNN-packed float32 weights without autograd, stock otherwise."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyfast.hf import swaps as hfs
from pyfast.ops import packed_linear as pl
from pyfast.optim import FusedAdamW
from tests.conftest import tiny_llama

pytestmark = pytest.mark.skipif(
    pl.packing_unavailable() is not None, reason=f"{pl.packing_unavailable()}"
)


REAL_MIN_MACS = pl._MIN_MACS


@pytest.fixture(autouse=True)
def _every_size(monkeypatch):
    """The unit tests' layers are tiny: every call may take the packed path (the size rule has
    its own test)."""
    monkeypatch.setattr(pl, "_MIN_MACS", 0)


def _packed_made(m: nn.Linear, packs: pl.PackedLinears) -> bool:
    pack = packs._packs.get(m)
    return pack is not None and pack.packed is not None


def _close(got: torch.Tensor, x: torch.Tensor, lin: nn.Linear) -> None:
    """Within float32 rounding of the float64 product (a summation order of its own)."""
    b = None if lin.bias is None else lin.bias.double()
    ref = F.linear(x.double(), lin.weight.double(), b)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    if ref.numel():
        scale = max(ref.abs().max().item(), 1.0)
        assert (got.double() - ref).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "shape", [(13,), (1, 13), (7, 13), (2, 5, 13), (3, 1, 4, 13), (0, 13), (300, 13)]
)
def test_matches_linear_on_awkward_shapes(shape, bias):
    lin = nn.Linear(13, 29, bias=bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        stock = lin(x)
        with pl.PackedLinears(lin) as packs:
            got = lin(x)
    assert _packed_made(lin, packs)
    _close(got, x, lin)
    assert torch.allclose(got, stock, rtol=1e-5, atol=1e-5)


def test_strided_inputs_and_inference_mode():
    lin = nn.Linear(24, 40)
    x = torch.randn(9, 48)[:, ::2]  # non-contiguous rows
    xt = torch.randn(24, 6).t()  # transposed
    with pl.PackedLinears(lin) as packs:
        with torch.inference_mode():
            a = lin(x)
        with torch.no_grad():  # the pack made in inference mode serves outside it too
            b = lin(xt)
    assert _packed_made(lin, packs)
    _close(a, x, lin)
    _close(b, xt, lin)


def test_autograd_dtype_and_autocast_take_the_stock_forward():
    lin = nn.Linear(16, 8)
    x = torch.randn(5, 16, requires_grad=True)
    with pl.PackedLinears(lin) as packs:
        y = lin(x)  # gradients wanted: torch's linear, which autograd can differentiate
        y.sum().backward()
        assert not _packed_made(lin, packs)
        assert x.grad is not None and torch.allclose(x.grad, lin.weight.sum(0).expand(5, 16))
        with torch.no_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert lin(torch.randn(2, 16)).dtype == torch.bfloat16
            with pytest.raises(RuntimeError, match="dtype"):  # torch's own message
                lin(torch.randn(2, 16, dtype=torch.float64))
        assert not _packed_made(lin, packs)
        with torch.no_grad():
            lin(torch.randn(2, 16))
        assert _packed_made(lin, packs)


@pytest.mark.parametrize("optimizer", ["sgd", "pyfast_fused_adamw"])
def test_weight_changed_in_place_or_replaced_is_packed_again(optimizer):
    lin = nn.Linear(12, 20)
    if optimizer == "sgd":
        opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    else:  # the compiled update bumps the params' version counters too
        opt = FusedAdamW(lin.parameters(), lr=0.5)
    x = torch.randn(4, 12)
    packs = pl.PackedLinears(lin)
    with packs, torch.no_grad():
        before = lin(x)
    lin(x).square().sum().backward()  # a training step between two evaluations
    opt.step()
    with packs, torch.no_grad():
        after = lin(x)
        _close(after, x, lin)
        assert not torch.allclose(after, before)
        lin.load_state_dict({"weight": torch.zeros(20, 12), "bias": torch.ones(20)})
        assert torch.equal(lin(x), torch.ones(4, 20))
        lin.weight = nn.Parameter(torch.eye(20, 12))  # a new tensor altogether
        _close(lin(x), x, lin)


def test_enter_and_exit_leave_other_forwards_and_the_class_alone():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4).double())
    own = model[1].forward = lambda x: x * 2  # a forward someone else installed
    packs = pl.PackedLinears(model)
    with packs:
        assert "forward" in model[0].__dict__
        assert model[1].forward is own and "_pyfast_pack" not in model[1].__dict__
        assert "forward" not in model[2].__dict__  # float64: not a candidate
        with packs:  # re-entered: still installed after the inner exit
            pass
        assert "forward" in model[0].__dict__
        with pl.PackedLinears(model) as inner:  # another one nested: the outer keeps the modules
            assert inner._installed == []
    assert "forward" not in model[0].__dict__ and "_pyfast_pack" not in model[0].__dict__
    assert model[1].forward is own
    assert nn.Linear.forward is not pl.linear_forward
    assert pl.packed_linear(model[0], torch.randn(2, 8)) is None  # outside: not served


def test_packed_bytes_and_release():
    lin = nn.Linear(32, 64, bias=False)
    packs = pl.PackedLinears(lin)
    with packs, torch.no_grad():
        lin(torch.randn(3, 32))
    assert packs.packed_bytes >= 32 * 64 * 4
    packs.release()
    assert packs.packed_bytes == 0
    x = torch.randn(3, 32)
    with packs, torch.no_grad():
        lin(x)
        lin.weight.data.mul_(2)  # through .data: the version counter does not move ...
        packs.release()  # ... so the documented remedy, valid while entered
        _close(lin(x), x, lin)


def test_plan(monkeypatch):
    model = nn.Sequential(nn.Linear(64, 64))
    assert pl.packing_plan(model, False) == (False, "off (asked)")
    on, why = pl.packing_plan(model)
    assert on and "1 linear layers" in why
    monkeypatch.setattr(pl, "_available_memory", lambda: 64 * 64 * 4)  # twice the weights: short
    on, why = pl.packing_plan(model)
    assert not on and "half the available memory" in why
    assert pl.packing_plan(model, True)[0]  # asked for: the memory rule is the caller's call
    bf16 = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    assert pl.packing_plan(bf16) == (
        False, "off: the model has no float32 nn.Linear layer on the CPU")  # fmt: skip
    with pytest.raises(ValueError, match="packed linear weights asked for, but the model has no"):
        pl.packing_plan(bf16, True)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert pl.packing_plan(model) == (False, "off: this torch build has no oneDNN (mkldnn)")


def test_fused_and_stock_llama_inside_match_outside():
    stock = tiny_llama(97)
    fused = copy.deepcopy(stock)
    assert hfs.fuse_decoder_blocks(fused) > 0
    ids = torch.randint(0, 97, (2, 11))
    for model in (stock, fused):
        with torch.no_grad():
            ref = model(ids).logits
            packs = pl.PackedLinears(model)
            with packs:
                got = model(ids).logits
        mlp = model.model.layers[0].mlp
        # every projection ran packed, the fused MLP's included
        assert all(_packed_made(m, packs) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        assert _packed_made(model.model.layers[1].self_attn.o_proj, packs)
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)
        # gradients on: the stock path, same result, and it trains
        with packs:
            out = model(ids).logits
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4) and out.requires_grad


def test_small_calls_stay_with_torch(monkeypatch):
    monkeypatch.setattr(pl, "_MIN_MACS", REAL_MIN_MACS)
    lin = nn.Linear(576, 192, bias=False)  # SmolLM2's k/v projection
    with pl.PackedLinears(lin) as packs, torch.no_grad():
        lin(torch.randn(16, 576))  # a decoding step of 16 rows: 1.8M multiply-adds
        assert not _packed_made(lin, packs)
        x = torch.randn(19, 576)  # 2.1M: at the threshold and above, packed
        assert x.numel() * 192 >= pl._MIN_MACS
        _close(lin(x), x, lin)
        assert _packed_made(lin, packs)


def test_packed_for_inference_follows_the_plan():
    model = nn.Sequential(nn.Linear(16, 16))
    ctx = pl.packed_for_inference(model)
    assert isinstance(ctx, pl.PackedLinears)
    with ctx, torch.no_grad():
        y = model(x := torch.randn(3, 16))
    _close(y, x, model[0])
    assert "forward" not in model[0].__dict__
    assert not isinstance(pl.packed_for_inference(model, False), pl.PackedLinears)
    bf16 = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    assert not isinstance(pl.packed_for_inference(bf16), pl.PackedLinears)


def test_packed_frozen_only_where_something_is_frozen():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    assert not isinstance(pl.packed_frozen(model), pl.PackedLinears)  # all trainable
    model[0].requires_grad_(False)
    packs = pl.packed_frozen(model)
    assert isinstance(packs, pl.PackedLinears)
    x = torch.randn(3, 16)
    with packs:  # gradients on: the frozen first layer runs packed, the trainable one does not
        y = model(x)
        y.sum().backward()
    assert _packed_made(model[0], packs) and not _packed_made(model[1], packs)
    assert model[1].weight.grad is not None and model[0].weight.grad is None
    _close(model[0](x).detach(), x, model[0])


def test_deepcopy_inside_packs_its_own_weights():
    model = nn.Sequential(nn.Linear(16, 16))
    x = torch.randn(3, 16)
    with pl.PackedLinears(model) as packs, torch.no_grad():
        model(x)
        twin = copy.deepcopy(model)  # as a LoRA merge at save time does
        with torch.no_grad():
            twin[0].weight.mul_(2)
        _close(twin(x), x, twin[0])
        _close(model(x), x, model[0])
    assert _packed_made(model[0], packs)


def test_frozen_layer_with_input_gradient_runs_packed_forward():
    lin = nn.Linear(24, 40).requires_grad_(False)  # frozen, above something trainable
    x = torch.randn(6, 24, requires_grad=True)
    want = lin(x)
    (want * torch.arange(40.0)).sum().backward()
    want_grad, x.grad = x.grad, None
    with pl.PackedLinears(lin) as packs:
        got = lin(x)
        (got * torch.arange(40.0)).sum().backward()
    assert _packed_made(lin, packs) and got.grad_fn is not None
    _close(got.detach(), x.detach(), lin)
    torch.testing.assert_close(x.grad, want_grad)  # grad_x = grad_y @ W, through the plain W
    assert lin.weight.grad is None


def test_lora_training_step_same_gradients_packed():
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(97)
    ids = torch.randint(0, 97, (2, 9))
    grads = []
    for packed in (False, True):
        torch.manual_seed(0)  # the same adapter initialisation both times
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.1)  # non-zero adapters: gradients reach lora_A too
        ctx = pl.packed_frozen(model) if packed else contextlib.nullcontext()
        with ctx:
            model(input_ids=ids, labels=ids).loss.backward()
        if packed:  # the frozen base projections ran packed, q_proj's under the adapter too
            assert _packed_made(model.base_model.model.model.layers[1].mlp.down_proj, ctx)
            assert _packed_made(
                model.base_model.model.model.layers[1].self_attn.q_proj.base_layer, ctx
            )
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-5)
