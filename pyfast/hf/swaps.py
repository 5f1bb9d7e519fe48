"""pyfast's fused decoder-block ops swapped into a loaded Hugging Face model, module by module.

A module is swapped only where both hold:

- its class is one whose forward pyfast reproduces (the allow-lists below, read off each
  family's modeling code: Llama's RMSNorm, Gemma's ``(1 + w)`` RMSNorm, OLMo-2's one-rounding
  RMSNorm, the gated MLPs of Llama / Qwen / Mistral / Granite / OLMo-2 (SiLU), Gemma-2/3
  (GELU-tanh) and Phi-3 (fused ``gate_up_proj``), and the attention classes of
  :data:`pyfast.hf.attention.ATTENTION_CLASSES` whose installed source is the one reproduced);
- a numeric self-check at swap time agrees: the fused forward against the stock forward of the
  first module of each class, on a few random rows with the module's own weights, dtype and
  device — forward with and without autograd, and the gradients of the input and of every
  trainable weight (computed with ``torch.autograd.grad``: nothing lands in ``.grad``).

Elsewhere the module keeps its stock forward and one warning per class says why. The swap is per
instance (a bound ``forward``), so it survives ``copy.deepcopy`` and leaves the classes — and
every other model in the process — untouched; state dicts are unchanged. Each decision is
recorded on the model (:func:`swap_report`) for :func:`pyfast.hf.supports`.

The decoder body runs under :class:`_LeanNorms` when gradients are on: a fused norm's output that
later layers save for backward is kept as a recipe (its input, which the norm's backward keeps
anyway) and recomputed bit for bit in backward.
"""

from __future__ import annotations

import functools
import threading
import types
import warnings
import weakref

import torch
from torch import nn

from pyfast.hf import attention as _attention
from pyfast.ops import reference
from pyfast.ops.fused_blocks import (
    _compiled,
    _rms_norm_fwd,
    _swiglu_fwd_,
    gated_mlp,
    rms_norm,
    rms_norm_offset,
)
from pyfast.ops.packed_linear import linear_forward, packed_linear

Tensor = torch.Tensor

# RMSNorm classes whose forward is LlamaRMSNorm's line for line: weight * (x * rstd).to(dtype).
RMSNORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm",
                   "Phi3RMSNorm", "GraniteRMSNorm")  # fmt: skip
# RMSNorm classes computing (x * rstd) * (offset + weight) in float32, cast once: class -> offset.
OFFSET_RMSNORM_CLASSES = {"GemmaRMSNorm": 1.0, "Gemma2RMSNorm": 1.0, "Gemma3RMSNorm": 1.0,
                          "Olmo2RMSNorm": 0.0}  # fmt: skip
# Gated MLPs with gate_proj / up_proj / down_proj and act_fn: down(act(gate(x)) * up(x)).
MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GraniteMLP", "Olmo2MLP",
               "GemmaMLP", "Gemma2MLP", "Gemma3MLP")  # fmt: skip
# Gated MLPs with one gate_up_proj (gate rows first) and activation_fn: Phi-3.
FUSED_GATE_UP_MLP_CLASSES = ("Phi3MLP",)
ATTENTION_CLASSES = _attention.ATTENTION_CLASSES
# Decoder bodies (embeddings + layers + final norm) whose forward runs under _LeanNorms.
BODY_CLASSES = (
    "LlamaModel", "MistralModel", "Qwen2Model", "Qwen3Model", "Phi3Model", "GraniteModel",
    "Olmo2Model", "GemmaModel", "Gemma2Model", "Gemma3TextModel",
)  # fmt: skip

# activation module class -> gated_mlp's activation name (modules that call exactly F.silu /
# F.gelu(approximate="tanh"); GELUTanh's python variant is told apart by its `act`).
_ACTIVATIONS = {"SiLU": "silu", "SiLUActivation": "silu", "GELUTanh": "gelu_tanh",
                "PytorchGELUTanh": "gelu_tanh"}  # fmt: skip


def _activation(act) -> str | None:
    name = _ACTIVATIONS.get(type(act).__name__)
    if name == "gelu_tanh":
        fn = getattr(act, "act", None)  # GELUTanh: functools.partial(F.gelu, approximate="tanh")
        ok = isinstance(fn, functools.partial) and fn.keywords == {"approximate": "tanh"}
        return name if ok or type(act).__name__ == "PytorchGELUTanh" else None
    return name


# -- lean norm outputs ---------------------------------------------------------------------------


class _LeanNorms:
    """Saved-tensor hooks for one forward of a decoder body: a fused RMSNorm's output that the
    next layers save for backward (the q/k/v projections' and the MLP's input) is stored as the
    recipe (norm function, input, weight, ...) instead — the input is kept by the norm's own
    backward anyway — and recomputed, bit for bit, when backward unpacks it. One (tokens, hidden)
    tensor per norm fewer stays alive between forward and backward, for one extra pass over it."""

    _local = threading.local()

    def __init__(self):
        self.outputs: dict[int, tuple] = {}

    @classmethod
    def active(cls) -> _LeanNorms | None:
        stack = getattr(cls._local, "stack", None)
        return stack[-1] if stack else None

    def record(self, y: Tensor, fn, *args) -> None:
        self.outputs[y.data_ptr()] = (weakref.ref(y), fn, args)

    def pack(self, t: Tensor):
        entry = self.outputs.get(t.data_ptr()) if self.outputs else None
        if entry is not None:
            y = entry[0]()
            # the norm's output itself or a reshape of it (alive, so the address is its own)
            same = y is not None and t.numel() == y.numel() and t.dtype == y.dtype
            if same and t.is_contiguous():
                return (_LeanNorms, entry[1], entry[2], t.shape)
        return t

    @staticmethod
    def unpack(packed):
        if type(packed) is tuple and packed[0] is _LeanNorms:
            _, fn, args, shape = packed
            with torch.no_grad():
                return fn(*args).view(shape)
        return packed

    def __enter__(self):
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        self._local.stack.append(self)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        self._local.stack.pop()
        self.outputs.clear()
        return False


def _llama_norm(x, weight, eps):
    return _rms_norm_fwd(x, weight, eps)[0]


def _offset_norm(x, weight, eps, offset):
    if _compiled(x):
        return torch.ops.pyfast.rms_norm_offset(x, weight, eps, offset)[0]
    return reference.rms_norm_offset(x, weight, eps, offset)[0]


# -- the swapped forwards ------------------------------------------------------------------------


def _fused_norm_forward(self, hidden_states: Tensor) -> Tensor:
    if hidden_states.dtype != self.weight.dtype:  # mixed dtypes: the stock module's promotion
        return type(self).forward(self, hidden_states)
    y = rms_norm(hidden_states, self.weight, self.variance_epsilon)
    lean = _LeanNorms.active()
    if lean is not None and y.requires_grad:
        lean.record(y, _llama_norm, hidden_states, self.weight, self.variance_epsilon)
    return y


def _norm_eps(module) -> float | None:
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    return float(eps) if isinstance(eps, (int, float)) else None


def _fused_offset_norm_forward(self, x: Tensor) -> Tensor:
    w = self.weight
    # the kernel's dtypes: x float32 / bfloat16 with the weight in x's dtype or float32
    if not (w.dtype == x.dtype or (x.dtype == torch.bfloat16 and w.dtype == torch.float32)):
        return type(self).forward(self, x)
    offset, eps = self._pyfast_offset, _norm_eps(self)
    y = rms_norm_offset(x, w, eps, offset)
    lean = _LeanNorms.active()
    if lean is not None and y.requires_grad:
        lean.record(y, _offset_norm, x, w, eps, offset)
    return y


def _lean_body_forward(module: nn.Module):
    """The body's forward under :class:`_LeanNorms` when gradients are on (its signature kept:
    callers inspect it, e.g. for the name of the cache argument)."""
    stock = type(module).forward

    @functools.wraps(stock)
    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return stock(self, *args, **kwargs)
        with _LeanNorms():
            return stock(self, *args, **kwargs)

    return types.MethodType(forward, module)


def _plain_linears(*mods) -> bool:
    return all(type(m) is nn.Linear for m in mods)


def _fused_mlp_forward(self, x: Tensor) -> Tensor:
    g, u, d = self.gate_proj, self.up_proj, self.down_proj
    # Wrapped projections (LoRA adapters, quantised layers) keep the stock path.
    if not _plain_linears(g, u, d):
        return type(self).forward(self, x)
    act = self._pyfast_activation
    if act == "silu":
        gate = packed_linear(g, x)  # inside PackedLinears, without autograd: packed weights
        if gate is not None:
            return linear_forward(d, _swiglu_fwd_(gate, linear_forward(u, x)))
    return gated_mlp(x, g.weight, u.weight, d.weight, g.bias, u.bias, d.bias, act,
                     recompute=getattr(self, "_pyfast_recompute", False))  # fmt: skip


def _fused_gate_up_mlp_forward(self, x: Tensor) -> Tensor:
    gu, d = self.gate_up_proj, self.down_proj
    if not _plain_linears(gu, d):
        return type(self).forward(self, x)
    return gated_mlp(x, None, None, d.weight, None, None, d.bias, self._pyfast_activation,
                     getattr(self, "_pyfast_recompute", False), w_gate_up=gu.weight,
                     b_gate_up=gu.bias)  # fmt: skip


# -- the numeric self-check ----------------------------------------------------------------------

# Largest error allowed, relative to the largest stock value: forward (the fused ops give the
# stock bits or differ in reduction order) and gradients (sums in another order), per dtype.
_FWD_TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 2e-3}
_BWD_TOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def _rel_err(got: Tensor, want: Tensor) -> float:
    if got.shape != want.shape:
        return float("inf")
    got, want = got.detach().double(), want.detach().double()
    if not (torch.isfinite(got).all() and torch.isfinite(want).all()):
        same = torch.equal(torch.isnan(got), torch.isnan(want))
        return 0.0 if same and torch.equal(got.nan_to_num(), want.nan_to_num()) else float("inf")
    scale = want.abs().max().clamp_min(1e-30)
    return float((got - want).abs().max() / scale) if want.numel() else 0.0


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _self_check(module: nn.Module, fused, make_args) -> str | None:
    """None where `fused` (an unbound forward) agrees with the stock forward of `module` on the
    arguments `make_args(device, dtype, generator)` builds (its first argument is the input whose
    gradient is compared); else what differed."""
    params = list(module.parameters())
    if not params:
        return "no weights to check against"
    p = params[0]
    if p.device.type == "meta" or p.is_sparse:
        return f"weights on the {p.device.type} device cannot be checked"
    stock = type(module).forward
    dtype, dev = p.dtype, p.device
    gen = torch.Generator(device=dev).manual_seed(0)
    args = make_args(dev, dtype, gen)
    fwd_tol, bwd_tol = _FWD_TOL.get(dtype, 1e-2), _BWD_TOL.get(dtype, 1e-1)
    trainable = [q for q in params if q.requires_grad]
    was_training = module.training
    module.eval()  # no dropout: both forwards see the same function
    try:
        with torch.inference_mode(False), torch.no_grad():
            want = _first(stock(module, *args))
            got = _first(fused(module, *args))
        err = _rel_err(got, want)
        if err > fwd_tol:
            return f"forward differs from the stock module's (relative error {err:.2e})"
        with torch.inference_mode(False), torch.enable_grad():
            x0 = args[0].detach()
            runs = []
            for fn in (stock, fused):
                x = x0.clone().requires_grad_()
                out = _first(fn(module, x, *args[1:]))
                runs.append((out, x))
            (want, xs), (got, xf) = runs
            err = _rel_err(got, want)
            if err > fwd_tol:
                return f"forward with autograd differs (relative error {err:.2e})"
            g = torch.randn(want.shape, generator=gen, device=dev, dtype=torch.float32).to(dtype)
            gs = torch.autograd.grad(want, [xs, *trainable], g, allow_unused=True)
            gf = torch.autograd.grad(got, [xf, *trainable], g, allow_unused=True)
        for i, (a, b) in enumerate(zip(gf, gs, strict=True)):
            if (a is None) != (b is None):
                return "gradients reach different weights"
            if a is not None and (err := _rel_err(a, b)) > bwd_tol:
                what = "the input" if i == 0 else "a weight"
                return f"gradient of {what} differs (relative error {err:.2e})"
    except Exception as exc:  # noqa: BLE001 - any failure of the fused path: keep the stock one
        return f"fused forward failed: {type(exc).__name__}: {exc}"
    finally:
        module.train(was_training)
    return None


def _rows(width: int):
    def make(dev, dtype, gen):
        x = torch.randn(2, 5, width, generator=gen, device=dev, dtype=torch.float32)
        return (x.to(dtype),)

    return make


def _attention_args(module: nn.Module):
    heads = module.config.num_attention_heads
    width = getattr(module.config, "hidden_size", heads * module.head_dim)

    def make(dev, dtype, gen):
        x = torch.randn(1, 6, width, generator=gen, device=dev).to(dtype)
        angle = torch.randn(1, 6, module.head_dim // 2, generator=gen, device=dev)
        angle = torch.cat((angle, angle), -1)
        return x, (angle.cos().to(dtype), angle.sin().to(dtype)), None

    return make


# -- deciding and swapping -----------------------------------------------------------------------

_WARNED: set[tuple[str, str]] = set()


def _decline(module: nn.Module, part: str, reason: str, report: dict) -> None:
    name = type(module).__name__
    report.setdefault(part, {"taken": [], "declined": {}})["declined"][name] = reason
    if (name, reason) not in _WARNED:
        _WARNED.add((name, reason))
        warnings.warn(
            f"pyfast: {name} keeps its stock forward ({part}): {reason}", UserWarning, stacklevel=4
        )


def _candidate(m: nn.Module):
    """(part, fused forward, argument maker, setup) for a module pyfast can swap, a
    (part, reason) pair where it knows the class but not this instance, or None."""
    name = type(m).__name__
    if name in RMSNORM_CLASSES:
        if not isinstance(getattr(m, "variance_epsilon", None), (int, float)):
            return "norm", "no variance_epsilon"
        return "norm", _fused_norm_forward, _rows(m.weight.shape[-1]), None
    if name in OFFSET_RMSNORM_CLASSES:
        if _norm_eps(m) is None or getattr(m, "weight", None) is None:
            return "norm", "no eps or no weight"
        offset = OFFSET_RMSNORM_CLASSES[name]

        def setup(mod, offset=offset):
            mod._pyfast_offset = offset

        return "norm", _fused_offset_norm_forward, _rows(m.weight.shape[-1]), setup
    if name in MLP_CLASSES or name in FUSED_GATE_UP_MLP_CLASSES:
        fused_gu = name in FUSED_GATE_UP_MLP_CLASSES
        act = _activation(getattr(m, "activation_fn" if fused_gu else "act_fn", None))
        if act is None:
            return "mlp", "its activation is not SiLU or GELU-tanh"
        first = m.gate_up_proj if fused_gu else m.gate_proj
        if not isinstance(first, nn.Linear):
            return "mlp", f"its projections are {type(first).__name__}, not nn.Linear"

        def setup(mod, act=act):
            mod._pyfast_activation = act

        fwd = _fused_gate_up_mlp_forward if fused_gu else _fused_mlp_forward
        return "mlp", fwd, _rows(first.in_features), setup
    if name in ATTENTION_CLASSES:
        if not _attention.stock_attention_matches(type(m)):
            import transformers

            return "attention", (
                f"the forward of transformers {transformers.__version__} is not the one pyfast's "
                "fused-rotary attention reproduces"
            )

        return "attention", _attention.fused_attention_forward, _attention_args(m), None
    return None


def _verdict(m: nn.Module, cache: dict):
    """(part, fused forward or None, reason or None) for module `m`; None for a module no part
    of pyfast applies to. The self-check runs once per class, activation and dtype (`cache`)."""
    cand = _candidate(m)
    if cand is None:
        return None
    if len(cand) == 2:
        return cand[0], None, cand[1]
    part, fwd, make_args, setup = cand
    if setup is not None:
        setup(m)
    p = next(m.parameters(), None)
    key = (type(m), getattr(m, "_pyfast_activation", None), getattr(p, "dtype", None))
    if key not in cache:
        cache[key] = _self_check(m, fwd, make_args)
    return part, fwd, cache[key]


def plan(model: nn.Module) -> dict:
    """What :func:`fuse_decoder_blocks` would swap in `model`, without swapping: part ->
    {"taken": [class names], "declined": {class name: reason}} (self-checks included)."""
    out: dict = {}
    cache: dict = {}
    for m in model.modules():
        if getattr(m, "_pyfast_fused", False) or type(m).__name__ in BODY_CLASSES:
            continue
        v = _verdict(m, cache)
        if v is None:
            continue
        part, _, reason = v
        entry = out.setdefault(part, {"taken": [], "declined": {}})
        name = type(m).__name__
        if reason is None and name not in entry["taken"]:
            entry["taken"].append(name)
        elif reason is not None:
            entry["declined"][name] = reason
    for part, entry in swap_report(model).items():  # modules swapped earlier
        mine = out.setdefault(part, {"taken": [], "declined": {}})
        mine["taken"] += [n for n in entry["taken"] if n not in mine["taken"]]
    return out


def swap_report(model: nn.Module) -> dict:
    """What :func:`fuse_decoder_blocks` decided for `model`: part -> {"taken": [class names],
    "declined": {class name: reason}}; empty before it ran."""
    return getattr(model, "_pyfast_swaps", {})


def fuse_decoder_blocks(model: nn.Module, recompute_mlp: bool = False) -> int:
    """Swaps pyfast's fused forwards into `model`'s norms, gated MLPs and attention layers (the
    classes above; each class only after its numeric self-check agrees with the stock forward,
    else the stock forward stays with one warning), and runs its decoder body (BODY_CLASSES)
    under :class:`_LeanNorms`; returns how many modules run a pyfast forward. With
    `recompute_mlp` the MLPs keep only their input for backward (recomputing their up
    projections there). Idempotent (a second call sets `recompute_mlp` anew). MLPs whose
    projections are wrapped later (e.g. by LoRA) take the stock path at call time."""
    report = getattr(model, "_pyfast_swaps", None)
    if report is None:
        report = model._pyfast_swaps = {}
    verdicts: dict[tuple, str | None] = {}
    n = 0
    for m in model.modules():
        name = type(m).__name__
        if name in MLP_CLASSES or name in FUSED_GATE_UP_MLP_CLASSES:
            m._pyfast_recompute = bool(recompute_mlp)
        if getattr(m, "_pyfast_fused", False):
            n += 1
            continue
        if name in BODY_CLASSES:
            m.forward = _lean_body_forward(m)
            m._pyfast_fused = True
            n += 1
            continue
        v = _verdict(m, verdicts)
        if v is None:
            continue
        part, fwd, reason = v
        if reason is not None:
            _decline(m, part, reason, report)
            continue
        m.forward = types.MethodType(fwd, m)
        m._pyfast_fused = True
        if part == "attention" and getattr(m, "num_key_value_groups", 1) > 1:
            # grouped-query SDPA on the CPU where it applies (after the check: that compares the
            # fused forward with the stock one on transformers' own attention function)
            _attention.install_sdpa_dispatcher()
            m._pyfast_gqa = True
        taken = report.setdefault(part, {"taken": [], "declined": {}})["taken"]
        if name not in taken:
            taken.append(name)
        n += 1
    return n
