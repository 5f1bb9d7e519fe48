"""pyfast's integration with Hugging Face transformers models: the one place that knows
how a model family turns its decoder's hidden states into logits, and the fused-head path from
a model's inputs (:mod:`pyfast.hf.head`).

The module swaps of the fused decoder blocks (:mod:`pyfast.ops.fused_blocks`) and the segment
hooks (:mod:`pyfast.ops.segments`) move here next (issue 19); until then they live beside the
kernels they call.
"""

from pyfast.hf.head import (
    PLAIN,
    LogitMap,
    apply_logit_map,
    causal_lm_loss,
    causal_lm_token_logprobs,
    check_head,
    logit_map,
)

__all__ = [
    "PLAIN",
    "LogitMap",
    "apply_logit_map",
    "causal_lm_loss",
    "causal_lm_token_logprobs",
    "check_head",
    "logit_map",
]
