"""The engine under ``torch.distributed`` (launched by ``torchrun``): who this process is, the student wrapped
in DistributedDataParallel, the loss averaged over ranks, and rank 0 alone writing files.

Nothing here starts processes or a process group: ``torchrun`` (or the caller) does; without an initialised
group every function is the single-process identity.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) without a process group."""
    if not active():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when there are several processes, else ``model`` itself.

    Gradients are averaged over ranks during backward, so every rank takes the same optimizer step. Buffers
    are not broadcast (the UNet's are constants), frozen parameters take no part."""
    if rank_world()[1] == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    # the UNet's buffers are constants: no sync before each forward (torch 2.14 renamed the switch)
    sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else {"broadcast_buffers": False}
    return DDP(model, device_ids=ids, gradient_as_bucket_view=True, **sync)


def no_sync(model: torch.nn.Module, skip: bool):
    """DDP's ``no_sync`` for the micro-batches before the last of an accumulated step (``skip`` True)."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def mean(t: torch.Tensor) -> torch.Tensor:
    """``t`` averaged over ranks (in place on a copy); ``t`` itself with one process."""
    if rank_world()[1] == 1:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank (so that every rank stops at the same step); ``flag`` alone."""
    if rank_world()[1] == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(value):
    """``value`` of rank 0 on every rank (any picklable object); ``value`` itself with one process."""
    if rank_world()[1] == 1:
        return value
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ranks(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank; ``flag`` alone with one process."""
    return not any_rank(not flag, device)


def barrier() -> None:
    if active():
        dist.barrier()


def is_writer() -> bool:
    """Whether this process writes files (checkpoints, results): rank 0."""
    return rank_world()[0] == 0
