"""The few collective operations the training step needs beyond what DDP does for it.

DDP averages the gradients of the parameters it owns. The statistics need more: sums
of batch moments over all ranks (z-scores, Sinkhorn columns, row counts), one global
decision to skip a non-finite step, and the router gradients, which DDP does not own
(see ``SMKModule``: the smk gradient is computed by its own ``autograd.grad`` and must
not go through DDP's reducer). The data loader gathers every rank's position into the
checkpoint (``gather_objects``). On one process every function here is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order (picklable objects; a collective)."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: Tensor) -> Tensor:
    """Σ over ranks of ``t`` (a new tensor; no gradient flows through it)."""
    if world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def average_grads(params: list[Tensor]) -> None:
    """Replace each parameter's ``.grad`` by its mean over ranks (missing grads count as 0)."""
    if world_size() == 1 or not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world_size()
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p).clone()


def broadcast_(params: list[Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values of ``params`` to every rank (for weights DDP does not own)."""
    if world_size() == 1:
        return
    for p in params:
        dist.broadcast(p.data, src)
