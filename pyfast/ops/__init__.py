"""Public entry points of the pyfast kernels (torch.ops.pyfast.*), with reference fallbacks."""

from pyfast.ops.fused_adamw import fused_adamw_, grad_norm
from pyfast.ops.grad_mask import grad_mask_

__all__ = ["fused_adamw_", "grad_norm", "grad_mask_"]
