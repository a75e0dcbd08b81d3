"""Collectives that let per-sample objectives see the global batch.

DRO weights depend on every sample of the batch, so under DDP/FSDP each rank must reduce the losses of all ranks,
not just its own. :func:`gather_with_local_grad` returns the global vector in which only this rank's slice
carries autograd; an objective evaluated on it has the right value everywhere and, on each rank, the gradient
with respect to that rank's rows. Data-parallel gradient averaging divides by the world size, which
:func:`data_parallel_scale` undoes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def release_process_group() -> None:
    """Tear down the default process group before the interpreter exits (no-op outside a distributed run).

    Lightning leaves the group it created alive; gloo's worker threads are then destroyed during interpreter
    shutdown, which sometimes aborts the process ("terminate called without an active exception", exit -6) after
    the work is done.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def data_parallel_scale() -> float:
    """Factor that turns an averaged data-parallel gradient back into the gradient of one global objective."""
    return float(world_size())


def gather_sizes(count: int, device: torch.device) -> list[int]:
    """Every rank's ``count``, in rank order."""
    if not is_distributed():
        return [count]
    local = torch.tensor([count], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local)
    return [int(s.item()) for s in sizes]


def gather_detached(x: Tensor) -> Tensor:
    """Concatenate every rank's ``x`` along dim 0 (ranks may hold different row counts); no autograd."""
    if not is_distributed():
        return x.detach()
    sizes = gather_sizes(x.shape[0], x.device)
    longest = max(sizes)
    padded = x.detach().new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)], dim=0)


def gather_with_local_grad(x: Tensor) -> tuple[Tensor, slice]:
    """The global vector of ``x`` with this rank's rows replaced by ``x`` itself (so they keep their graph).

    Returns:
        ``(global_x, local_rows)`` where ``global_x[local_rows] is x``'s values with autograd attached.
    """
    if not is_distributed():
        return x, slice(0, x.shape[0])
    sizes = gather_sizes(x.shape[0], x.device)
    rank = dist.get_rank()
    start = sum(sizes[:rank])
    everyone = gather_detached(x)
    local = slice(start, start + x.shape[0])
    return torch.cat([everyone[:start], x, everyone[local.stop :]], dim=0), local


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over ranks (a copy; no autograd)."""
    x = x.detach().clone()
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: Tensor) -> Tensor:
    """Maximum of ``x`` over ranks (a copy; no autograd)."""
    x = x.detach().clone()
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x
