"""grad_mask_ against its reference twin, per element and per row, fp32 and bf16."""

import pytest
import torch

import pyfast
from pyfast.ops import grad_mask_, reference
from tests.conftest import devices


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(device, dtype):
    grads = [torch.randn(s, device=device, dtype=dtype) for s in [(97, 33), (5,), (49, 3, 2), ()]]
    masks = [
        torch.rand(97, device=device) < 0.1,  # per row
        torch.rand(5, device=device) < 0.5,
        torch.rand(49, 3, 2, device=device) < 0.5,  # per element
        None,
    ]
    ours = [g.clone() for g in grads]
    twin = [g.clone() for g in grads]
    grad_mask_(ours, masks)
    reference.grad_mask_(twin, masks)
    for a, b in zip(ours, twin, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(ours[0][~masks[0]], torch.zeros_like(ours[0][~masks[0]]))
    assert torch.equal(ours[0][masks[0]], grads[0][masks[0]])
    assert torch.equal(ours[3], grads[3])


@pytest.mark.skipif(not pyfast.HAS_C, reason="compiled extension not available")
def test_uint8_masks_and_errors():
    g = torch.randn(4, 3)
    grad_mask_([g], [torch.tensor([1, 0, 1, 0], dtype=torch.uint8)])
    assert torch.equal(g[1], torch.zeros(3)) and not torch.equal(g[0], torch.zeros(3))
    with pytest.raises(RuntimeError, match=r"grad_mask_: masks must have 1 entries"):
        torch.ops.pyfast.grad_mask_([g], [])
    with pytest.raises(RuntimeError, match=r"grad_mask_: masks\[0\] must be bool or uint8"):
        torch.ops.pyfast.grad_mask_([g], [torch.ones(4)])
