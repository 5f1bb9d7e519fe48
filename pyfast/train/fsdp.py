"""FSDP for the fine-tuning recipe (``distributed=fsdp``), through torch's ``fully_shard`` (FSDP2).

Every decoder block is its own unit and the recipe's loss module the root (it holds the
embeddings, final norm, head and any scalar head), so the loss computed outside the Hugging Face
``forward`` (decoder body + fused head) still runs on gathered weights. Parameters, gradients and
optimizer moments are sharded along their first dimension over the ranks (DTensors); FusedAdamW
updates each rank's shard and clips by the global norm (see :mod:`pyfast.optim`).

Checkpoints stay world-size independent: the model is gathered into a full state dict on rank 0
(the same plain safetensors folder as a single process writes), and the optimizer state is
gathered into ``torch.optim.AdamW``'s format with full tensors; loading scatters it back to the
shards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from pyfast.train.freeze import decoder_blocks


def shard(root: nn.Module, model: nn.Module, device: torch.device) -> int:
    """``fully_shard`` each decoder block of `model`, then `root`; returns the number of blocks."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    blocks = decoder_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(root, mesh=mesh)
    return len(blocks)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (gathered) state dict of a sharded `model` on CPU: rank 0 gets it, others {}.

    Collective: every rank must call it. A tied weight is kept once, under its first name (as
    ``save_pretrained`` keeps it).
    """
    state = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            state.pop(name, None)
        seen.add(id(p))
    return state


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded tensor gathered (full, CPU) on rank 0.

    Collective: every rank must call it (the states are visited in the same order on every rank).
    """
    sd = optimizer.state_dict()
    rank0 = dist.get_rank() == 0
    state = {}
    for index in sorted(sd["state"]):
        entry = {}
        for key in sorted(sd["state"][index]):
            value = sd["state"][index][key]
            if isinstance(value, DTensor):
                value = value.full_tensor()  # collective; only rank 0 keeps the result
            entry[key] = value.cpu() if torch.is_tensor(value) else value
        if rank0:
            state[index] = entry
    return {"state": state, "param_groups": sd["param_groups"]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Loads a full optimizer state (:func:`full_optimizer_state`'s or a single process's) into an
    optimizer over sharded params: each moment is scattered to its param's shards first, one
    tensor at a time, so the full state never sits on a device at once.

    Collective: every rank must call it with the same state.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {}
    for index, entry in state_dict["state"].items():
        p = params[index] if 0 <= index < len(params) else None
        sharded[index] = {
            key: distribute_tensor(value, p.device_mesh, p.placements)
            if isinstance(p, DTensor) and torch.is_tensor(value) and value.shape == p.shape
            else value
            for key, value in entry.items()
        }
    optimizer.load_state_dict({**state_dict, "state": sharded})
