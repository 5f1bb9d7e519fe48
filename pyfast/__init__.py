"""pyfast: fine-tune, align and evaluate bespoke LLMs on fused C++/CUDA kernels.

Importing pyfast loads the compiled extension ``pyfast._C`` (which registers
``torch.ops.pyfast.*``). If it is missing, fails to load, or was compiled for SIMD instructions
this CPU lacks, pyfast warns once and every op in :mod:`pyfast.ops` runs its pure-PyTorch twin
from :mod:`pyfast.ops.reference` instead.
"""

from pyfast._extension import HAS_C, HAS_CUDA_KERNELS, extension_info

__version__ = "0.1.0"

__all__ = ["HAS_C", "HAS_CUDA_KERNELS", "extension_info", "__version__"]
