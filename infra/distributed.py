"""Distributed data parallel training: process placement from torchrun's environment and the collectives the
trainers use (each a pass-through in a single process).

* :func:`init_distributed` / :func:`cleanup_distributed` join and leave the process group (``nccl`` on CUDA, else
  ``gloo``); :class:`DistInfo` says where this process runs.
* :func:`get_rank`, :func:`get_world_size`, :func:`barrier`, :func:`all_gather_object`, :func:`all_reduce_sum`.
* :func:`all_gather_with_grad`: every rank's rows, differentiable (its backward sums the ranks' gradients).
* :func:`unwrap_model`: the module inside DDP / ``torch.compile`` wrappers.
* :func:`all_gather_rows` (no gradient, uneven counts) and :func:`sharded_topk`: an exact top-k over rows split
  across the ranks (ADORE's sharded training index).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from infra.io import InputError, env_int


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


def init_distributed(no_cuda: bool = False, timeout_s: Optional[float] = None) -> DistInfo:
    """Read torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; with ``WORLD_SIZE > 1`` join the process group
    (``nccl`` when training on CUDA, else ``gloo``).  Each process uses ``cuda:LOCAL_RANK`` (or the CPU when
    CUDA is absent or ``no_cuda``).  ``timeout_s``: how long a collective may wait for the other ranks (default
    torch's: 10 min with nccl, 30 min with gloo), e.g. longer for ranks that wait while one writes a large file."""
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
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                timeout=timeout)
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


def all_gather_rows(t: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Every rank's rows of ``t`` concatenated in rank order (the first dims may differ across ranks; the others
    and the dtype must agree), and the row count of each rank; no gradient.  The tensors live on the process
    group's device (CUDA for nccl, CPU for gloo).  Without a process group: ``(t, [len(t)])``."""
    t = t.detach()
    if not _active():
        return t, [int(t.shape[0])]
    counts = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device))
    sizes = [int(c.item()) for c in counts]
    padded = t.new_zeros((max(sizes),) + tuple(t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]), sizes


def sharded_topk(search: Callable[[torch.Tensor, int], tuple[np.ndarray, np.ndarray]], queries: torch.Tensor,
                 k: int, row_start: int, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-``k`` of this rank's ``queries`` over ``n_rows`` rows split across the ranks, each rank
    holding the consecutive rows ``[row_start, row_start + its count)``, the ranges increasing with the rank
    (:func:`infra.exact_search.shard_rows`); ``search(queries, k)`` is the exact search of this rank's rows (local ids,
    the format of :mod:`exact_search`: rows sorted by score desc, id asc).  A collective: every rank calls it,
    with the same ``k``.

    The queries of all ranks are all-gathered (counts may differ), searched here, their ids shifted by
    ``row_start``; the (score, id) lists of every rank are all-gathered (padded to the widest with
    ``PAD_SCORE``/``PAD_ID``, where a shard has fewer than ``k`` rows) and this rank's rows merged with
    :func:`infra.exact_search.merge_topk`: as the shards are increasing row ranges, equal scores keep the order of one
    search over all rows (id asc).  Returns ``(scores float32, ids int64)`` ``[len(queries), min(k, n_rows)]``,
    numpy.  Without a process group: ``search(queries, k)`` with ids shifted."""
    from infra.exact_search import PAD_ID, PAD_SCORE, merge_topk  # numpy + faiss: only for the callers that search

    every, sizes = all_gather_rows(queries)
    scores, ids = search(every, k)
    ids = np.asarray(ids, dtype=np.int64) + row_start
    if not _active():
        return scores, ids
    device = queries.device
    width = torch.tensor([scores.shape[1]], dtype=torch.int64, device=device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    pad = int(width.item()) - scores.shape[1]
    scores = np.pad(np.asarray(scores, np.float32), ((0, 0), (0, pad)), constant_values=PAD_SCORE)
    ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=PAD_ID)
    all_scores, _ = all_gather_rows(torch.from_numpy(scores).to(device))
    all_ids, _ = all_gather_rows(torch.from_numpy(ids).to(device))
    n_every, rank = len(every), dist.get_rank()
    mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    parts = [(s[mine].cpu().numpy(), i[mine].cpu().numpy())
             for s, i in zip(all_scores.split(n_every), all_ids.split(n_every))]
    return merge_topk(parts, min(k, n_rows))
