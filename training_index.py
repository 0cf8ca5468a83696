"""ADORE's training index (adore/train.py): the frozen document embeddings, searched exactly for a whole batch
of queries once per training step, and the fp32 embeddings of the rows retrieved (ADORE trains the query encoder
against the top-k that the current encoder retrieves from fixed document embeddings).

* :class:`TensorIPIndex` — the embeddings as a torch tensor (on the model's GPU, or on the CPU), searched exactly
  with a chunked fp32 matmul + top-k; results and tie order as :class:`exact_search.FlatIPIndex` (the format of
  :mod:`exact_search`).  Its ``"fast"`` precision scans a bfloat16 copy, re-scores a widened candidate set in
  fp32 and certifies the result (see the class).
* :class:`TrainingIndex` — what a training step needs: one exact top-k search for the whole batch
  (:class:`exact_search.FlatIPIndex` on CPU / one GPU / sharded GPUs, or a :class:`TensorIPIndex`) and the fp32
  embeddings of given rows (gathered from the tensor, or from the read-only memmap as the original did).
* :func:`build_training_index` — chooses the backend.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Optional, Sequence

import faiss  # imported before torch (JPQ PR #2: the other order failed on some machines)
import numpy as np
import torch
from tqdm import tqdm

from embedding_memmap import iter_row_blocks
from exact_search import (MAX_SEARCH_BLOCK_BYTES, QUERY_BATCH, FlatIPIndex, as_float32_matrix, exact_topk,
                          join_batches, resolve_faiss_gpus, sort_rows)
from io_utils import InputError

logger = logging.getLogger(__name__)

INDEX_BACKENDS = ("auto", "faiss", "tensor")
SEARCH_PRECISIONS = ("fp32", "fast")
TENSOR_CHUNK_BYTES = {"cpu": 256 << 20, "cuda": 1 << 30}  # scores + converted rows per chunk of the tensor scan
TRAINING_HEADROOM_BYTES = 6 << 30  # GPU memory left to the model when "auto" puts the embeddings beside it
BF16_UNIT_ROUNDOFF = 2.0 ** -8     # |bf16(x) − x| ≤ 2^-8·|x| (8-bit significand, round to nearest)
# Bound on the relative error each addition of an fp32 accumulation may add: 16 fp32 ulps, conservative enough for
# tensor cores (whose bf16 GEMMs accumulate with truncation) and for any fp32 summation order.
ACCUMULATION_UNIT = 2.0 ** -20


@contextlib.contextmanager
def _ieee_fp32_matmul() -> Iterator[None]:
    """fp32 matmuls in full IEEE precision inside the block (no TF32, whatever the process set)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _probe_fp32_output_mm(device: torch.device) -> bool:
    """True if ``torch.mm(bf16, bf16, out_dtype=torch.float32)`` runs on ``device`` (fp32 accumulator kept)."""
    if device.type != "cuda":
        return False
    x = torch.ones((2, 2), dtype=torch.bfloat16, device=device)
    try:
        return torch.mm(x, x, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


class TensorIPIndex:
    """Exact inner-product search over float32 embeddings held as a torch tensor on ``device`` (id = row).

    ``precision="fp32"``: each query batch is scored against chunks of rows with an fp32 matmul (IEEE, no TF32);
    each chunk's top-k is merged into a running top-k, and ties at the k-th place are settled by id exactly as
    :class:`FlatIPIndex` does (:func:`exact_topk`), so the results have the format and tie order of
    :mod:`exact_search`.

    ``precision="fast"`` (exact too, certified): a bfloat16 copy of the embeddings (half the bytes of a scan) is
    scored (tensor cores with fp32 accumulation on CUDA; on the CPU the same values computed in fp32, an
    emulation kept for testing), the top ``k + margin`` candidates ``C`` are re-scored with an fp32 matmul
    (no TF32) against the batch's distinct candidate rows and sorted by (score desc, id asc).  With ``ŝ`` the
    reduced score, ``s`` the true inner product and ``s̄`` the fp32 re-score, for every row d::

        |ŝ − s̄| ≤ E(q) = ‖q‖·R + ‖q − q̃‖·D̃ + γ·(‖q̃‖·D̃ + ‖q‖·D) + u_out·(1 + γ)·‖q̃‖·D̃

    (``q̃ = bf16(q)``; ``D``, ``D̃``, ``R`` the largest ‖d‖, ‖bf16(d)‖, ‖d − bf16(d)‖ over the corpus, in float64;
    ``γ = dim·2^-20`` covers both fp32 accumulations; ``u_out = 2^-8`` when the reduced GEMM rounds its output to
    bf16, else 0; proof: ``q·d − q̃·d̃ = q·(d − d̃) + (q − q̃)·d̃`` and Cauchy–Schwarz).  Every excluded row has
    ``ŝ ≤ ŝ_(k+margin)``, hence ``s̄ ≤ ŝ_(k+margin) + E``; when the k-th re-scored candidate is strictly above that,
    no excluded row can enter the top k, and the top k of ``C`` is the exact fp32 top k.  A query that is not
    certified this way is searched again with the fp32 path (counted in ``fallbacks``).  Memory: the fp32 tensor
    plus the bf16 copy (1.5x the embeddings).

    The re-scores and the fp32 path's scores are fp32 inner products from matmuls of different shapes: equal up
    to the last bits (bitwise whenever fp32 arithmetic is exact), like faiss's scores.
    """

    def __init__(self, embeddings: np.ndarray, device: torch.device | str = "cpu", precision: str = "fp32",
                 margin: Optional[int] = None, chunk_bytes: Optional[int] = None):
        if precision not in SEARCH_PRECISIONS:
            raise ValueError(f"precision must be one of {SEARCH_PRECISIONS}, got {precision!r}")
        if margin is not None and margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.device = torch.device(device)
        self.precision, self.margin = precision, margin
        self.ntotal, self.dim = embeddings.shape
        if self.ntotal == 0:
            raise InputError("cannot search an empty set of embeddings")
        self.chunk_bytes = chunk_bytes or TENSOR_CHUNK_BYTES["cuda" if self.device.type == "cuda" else "cpu"]
        self.vectors = torch.empty((self.ntotal, self.dim), dtype=torch.float32, device=self.device)
        self.reduced: Optional[torch.Tensor] = None
        if precision == "fast":
            self.reduced = torch.empty((self.ntotal, self.dim), dtype=torch.bfloat16, device=self.device)
        norms = np.zeros(3)  # max ‖d‖, ‖bf16(d)‖, ‖d − bf16(d)‖
        block_rows = max(1, MAX_SEARCH_BLOCK_BYTES // (self.dim * 4))
        for start, block in iter_row_blocks(embeddings, block_rows):
            rows = self.vectors[start:start + len(block)]
            rows.copy_(torch.from_numpy(block))  # the block buffer is reused: copy, never alias
            if self.reduced is not None:
                self.reduced[start:start + len(block)] = rows.to(torch.bfloat16)
                norms = np.maximum(norms, self._block_norms(rows, self.reduced[start:start + len(block)]))
        self.max_norm, self.max_reduced_norm, self.max_residual_norm = (float(x) for x in norms)
        self.fp32_output_mm = _probe_fp32_output_mm(self.device) if precision == "fast" else False
        self.queries_searched = 0
        self.fallbacks = 0

    @staticmethod
    def _block_norms(rows: torch.Tensor, reduced: torch.Tensor) -> np.ndarray:
        exact, low = rows.double(), reduced.double()
        return np.array([exact.norm(dim=1).max().item(), low.norm(dim=1).max().item(),
                         (exact - low).norm(dim=1).max().item()])

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
                batch = q[q0:q0 + batch_size]
                parts.append(self._fast_topk(batch, k) if self.precision == "fast" else self._fp32_topk(batch, k))
        return join_batches(parts, k, self.ntotal)

    @property
    def nbytes(self) -> int:
        """Device memory held by the embeddings (and the bf16 copy)."""
        return self.vectors.nbytes + (0 if self.reduced is None else self.reduced.nbytes)

    # -- fp32 ---------------------------------------------------------------------------------------------------
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

    def _chunked_topk(self, q: torch.Tensor, kf: int,
                      score: Callable[[torch.Tensor, int, int], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """A correct top-``kf`` of ``score(q, start, end)`` over all rows, ties in any order, sorted by score:
        each chunk's top-kf merged into a running top-kf (a row dropped anywhere scores ≤ the final kf-th)."""
        best_scores = best_ids = None
        rows = self._chunk_rows(len(q))
        for start in range(0, self.ntotal, rows):
            end = min(start + rows, self.ntotal)
            values, index = torch.topk(score(q, start, end), min(kf, end - start), dim=1)
            index = index + start
            if best_scores is not None:
                merged = torch.cat([best_scores, values], 1)
                values, order = torch.topk(merged, min(kf, merged.shape[1]), dim=1)
                index = torch.gather(torch.cat([best_ids, index], 1), 1, order)
            best_scores, best_ids = values, index
        return best_scores, best_ids

    def _fp32_scores(self, q: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return q @ self.vectors[start:end].T

    def _fp32_candidates(self, q: torch.Tensor, kf: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self._chunked_topk(q, kf, self._fp32_scores)
        return scores.cpu().numpy(), ids.cpu().numpy()

    def _fp32_topk(self, q: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        return exact_topk(self._fp32_candidates, q, k, self.ntotal, self.ntotal)

    # -- fast -----------------------------------------------------------------------------------------------
    def _reduced_scores(self, q_low: torch.Tensor, start: int, end: int) -> torch.Tensor:
        rows = self.reduced[start:end]
        if self.device.type != "cuda":  # emulation: bf16 values, fp32 products (exact) and fp32 accumulation
            return q_low.float() @ rows.float().T
        if self.fp32_output_mm:
            return torch.mm(q_low, rows.T, out_dtype=torch.float32)
        return (q_low @ rows.T).float()

    def error_bound(self, q: torch.Tensor) -> np.ndarray:
        """``E(q)`` (float64 ``[nq]``) of the class docstring: a bound on |reduced score − fp32 re-score|."""
        exact = q.double()
        low = q.to(torch.bfloat16).double()
        q_norm, low_norm = exact.norm(dim=1), low.norm(dim=1)
        gamma = self.dim * ACCUMULATION_UNIT
        u_out = 0.0 if (self.device.type != "cuda" or self.fp32_output_mm) else BF16_UNIT_ROUNDOFF
        bound = (q_norm * self.max_residual_norm + (exact - low).norm(dim=1) * self.max_reduced_norm
                 + gamma * (low_norm * self.max_reduced_norm + q_norm * self.max_norm)
                 + u_out * (1 + gamma) * low_norm * self.max_reduced_norm)
        return (bound * (1 + 1e-9)).cpu().numpy()  # covers the float64 rounding of the bound itself

    def _fast_topk(self, q: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.ntotal)
        n_candidates = k + (k if self.margin is None else self.margin)
        self.queries_searched += len(q)
        if n_candidates >= self.ntotal:  # nothing would be excluded: the fp32 scan is as cheap
            return self._fp32_topk(q, k)
        approx, candidates = self._chunked_topk(q.to(torch.bfloat16), n_candidates, self._reduced_scores)
        unique, inverse = torch.unique(candidates, return_inverse=True)  # rows shared by several queries
        rescored = torch.gather(q @ self.vectors[unique].T, 1, inverse.view_as(candidates))
        scores, ids = sort_rows(rescored.cpu().numpy(), candidates.cpu().numpy())
        excluded_max = approx[:, -1].double().cpu().numpy() + self.error_bound(q)
        todo = np.flatnonzero(~(scores[:, k - 1].astype(np.float64) > excluded_max))
        scores, ids = scores[:, :k].copy(), ids[:, :k].copy()
        if todo.size:
            self.fallbacks += int(todo.size)
            scores[todo], ids[todo] = self._fp32_topk(q[torch.from_numpy(todo).to(q.device)], k)
        return scores, ids


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
            return f"torch tensor on {s.device} ({s.precision} search, {s.nbytes / (1 << 30):.2f} GiB)"
        return f"faiss IndexFlatIP on {'GPU ' + ','.join(map(str, s.gpus)) if s.gpus else 'CPU'}"

    @property
    def fallback_stats(self) -> Optional[tuple[int, int]]:
        """``(queries searched, fp32 fallbacks)`` of a fast tensor index, else None."""
        s = self.searcher
        if isinstance(s, TensorIPIndex) and s.precision == "fast":
            return s.queries_searched, s.fallbacks
        return None


def build_training_index(embeddings: np.ndarray, backend: str = "auto", gpus: Optional[Sequence[int]] = None,
                         device: torch.device | str = "cpu", precision: str = "fp32",
                         margin: Optional[int] = None, omp_threads: Optional[int] = None,
                         headroom_bytes: int = TRAINING_HEADROOM_BYTES) -> TrainingIndex:
    """The :class:`TrainingIndex` for ``embeddings`` (float32 ``[N, dim]``, e.g. a read-only memmap).

    ``backend``: ``"faiss"`` → :class:`FlatIPIndex` on ``gpus`` (one, or several sharded; CPU faiss when none or
    faiss has no GPU support, with ``omp_threads`` OpenMP threads if given); ``"tensor"`` → :class:`TensorIPIndex`
    on ``device`` (the model's); ``"auto"`` → faiss on ``gpus`` when GPUs are given and usable, else the tensor on
    ``device`` when it is a CUDA device with room for the embeddings (×1.5 for ``"fast"``) plus
    ``headroom_bytes`` for the model, else the tensor on the CPU for ``"fast"``, else CPU faiss (the original's
    setting).  ``precision="fast"`` needs the tensor backend.
    """
    if backend not in INDEX_BACKENDS:
        raise ValueError(f"backend must be one of {INDEX_BACKENDS}, got {backend!r}")
    if precision not in SEARCH_PRECISIONS:
        raise ValueError(f"precision must be one of {SEARCH_PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    gpus = resolve_faiss_gpus(gpus)
    if backend == "faiss" and precision == "fast":
        raise InputError("the fast search precision needs the tensor index (not faiss)")
    if backend == "auto":
        backend, device = _auto_backend(embeddings, gpus, device, precision, headroom_bytes)
    if backend == "tensor":
        if gpus:
            logger.warning("--faiss_gpu_index is ignored: the index is a tensor on %s", device)
        searcher: FlatIPIndex | TensorIPIndex = TensorIPIndex(embeddings, device, precision, margin)
    else:
        if omp_threads and not gpus:
            faiss.omp_set_num_threads(omp_threads)
        searcher = FlatIPIndex(embeddings, gpus)
    index = TrainingIndex(embeddings, searcher)
    logger.info("training index: %d x %d embeddings, %s", index.ntotal, index.dim, index.describe())
    return index


def _auto_backend(embeddings: np.ndarray, gpus: list[int], device: torch.device, precision: str,
                  headroom_bytes: int) -> tuple[str, torch.device]:
    """``(backend, device)`` of ``backend="auto"`` (see :func:`build_training_index`)."""
    cpu = torch.device("cpu")
    if gpus:
        if precision == "fast":
            raise InputError("the fast search precision needs the tensor index: drop --faiss_gpu_index")
        return "faiss", cpu
    if device.type == "cuda":
        needed = embeddings.nbytes * (1.5 if precision == "fast" else 1.0) + headroom_bytes
        free, _ = torch.cuda.mem_get_info(device)
        if needed <= free:
            return "tensor", device
        logger.warning("the embeddings (%.1f GiB%s) do not fit beside the model on %s (%.1f GiB free, %.1f GiB "
                       "kept for training): searching %s", embeddings.nbytes / (1 << 30),
                       " + bf16 copy" if precision == "fast" else "", device, free / (1 << 30),
                       headroom_bytes / (1 << 30), "a CPU tensor" if precision == "fast" else "with CPU faiss")
    return ("tensor" if precision == "fast" else "faiss"), cpu
