"""The plan of a corpus encoding: which items form each batch, where the resumable blocks end, and how the batches
are shared out between processes (torchrun ranks or ``--shard_id`` jobs).  numpy only.

Order and batches
-----------------
Items are encoded longest first (ties in dataset order).  A batch is padded to its first, longest item, so it costs
``rows × that length`` padded tokens.  Batches are consecutive runs of that order, cut greedily from its start:

* by rows (``batch_tokens`` None): ``batch_rows`` items a batch, as the original's fixed batch size;
* by a token budget: each batch takes as many items as fit ``rows × longest <= batch_tokens`` (at least one), so
  a batch of short passages holds many more of them than one of long passages and every batch is about the
  same work for the device.

Cutting from the start of any batch gives the same later batches, so an encode resumed after a finished batch
forms exactly the batches of an uninterrupted one (and, on the same device, the same bytes).

Shards
------
``num_shards`` processes share the batches as consecutive runs, balanced by padded tokens (not by count): shard
``s`` starts at the first batch before which at least ``s / num_shards`` of all padded tokens lie.  Every shard
encodes whole batches of the one-process plan, so the shards together hold exactly the one-process embeddings.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def encoding_order(lengths: np.ndarray) -> np.ndarray:
    """Item indices longest first, ties in item order (int64)."""
    return np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")


def batch_bounds(sorted_lengths: np.ndarray, start: int, batch_rows: int,
                 batch_tokens: Optional[int] = None) -> np.ndarray:
    """``int64 [n_batches, 2]``: the ``(first, end)`` positions of the batches from position ``start`` of the
    length-sorted items (``sorted_lengths``, non-increasing), cut by rows or by a token budget (module docstring)."""
    n = len(sorted_lengths)
    if batch_tokens is None:
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
        firsts = np.arange(start, n, batch_rows, dtype=np.int64)
        return np.stack([firsts, np.minimum(firsts + batch_rows, n)], axis=1).reshape(-1, 2)
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
    bounds = []
    first = start
    while first < n:
        end = min(n, first + max(1, batch_tokens // max(1, int(sorted_lengths[first]))))
        bounds.append((first, end))
        first = end
    return np.asarray(bounds, dtype=np.int64).reshape(-1, 2)


def padded_tokens(bounds: np.ndarray, sorted_lengths: np.ndarray) -> np.ndarray:
    """Padded tokens of each batch: rows × the length of its first (longest) item (int64)."""
    if len(bounds) == 0:
        return np.zeros(0, np.int64)
    return (bounds[:, 1] - bounds[:, 0]) * np.asarray(sorted_lengths, np.int64)[bounds[:, 0]]


def shard_batches(bounds: np.ndarray, sorted_lengths: np.ndarray, num_shards: int) -> list[tuple[int, int]]:
    """``[(first_batch, end_batch)]`` of each of ``num_shards`` shards of the batches ``bounds`` (from position 0),
    balanced by padded tokens (module docstring); a shard may be empty when there are fewer batches than
    shards."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    before = np.concatenate([[0], np.cumsum(padded_tokens(bounds, sorted_lengths))])  # tokens before batch i
    total = int(before[-1])
    cuts = [0] + [int(np.searchsorted(before[:-1], s * total / num_shards, side="left"))
                  for s in range(1, num_shards)] + [len(bounds)]
    cuts = np.maximum.accumulate(cuts)
    return [(int(cuts[s]), int(cuts[s + 1])) for s in range(num_shards)]


def shard_positions(bounds: np.ndarray, sorted_lengths: np.ndarray, shard: int, num_shards: int) -> tuple[int, int]:
    """``(first, end)`` positions in the length-sorted order that shard ``shard`` of ``num_shards`` encodes."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} outside 0..{num_shards - 1}")
    first_batch, end_batch = shard_batches(bounds, sorted_lengths, num_shards)[shard]
    if first_batch == end_batch:
        position = int(bounds[first_batch, 0]) if first_batch < len(bounds) else len(sorted_lengths)
        return position, position
    return int(bounds[first_batch, 0]), int(bounds[end_batch - 1, 1])


def flush_points(bounds: np.ndarray, block_rows: int) -> np.ndarray:
    """Bool ``[n_batches]``: True after the batches that end a resumable block: the first batch end at least
    ``block_rows`` rows after the previous block's end (or its start), and the last batch."""
    flush = np.zeros(len(bounds), bool)
    if len(bounds) == 0:
        return flush
    block_start = int(bounds[0, 0])
    for i, end in enumerate(bounds[:, 1].tolist()):
        if end - block_start >= block_rows:
            flush[i], block_start = True, end
    flush[-1] = True
    return flush
