"""Encoding to embedding memmaps and exact inner-product search: the one encoding loop and the one search API that
every script (``star/prepare_hardneg.py``, ``star/inference.py``, ``adore/*``) calls (spec §3.7, §3.10, §3.12, §7).

Embedding memmap (written by :func:`encode_to_memmap`)
-------------------------------------------------------
Raw float32 ``[N, dim]`` (``np.memmap``, no header), row = offset, plus ``<path>.manifest.json``::

    {"format": "star-adore-embeddings/1", "model_id": "sha256:…", "max_length": 256, "n_rows": N, "dim": 768,
     "dtype": "float32", "precision": "fp32", "order_hash": "sha256:…", "block_rows": 4096,
     "completed_rows": 8192, "complete": false}

Rows are encoded longest first (``order_hash`` fingerprints that order: the offsets and their lengths), in blocks of
``block_rows``; after each block the memmap is flushed and then the manifest is replaced atomically, so an
interrupted encode resumes at the last finished block and (same batch size and devices) gives the same bytes as
an uninterrupted one.
``model_id`` … ``order_hash`` are the *identity* of the file: an existing memmap whose identity differs from the
current run, or that has no manifest, is never reused silently (the original's bug, spec §10.11).

Search results
--------------
``(scores float32 [nq, k], ids int64 [nq, k])``, each row sorted by decreasing score; bitwise-equal scores are
ordered by increasing id, also at the k-th place (so the result equals ``np.argsort(-scores, kind="stable")[:k]``
of the same scores).  When k exceeds the number of rows N, columns N… hold id ``-1`` and score ``-inf``; rank
files never contain them.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import faiss  # imported before torch (JPQ PR #2: the other order failed on some machines)
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset import SequenceCollator, SequenceDataset, TokenIdsCache
from io_utils import InputError, PathLike, atomic_output, atomic_write_json, require_file
from model import DenseEncoder, model_identity

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "star-adore-embeddings/1"
IDENTITY_FIELDS = ("model_id", "max_length", "n_rows", "dim", "dtype", "precision", "order_hash")
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
BLOCK_TARGET_ROWS = 4096          # rows per resumable encoding block (rounded to whole batches)
QUERY_BATCH = 4096                # queries per faiss call
TIE_MARGIN = 16                   # extra results asked from faiss to settle ties at the k-th place
GPU_MAX_K = 2048                  # largest k faiss GPU indexes accept
MAX_SEARCH_BLOCK_BYTES = 1 << 30  # corpus block of the streamed search: larger blocks gain nothing
PAD_ID = -1
PAD_SCORE = -np.inf

SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


# ==============================================================================================================
# Encoding
# ==============================================================================================================

def manifest_path(out_path: PathLike) -> Path:
    """``<out_path>.manifest.json``."""
    return Path(f"{out_path}.manifest.json")


def read_manifest(out_path: PathLike) -> Optional[dict]:
    """The manifest beside an embedding memmap, or None if there is none."""
    path = manifest_path(out_path)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"embedding manifest is not valid JSON ({e})", path=path) from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise InputError(f"not an embedding manifest (format {MANIFEST_FORMAT!r} expected)", path=path)
    counts = [manifest.get(key) for key in ("n_rows", "dim", "block_rows", "completed_rows")]
    if not all(isinstance(c, int) and c >= 0 for c in counts) or not isinstance(manifest.get("complete"), bool):
        raise InputError("embedding manifest lacks n_rows/dim/block_rows/completed_rows/complete", path=path)
    return manifest


def encode_to_memmap(model: torch.nn.Module, dataset: SequenceDataset, out_path: PathLike, batch_size: int,
                     device: torch.device | str, pad_token_id: int, model_id: str, amp: Optional[str] = None,
                     resume: bool = True, overwrite: bool = False, block_rows: Optional[int] = None,
                     num_workers: int = 0, desc: str = "encode", unit: str = "passage") -> np.memmap:
    """Encode every item of ``dataset`` into a float32 memmap ``[len(dataset.cache), dim]`` at ``out_path``
    (row = offset; rows of offsets not in the dataset stay 0) and return it opened read-only.

    Batches hold items of similar length: items are sorted longest first and each batch is padded only to its
    own longest item (``pad_token_id``, attention 0), so little compute goes to padding.  ``batch_size`` is per
    device: on ``cuda``/``cuda:0`` every visible GPU is used (DataParallel) with ``batch_size × n_gpus`` rows
    per batch.
    ``amp`` "fp16"/"bf16" turns on autocast on CUDA (ignored, with a warning, on CPU); fp32 by default.

    Existing file at ``out_path``:
      * manifest identity equal to this run and ``resume``: a complete file is returned as is, an incomplete
        one continues at its last finished block;
      * otherwise (other model / max length / N / dim / precision / data, no manifest, ``resume=False``):
        :class:`InputError` naming the mismatch, unless ``overwrite``, which re-encodes from scratch.
    """
    device = torch.device(device)
    precision = _effective_precision(amp, device)
    n_rows = len(dataset.cache)
    if len(dataset) == 0:
        raise InputError("nothing to encode: the dataset is empty", path=dataset.cache.path)
    order = np.argsort(-dataset.lengths.astype(np.int64), kind="stable")  # longest first, ties in dataset order
    identity = {"model_id": model_id, "max_length": int(dataset.max_seq_length), "n_rows": n_rows,
                "dim": int(_unwrap(model).output_dim), "dtype": "float32", "precision": precision,
                "order_hash": _order_hash(dataset, order)}
    rows_per_batch = batch_size * _n_devices(device)
    if block_rows is None:
        block_rows = rows_per_batch * max(1, BLOCK_TARGET_ROWS // rows_per_batch)
    manifest = _open_or_start(Path(out_path), identity, block_rows, resume, overwrite)
    if not manifest["complete"]:
        embeddings = np.memmap(out_path, dtype=np.float32, mode="r+", shape=(n_rows, identity["dim"]))
        _encode_blocks(_EncodeJob(model, dataset, order, embeddings, manifest, Path(out_path), rows_per_batch,
                                  device, pad_token_id, precision, num_workers, desc, unit))
        del embeddings
    return np.memmap(out_path, dtype=np.float32, mode="r", shape=(n_rows, identity["dim"]))


def _effective_precision(amp: Optional[str], device: torch.device) -> str:
    if amp in (None, "fp32"):
        return "fp32"
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be None, 'fp32', 'fp16' or 'bf16', got {amp!r}")
    if device.type != "cuda":
        logger.warning("%s autocast is only used on CUDA; encoding in fp32 on %s", amp, device)
        return "fp32"
    return amp


def _n_devices(device: torch.device) -> int:
    """GPUs a run on ``device`` uses: all visible ones for ``cuda``/``cuda:0`` (DataParallel), else 1."""
    if device.type == "cuda" and device.index in (None, 0):
        return max(1, torch.cuda.device_count())
    return 1


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.DataParallel) else model


def _order_hash(dataset: SequenceDataset, order: np.ndarray) -> str:
    """Fingerprint of the encoding order: the offsets in order and their (truncated) lengths."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(dataset.offsets[order], dtype="<i8").tobytes())
    digest.update(np.ascontiguousarray(dataset.lengths[order], dtype="<i8").tobytes())
    return "sha256:" + digest.hexdigest()


def _stale_reason(path: Path, manifest: Optional[dict], identity: dict) -> Optional[str]:
    """Why the existing file at ``path`` cannot be reused for ``identity`` (None if it can)."""
    if manifest is None:
        return f"it has no manifest ({manifest_path(path).name}), so the model and settings it was encoded " \
               f"with are unknown"
    for key in IDENTITY_FIELDS:
        if manifest.get(key) != identity[key]:
            return f"it was encoded with {key}={manifest.get(key)!r}, this run has {key}={identity[key]!r}"
    expected = identity["n_rows"] * identity["dim"] * 4
    actual = path.stat().st_size
    if actual != expected:
        return f"its size is {actual} bytes, {expected} expected"
    return None


def _open_or_start(path: Path, identity: dict, block_rows: int, resume: bool, overwrite: bool) -> dict:
    """Apply the reuse policy of :func:`encode_to_memmap`; return the manifest to continue from."""
    if path.exists():
        manifest = read_manifest(path)
        problem = _stale_reason(path, manifest, identity)
        if problem is None and resume:
            if manifest["complete"]:
                logger.info("%s: reusing complete embeddings (manifest matches)", path)
            else:
                logger.info("%s: resuming after %d of %d rows", path, manifest["completed_rows"],
                            identity["n_rows"])
            return manifest
        problem = problem or "resuming was not requested"
        if not overwrite:
            raise InputError(f"existing embeddings cannot be reused: {problem}; pass --overwrite to re-encode",
                             path=path)
        logger.warning("%s: re-encoding from scratch (%s)", path, problem)
    manifest = {"format": MANIFEST_FORMAT, **identity, "block_rows": int(block_rows), "completed_rows": 0,
                "complete": False}
    # The manifest first: a crash before the file exists leaves a manifest that a new run simply replaces.
    atomic_write_json(manifest_path(path), manifest)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(identity["n_rows"] * identity["dim"] * 4)
    return manifest


@dataclass
class _EncodeJob:
    """Everything one encoding run needs."""
    model: torch.nn.Module
    dataset: SequenceDataset
    order: np.ndarray             # dataset item indices, longest first
    embeddings: np.memmap         # opened r+
    manifest: dict
    path: Path
    rows_per_batch: int
    device: torch.device
    pad_token_id: int
    precision: str
    num_workers: int
    desc: str
    unit: str


class _BlockBatches:
    """Batch sampler over ``order[start:]``: whole blocks of ``block_rows``, each cut into batches of
    ``batch_rows`` (a batch never straddles a block, so resumed runs form exactly the same batches)."""

    def __init__(self, order: np.ndarray, start: int, block_rows: int, batch_rows: int):
        self.bounds = [(s, min(s + batch_rows, b + block_rows, len(order)))
                       for b in range(start, len(order), block_rows)
                       for s in range(b, min(b + block_rows, len(order)), batch_rows)]
        self.order = order

    def __len__(self) -> int:
        return len(self.bounds)

    def __iter__(self) -> Iterator[np.ndarray]:
        for s, e in self.bounds:
            yield self.order[s:e]


def _encode_blocks(job: _EncodeJob) -> None:
    """Encode the unfinished blocks of ``job``; flush + update the manifest after each block."""
    manifest, total = job.manifest, len(job.order)
    done = manifest["completed_rows"]
    block_rows = manifest["block_rows"]
    sampler = _BlockBatches(job.order, done, block_rows, job.rows_per_batch)
    collator = SequenceCollator(job.dataset.max_seq_length, job.pad_token_id, padding=False, full_pad_batches=0)
    loader = DataLoader(job.dataset, batch_sampler=sampler, collate_fn=collator, num_workers=job.num_workers,
                        pin_memory=job.device.type == "cuda")
    runner, was_training = _prepare_model(job.model, job.device)
    # DataParallel replicates modules with autograd-aware broadcasts; plain no_grad is the safe mode there.
    grad_off = torch.no_grad() if isinstance(runner, torch.nn.DataParallel) else torch.inference_mode()
    next_flush = min(done + block_rows, total)
    try:
        with grad_off, tqdm(total=total, initial=done, desc=job.desc, unit=job.unit, unit_scale=True,
                            dynamic_ncols=True, disable=None) as bar:
            for inputs, ids in loader:
                vectors = _forward(runner, inputs, job)
                _refuse_non_finite(vectors, ids, job)
                job.embeddings[np.asarray(ids, dtype=np.int64)] = vectors
                done += len(ids)
                bar.update(len(ids))
                if done == next_flush:
                    job.embeddings.flush()  # rows on disk before the manifest says so
                    manifest.update(completed_rows=done, complete=done == total)
                    atomic_write_json(manifest_path(job.path), manifest)
                    next_flush = min(done + block_rows, total)
    finally:
        _unwrap(runner).train(was_training)


def _refuse_non_finite(vectors: np.ndarray, ids: Sequence[int], job: _EncodeJob) -> None:
    """Stop the encoding at the first NaN/inf embedding (a NaN row would silently never be retrieved, an inf one
    ranked first for every query); the blocks written so far stay resumable."""
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise RuntimeError(f"{job.path}: the encoder returned NaN/inf for offset {int(ids[int(np.argmax(bad))])} "
                           f"(precision {job.precision}; fp16 overflow? try fp32 or --bf16)")


def _prepare_model(model: torch.nn.Module, device: torch.device) -> tuple[torch.nn.Module, bool]:
    """Move ``model`` to ``device`` in eval mode; wrap it in DataParallel when several GPUs are visible."""
    base = _unwrap(model)
    was_training = base.training
    base.eval().to(device)
    if _n_devices(device) > 1 and not isinstance(model, torch.nn.DataParallel):
        return torch.nn.DataParallel(base), was_training
    return model, was_training


def _forward(runner: torch.nn.Module, inputs: dict[str, torch.Tensor], job: _EncodeJob) -> np.ndarray:
    input_ids = inputs["input_ids"].to(job.device, non_blocking=True)
    attention_mask = inputs["attention_mask"].to(job.device, non_blocking=True)
    amp_on = job.precision != "fp32"
    with torch.autocast(job.device.type, dtype=AMP_DTYPES.get(job.precision), enabled=amp_on):
        vectors = runner(input_ids, attention_mask)
    return vectors.float().cpu().numpy()


def open_embeddings(path: PathLike, dim: Optional[int] = None, check_finite: bool = False) -> np.memmap:
    """Open an embedding memmap read-only as float32 ``[N, dim]``.

    ``dim`` defaults to the manifest's.  With a manifest the encode must be complete and its dim must equal
    ``dim``; a file without one (e.g. from the original code) is accepted when its size is a positive multiple
    of ``dim × 4`` bytes.  ``check_finite`` scans the rows (bounded memory) and rejects NaN/inf, naming the
    first bad row.  Every problem is an :class:`InputError` naming the file.
    """
    p = require_file(path, "embedding memmap")
    manifest = read_manifest(p)
    if manifest is not None:
        if not manifest.get("complete"):
            raise InputError(f"encoding is incomplete ({manifest.get('completed_rows')} of "
                             f"{manifest.get('n_rows')} rows); rerun the encoding to resume it", path=p)
        if dim is not None and dim != manifest.get("dim"):
            raise InputError(f"embeddings have dim {manifest.get('dim')} (manifest) but the model's is {dim}",
                             path=p)
        dim = manifest.get("dim")
    if dim is None:
        raise InputError("embedding size unknown: no manifest beside the file and no dim given", path=p)
    size = p.stat().st_size
    if size == 0 or size % (dim * 4):
        raise InputError(f"size is not a positive multiple of dim {dim} x 4 bytes (float32)", path=p,
                         value=size)
    embeddings = np.memmap(p, dtype=np.float32, mode="r", shape=(size // (dim * 4), dim))
    if check_finite:
        _check_finite(embeddings, p)
    return embeddings


def _check_finite(embeddings: np.ndarray, path: Path, block_rows: int = 65536) -> None:
    for start, block in _iter_row_blocks(embeddings, block_rows):
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            raise InputError(f"row {start + int(np.argmax(bad))} holds NaN or inf", path=path)


# ==============================================================================================================
# Search
# ==============================================================================================================

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


def _as_float32_matrix(x: np.ndarray, what: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array, got shape {x.shape}")
    return x


def _sort_rows(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by (decreasing score, increasing id)."""
    order = np.lexsort((ids, -scores), axis=-1)
    return np.take_along_axis(scores, order, -1), np.take_along_axis(ids, order, -1)


def _exact_topk(search: SearchFn, queries: np.ndarray, k: int, n: int, k_limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``min(k, n)`` of each query with ties broken by lower id, from ``search(q, kf)`` which returns *a*
    correct top-kf over ``n`` rows with ties in any order (faiss keeps arbitrary ones at the k-th place).

    Every row scoring above the kf-th returned score is returned, so a row is settled when its k-th score
    (after sorting by (-score, id)) is above the kf-th; unsettled rows are searched again with kf doubled until
    settled or kf reaches ``min(n, k_limit)`` (at n everything is returned, so the CPU always settles)."""
    k = min(k, n)
    cap = min(n, k_limit)
    kf = min(cap, k + TIE_MARGIN)
    scores, ids = _sort_rows(*search(queries, kf))
    out_scores, out_ids = scores[:, :k].copy(), ids[:, :k].copy()
    todo = np.flatnonzero(scores[:, k - 1] == scores[:, kf - 1]) if kf < n else np.empty(0, np.int64)
    while todo.size and kf < cap:
        kf = min(cap, 2 * kf)
        scores, ids = _sort_rows(*search(queries[todo], kf))
        out_scores[todo], out_ids[todo] = scores[:, :k], ids[:, :k]
        todo = todo[scores[:, k - 1] == scores[:, kf - 1]] if kf < n else todo[:0]
    if todo.size:
        logger.warning("%d queries have more than %d results tied at the k-th score; faiss chose which of the "
                       "tied ids are kept", todo.size, kf)
    return out_scores, out_ids


def _pad_columns(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Widen results to k columns with id -1 / score -inf (when k exceeds the number of rows)."""
    missing = k - scores.shape[1]
    if missing <= 0:
        return scores, ids
    nq = scores.shape[0]
    return (np.hstack([scores, np.full((nq, missing), PAD_SCORE, np.float32)]),
            np.hstack([ids, np.full((nq, missing), PAD_ID, np.int64)]))


def _check_search_args(n: int, dim: int, queries: np.ndarray, k: int) -> np.ndarray:
    queries = _as_float32_matrix(queries, "queries")
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
        for _, block in _iter_row_blocks(embeddings, max(1, MAX_SEARCH_BLOCK_BYTES // (self.dim * 4))):
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
        """Top-k ``(scores float32 [nq, k], ids int64 [nq, k])`` in query batches (see the module docstring)."""
        queries = _check_search_args(self.ntotal, self.dim, queries, k)
        k_limit = GPU_MAX_K if self.gpus else self.ntotal
        parts = []
        for q0 in tqdm(range(0, len(queries), batch_size), desc=desc, unit="batch", disable=None if desc else True):
            parts.append(_exact_topk(self.index.search, queries[q0:q0 + batch_size], k, self.ntotal, k_limit))
        kk = min(k, self.ntotal)
        scores = np.concatenate([p[0] for p in parts]) if parts else np.empty((0, kk), np.float32)
        ids = np.concatenate([p[1] for p in parts]) if parts else np.empty((0, kk), np.int64)
        return _pad_columns(scores, ids, k)


def _is_file_memmap(x: np.ndarray) -> bool:
    """True for a top-level float32 ``np.memmap`` (not a view), whose rows can be read from its file."""
    return (isinstance(x, np.memmap) and isinstance(x.base, mmap.mmap) and x.filename is not None
            and x.dtype == np.float32 and x.ndim == 2 and x.flags.c_contiguous)


def _iter_row_blocks(embeddings: np.ndarray, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_row, rows)`` float32 blocks of at most ``block_rows`` rows.

    A file-backed ``np.memmap`` is read with plain file reads into one reused buffer (each yielded block is
    valid until the next one), so resident memory stays at one block however large the file: slicing the map
    instead would keep every page it touched resident.  Other arrays are sliced.
    """
    n, dim = embeddings.shape
    if not _is_file_memmap(embeddings):
        for start in range(0, n, block_rows):
            yield start, np.ascontiguousarray(embeddings[start:start + block_rows], dtype=np.float32)
        return
    buffer = np.empty((min(block_rows, n), dim), np.float32)
    with open(embeddings.filename, "rb", buffering=0) as f:
        f.seek(embeddings.offset)
        for start in range(0, n, block_rows):
            block = buffer[: min(block_rows, n - start)]
            _read_into(f, block, embeddings.filename)
            yield start, block


def _read_into(f, array: np.ndarray, path: str) -> None:
    view = memoryview(array).cast("B")
    got = 0
    while got < len(view):
        count = f.readinto(view[got:])
        if not count:
            raise InputError("embedding file is shorter than its shape says", path=path)
        got += count


def memory_budget_bytes(mem_gb: Optional[float] = None) -> int:
    """``mem_gb`` GiB, or by default half of the memory available now (``MemAvailable``)."""
    if mem_gb is not None:
        if mem_gb <= 0:
            raise InputError("the search memory budget must be positive", value=mem_gb)
        return int(mem_gb * (1 << 30))
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return available // 2


def streamed_search(embeddings: np.ndarray, queries: np.ndarray, k: int, block_rows: Optional[int] = None,
                    mem_gb: Optional[float] = None, batch_size: int = QUERY_BATCH,
                    desc: Optional[str] = "search") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over embeddings read ``block_rows`` rows at a time, with a running top-k merge: for a corpus
    memmap larger than RAM (MS MARCO passage: 27 GB).  Same results as :meth:`FlatIPIndex.search`.

    Memory: one corpus block (``block_rows × dim × 4`` bytes; by default half of ``mem_gb`` — see
    :func:`memory_budget_bytes` — capped at 1 GiB), the results (``nq × k × 12`` bytes) and per query batch
    ``batch_size × (2k + 16) × 12`` bytes of merge buffers.  Each block is searched with faiss (exact, CPU).
    """
    n, dim = embeddings.shape
    queries = _check_search_args(n, dim, queries, k)
    if block_rows is None:
        block_rows = max(1, min(memory_budget_bytes(mem_gb) // 2, MAX_SEARCH_BLOCK_BYTES) // (dim * 4))
    kk = min(k, n)
    best_scores = np.full((len(queries), kk), PAD_SCORE, np.float32)
    best_ids = np.full((len(queries), kk), PAD_ID, np.int64)
    with tqdm(total=n, desc=desc, unit="row", unit_scale=True, disable=None if desc else True) as bar:
        for start, block in _iter_row_blocks(embeddings, block_rows):
            def search_block(x: np.ndarray, kf: int, block: np.ndarray = block) -> tuple[np.ndarray, np.ndarray]:
                return faiss.knn(x, block, kf, metric=faiss.METRIC_INNER_PRODUCT)

            for q0 in range(0, len(queries), batch_size):
                scores, ids = _exact_topk(search_block, queries[q0:q0 + batch_size], kk, len(block), len(block))
                rows = slice(q0, q0 + batch_size)
                best_scores[rows], best_ids[rows] = _merge_topk(best_scores[rows], best_ids[rows], scores,
                                                                ids + start, kk)
            bar.update(len(block))
    return _pad_columns(best_scores, best_ids, k)


def _merge_topk(scores_a: np.ndarray, ids_a: np.ndarray, scores_b: np.ndarray, ids_b: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of two row-sorted result sets where every id of ``a`` is below every id of ``b`` (earlier blocks):
    a stable sort by score of ``[a | b]`` then orders equal scores by id."""
    scores = np.hstack([scores_a, scores_b])
    ids = np.hstack([ids_a, ids_b])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def exact_search(embeddings: np.ndarray, queries: np.ndarray, k: int, gpus: Optional[Sequence[int]] = None,
                 mem_gb: Optional[float] = None, batch_size: int = QUERY_BATCH,
                 desc: Optional[str] = "search") -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of ``queries`` against ``embeddings`` (id = row), choosing the path:
    faiss on the given GPUs (when faiss has GPU support); otherwise faiss ``IndexFlatIP`` in RAM when the
    embeddings fit the memory budget (:func:`memory_budget_bytes`), else :func:`streamed_search`."""
    gpus = resolve_faiss_gpus(gpus)
    if not gpus and embeddings.nbytes > memory_budget_bytes(mem_gb):
        logger.info("embeddings (%.3g GiB) exceed the search memory budget: streamed search",
                    embeddings.nbytes / (1 << 30))
        return streamed_search(embeddings, queries, k, mem_gb=mem_gb, batch_size=batch_size, desc=desc)
    return FlatIPIndex(embeddings, gpus).search(queries, k, batch_size=batch_size, desc=desc)


def search(index_or_embeddings: FlatIPIndex | np.ndarray, queries: np.ndarray, k: int,
           gpus: Optional[Sequence[int]] = None, batch_size: int = QUERY_BATCH,
           desc: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k with a prebuilt :class:`FlatIPIndex` (repeated searches, e.g. ADORE training), or with an
    index built on the fly over embeddings (on ``gpus`` if given)."""
    index = index_or_embeddings if isinstance(index_or_embeddings, FlatIPIndex) else \
        FlatIPIndex(index_or_embeddings, gpus)
    return index.search(queries, k, batch_size=batch_size, desc=desc)


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


# ==============================================================================================================
# Pieces of the inference drivers (star/inference.py, adore/inference.py, star/prepare_hardneg.py)
# ==============================================================================================================

def add_encoding_args(parser: argparse.ArgumentParser) -> None:
    """``--no_cuda``, ``--fp16``/``--bf16`` (dest ``amp``), ``--allow_pickle``, ``--overwrite``."""
    parser.add_argument("--no_cuda", action="store_true", help="encode on CPU even when CUDA is available")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", dest="amp", action="store_const", const="fp16",
                           help="fp16 autocast when encoding on CUDA (default fp32, as the original)")
    precision.add_argument("--bf16", dest="amp", action="store_const", const="bf16",
                           help="bf16 autocast when encoding on CUDA")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="allow a legacy pytorch_model.bin that needs full unpickling (trusted files only)")
    parser.add_argument("--overwrite", action="store_true",
                        help="re-encode embedding memmaps that do not match this run (other model, length, data) "
                             "and replace an existing rank file; matching memmaps are reused or resumed")


def add_search_args(parser: argparse.ArgumentParser, topk: int) -> None:
    """``--topk``, ``--faiss_gpus``, ``--search_mem_gb``, ``--with_scores``."""
    parser.add_argument("--topk", type=int, default=topk, help=f"results per query (default {topk})")
    parser.add_argument("--faiss_gpus", type=int, nargs="+", default=None,
                        help="GPU ids for faiss (several: sharded index); CPU faiss if absent or unsupported")
    parser.add_argument("--search_mem_gb", type=float, default=None,
                        help="RAM budget for CPU search: larger embedding files are searched streamed from disk "
                             "(default: half of the available memory)")
    parser.add_argument("--with_scores", action="store_true",
                        help="add the inner-product score as a 4th rank-file column (the original writes 3)")


def inference_device(no_cuda: bool) -> torch.device:
    """``cuda`` when available and not disabled, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() and not no_cuda else "cpu")


def load_encoder(model_dir: PathLike, allow_pickle: bool = False) -> tuple[DenseEncoder, str, int]:
    """``(model, model_id, pad_token_id)`` of a saved encoder; the pad id comes from the config (RoBERTa 1)."""
    model = DenseEncoder.from_pretrained(model_dir, allow_pickle=allow_pickle)
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        logger.warning("%s: config has no pad_token_id; padding with 1 (RoBERTa's)", model_dir)
        pad = 1
    return model, model_identity(model_dir, model), int(pad)


def encode_split(model: torch.nn.Module, model_id: str, preprocess_dir: PathLike, prefix: str, max_length: int,
                 out_path: PathLike, batch_size: int, device: torch.device, pad_token_id: int,
                 amp: Optional[str] = None, overwrite: bool = False, num_workers: int = 0) -> np.memmap:
    """Encode the preprocessed ``{prefix}`` token memmap (e.g. ``passages``, ``dev-query``) of ``preprocess_dir``,
    truncated to ``max_length`` (end-preserving), into ``out_path`` with :func:`encode_to_memmap` (resumable)."""
    dataset = SequenceDataset(TokenIdsCache(preprocess_dir, prefix), max_length)
    unit = "query" if prefix.endswith("query") else "passage"
    return encode_to_memmap(model, dataset, out_path, batch_size, device, pad_token_id, model_id, amp=amp,
                            resume=True, overwrite=overwrite, num_workers=num_workers, desc=f"encode {prefix}",
                            unit=unit)


# ==============================================================================================================
# Training-time index (ADORE, adore/train.py): frozen document embeddings searched once per training step
# ==============================================================================================================
#
# * :class:`TensorIPIndex` — the embeddings as a torch tensor (on the model's GPU, or on the CPU), searched exactly
#   with a chunked fp32 matmul + top-k; results and tie order as :class:`FlatIPIndex`.  Its ``"fast"`` precision
#   scans a bfloat16 copy, re-scores a widened candidate set in fp32 and certifies the result (see the class).
# * :class:`TrainingIndex` — what a training step needs: one exact top-k search for the whole batch
#   (:class:`FlatIPIndex` on CPU / one GPU / sharded GPUs, or a :class:`TensorIPIndex`) and the fp32 embeddings
#   of given rows (gathered from the tensor, or from the read-only memmap as the original did).
# * :func:`build_training_index` — chooses the backend.

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
    :class:`FlatIPIndex` does (:func:`_exact_topk`), so the results have the module's format and tie order.

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
        for start, block in _iter_row_blocks(embeddings, block_rows):
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
        """Top-k ``(scores float32 [nq, k], ids int64 [nq, k])``, numpy, in the module's format."""
        q = self._query_tensor(queries)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        parts = []
        with torch.no_grad(), _ieee_fp32_matmul():
            for q0 in tqdm(range(0, len(q), batch_size), desc=desc, unit="batch", disable=None if desc else True):
                batch = q[q0:q0 + batch_size]
                parts.append(self._fast_topk(batch, k) if self.precision == "fast" else self._fp32_topk(batch, k))
        kk = min(k, self.ntotal)
        scores = np.concatenate([p[0] for p in parts]) if parts else np.empty((0, kk), np.float32)
        ids = np.concatenate([p[1] for p in parts]) if parts else np.empty((0, kk), np.int64)
        return _pad_columns(scores, ids, k)

    @property
    def nbytes(self) -> int:
        """Device memory held by the embeddings (and the bf16 copy)."""
        return self.vectors.nbytes + (0 if self.reduced is None else self.reduced.nbytes)

    # -- fp32 ---------------------------------------------------------------------------------------------------
    def _query_tensor(self, queries: np.ndarray | torch.Tensor) -> torch.Tensor:
        q = queries.detach() if isinstance(queries, torch.Tensor) else torch.from_numpy(
            _as_float32_matrix(queries, "queries"))
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
        return _exact_topk(self._fp32_candidates, q, k, self.ntotal, self.ntotal)

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
        scores, ids = _sort_rows(rescored.cpu().numpy(), candidates.cpu().numpy())
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
        """Exact top-k ``(scores, ids)`` of (detached) queries, numpy, in the module's format."""
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
