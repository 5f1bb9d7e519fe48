"""grad_mask_: zero the gradients of frozen elements or rows (transfer learning)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pyfast._extension import HAS_C
from pyfast.ops import reference
from pyfast.ops._dispatch import use_kernel

Tensor = torch.Tensor


def grad_mask_(grads: Sequence[Tensor], masks: Sequence[Tensor | None]) -> None:
    """Zeroes, in place, every frozen entry of `grads`.

    Args:
        grads: float32 or bfloat16 contiguous tensors.
        masks: one entry per grad: None (leave alone), or a bool/uint8 tensor of the grad's shape
            (per element) or of shape (grad.shape[0],) (per row); true = trainable.
    """
    if grads and use_kernel(grads[0].device):
        torch.ops.pyfast.grad_mask_(list(grads), list(masks))
    else:
        reference.grad_mask_(grads, masks)


if HAS_C:

    @torch.library.register_fake("pyfast::grad_mask_")
    def _grad_mask_fake(grads, masks):
        return None
