"""Public entry points of the pyfast kernels (torch.ops.pyfast.*), with reference fallbacks."""

from pyfast.ops.fused_adamw import fused_adamw_, grad_norm
from pyfast.ops.fused_blocks import (
    gated_mlp,
    geglu,
    rms_norm,
    rms_norm_offset,
    rotary,
    swiglu,
    swiglu_mlp,
)
from pyfast.ops.grad_mask import grad_mask_
from pyfast.ops.token_logprobs import (
    fused_cross_entropy,
    linear_cross_entropy,
    linear_token_logprobs,
    sequence_logprobs,
    token_logprobs,
)

__all__ = [
    "fused_adamw_",
    "grad_norm",
    "grad_mask_",
    "token_logprobs",
    "linear_token_logprobs",
    "sequence_logprobs",
    "fused_cross_entropy",
    "linear_cross_entropy",
    "rms_norm",
    "swiglu",
    "swiglu_mlp",
    "rms_norm_offset",
    "geglu",
    "gated_mlp",
    "rotary",
]
