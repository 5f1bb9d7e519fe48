"""fused_adamw_ and grad_norm: the optimizer kernels behind pyfast.optim.FusedAdamW."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pyfast._extension import HAS_C
from pyfast.ops import reference
from pyfast.ops._dispatch import use_kernel

Tensor = torch.Tensor


def fused_adamw_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    masks: Sequence[Tensor | None],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: Tensor | None = None,
) -> None:
    """One AdamW update of every tensor in `params`, in place, in a single pass.

    Args:
        params, grads: same shapes; float32 or bfloat16 (grads share their param's dtype);
            contiguous; one device.
        exp_avgs, exp_avg_sqs: optimizer state, float32 or bfloat16 (one dtype for the call).
        masks: empty, or one entry per param: None, a bool/uint8 tensor of the param's shape
            (per element) or of shape (param.shape[0],) (per row); true = trainable. Frozen
            entries keep param, exp_avg and exp_avg_sq bit-identical.
        step: the step count *after* this update (1 on the first call), for bias correction.
        grad_scale: optional one-element float32 tensor multiplied into every gradient (the
            clipping coefficient); read on the device, so no host synchronisation.

    Raises:
        RuntimeError: mismatched list lengths, shapes, dtypes or devices (the message names the
            argument and index).
    """
    use_c = bool(params) and use_kernel(params[0].device)
    impl = torch.ops.pyfast.fused_adamw_ if use_c else reference.fused_adamw_
    lists = [list(x) for x in (params, grads, exp_avgs, exp_avg_sqs, masks)]
    impl(*lists, lr, beta1, beta2, eps, weight_decay, step, grad_scale)
    if use_c:
        # The compiled op writes through raw pointers, which autograd's version counters do not
        # see; bump the params' as torch's in-place updates do (~12 us for 272 tensors), so that
        # anything keyed on them (autograd's saved-tensor check, PackedLinears' packed copies)
        # knows the weights changed.
        torch.autograd.graph.increment_version(lists[0])


def grad_norm(tensors: Sequence[Tensor], masks: Sequence[Tensor | None] = ()) -> Tensor:
    """Global L2 norm of `tensors` (only trainable entries when `masks` is given).

    Returns a 0-dim float32 tensor on the tensors' device (no host synchronisation).
    """
    if tensors and use_kernel(tensors[0].device):
        return torch.ops.pyfast.grad_norm(list(tensors), list(masks))
    return reference.grad_norm(tensors, masks)


if HAS_C:

    @torch.library.register_fake("pyfast::fused_adamw_")
    def _fused_adamw_fake(*args, **kwargs):
        return None  # mutates its inputs in place, returns nothing

    @torch.library.register_fake("pyfast::grad_norm")
    def _grad_norm_fake(tensors, masks):
        device = tensors[0].device if tensors else torch.device("cpu")
        return torch.empty((), dtype=torch.float32, device=device)
