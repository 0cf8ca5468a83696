"""Distributed data parallel training: process placement from torchrun's environment and the collectives the
trainers use (each a pass-through in a single process).

* :func:`init_distributed` / :func:`cleanup_distributed` join and leave the process group (``nccl`` on CUDA, else
  ``gloo``); :class:`DistInfo` says where this process runs.
* :func:`get_rank`, :func:`get_world_size`, :func:`barrier`, :func:`all_gather_object`, :func:`all_reduce_sum`.
* :func:`all_gather_with_grad`: every rank's rows, differentiable (its backward sums the ranks' gradients).
* :func:`unwrap_model`: the module inside DDP / ``torch.compile`` wrappers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from io_utils import InputError, env_int


@dataclass(frozen=True)
class DistInfo:
    """Process placement: ``rank``/``world_size``/``local_rank`` (0/1/0 without torchrun) and the device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(no_cuda: bool = False) -> DistInfo:
    """Read torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; with ``WORLD_SIZE > 1`` join the process group
    (``nccl`` when training on CUDA, else ``gloo``).  Each process uses ``cuda:LOCAL_RANK`` (or the CPU when
    CUDA is absent or ``no_cuda``)."""
    world_size = env_int("WORLD_SIZE", 1)
    rank, local_rank = env_int("RANK", 0), env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() and not no_cuda
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, device)


def cleanup_distributed() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if _active() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _active() else 1


def barrier() -> None:
    if _active():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` without a process group)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor, no gradient; ``t`` itself without a process group)."""
    if not _active():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's rows; backward sums the global gradient over ranks and returns this rank's rows.

    Each rank's loss depends on every rank's rows, so the gradient of the summed loss w.r.t. this rank's rows is
    the sum over ranks of each rank's gradient for them (an all-reduce) — replacing only the local slice of a
    plain all_gather would drop the other ranks' contributions.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        longest = max(sizes)
        padded = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return total[start: start + ctx.sizes[ctx.rank]], None, None


def all_gather_with_grad(t: torch.Tensor, sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Rows of ``t`` from every rank concatenated in rank order (first dims may differ across ranks).

    Differentiable: the gradient reaching this rank's ``t`` is the sum over all ranks of the gradient of
    their losses w.r.t. these rows, so DDP's gradient averaging of per-rank losses over local queries × global
    documents reproduces single-process gradients (see ``star/train.py``).  ``sizes`` (rows per rank), when
    known, saves one collective.  Without a process group ``t`` is returned unchanged.
    """
    if not _active():
        return t
    if sizes is None:
        sizes = [int(n) for n in all_gather_object(int(t.shape[0]))]
    return _GatherWithGrad.apply(t, list(sizes), dist.get_rank())


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner
