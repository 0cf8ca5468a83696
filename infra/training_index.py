"""ADORE's training index (adore/train.py): the frozen document embeddings, searched exactly for a whole batch
of queries once per training step, and the fp32 embeddings of the rows retrieved (ADORE trains the query encoder
against the top-k that the current encoder retrieves from fixed document embeddings).

* :class:`TensorIPIndex` — the embeddings as a torch tensor (on the model's GPU, or on the CPU), searched exactly
  with a chunked fp32 matmul + top-k; results and tie order as :class:`infra.exact_search.FlatIPIndex` (the format of
  :mod:`exact_search`).
* :class:`TrainingIndex` — what a training step needs: one exact top-k search for the whole batch
  (:class:`infra.exact_search.FlatIPIndex` on CPU / one GPU / sharded GPUs, or a :class:`TensorIPIndex`) and the fp32
  embeddings of given rows (gathered from the tensor, or from the read-only memmap as the original did).
* :func:`build_training_index` — chooses the backend.

Under torchrun each process builds one of these over its own rows only (adore/train.py,
``infra.distributed.sharded_topk``).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Optional, Sequence

import faiss  # imported before torch (JPQ PR #2: the other order failed on some machines)
import numpy as np
import torch
from tqdm import tqdm

from infra.embedding_memmap import iter_row_blocks
from infra.exact_search import (MAX_SEARCH_BLOCK_BYTES, QUERY_BATCH, FlatIPIndex, as_float32_matrix, exact_topk,
                                join_batches, resolve_faiss_gpus)
from infra.io import InputError

logger = logging.getLogger(__name__)

INDEX_BACKENDS = ("auto", "faiss", "tensor")
TENSOR_CHUNK_BYTES = {"cpu": 256 << 20, "cuda": 1 << 30}  # scores + converted rows per chunk of the tensor scan
TRAINING_HEADROOM_BYTES = 6 << 30  # GPU memory left to the model when "auto" puts the embeddings beside it


@contextlib.contextmanager
def _ieee_fp32_matmul() -> Iterator[None]:
    """fp32 matmuls in full IEEE precision inside the block (no TF32, whatever the process set)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


class TensorIPIndex:
    """Exact inner-product search over float32 embeddings held as a torch tensor on ``device`` (id = row).

    Each query batch is scored against chunks of rows with an fp32 matmul (IEEE, no TF32); each chunk's top-k is
    merged into a running top-k, and ties at the k-th place are settled by id exactly as :class:`FlatIPIndex`
    does (:func:`exact_topk`), so the results have the format and tie order of :mod:`exact_search`.  The scores
    are fp32 inner products from matmuls of other shapes than faiss's: equal up to the last bits (bitwise whenever
    fp32 arithmetic is exact).
    """

    def __init__(self, embeddings: np.ndarray, device: torch.device | str = "cpu",
                 chunk_bytes: Optional[int] = None):
        self.device = torch.device(device)
        self.ntotal, self.dim = embeddings.shape
        if self.ntotal == 0:
            raise InputError("cannot search an empty set of embeddings")
        self.chunk_bytes = chunk_bytes or TENSOR_CHUNK_BYTES["cuda" if self.device.type == "cuda" else "cpu"]
        self.vectors = torch.empty((self.ntotal, self.dim), dtype=torch.float32, device=self.device)
        block_rows = max(1, MAX_SEARCH_BLOCK_BYTES // (self.dim * 4))
        for start, block in iter_row_blocks(embeddings, block_rows):
            # the block buffer is reused: copy, never alias
            self.vectors[start:start + len(block)].copy_(torch.from_numpy(block))

    # -- public -----------------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray | torch.Tensor, k: int, batch_size: int = QUERY_BATCH,
               desc: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k ``(scores float32 [nq, min(k, N)], ids int64 [nq, min(k, N)])``, numpy, in the format of
        :mod:`exact_search`."""
        q = self._query_tensor(queries)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        parts = []
        with torch.no_grad(), _ieee_fp32_matmul():
            for q0 in tqdm(range(0, len(q), batch_size), desc=desc, unit="batch", disable=None if desc else True):
                parts.append(self._fp32_topk(q[q0:q0 + batch_size], k))
        return join_batches(parts, k, self.ntotal)

    @property
    def nbytes(self) -> int:
        """Device memory held by the embeddings."""
        return self.vectors.nbytes

    # -- the scan -----------------------------------------------------------------------------------------------
    def _query_tensor(self, queries: np.ndarray | torch.Tensor) -> torch.Tensor:
        q = queries.detach() if isinstance(queries, torch.Tensor) else torch.from_numpy(
            as_float32_matrix(queries, "queries"))
        if q.dim() != 2:
            raise ValueError(f"queries must be a 2-D array, got shape {tuple(q.shape)}")
        if q.shape[1] != self.dim:
            raise InputError(f"queries have dim {q.shape[1]} but the embeddings have dim {self.dim}")
        return q.to(self.device, torch.float32).contiguous()

    def _chunk_rows(self, n_queries: int) -> int:
        return max(1, self.chunk_bytes // (4 * (self.dim + n_queries)))

    def _candidates(self, q: torch.Tensor, kf: int) -> tuple[np.ndarray, np.ndarray]:
        """A correct top-``kf`` of ``q @ vectors.T`` over all rows, ties in any order, sorted by score: each chunk's
        top-kf merged into a running top-kf (a row dropped anywhere scores ≤ the final kf-th)."""
        best_scores = best_ids = None
        rows = self._chunk_rows(len(q))
        for start in range(0, self.ntotal, rows):
            end = min(start + rows, self.ntotal)
            values, index = torch.topk(q @ self.vectors[start:end].T, min(kf, end - start), dim=1)
            index = index + start
            if best_scores is not None:
                merged = torch.cat([best_scores, values], 1)
                values, order = torch.topk(merged, min(kf, merged.shape[1]), dim=1)
                index = torch.gather(torch.cat([best_ids, index], 1), 1, order)
            best_scores, best_ids = values, index
        return best_scores.cpu().numpy(), best_ids.cpu().numpy()

    def _fp32_topk(self, q: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        return exact_topk(self._candidates, q, k, self.ntotal, self.ntotal)


class TrainingIndex:
    """The frozen document embeddings of a training run: exact top-k search for a whole batch in one call, and
    the fp32 embeddings of given rows.

    ``searcher`` is a :class:`FlatIPIndex` (faiss: CPU, one GPU or sharded GPUs) — rows are then gathered from
    ``embeddings`` (the read-only memmap, as the original) — or a :class:`TensorIPIndex`, whose tensor they are
    gathered from.  Nothing ever writes to ``embeddings``.
    """

    def __init__(self, embeddings: np.ndarray, searcher: FlatIPIndex | TensorIPIndex):
        self.embeddings = embeddings
        self.searcher = searcher
        self.ntotal, self.dim = embeddings.shape

    def search(self, queries: torch.Tensor | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k ``(scores, ids)`` of (detached) queries, numpy, in the format of :mod:`exact_search`."""
        if isinstance(self.searcher, TensorIPIndex):
            return self.searcher.search(queries, k)
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().float().cpu().numpy()
        return self.searcher.search(queries, k, desc=None)

    def gather(self, ids: np.ndarray, device: torch.device | str) -> torch.Tensor:
        """float32 embeddings ``[*ids.shape, dim]`` of the rows ``ids`` (int64, all valid), on ``device``."""
        ids = np.asarray(ids, dtype=np.int64)
        if isinstance(self.searcher, TensorIPIndex):
            vectors = self.searcher.vectors
            return vectors[torch.from_numpy(ids).to(vectors.device)].to(device)
        return torch.from_numpy(np.asarray(self.embeddings[ids], dtype=np.float32)).to(device)

    def describe(self) -> str:
        s = self.searcher
        if isinstance(s, TensorIPIndex):
            return f"torch tensor on {s.device} (fp32, {s.nbytes / (1 << 30):.2f} GiB)"
        return f"faiss IndexFlatIP on {'GPU ' + ','.join(map(str, s.gpus)) if s.gpus else 'CPU'}"


def build_training_index(embeddings: np.ndarray, backend: str = "auto", gpus: Optional[Sequence[int]] = None,
                         device: torch.device | str = "cpu", omp_threads: Optional[int] = None,
                         headroom_bytes: int = TRAINING_HEADROOM_BYTES) -> TrainingIndex:
    """The :class:`TrainingIndex` for ``embeddings`` (float32 ``[N, dim]``, e.g. a read-only memmap, or a row range
    of one).

    ``backend``: ``"faiss"`` → :class:`FlatIPIndex` on ``gpus`` (one, or several sharded; CPU faiss when none or
    faiss has no GPU support, with ``omp_threads`` OpenMP threads if given); ``"tensor"`` → :class:`TensorIPIndex`
    on ``device`` (the model's); ``"auto"`` → faiss on ``gpus`` when GPUs are given and usable, else the tensor on
    ``device`` when it is a CUDA device with room for the embeddings plus ``headroom_bytes`` for the model, else
    CPU faiss (the original's setting).
    """
    if backend not in INDEX_BACKENDS:
        raise ValueError(f"backend must be one of {INDEX_BACKENDS}, got {backend!r}")
    device = torch.device(device)
    gpus = resolve_faiss_gpus(gpus)
    if backend == "auto":
        backend, device = _auto_backend(embeddings, gpus, device, headroom_bytes)
    if backend == "tensor":
        if gpus:
            logger.warning("--faiss_gpu_index is ignored: the index is a tensor on %s", device)
        searcher: FlatIPIndex | TensorIPIndex = TensorIPIndex(embeddings, device)
    else:
        if omp_threads and not gpus:
            faiss.omp_set_num_threads(omp_threads)
        searcher = FlatIPIndex(embeddings, gpus)
    index = TrainingIndex(embeddings, searcher)
    logger.info("training index: %d x %d embeddings, %s", index.ntotal, index.dim, index.describe())
    return index


def _auto_backend(embeddings: np.ndarray, gpus: list[int], device: torch.device,
                  headroom_bytes: int) -> tuple[str, torch.device]:
    """``(backend, device)`` of ``backend="auto"`` (see :func:`build_training_index`)."""
    cpu = torch.device("cpu")
    if gpus:
        return "faiss", cpu
    if device.type == "cuda" and fits_on_gpu(embeddings.nbytes, device, headroom_bytes, "kept for training"):
        return "tensor", device
    return "faiss", cpu


def fits_on_gpu(nbytes: int, device: torch.device, headroom_bytes: int, headroom_use: str) -> bool:
    """Whether ``nbytes`` of embeddings fit in the free memory of the CUDA ``device`` with ``headroom_bytes`` left
    over (``headroom_use`` says what for); if not, a warning that the search runs on the CPU."""
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes + headroom_bytes <= free:
        return True
    logger.warning("the embeddings (%.1f GiB) do not fit on %s (%.1f GiB free, %.1f GiB %s): searching on the CPU",
                   nbytes / (1 << 30), device, free / (1 << 30), headroom_bytes / (1 << 30), headroom_use)
    return False
