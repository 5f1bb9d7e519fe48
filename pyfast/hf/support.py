"""What pyfast takes over in a given Hugging Face model, part by part, and why (not).

:func:`supports` answers without changing the model; :func:`apply` swaps in every part that is
taken and returns the same answer. The parts:

- ``fused_head``: loss / log-probs from hidden states without (tokens, vocab) logits
  (:func:`pyfast.hf.head.check_head`: the model's logit map, checked numerically);
- ``fused_norm``, ``fused_mlp``, ``fused_attention``: the decoder-block swaps
  (:mod:`pyfast.hf.swaps`: allow-listed classes whose self-check agrees with the stock forward);
- ``segment_attention``: packed rows (padding-free SFT, DPO and eval scoring;
  :func:`pyfast.hf.packing.packing_unsupported`);
- ``trie_attention``: the compiled prefix-trie attention kernel for eval scoring (packed rows
  on the CPU with pyfast's C++ extension; elsewhere the segments path).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pyfast._extension import HAS_C
from pyfast.hf import swaps
from pyfast.hf.compat import check_transformers
from pyfast.hf.head import check_head
from pyfast.hf.packing import packing_unsupported

PARTS = ("fused_head", "fused_norm", "fused_mlp", "fused_attention", "segment_attention",
         "trie_attention")  # fmt: skip
# Module-name suffixes that tell a block's kind when its class is not one pyfast knows.
_SUFFIXES = {"norm": ("RMSNorm", "LayerNorm"), "mlp": ("MLP",), "attention": ("Attention",)}


@dataclass(frozen=True)
class Support:
    taken: bool
    why: str

    def __str__(self) -> str:
        return f"{'taken' if self.taken else 'not taken'}: {self.why}"


def _blocks(model: nn.Module, part: str, verdict: dict) -> Support:
    entry = verdict.get(part, {"taken": [], "declined": {}})
    unknown = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if type(m).__name__.endswith(_SUFFIXES[part])
            and type(m).__name__ not in entry["taken"]
            and type(m).__name__ not in entry["declined"]
            and not type(m).__name__.endswith(("FlashAttention2", "SdpaAttention"))
        }
    )
    why = []
    if entry["taken"]:
        why.append("swapped: " + ", ".join(entry["taken"]))
    why += [f"{name} kept: {reason}" for name, reason in entry["declined"].items()]
    why += [f"{name} kept: not a class pyfast reproduces" for name in unknown]
    if not why:
        why = ["the model has no such block"]
    return Support(bool(entry["taken"]) and not entry["declined"] and not unknown, "; ".join(why))


def supports(model: nn.Module) -> dict[str, Support]:
    """Part -> :class:`Support` (taken or not, and why) for `model`, in :data:`PARTS` order.
    Runs the same checks as :func:`apply` (the head's and each block class's numeric
    self-check) but swaps nothing. A part is "taken" only where it applies to every module of
    its kind; partly taken parts say which classes were kept and why."""
    out: dict[str, Support] = {}
    try:
        m = check_head(model)
        what = "logits = hidden @ W.T + b" if m.plain else f"logit map {m} folded into the kernel"
        out["fused_head"] = Support(True, what)
    except ValueError as exc:
        out["fused_head"] = Support(False, str(exc))
    verdict = swaps.plan(model)
    for part in ("norm", "mlp", "attention"):
        out[f"fused_{part}"] = _blocks(model, part, verdict)
    why = packing_unsupported(model, implementations=("sdpa",))
    out["segment_attention"] = (
        Support(True, "packed rows through the sdpa dispatcher")
        if why is None
        else Support(False, why)
    )
    device = next(model.parameters()).device.type
    out["trie_attention"] = (
        Support(False, f"needs packed rows ({why})")
        if why is not None
        else Support(False, "pyfast._C is not built")
        if not HAS_C
        else Support(False, f"the compiled kernel is CPU-only; {device} runs the segments path")
        if device != "cpu"
        else Support(True, "compiled prefix-trie kernel for inference on the CPU")
    )
    return out


def apply(model: nn.Module, recompute_mlp: bool = False) -> dict[str, Support]:
    """Installs in `model` every block swap that :func:`supports` takes (norms, MLPs, attention;
    :func:`pyfast.hf.swaps.fuse_decoder_blocks`) and returns :func:`supports`'s answer after it.
    The fused head and packed rows are not module swaps: pyfast's train / align / eval recipes
    (and :func:`pyfast.hf.causal_lm_loss`) use them where the answer says so. Idempotent."""
    check_transformers()
    swaps.fuse_decoder_blocks(model, recompute_mlp=recompute_mlp)
    return supports(model)


def format_support(report: dict[str, Support]) -> str:
    """One line per part, for logs and the CLI."""
    width = max(map(len, report))
    return "\n".join(f"{part:<{width}}  {s}" for part, s in report.items())
