"""pyfast's integration with Hugging Face transformers models, in one place; :mod:`pyfast.ops` holds
the kernels alone.

- :mod:`pyfast.hf.head`: how a model family turns hidden states into logits (the logit map,
  checked at load) and the fused-head path from a model's inputs (:func:`causal_lm_loss`,
  :func:`causal_lm_token_logprobs`);
- :mod:`pyfast.hf.swaps`: the fused decoder blocks swapped into a model, each class behind an
  allow-list and a numeric self-check;
- :mod:`pyfast.hf.attention`: the fused-rotary attention forward and the sdpa dispatcher;
- :mod:`pyfast.hf.packing`: packed rows through a decoder (segment and trie attention);
- :mod:`pyfast.hf.support`: :func:`supports` (what is taken, per part, and why) and
  :func:`apply` (install what is taken);
- :mod:`pyfast.hf.compat`: the transformers versions pyfast is tested with.
"""

from pyfast.hf.compat import TRANSFORMERS_TESTED, check_transformers
from pyfast.hf.head import (
    PLAIN,
    LogitMap,
    apply_logit_map,
    causal_lm_loss,
    causal_lm_token_logprobs,
    check_head,
    logit_map,
)
from pyfast.hf.support import PARTS, Support, apply, format_support, supports
from pyfast.hf.swaps import fuse_decoder_blocks

__all__ = [
    "PARTS",
    "PLAIN",
    "TRANSFORMERS_TESTED",
    "LogitMap",
    "Support",
    "apply",
    "apply_logit_map",
    "causal_lm_loss",
    "causal_lm_token_logprobs",
    "check_head",
    "check_transformers",
    "format_support",
    "fuse_decoder_blocks",
    "logit_map",
    "supports",
]
