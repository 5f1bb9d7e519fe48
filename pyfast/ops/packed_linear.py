"""nn.Linear layers on oneDNN-packed float32 weights on the CPU: inference and frozen layers.

A matmul library reorders ("packs") both operands into the blocked layout of its micro-kernel on
every call. Inference multiplies by the same weights thousands of times, so the weight's packing can
be done once: :class:`PackedLinears` keeps a oneDNN-packed copy of each float32 ``nn.Linear`` weight
of a model (``torch.ops.mkldnn._reorder_linear_weight``, made on first use) and, while it is
entered, the modules' forward runs ``torch.ops.mkldnn._linear_pointwise`` on it wherever the weight
needs no gradient (without autograd; with it, for frozen layers, whose input gradient then goes
through the plain weight: LoRA's base layers, frozen blocks). Measured here
(benchmarks/bench_packed_linear.py, 2-core AMD EPYC): SmolLM2-135M's layer shapes at 2,048 rows run
at 210-225 GFLOP/s against 170-200 for torch's ``F.linear`` (MKL), its 49152-wide head at 1-16 rows
(decoding) 1.9-3.2x faster, and 0-shot HellaSwag evaluation (benchmarks/bench_eval.py) ~10% faster.
Calls below ``_MIN_MACS`` multiply-adds stay with torch, where oneDNN's fixed cost per call loses.

The packed copy costs the weight's size once more in memory, so :func:`packing_plan` packs only
where the model's float32 linear weights fit in half the available memory. A weight changed in place
after packing (a training step between two evaluations, ``load_state_dict``) is packed again at its
next use: each pack remembers the weight's storage and version counter (writes through
``weight.data``, which bypass that counter, are not seen: call :meth:`PackedLinears.release` after
them). Results equal ``F.linear``'s to float32 rounding (a different summation order), not bit for
bit.

Anything else — a weight or bias that wants its gradient, another dtype or device, autocast,
``torch.compile`` — takes the module's stock forward. Exiting restores the modules' forward; the
packs stay with the :class:`PackedLinears` object for the next entry."""

from __future__ import annotations

import contextlib
import os
import types

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

_ROWS_HINT = 2048  # rows the packed layout is chosen for; measured the same from 64 to 4096 rows
# Below this many multiply-adds a call stays with torch: oneDNN's ~20-30 us of fixed cost per
# call lost to MKL on SmolLM2's narrow projections at decoding sizes (576->192 at 1 and 16 rows:
# 0.37x and 0.82x, 576->576 at 1 row: 0.75x; benchmarks/bench_packed_linear.py), while from
# 576->576 at 16 rows (5.3M) up it won.
_MIN_MACS = 1 << 21


def packing_unavailable() -> str | None:
    """Why oneDNN weight packing cannot serve this torch build, or None where it can."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    try:
        w = torch.ones(3, 2)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 4)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(4, 2), packed, None, "none", [], "")
    except (AttributeError, RuntimeError) as exc:  # an op missing or refusing float32
        return f"oneDNN linear weight packing failed: {str(exc).splitlines()[0]}"
    if not torch.equal(y, torch.full((4, 3), 2.0)):
        return "oneDNN packed linear gave a wrong result on a self-check"
    return None


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _candidates(model: nn.Module) -> list[nn.Linear]:
    """The model's plain float32 CPU nn.Linear modules with plain weights (subclasses and
    wrappers, e.g. LoRA or quantised layers, keep their own forward; so do sharded weights)."""
    return [
        m
        for m in model.modules()
        if type(m) is nn.Linear
        and type(m.weight.detach()) is torch.Tensor  # not a DTensor or other subclass
        and m.weight.device.type == "cpu"
        and m.weight.dtype == torch.float32
    ]


def packing_plan(model: nn.Module, want: bool | None = None) -> tuple[bool, str]:
    """(pack or not, why) for `model`: `want` None decides by itself (float32 CPU linear layers,
    oneDNN available, their weights fit in half the available memory), True insists (ValueError
    where packing cannot serve), False declines."""
    if want is False:
        return False, "off (asked)"
    mods = _candidates(model)
    if mods:
        reason = packing_unavailable()
    else:
        reason = "the model has no float32 nn.Linear layer on the CPU"
    if reason is None and want is None:
        need = sum(m.weight.numel() * m.weight.element_size() for m in mods)
        avail = _available_memory()
        if avail is not None and need > avail // 2:
            reason = (
                f"the packed copies ({need / 2**20:.0f} MiB) would take more than half the "
                f"available memory ({avail / 2**20:.0f} MiB)"
            )
    if reason is not None:
        if want:
            raise ValueError(f"packed linear weights asked for, but {reason}")
        return False, f"off: {reason}"
    return True, f"oneDNN-packed float32 weights for {len(mods)} linear layers"


class _Pack:
    """One module's packed weight, with the storage and version it was made from."""

    __slots__ = ("packed", "ptr", "version", "out_features")

    def __init__(self, out_features: int):
        self.packed: Tensor | None = None
        self.ptr = self.version = -1
        self.out_features = out_features  # for the size rule without touching the module

    def __deepcopy__(self, memo) -> _Pack:
        # a copied module (e.g. for a LoRA merge at save time) packs its own weight afresh
        return _Pack(self.out_features)

    def weight(self, w: Tensor) -> Tensor:
        if self.packed is None or w.data_ptr() != self.ptr or w._version != self.version:
            # a normal tensor (usable in and out of inference mode), no autograd history
            with torch.inference_mode(False), torch.no_grad():
                self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), _ROWS_HINT)
            self.ptr, self.version = w.data_ptr(), w._version
        return self.packed


def packed_linear(module: nn.Module, x: Tensor) -> Tensor | None:
    """``module(x)`` on the packed weight where `module` is inside an entered
    :class:`PackedLinears`, its weight and bias need no gradient (x may: then through
    :class:`_FrozenPackedLinear`), the input is float32 on the CPU (no autocast, not compiling)
    and the call has at least ``_MIN_MACS`` multiply-adds; None otherwise (the caller takes the
    stock path)."""
    pack = module.__dict__.get("_pyfast_pack")
    # cheapest tests first: small decoding calls come back here thousands of times
    if pack is None or x.numel() * pack.out_features < _MIN_MACS:
        return None
    w, b = module.weight, module.bias
    if (
        x.device.type != "cpu"
        or x.dtype != torch.float32
        or w.dtype != torch.float32
        or (b is not None and b.dtype != torch.float32)
        or x.shape[-1:] != w.shape[1:]
        or torch.is_autocast_enabled("cpu")
        or torch.compiler.is_compiling()
    ):
        return None
    if torch.is_grad_enabled():
        if w.requires_grad or (b is not None and b.requires_grad):
            return None
        if x.requires_grad:
            # a frozen layer whose input needs its gradient (LoRA's base layers, frozen blocks
            # above a trainable one): packed forward, x's gradient through the plain weight
            return _FrozenPackedLinear.apply(x, w, b, pack.weight(w))
    return torch.ops.mkldnn._linear_pointwise(x, pack.weight(w), b, "none", [], "")


class _FrozenPackedLinear(torch.autograd.Function):
    """y = x @ W.T + b with W and b frozen: forward on the packed weight, backward grad_x =
    grad_y @ W (keeps W, which is a parameter anyway, and no activation)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, packed: Tensor) -> Tensor:
        ctx.save_for_backward(weight)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        return grad.matmul(weight), None, None, None


def linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    """The forward :class:`PackedLinears` installs: :func:`packed_linear` where it serves the
    call, else ``nn.Linear.forward``'s ``F.linear``."""
    y = packed_linear(self, x)
    return y if y is not None else F.linear(x, self.weight, self.bias)


class PackedLinears:
    """Context manager: while entered, the float32 CPU ``nn.Linear`` modules of `model` (plain
    ``nn.Linear`` only, and only those whose forward is not already replaced) run on
    oneDNN-packed weights without autograd; see the module docstring. Re-entrant: a nested
    ``with`` of the same object (a scoring call from inside generation, say) keeps the modules
    installed until the outermost exit.

    >>> with PackedLinears(model):
    ...     logits = model(ids).logits
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._packs: dict[nn.Linear, _Pack] = {}
        self._installed: list[nn.Linear] = []
        self._depth = 0

    def __enter__(self) -> PackedLinears:
        self._depth += 1
        if self._depth > 1:
            return self
        for m in _candidates(self.model):
            if "forward" in m.__dict__ or "_pyfast_pack" in m.__dict__:
                continue  # someone else's forward, or another PackedLinears
            pack = self._packs.get(m)
            if pack is None:
                pack = self._packs[m] = _Pack(m.weight.shape[0])
            m.__dict__["_pyfast_pack"] = pack
            m.forward = types.MethodType(linear_forward, m)
            self._installed.append(m)
        return self

    def __exit__(self, *exc) -> bool:
        self._depth -= 1
        if self._depth:
            return False
        for m in self._installed:
            m.__dict__.pop("forward", None)
            m.__dict__.pop("_pyfast_pack", None)
        self._installed = []
        return False

    @property
    def packed_bytes(self) -> int:
        """Memory held by the packed copies made so far."""
        return sum(
            p.packed.numel() * p.packed.element_size()
            for p in self._packs.values()
            if p.packed is not None
        )

    def release(self) -> None:
        """Drops the packed copies, also while entered (they are made again at the next use)."""
        for pack in self._packs.values():
            pack.packed = None


def packed_for_inference(model: nn.Module, want: bool | None = None):
    """A context for a no-grad pass over `model`: :class:`PackedLinears` where
    :func:`packing_plan` packs (packed afresh at each use, dropped on exit), else a null
    context. For passes that see the weights once per call: DPO's reference pass, held-out
    losses between training steps."""
    return PackedLinears(model) if packing_plan(model, want)[0] else contextlib.nullcontext()


def packed_frozen(model: nn.Module, want: bool | None = None):
    """A context for a training loop over `model`: :class:`PackedLinears` where
    :func:`packing_plan` packs and some float32 CPU linear layer is frozen, else a null context.
    Gradients on, a frozen layer runs its forward packed — the frozen blocks of transfer learning,
    LoRA's base layers — and its packs stay valid for the whole run; where its input needs a
    gradient, that goes through the plain weight. Trainable layers take torch's forward."""
    frozen = any(not m.weight.requires_grad for m in _candidates(model))
    if frozen and packing_plan(model, want)[0]:
        return PackedLinears(model)
    return contextlib.nullcontext()
