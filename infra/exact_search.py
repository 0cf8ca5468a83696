"""Exact inner-product top-k search over float32 embeddings (id = row) and the rank files written from its
results: faiss ``IndexFlatIP`` in RAM (CPU, one GPU or sharded GPUs) or streamed block by block from a memmap
larger than RAM.  numpy + faiss only (no torch).  The original retrieve_utils.py built the same flat
inner-product index.

Search results
--------------
``(scores float32 [nq, min(k, N)], ids int64 [nq, min(k, N)])`` over N rows, each row sorted by decreasing score;
bitwise-equal scores are ordered by increasing id, also at the k-th place (so the result equals
``np.argsort(-scores, kind="stable")[:k]`` of the same scores).  A k above N returns all N rows (never padded),
so the memory of a search follows the data: a huge k costs no more than k = N.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Callable, Optional, Sequence

import faiss
import numpy as np
from tqdm import tqdm

from infra import cli_types as ct
from infra.embedding_memmap import iter_row_blocks
from infra.io import InputError, PathLike, atomic_output

logger = logging.getLogger(__name__)

QUERY_BATCH = 4096                # queries per faiss call
TIE_MARGIN = 16                   # extra results asked from faiss to settle ties at the k-th place
GPU_MAX_K = 2048                  # largest k faiss GPU indexes accept
MAX_SEARCH_BLOCK_BYTES = 1 << 30  # corpus block of the streamed search: larger blocks gain nothing
PAD_ID = -1                       # fill of the streamed search's running top-k before its first block
PAD_SCORE = -np.inf

SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def faiss_gpu_count() -> int:
    """GPUs faiss can use: 0 for a CPU-only faiss build or when no GPU is visible."""
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    return int(faiss.get_num_gpus())


def resolve_faiss_gpus(gpus: Optional[Sequence[int]]) -> list[int]:
    """The GPU ids to search on: ``[]`` (CPU) when none are requested or faiss has no GPU support (warning);
    an id that is not visible raises :class:`InputError`."""
    if not gpus:
        return []
    available = faiss_gpu_count()
    if available == 0:
        logger.warning("faiss has no GPU support here (faiss-cpu build or no visible GPU): searching on CPU")
        return []
    bad = [g for g in gpus if not 0 <= g < available]
    if bad:
        raise InputError(f"faiss sees {available} GPU(s), ids 0..{available - 1}", value=bad)
    return [int(g) for g in gpus]


def as_float32_matrix(x: np.ndarray, what: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 2-D array (``ValueError`` naming ``what`` if it is not 2-D)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array, got shape {x.shape}")
    return x


def sort_rows(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by (decreasing score, increasing id)."""
    order = np.lexsort((ids, -scores), axis=-1)
    return np.take_along_axis(scores, order, -1), np.take_along_axis(ids, order, -1)


def exact_topk(search: SearchFn, queries: np.ndarray, k: int, n: int, k_limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``min(k, n)`` of each query with ties broken by lower id, from ``search(q, kf)`` which returns *a*
    correct top-kf over ``n`` rows with ties in any order (faiss keeps arbitrary ones at the k-th place).

    Every row scoring above the kf-th returned score is returned, so a row is settled when its k-th score
    (after sorting by (-score, id)) is above the kf-th; unsettled rows are searched again with kf doubled until
    settled or kf reaches ``min(n, k_limit)`` (at n everything is returned, so the CPU always settles)."""
    k = min(k, n)
    cap = min(n, k_limit)
    kf = min(cap, k + TIE_MARGIN)
    scores, ids = sort_rows(*search(queries, kf))
    out_scores, out_ids = scores[:, :k].copy(), ids[:, :k].copy()
    todo = np.flatnonzero(scores[:, k - 1] == scores[:, kf - 1]) if kf < n else np.empty(0, np.int64)
    while todo.size and kf < cap:
        kf = min(cap, 2 * kf)
        scores, ids = sort_rows(*search(queries[todo], kf))
        out_scores[todo], out_ids[todo] = scores[:, :k], ids[:, :k]
        todo = todo[scores[:, k - 1] == scores[:, kf - 1]] if kf < n else todo[:0]
    if todo.size:
        logger.warning("%d queries have more than %d results tied at the k-th score; faiss chose which of the "
                       "tied ids are kept", todo.size, kf)
    return out_scores, out_ids


def join_batches(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The results of consecutive query batches over ``n`` rows (each ``min(k, n)`` wide) as one result in the
    module's format."""
    kk = min(k, n)
    scores = np.concatenate([p[0] for p in parts]) if parts else np.empty((0, kk), np.float32)
    ids = np.concatenate([p[1] for p in parts]) if parts else np.empty((0, kk), np.int64)
    return scores, ids


def _check_search_args(n: int, dim: int, queries: np.ndarray, k: int) -> np.ndarray:
    queries = as_float32_matrix(queries, "queries")
    if queries.shape[1] != dim:
        raise InputError(f"queries have dim {queries.shape[1]} but the embeddings have dim {dim}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n == 0:
        raise InputError("cannot search an empty set of embeddings")
    return queries


class FlatIPIndex:
    """Exact inner-product index over float32 embeddings, id = row: faiss ``IndexFlatIP`` on CPU, on one GPU
    (``index_cpu_to_gpu`` with an int device: the original's list-instead-of-int bug is fixed), or sharded over
    several GPUs (``index_cpu_to_gpu_multiple`` with ``shard=True``).  GPUs are used only when faiss has GPU
    support (:func:`resolve_faiss_gpus`).  The embeddings are copied into the index (RAM, then GPU memory).
    """

    def __init__(self, embeddings: np.ndarray, gpus: Optional[Sequence[int]] = None):
        n, self.dim = embeddings.shape
        cpu_index = faiss.IndexFlatIP(self.dim)
        for _, block in iter_row_blocks(embeddings, max(1, MAX_SEARCH_BLOCK_BYTES // (self.dim * 4))):
            cpu_index.add(block)
        self.ntotal = cpu_index.ntotal
        self.gpus = resolve_faiss_gpus(gpus)
        self._resources: list = []  # must outlive the GPU index
        self.index = self._to_gpu(cpu_index) if self.gpus else cpu_index

    def _to_gpu(self, cpu_index: faiss.Index) -> faiss.Index:
        if len(self.gpus) == 1:
            self._resources = [faiss.StandardGpuResources()]
            return faiss.index_cpu_to_gpu(self._resources[0], self.gpus[0], cpu_index, faiss.GpuClonerOptions())
        self._resources = [faiss.StandardGpuResources() for _ in self.gpus]
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True
        return faiss.index_cpu_to_gpu_multiple_py(self._resources, cpu_index, options, self.gpus)

    def search(self, queries: np.ndarray, k: int, batch_size: int = QUERY_BATCH,
               desc: Optional[str] = "search") -> tuple[np.ndarray, np.ndarray]:
        """Top-k ``(scores float32 [nq, min(k, N)], ids int64 [nq, min(k, N)])`` in query batches (see the module
        docstring)."""
        queries = _check_search_args(self.ntotal, self.dim, queries, k)
        if self.gpus and min(k, self.ntotal) > GPU_MAX_K:
            raise InputError(f"faiss searches at most {GPU_MAX_K} results per query on a GPU: search the top {k} "
                             f"on the CPU (no GPU ids) or ask for fewer", value=k)
        k_limit = GPU_MAX_K if self.gpus else self.ntotal
        parts = []
        for q0 in tqdm(range(0, len(queries), batch_size), desc=desc, unit="batch", disable=None if desc else True):
            parts.append(exact_topk(self.index.search, queries[q0:q0 + batch_size], k, self.ntotal, k_limit))
        return join_batches(parts, k, self.ntotal)


def physical_memory_bytes() -> int:
    """The machine's memory (RAM) in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget_bytes(mem_gb: Optional[float] = None) -> int:
    """``mem_gb`` GiB capped at the machine's memory, with a warning (a larger budget would build in RAM an index
    that cannot fit there), or by default half of the memory available now (``MemAvailable``)."""
    if mem_gb is not None:
        if mem_gb <= 0:
            raise InputError("the search memory budget must be positive", value=mem_gb)
        total = physical_memory_bytes()
        if mem_gb > total / (1 << 30):
            logger.warning("--search_mem_gb %g exceeds the machine's %.1f GiB of memory: using that", mem_gb,
                           total / (1 << 30))
            return total
        return int(mem_gb * (1 << 30))
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        available = physical_memory_bytes()
    return available // 2


def streamed_search(embeddings: np.ndarray, queries: np.ndarray, k: int, block_rows: Optional[int] = None,
                    mem_gb: Optional[float] = None, batch_size: int = QUERY_BATCH,
                    desc: Optional[str] = "search") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over embeddings read ``block_rows`` rows at a time, with a running top-k merge: for a corpus
    memmap larger than RAM (MS MARCO passage: 27 GB).  Same results as :meth:`FlatIPIndex.search`.

    Memory: one corpus block (``block_rows × dim × 4`` bytes; by default half of ``mem_gb`` — see
    :func:`memory_budget_bytes` — capped at 1 GiB), the results (``nq × min(k, N) × 12`` bytes) and per query
    batch ``batch_size × (2 min(k, N) + 16) × 12`` bytes of merge buffers.  Each block is searched with faiss
    (exact, CPU).
    """
    n, dim = embeddings.shape
    queries = _check_search_args(n, dim, queries, k)
    if block_rows is None:
        block_rows = max(1, min(memory_budget_bytes(mem_gb) // 2, MAX_SEARCH_BLOCK_BYTES) // (dim * 4))
        if block_rows > faiss_block_rows():  # whole faiss blocks: the scores of the in-RAM search, bit for bit
            block_rows -= block_rows % faiss_block_rows()
    kk = min(k, n)
    best_scores = np.full((len(queries), kk), PAD_SCORE, np.float32)
    best_ids = np.full((len(queries), kk), PAD_ID, np.int64)
    with tqdm(total=n, desc=desc, unit="row", unit_scale=True, disable=None if desc else True) as bar:
        for start, block in iter_row_blocks(embeddings, block_rows):
            def search_block(x: np.ndarray, kf: int, block: np.ndarray = block) -> tuple[np.ndarray, np.ndarray]:
                return faiss.knn(x, block, kf, metric=faiss.METRIC_INNER_PRODUCT)

            for q0 in range(0, len(queries), batch_size):
                scores, ids = exact_topk(search_block, queries[q0:q0 + batch_size], kk, len(block), len(block))
                rows = slice(q0, q0 + batch_size)
                best_scores[rows], best_ids[rows] = merge_topk(
                    [(best_scores[rows], best_ids[rows]), (scores, ids + start)], kk)
            bar.update(len(block))
    return best_scores, best_ids


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of several row-sorted result sets of the same queries, in the module's format, where every id of
    a part is below every id of the next (results over consecutive row ranges: corpus blocks, or the row shards of
    :func:`shard_rows`): a stable sort by score of the concatenation then orders equal scores by id, so the merge
    equals one search over all the rows.  Padding (``PAD_SCORE``/``PAD_ID``) sorts last."""
    scores = np.hstack([p[0] for p in parts])
    ids = np.hstack([p[1] for p in parts])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def faiss_block_rows() -> int:
    """The corpus rows faiss scores per BLAS call (``distance_compute_blas_database_bs``, 1024 by default): searches
    whose row ranges start at multiples of it compute every score with the same matrix products, bit for bit."""
    return int(faiss.cvar.distance_compute_blas_database_bs)


def shard_rows(n: int, shard: int, num_shards: int) -> tuple[int, int]:
    """``(start, end)``: the rows of ``shard`` (0-based) when ``n`` rows are cut into ``num_shards`` consecutive
    ranges as even as possible.  When every shard can hold one, the ranges are cut at multiples of
    :func:`faiss_block_rows`, so each shard's scores are bitwise those of one search over all the rows (cut
    elsewhere, faiss's products of other shapes round some scores differently: 20 ulps at 400k x 384, enough to swap
    near-ties); the first ranges then hold one block more."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} outside 0..{num_shards - 1}")
    align = faiss_block_rows() if n >= num_shards * faiss_block_rows() else 1
    units = -(-n // align)
    size, extra = divmod(units, num_shards)
    start = shard * size + min(shard, extra)
    return min(start * align, n), min((start + size + (shard < extra)) * align, n)


def exact_search(embeddings: np.ndarray, queries: np.ndarray, k: int, gpus: Optional[Sequence[int]] = None,
                 mem_gb: Optional[float] = None, batch_size: int = QUERY_BATCH,
                 desc: Optional[str] = "search") -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of ``queries`` against ``embeddings`` (id = row), choosing the path:
    faiss on the given GPUs (when faiss has GPU support and ``k`` is within its :data:`GPU_MAX_K`); otherwise faiss
    ``IndexFlatIP`` in RAM when the embeddings fit the memory budget (:func:`memory_budget_bytes`), else
    :func:`streamed_search`."""
    gpus = resolve_faiss_gpus(gpus)
    if gpus and min(k, len(embeddings)) > GPU_MAX_K:
        logger.warning("faiss searches at most %d results per query on a GPU: the top %d are searched on the CPU",
                       GPU_MAX_K, k)
        gpus = []
    if not gpus and embeddings.nbytes > memory_budget_bytes(mem_gb):
        logger.info("embeddings (%.3g GiB) exceed the search memory budget: streamed search",
                    embeddings.nbytes / (1 << 30))
        return streamed_search(embeddings, queries, k, mem_gb=mem_gb, batch_size=batch_size, desc=desc)
    return FlatIPIndex(embeddings, gpus).search(queries, k, batch_size=batch_size, desc=desc)


def write_rank_file(path: PathLike, qoffsets: Sequence[int] | np.ndarray, ids: np.ndarray,
                    scores: Optional[np.ndarray] = None, chunk_rows: int = 4096) -> int:
    """Write a rank file atomically: one line ``qoffset\\tpoffset\\trank`` per result (rank 1-based in row
    order), plus ``\\tscore`` (``%.9g``, exact for float32) when ``scores`` is given.  Padding (id -1) is
    skipped.  Returns the number of lines."""
    qoffsets = np.asarray(qoffsets, dtype=np.int64)
    ids = np.asarray(ids)
    if ids.ndim != 2 or len(qoffsets) != len(ids) or (scores is not None and np.shape(scores) != ids.shape):
        raise ValueError(f"shapes do not fit: qoffsets {qoffsets.shape}, ids {ids.shape}, "
                         f"scores {None if scores is None else np.shape(scores)}")
    lines = 0
    with atomic_output(path) as tmp, open(tmp, "w", encoding="ascii", newline="\n") as f:
        for r0 in range(0, len(ids), chunk_rows):
            chunk = ids[r0:r0 + chunk_rows]
            valid = chunk >= 0
            ranks = np.cumsum(valid, axis=1)
            columns = [np.broadcast_to(qoffsets[r0:r0 + chunk_rows, None], chunk.shape)[valid], chunk[valid],
                       ranks[valid]]
            template = "%d\t%d\t%d\n"
            if scores is not None:
                columns.append(np.asarray(scores[r0:r0 + chunk_rows], dtype=np.float64)[valid])
                template = "%d\t%d\t%d\t%.9g\n"
            values = [c.tolist() for c in columns]
            f.write((template * len(values[0])) % tuple(v for row in zip(*values) for v in row))
            lines += len(values[0])
    return lines


def add_search_args(parser: argparse.ArgumentParser, topk: int) -> None:
    """``--topk``, ``--faiss_gpus``, ``--search_mem_gb``, ``--with_scores``."""
    parser.add_argument("--topk", type=ct.positive_int, default=topk,
                        help="results per query (at most the documents)")
    parser.add_argument("--faiss_gpus", type=ct.non_negative_int, nargs="+", default=None,
                        help="faiss GPUs (several: sharded); none: CPU faiss, or the torch index "
                             "on a GPU faiss cannot use")
    parser.add_argument("--search_mem_gb", type=ct.positive_float, default=None,
                        help="RAM for CPU search; larger files are streamed (default: half the free RAM)")
    parser.add_argument("--with_scores", action="store_true",
                        help="add a 4th rank-file column: the score")
