"""FusedAdamW: a drop-in torch.optim.Optimizer over the fused_adamw_ / grad_norm kernels."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

import torch

from pyfast.ops import fused_adamw_, grad_norm

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without torch.distributed
    DTensor = None

Tensor = torch.Tensor


def _local(t: Tensor) -> Tensor:
    """The rank-local shard of a DTensor (a view of its storage); other tensors unchanged."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def _sparse_error(p: Tensor) -> RuntimeError:
    # RuntimeError, as torch.optim's optimizers raise for sparse gradients
    return RuntimeError(
        f"FusedAdamW does not support sparse gradients: a param of shape {tuple(p.shape)} has "
        f"a {p.grad.layout} gradient (e.g. nn.Embedding(sparse=True)); use dense gradients, or "
        "torch.optim.SparseAdam for that param"
    )


def _check_dense(params: list[Tensor]) -> None:
    for p in params:
        if p.grad is not None and p.grad.layout != torch.strided:
            raise _sparse_error(p)


def _mask_arg(masks: list) -> list:
    """The kernels' masks argument: the per-tensor list, or [] when no tensor has a mask."""
    return masks if any(m is not None for m in masks) else []


class _Plan:
    """The lists that one param group's fused update hands the kernel, read once and reused for
    every step until something they were read from changes: per-tensor Python work (state
    lookups, a ``+= 1`` per step counter) would otherwise cost more host time per step than the
    whole update takes on a GPU (~5 us per tensor against ~1 ms for 135M parameters on an H200).

    The params' step counters become views of one tensor, so one ``+= 1`` advances them all and
    ``state[p]["step"]`` stays what torch.optim.AdamW keeps there. Params whose counts differ
    (one that got its first gradient later) form one kernel call per count. The plan is dropped
    when the group's params, which of them have a gradient, the optimizer's state dict object or
    its size, or the masks change (``load_state_dict`` and ``set_masks`` drop every plan), and
    when a state tensor is replaced (``opt.state[p]["exp_avg"] = torch.zeros_like(p)``, a common
    reset): the plan checks by identity that every state entry is still the tensor it holds, so
    the kernel never updates a moment that the optimizer no longer keeps."""

    def __init__(self, opt, group: dict, params: list[Tensor], states: list[dict]):
        self.params = params
        self.without = [p for p in group["params"] if p.grad is None]
        self.key = self._key(opt, group)
        self.device = params[0].device if params else None
        self.masks = [opt._masks.get(id(p)) for p in params]
        self.steps = torch.tensor([float(s["step"]) for s in states], dtype=torch.float32)
        for i, s in enumerate(states):
            s["step"] = self.steps[i]
        # what each state dict must still hold for the plan to stand (checked by identity:
        # ~0.4 us per param and step on the 2-core dev machine)
        self.held = [(s, s["step"], s["exp_avg"], s["exp_avg_sq"]) for s in states]
        by_count: dict[float, list[int]] = {}
        for i, s in enumerate(states):
            by_count.setdefault(float(s["step"]), []).append(i)
        # per kernel call: (indices into params or None for all, its first index, its lists)
        self.calls = []
        for idx in by_count.values():
            masks = [self.masks[i] for i in idx]
            self.calls.append((
                None if len(idx) == len(params) else idx, idx[0], [params[i] for i in idx],
                [states[i]["exp_avg"] for i in idx], [states[i]["exp_avg_sq"] for i in idx],
                _mask_arg(masks),
            ))  # fmt: skip

    @staticmethod
    def _key(opt, group: dict) -> tuple:
        return (id(opt.state), len(opt.state), id(group["params"]), len(group["params"]))

    def valid(self, opt, group: dict) -> bool:
        return (
            self._key(opt, group) == self.key
            and all(p.grad is not None for p in self.params)
            and all(p.grad is None for p in self.without)
            and all(
                s["exp_avg"] is m and s["exp_avg_sq"] is v and s["step"] is c
                for s, c, m, v in self.held
            )
        )

    def grads(self) -> list[Tensor]:
        gs = [p.grad for p in self.params]
        try:
            return [g if g.is_contiguous() else g.contiguous() for g in gs]
        except RuntimeError:  # a sparse gradient has no memory format
            _check_dense(self.params)
            raise

    def update(self, group: dict, grads: list[Tensor], scale: Tensor | None) -> None:
        if not self.params:
            return
        if group.get("maximize") or group.get("amsgrad"):
            raise ValueError("FusedAdamW supports neither maximize nor amsgrad")
        self.steps += 1
        beta1, beta2 = group["betas"]
        scale = None if scale is None else scale.to(self.device)
        for idx, first, ps, ms, vs, masks in self.calls:
            gs = grads if idx is None else [grads[i] for i in idx]
            fused_adamw_(ps, gs, ms, vs, masks, float(group["lr"]), beta1, beta2, group["eps"],
                         group["weight_decay"], int(self.steps[first]), scale)  # fmt: skip


def _shard_like(mask: Tensor, p: Tensor) -> Tensor:
    """This rank's part of `mask` (per element, or per row) for the sharded param `p`: the same
    dim-0 chunks as ``fully_shard`` makes (each rank slices its own copy; no communication)."""
    from torch.distributed.tensor import distribute_tensor

    m = mask.to(device=p.device, dtype=torch.uint8)
    return distribute_tensor(m, p.device_mesh, p.placements, src_data_rank=None).to_local()


def _sharded_group(grad: Tensor):
    """The process group over which a sharded (DTensor) gradient's squares must be summed."""
    mesh = grad.device_mesh
    if mesh.ndim != 1 or not all(pl.is_shard() for pl in grad.placements):
        raise ValueError(
            "FusedAdamW: sharded params must be sharded (Shard placements) over a 1-D device "
            f"mesh, got {grad.placements} over a {mesh.ndim}-D mesh"
        )
    return mesh.get_group()


# torch.optim.AdamW's group keys beyond the hyper-parameters, kept so that a state_dict of
# FusedAdamW loads into torch.optim.AdamW and back without surprises.
_TORCH_GROUP_DEFAULTS = {
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": None,
}


class FusedAdamW(torch.optim.Optimizer):
    """AdamW whose whole update (and optionally gradient clipping) is one fused pass.

    Same math as ``torch.optim.AdamW`` (decoupled weight decay, bias correction), with:

    * ``max_grad_norm``: clip the global gradient norm (as ``clip_grad_norm_``) inside the update:
      the clip coefficient is applied to each gradient in-register, so gradients are read once for
      the norm and once for the update, and are never rewritten. Unlike ``clip_grad_norm_``, the
      ``.grad`` tensors are left unscaled. The norm of the last step is ``last_grad_norm``.
    * ``masks``: ``{param: mask}`` with a bool tensor of the param's shape (per element) or of
      shape ``(param.shape[0],)`` (per row, e.g. embedding rows); true = trainable. Frozen entries
      get no update, no weight decay, and their moments stay exactly unchanged; frozen rows are not
      even read. The norm for clipping counts trainable entries only.
    * :meth:`update_in_backward`: each parameter is updated, and its gradient freed, as soon as
      backward has completed that gradient, so the gradients never all exist at once (without
      clipping or gradient accumulation, which need every gradient first).
    * ``state_dtype=torch.bfloat16``: keep exp_avg and exp_avg_sq in bfloat16 — half the state
      memory and 20 instead of 28 bytes moved per fp32 parameter. The math stays fp32, but the
      moments are rounded to 8 significant bits each step: the update direction then carries a
      relative error of about 2^-9 per step, which is below typical gradient noise for fine-tuning
      yet can matter for long pre-training runs. Default: float32 state for every param.

    ``state_dict()`` uses torch.optim.AdamW's format, so checkpoints load into either optimizer.

    Sharded params (DTensors, as ``torch.distributed.fsdp.fully_shard`` makes them): each rank
    updates its local shard, the moments are DTensors sharded like their params, and clipping uses
    the global norm (the local sums of squares all-reduced over the shards' process group). A mask
    of a sharded param is given whole and sliced like the param (dim-0 sharding).

    Raises:
        ValueError: invalid hyper-parameters, a mask whose shape fits neither form, or a mask for a
            tensor that is not among the optimised params.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        max_grad_norm: float | None = None,
        masks: Mapping[Tensor, Tensor] | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(lr, Tensor):
            lr = float(lr)
        if lr < 0.0:
            raise ValueError(f"FusedAdamW: lr must be >= 0, got {lr}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"FusedAdamW: betas must each be in [0, 1), got {betas}")
        if eps < 0.0:
            raise ValueError(f"FusedAdamW: eps must be >= 0, got {eps}")
        if weight_decay < 0.0:
            raise ValueError(f"FusedAdamW: weight_decay must be >= 0, got {weight_decay}")
        if max_grad_norm is not None and max_grad_norm <= 0.0:
            raise ValueError(f"FusedAdamW: max_grad_norm must be > 0 or None, got {max_grad_norm}")
        if state_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(
                "FusedAdamW: state_dtype must be torch.float32 or torch.bfloat16, "
                f"got {state_dtype}"
            )
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **_TORCH_GROUP_DEFAULTS
        )
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self.state_dtype = state_dtype or torch.float32
        self.last_grad_norm: Tensor | None = None
        self._masks: dict[int, Tensor] = {}
        self._plans: dict[int, _Plan] = {}
        self.set_masks(masks or {})
        self._backward_hooks: list = []

    # -- masks -----------------------------------------------------------------------------
    def set_masks(self, masks: Mapping[Tensor, Tensor]) -> None:
        """Replaces the trainable masks (``{param: bool mask}``); see the class docstring."""
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        checked: dict[int, Tensor] = {}
        for p, m in masks.items():
            if id(p) not in owned:
                raise ValueError("FusedAdamW: masks has a tensor that is not an optimised param")
            if m.dtype not in (torch.bool, torch.uint8):
                raise ValueError(f"FusedAdamW: a mask must be bool or uint8, got {m.dtype}")
            per_row = p.dim() >= 1 and m.dim() == 1 and m.shape[0] == p.shape[0]
            if m.shape != p.shape and not per_row:
                raise ValueError(
                    f"FusedAdamW: mask of shape {tuple(m.shape)} fits neither the param's shape "
                    f"{tuple(p.shape)} nor its rows ({p.shape[0] if p.dim() else 0},)"
                )
            if DTensor is not None and isinstance(p, DTensor):
                if not all(pl.is_shard(0) for pl in p.placements):
                    raise ValueError(f"FusedAdamW: masks need dim-0 sharding, got {p.placements}")
                m = _shard_like(m, p)
            checked[id(p)] = m.to(device=p.device, dtype=torch.bool).contiguous()
        self._masks = checked
        self._plans.clear()

    def mask_of(self, p: Tensor) -> Tensor | None:
        return self._masks.get(id(p))

    # -- state -----------------------------------------------------------------------------
    def allocate_state(self) -> None:
        """Allocates the moments of every param that requires grad now, instead of at its first
        update. Called before training, this puts them apart from the activations that come and
        go every step rather than in the holes those leave behind; the training loops do, as it
        measurably lowers the resident peak on CPU (glibc's heap) — see README, bench_train."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._init_state(p)

    def _init_state(self, p: Tensor) -> dict:
        """p's state, created on first use; entries that code replaced are brought back to the
        form the kernels take (a float32 step tensor, contiguous moments of p's shape)."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(
                p, dtype=self.state_dtype, memory_format=torch.contiguous_format
            )
            state["exp_avg_sq"] = torch.zeros_like(
                p, dtype=self.state_dtype, memory_format=torch.contiguous_format
            )
            return state
        step = state.get("step")
        if not (isinstance(step, Tensor) and step.dtype == torch.float32 and step.dim() == 0):
            state["step"] = torch.tensor(float(step or 0), dtype=torch.float32)
        for key in ("exp_avg", "exp_avg_sq"):
            t = state.get(key)
            if not isinstance(t, Tensor) or t.shape != p.shape:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"FusedAdamW: state[p][{key!r}] of a param of shape {tuple(p.shape)} is {got}"
                )
            if not t.is_contiguous():
                state[key] = t.contiguous()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a FusedAdamW or torch.optim.AdamW state_dict; moments move to ``state_dtype``."""
        super().load_state_dict(state_dict)
        self._plans.clear()
        for group in self.param_groups:
            for key, value in _TORCH_GROUP_DEFAULTS.items():
                group.setdefault(key, value)
            if group.get("amsgrad"):
                raise ValueError("FusedAdamW: state_dict uses amsgrad=True, which is not supported")
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = state[key].to(dtype=self.state_dtype).contiguous()
                # A tensor of its own: never one shared with the state_dict's source.
                state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)

    # -- step ------------------------------------------------------------------------------
    def _params_with_grads(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.layout != torch.strided:
                    raise _sparse_error(p)
                yield group, p

    def clip_coefficient(self) -> Tensor | None:
        """Computes the global grad norm (kept in ``last_grad_norm``) and the clip coefficient.

        Returns None when ``max_grad_norm`` is unset. No host synchronisation.
        """
        by_device: dict[torch.device, tuple[list, list]] = defaultdict(lambda: ([], []))
        sharded: dict[torch.device, tuple[list, list]] = defaultdict(lambda: ([], []))
        group, shard_device = None, None
        for _, p in self._params_with_grads():
            if DTensor is not None and isinstance(p.grad, DTensor):
                group, shard_device = _sharded_group(p.grad), p.grad.device
                g = p.grad.to_local()
                if g.numel():
                    grads, masks = sharded[p.grad.device]
                    grads.append(g if g.is_contiguous() else g.contiguous())
                    masks.append(self._masks.get(id(p)))
                continue
            grads, masks = by_device[p.grad.device]
            grads.append(p.grad if p.grad.is_contiguous() else p.grad.contiguous())
            masks.append(self._masks.get(id(p)))
        if not by_device and group is None:
            return None
        norms = [grad_norm(g, _mask_arg(m)) for g, m in by_device.values()]
        if group is not None:  # global norm of the shards: sum of local squares over the ranks
            sq = torch.zeros((), dtype=torch.float32, device=shard_device)
            for gs, ms in sharded.values():
                sq = sq + grad_norm(gs, _mask_arg(ms)).to(shard_device).float().square()
            torch.distributed.all_reduce(sq, group=group)
            norms.append(sq.sqrt())
        first = norms[0].device
        total = norms[0] if len(norms) == 1 else torch.stack([n.to(first) for n in norms]).norm()
        return self._coefficient(total)

    def _coefficient(self, total: Tensor) -> Tensor | None:
        self.last_grad_norm = total
        if self.max_grad_norm is None:
            return None
        return torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0).to(torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = [self._plan(group) for group in self.param_groups]
        if any(plan is None for plan in plans):  # sharded or mixed params: the general path
            scale = self.clip_coefficient() if self.max_grad_norm is not None else None
            for group in self.param_groups:
                self._update(group, group["params"], scale)
            return loss
        grads = [plan.grads() for plan in plans]
        scale = None
        if self.max_grad_norm is not None:
            devices = {plan.device for plan in plans if plan.params}
            if len(devices) != 1:
                scale = self.clip_coefficient()
            else:
                gs = [g for gl in grads for g in gl]
                ms = [m for plan in plans for m in plan.masks]
                scale = self._coefficient(grad_norm(gs, _mask_arg(ms)))
        for group, plan, gs in zip(self.param_groups, plans, grads, strict=True):
            plan.update(group, gs, scale)
        return loss

    def _plan(self, group: dict) -> _Plan | None:
        """The group's cached :class:`_Plan`, rebuilt when what it was read from has changed;
        None for sharded or empty params, or params of several devices or dtypes (the general
        path)."""
        plan = self._plans.get(id(group))
        if plan is not None and plan.valid(self, group):
            return plan
        self._plans.pop(id(group), None)
        params = group["params"]
        todo = [p for p in params if p.grad is not None]
        _check_dense(todo)
        if any(DTensor is not None and isinstance(p, DTensor) for p in todo):
            return None
        if any(p.numel() == 0 for p in todo):
            return None
        states = [self._init_state(p) for p in todo]
        kinds = {(p.device, p.dtype, s["exp_avg"].dtype) for p, s in zip(todo, states, strict=True)}
        if len(kinds) > 1:
            return None
        plan = _Plan(self, group, todo, states)
        self._plans[id(group)] = plan
        return plan

    def _update(self, group: dict, params: Iterable[Tensor], scale: Tensor | None) -> None:
        """The fused update of `params` (those with a gradient) of one param group."""
        beta1, beta2 = group["betas"]
        if group.get("maximize") or group.get("amsgrad"):
            raise ValueError("FusedAdamW supports neither maximize nor amsgrad")
        buckets: dict[tuple, tuple[list, list, list, list, list]] = defaultdict(
            lambda: ([], [], [], [], [])
        )
        todo = [p for p in params if p.grad is not None]
        _check_dense(todo)
        states = [self._init_state(p) for p in todo]
        counters = [state["step"] for state in states]
        if counters:  # one call for every step counter: per-tensor `+= 1` costs ~5 us each
            torch._foreach_add_(counters, 1.0)
        masks_of = self._masks
        for p, state, counter in zip(todo, states, counters, strict=True):
            mask = masks_of.get(id(p))
            grad, m, v = p.grad, state["exp_avg"], state["exp_avg_sq"]
            if DTensor is not None and isinstance(p, DTensor):  # this rank's shard
                p, grad, m, v = p.to_local(), _local(grad), _local(m), _local(v)
            if p.numel() == 0:
                continue
            key = (p.device, p.dtype, m.dtype, int(counter.item()))
            ps, gs, ms, vs, masks = buckets[key]
            ps.append(p)
            gs.append(grad if grad.is_contiguous() else grad.contiguous())
            ms.append(m)
            vs.append(v)
            masks.append(mask)
        for (device, _, _, step), (ps, gs, ms, vs, masks) in buckets.items():
            fused_adamw_(
                ps,
                gs,
                ms,
                vs,
                _mask_arg(masks),
                float(group["lr"]),
                beta1,
                beta2,
                group["eps"],
                group["weight_decay"],
                step,
                None if scale is None else scale.to(device),
            )

    # -- update fused into backward ------------------------------------------------------------
    def update_in_backward(self) -> None:
        """From now on, update each parameter inside ``loss.backward()``, as soon as its gradient
        is complete (a post-accumulate-grad hook), then free that gradient: the parameters'
        gradients never all exist at once, which lowers the peak memory of a step by up to their
        size. The update is the one :meth:`step` would make (same math, same lr at the time of
        backward); :meth:`step` and ``zero_grad`` then have nothing left to do. Tied parameters
        are updated once, after all their uses' gradients have been summed.

        Only for one backward per update: clipping (``max_grad_norm``) needs the global norm of
        every gradient first, and gradient accumulation needs gradients to persist.

        Raises:
            ValueError: ``max_grad_norm`` is set.
        """
        if self.max_grad_norm is not None:
            raise ValueError(
                "FusedAdamW.update_in_backward: gradient clipping (max_grad_norm="
                f"{self.max_grad_norm}) needs every gradient before the first update; "
                "set max_grad_norm=None to update in backward"
            )
        if self._backward_hooks:
            return
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    hook = p.register_post_accumulate_grad_hook(self._backward_hook(group))
                    self._backward_hooks.append(hook)

    def _backward_hook(self, group: dict):
        @torch.no_grad()
        def hook(p: Tensor) -> None:
            self._update(group, [p], None)
            p.grad = None

        return hook

    @property
    def updates_in_backward(self) -> bool:
        """Whether :meth:`update_in_backward` is in effect."""
        return bool(self._backward_hooks)

    def remove_backward_hooks(self) -> None:
        """Back to updates in :meth:`step`."""
        for h in self._backward_hooks:
            h.remove()
        self._backward_hooks = []
