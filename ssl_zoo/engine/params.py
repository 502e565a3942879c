"""Writing weights outside the optimiser, whatever the strategy shards: what a method needs to set its own
parameters (a quantiser's k-means initialisation or code restarts).

Writing `param.data` is not enough under DeepSpeed: ZeRO-1/2 keep an fp32 master copy in the optimiser that
overwrites the module's weight at the next step, and ZeRO-3 keeps only this rank's slice (the module's tensor
is empty outside that module's forward). Inside `modifiable(params)` every rank sees the full tensors; what
rank 0 holds at the end of the block becomes the value everywhere: every rank's module tensor, every ZeRO-3
slice (DeepSpeed's `GatheredParameters` with `modifier_rank=0`) and the optimiser's fp32 master copies. Without
DeepSpeed only the broadcast from rank 0 remains, so methods call it unconditionally.

Call it outside the owning module's forward: ZeRO-3 gathers and releases a module's parameters around its
forward, and a block inside it would release them mid-forward.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
import torch.distributed as torch_dist

from ssl_zoo.engine import distributed as dist


def _zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def modifiable(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Full, writable `params` (parameters or buffers) inside the block; rank 0's values win at its end."""
    params = list(params)
    sharded = [p for p in params if _zero3(p)]
    if sharded:
        import deepspeed

        gathered: contextlib.AbstractContextManager = deepspeed.zero.GatheredParameters(sharded, modifier_rank=0)
    else:
        gathered = contextlib.nullcontext()
    with gathered, torch.no_grad():
        yield
        if dist.is_initialized():  # the master copies below need the final value on every rank
            for p in params:
                torch_dist.broadcast(p.data, src=0)
        for p in params:
            _set_master_copy(p)


def _set_master_copy(param: torch.Tensor) -> None:
    """Copy the (full) module tensor into the optimiser's fp32 master copy, where DeepSpeed keeps one."""
    if not isinstance(param, torch.nn.Parameter) or not param.requires_grad:
        return  # not trained by the optimiser: the module tensor is the only copy
    if _zero3(param) or hasattr(param, "_hp_mapping"):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, param.data.float())


def replicate_frozen_parameters(module: torch.nn.Module) -> list[str]:
    """Turn every parameter that needs no gradient into a buffer of the same name (so the state dict is
    unchanged) and return their names. ZeRO-3 partitions parameters, never buffers: frozen networks then stay
    whole on every rank, with no all-gather at each forward, and weights a method updates itself without the
    optimiser (an EMA codebook) can be written in place as under DDP. They hold no gradient and no optimiser
    state, so partitioning them would only save 1/world of their fp32 weights."""
    names = []
    for owner_name, owner in module.named_modules():
        for name, param in list(owner.named_parameters(recurse=False)):
            if param.requires_grad:
                continue
            del owner._parameters[name]
            owner.register_buffer(name, param.data)
            names.append(f"{owner_name}.{name}" if owner_name else name)
    return names
