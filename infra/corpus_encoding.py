"""Corpus encoding: a dense encoder turned into an embedding memmap (``embedding_memmap`` describes the file and
its manifest), resumably, in the length-sorted batches of :mod:`encoding_plan`, in one process or as shards that
are assembled into the same file (:func:`encode_to_memmap`).

An existing memmap is reused only when its manifest's identity (model, max length, rows, dim, dtype, precision,
encoding order) equals the current run's.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol, Sequence

import numpy as np

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from infra.embedding_memmap import MANIFEST_FORMAT, iter_row_blocks, manifest_mismatch, manifest_path, read_manifest
from infra.encoding_plan import batch_bounds, encoding_order, flush_points, shard_positions
from infra.io import InputError, PathLike, atomic_output, atomic_write_json, writing

logger = logging.getLogger(__name__)

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
BLOCK_TARGET_ROWS = 4096          # rows per resumable encoding block (rounded to whole batches)
TOKEN_BATCHING_BLOCK_ROWS = 65536  # the same with a token budget (batches of thousands of rows on a GPU)
MAX_ASSEMBLY_BLOCK_BYTES = 1 << 28  # shard rows read at a time when assembling shards


class TokenRows(Protocol):
    """What encoding reads from a ``dataset.SequenceDataset``: the rows to encode (``offsets`` into the token
    ``cache``), their ``lengths`` after truncation to ``max_seq_length``, and whole padded batches."""
    cache: Any
    offsets: np.ndarray
    lengths: np.ndarray
    max_seq_length: int

    def padded_batch(self, indices: np.ndarray, pad_token_id: int) -> tuple[dict[str, torch.Tensor], np.ndarray]: ...


@dataclass(frozen=True)
class EncodingSettings:
    """How :func:`encode_to_memmap` encodes, on ``device``.

    Batches follow :mod:`encoding_plan`: items longest first, each batch padded only to its own longest item
    (``pad_token_id``, attention 0), of ``batch_size`` rows or, with ``batch_tokens``, of at most that many
    padded tokens.  Both are per device: on ``cuda``/``cuda:0`` every visible GPU is used (DataParallel) with
    ``n_gpus`` times as much per batch.  On CUDA each batch's embeddings are copied to the host while the next
    batch runs (no host sync per batch).
    ``amp`` "fp16"/"bf16" turns on autocast on CUDA (ignored, with a warning, on CPU); fp32 by default.
    ``num_workers``: DataLoader workers; ``block_rows``: rows per resumable block (default: whole batches of about
    :data:`BLOCK_TARGET_ROWS` rows, :data:`TOKEN_BATCHING_BLOCK_ROWS` with a token budget); ``desc`` and ``unit``
    label the progress bar.
    """

    batch_size: int
    device: torch.device | str
    pad_token_id: int
    amp: Optional[str] = None
    batch_tokens: Optional[int] = None
    num_workers: int = 0
    block_rows: Optional[int] = None
    desc: str = "encode"
    unit: str = "passage"


def encode_to_memmap(model: torch.nn.Module, dataset: TokenRows, out_path: PathLike, model_id: str,
                     settings: EncodingSettings, resume: bool = True, overwrite: bool = False,
                     shard: Optional[tuple[int, int]] = None) -> Optional[np.memmap]:
    """Encode every item of ``dataset`` into a float32 memmap ``[len(dataset.cache), dim]`` at ``out_path``
    (row = offset; rows of offsets not in the dataset stay 0) as ``settings`` say and return it opened
    read-only.  ``model_id`` identifies the model in the file's manifest.

    ``shard=(s, n)``: encode only shard ``s`` of ``n`` (:mod:`encoding_plan`: whole batches of the one-process
    plan, balanced by tokens; one device) into its own file :func:`shard_path` (rows in encoding order, its own
    manifest, resumable like the whole file) and return None.  A call without ``shard`` finding no complete
    ``out_path`` but a complete set of shards with this run's identity assembles them into ``out_path`` (the
    bytes one process would have written) and deletes them.

    Existing file at ``out_path`` (or at the shard's path):
      * manifest identity equal to this run and ``resume``: a complete file is returned as is, an incomplete
        one continues at its last finished block;
      * otherwise (other model / max length / N / dim / precision / data, no manifest, ``resume=False``):
        :class:`InputError` naming the mismatch, unless ``overwrite``, which re-encodes from scratch.
    """
    device = torch.device(settings.device)
    precision = _effective_precision(settings.amp, device)
    n_rows = len(dataset.cache)
    if len(dataset) == 0:
        raise InputError("nothing to encode: the dataset is empty", path=dataset.cache.path)
    order = encoding_order(dataset.lengths)
    identity = {"model_id": model_id, "max_length": int(dataset.max_seq_length), "n_rows": n_rows,
                "dim": int(_unwrap(model).output_dim), "dtype": "float32", "precision": precision,
                "order_hash": _order_hash(dataset, order)}
    n_devices = 1 if shard is not None else _n_devices(device)
    batching = _Batching(settings.batch_size * n_devices,
                         None if not settings.batch_tokens else settings.batch_tokens * n_devices)
    sorted_lengths = dataset.lengths[order]
    path = Path(out_path)
    if shard is None:
        shards = _complete_shards(path, identity, overwrite)
        if shards:
            return _assemble_shards(path, identity, shards, dataset.offsets[order])
        first, end = 0, len(order)
    else:
        if _is_complete(path, identity):
            logger.info("%s: already complete, shard %d of %d has nothing to encode", path, *shard)
            return None
        problem = _stale_reason(path, read_manifest(path), identity) if path.exists() and not overwrite else None
        if problem is not None:  # the assembly would replace it: refused as one process refuses
            raise _reuse_refused(path, problem)
        first, end = shard_positions(batching.bounds(sorted_lengths, 0), sorted_lengths, *shard)
        identity = {"shard": list(shard), "batching": batching.describe(), "order_range": [first, end],
                    **identity, "n_rows": end - first, "corpus_rows": n_rows}
        path = shard_path(path, *shard)
    block_rows = settings.block_rows if settings.block_rows is not None else batching.default_block_rows()
    manifest = _open_or_start(path, identity, block_rows, resume, overwrite)
    if not manifest["complete"]:
        embeddings = np.memmap(path, dtype=np.float32, mode="r+", shape=(identity["n_rows"], identity["dim"]))
        bounds = batching.bounds(sorted_lengths[:end], first + manifest["completed_rows"])
        _encode_blocks(_EncodeJob(model, dataset, order, embeddings, manifest, path, bounds, first, end,
                                  shard is None, device, precision, settings))
        del embeddings
    if shard is not None:
        return None
    return np.memmap(path, dtype=np.float32, mode="r", shape=(n_rows, identity["dim"]))


@dataclass(frozen=True)
class _Batching:
    """How batches are cut (:mod:`encoding_plan`): ``rows`` a batch, or at most ``tokens`` padded tokens."""
    rows: int
    tokens: Optional[int]

    def bounds(self, sorted_lengths: np.ndarray, start: int) -> np.ndarray:
        return batch_bounds(sorted_lengths, start, self.rows, self.tokens)

    def describe(self) -> str:
        return f"rows:{self.rows}" if self.tokens is None else f"tokens:{self.tokens}"

    def default_block_rows(self) -> int:
        if self.tokens is not None:
            return TOKEN_BATCHING_BLOCK_ROWS
        return self.rows * max(1, BLOCK_TARGET_ROWS // self.rows)


def shard_path(out_path: PathLike, shard: int, num_shards: int) -> Path:
    """``<out_path>.shard-<s>-of-<n>``: the embedding file of one shard (:func:`encode_to_memmap`)."""
    return Path(f"{out_path}.shard-{shard}-of-{num_shards}")


def _is_complete(path: Path, identity: dict) -> bool:
    if not path.is_file():
        return False
    try:
        manifest = read_manifest(path)
    except InputError:
        return False
    return manifest is not None and manifest["complete"] and _stale_reason(path, manifest, identity) is None


def _complete_shards(path: Path, identity: dict, overwrite: bool) -> Optional[list[tuple[Path, dict]]]:
    """The shard files and manifests of ``path`` to assemble: a complete set with ``identity``, when ``path``
    itself is not complete.  None when there are no shards (or ``path`` is complete or ``overwrite``); an
    incomplete or foreign set raises :class:`InputError` (they are a run's work: never silently redone)."""
    if overwrite or _is_complete(path, identity):
        return None
    found = {}
    for candidate in path.parent.glob(f"{glob.escape(path.name)}.shard-*-of-*"):
        match = re.fullmatch(re.escape(path.name) + r"\.shard-(\d+)-of-(\d+)", candidate.name)
        if match:
            found.setdefault(int(match.group(2)), {})[int(match.group(1))] = candidate
    if not found:
        return None
    if len(found) > 1:
        raise InputError(f"shards of several splits lie beside it ({', '.join(f'of-{n}' for n in sorted(found))}): "
                         f"remove the ones not wanted", path=path)
    (num_shards, files), = found.items()
    problems, shards = [], []
    for shard in range(num_shards):
        file = files.get(shard, shard_path(path, shard, num_shards))
        manifest = read_manifest(file) if file.is_file() else None
        whole = None if manifest is None else {k: manifest.get(k if k != "n_rows" else "corpus_rows")
                                                for k in identity}
        if manifest is None or not manifest["complete"]:
            problems.append(f"shard {shard} is {'missing' if manifest is None else 'incomplete'}")
        elif whole != identity:
            problems.append(f"shard {shard} was encoded with other settings")
        else:
            shards.append((file, manifest))
    if problems:
        raise InputError(f"cannot assemble its {num_shards} shards: {'; '.join(problems)} (finish them with "
                         f"--shard_id K --num_shards {num_shards}, or pass --overwrite to encode in one process)",
                         path=path)
    return shards


def _assemble_shards(path: Path, identity: dict, shards: list[tuple[Path, dict]],
                     offsets_in_order: np.ndarray) -> np.memmap:
    """Write the complete file ``path`` (row = offset) from ``shards``, then delete them.  The data is written
    under a temporary name and renamed last, after the complete manifest: an interrupted assembly leaves the
    shards and is redone by the next run."""
    n_rows, dim = identity["n_rows"], identity["dim"]
    ranges = sorted(tuple(m["order_range"]) for _, m in shards)
    if ranges[0][0] != 0 or ranges[-1][1] != len(offsets_in_order) or any(
            a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
        raise InputError(f"its shards do not cover the encoding order exactly: {ranges}", path=path)
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.truncate(n_rows * dim * 4)
        out = np.memmap(tmp, dtype=np.float32, mode="r+", shape=(n_rows, dim))
        for file, manifest in tqdm(shards, desc=f"assemble {path.name}", unit="shard", disable=None):
            if manifest["n_rows"] == 0:  # more shards than batches
                continue
            first = manifest["order_range"][0]
            rows = np.memmap(file, dtype=np.float32, mode="r", shape=(manifest["n_rows"], dim))
            for start, block in iter_row_blocks(rows, max(1, MAX_ASSEMBLY_BLOCK_BYTES // (dim * 4))):
                out[offsets_in_order[first + start:first + start + len(block)]] = block
        out.flush()
        del out
        atomic_write_json(manifest_path(path), {"format": MANIFEST_FORMAT, **identity,
                                                "block_rows": max(m["block_rows"] for _, m in shards),
                                                "completed_rows": n_rows, "complete": True})
    for file, _ in shards:
        file.unlink()
        manifest_path(file).unlink(missing_ok=True)
    logger.info("%s: assembled from %d shards", path, len(shards))
    return np.memmap(path, dtype=np.float32, mode="r", shape=(n_rows, dim))


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


def _order_hash(dataset: TokenRows, order: np.ndarray) -> str:
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
    for key in identity:
        if manifest.get(key) != identity[key]:
            return f"it was encoded with {key}={manifest.get(key)!r}, this run has {key}={identity[key]!r}"
    problem = manifest_mismatch(path.stat().st_size, manifest)  # e.g. replaced, truncated or float64
    return None if problem is None else f"the file {problem}"


def _reuse_refused(path: Path, problem: str) -> InputError:
    return InputError(f"existing embeddings cannot be reused: {problem}; pass --overwrite to re-encode", path=path)


def _open_or_start(path: Path, identity: dict, block_rows: int, resume: bool, overwrite: bool) -> dict:
    """Apply the reuse policy of :func:`encode_to_memmap`; return the manifest to continue from."""
    if path.exists():
        try:
            manifest = read_manifest(path)
            problem = _stale_reason(path, manifest, identity)
        except InputError as e:  # an unreadable manifest: refused, or replaced by re-encoding with overwrite
            if not overwrite:
                raise
            manifest, problem = None, str(e)
        if problem is None and resume:
            if manifest["complete"]:
                logger.info("%s: reusing complete embeddings (manifest matches)", path)
            else:
                logger.info("%s: resuming after %d of %d rows", path, manifest["completed_rows"],
                            identity["n_rows"])
            return manifest
        problem = problem or "resuming was not requested"
        if not overwrite:
            raise _reuse_refused(path, problem)
        logger.warning("%s: re-encoding from scratch (%s)", path, problem)
    manifest = {"format": MANIFEST_FORMAT, **identity, "block_rows": int(block_rows), "completed_rows": 0,
                "complete": identity["n_rows"] == 0}
    # The manifest first: a crash before the file exists leaves a manifest that a new run simply replaces.
    atomic_write_json(manifest_path(path), manifest)
    path.parent.mkdir(parents=True, exist_ok=True)
    with writing(path), open(path, "wb") as f:
        f.truncate(identity["n_rows"] * identity["dim"] * 4)
    return manifest


@dataclass
class _EncodeJob:
    """Everything one encoding run needs."""
    model: torch.nn.Module
    dataset: TokenRows
    order: np.ndarray             # dataset item indices, longest first
    embeddings: np.memmap         # opened r+
    manifest: dict
    path: Path
    bounds: np.ndarray            # [n_batches, 2] positions in ``order`` of the batches still to encode
    first: int                    # positions ``[first, end)`` of ``order`` are the file's rows
    end: int
    rows_are_offsets: bool        # True: row = offset (the whole file); False: row = position - first (a shard)
    device: torch.device          # settings.device as a torch device
    precision: str
    settings: EncodingSettings


class _PlannedBatches(Sampler):
    """Yields the dataset indices of each planned batch."""

    def __init__(self, order: np.ndarray, bounds: np.ndarray):
        self.order, self.bounds = order, bounds

    def __len__(self) -> int:
        return len(self.bounds)

    def __iter__(self) -> Iterator[np.ndarray]:
        for s, e in self.bounds.tolist():
            yield self.order[s:e]


class _BatchReader(Dataset):
    """Whole batches of a :class:`dataset.SequenceDataset`, each read and padded at once
    (its ``padded_batch``)."""

    def __init__(self, dataset: TokenRows, pad_token_id: int):
        self.dataset, self.pad_token_id = dataset, pad_token_id

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: np.ndarray) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        return self.dataset.padded_batch(indices, self.pad_token_id)


@dataclass
class _Launched:
    """A batch whose embeddings are on their way to the host (``ready`` is recorded after the copy on CUDA)."""
    vectors: torch.Tensor
    ready: Optional[torch.cuda.Event]
    ids: list
    bounds: tuple[int, int]
    flush: bool


def _encode_blocks(job: _EncodeJob) -> None:
    """Encode the batches of ``job``; flush + update the manifest after each block.  Each batch is launched
    before the previous one is stored, so on CUDA the device computes while the host writes."""
    manifest = job.manifest
    total, done = job.end - job.first, manifest["completed_rows"]
    flushes = flush_points(job.bounds, manifest["block_rows"])
    loader = DataLoader(_BatchReader(job.dataset, job.settings.pad_token_id),
                        sampler=_PlannedBatches(job.order, job.bounds),
                        batch_size=None, num_workers=job.settings.num_workers, pin_memory=job.device.type == "cuda")
    runner, was_training = _prepare_model(job.model, job.device, job.rows_are_offsets)
    # DataParallel replicates modules with autograd-aware broadcasts; plain no_grad is the safe mode there.
    grad_off = torch.no_grad() if isinstance(runner, torch.nn.DataParallel) else torch.inference_mode()
    buffers = _HostBuffers(job)
    pending: Optional[_Launched] = None
    try:
        with grad_off, tqdm(total=total, initial=done, desc=job.settings.desc, unit=job.settings.unit, unit_scale=True,
                            dynamic_ncols=True, disable=None) as bar:
            for i, ((inputs, ids), bounds) in enumerate(zip(loader, job.bounds.tolist())):
                launched = _Launched(*buffers.launch(_forward(runner, inputs, job), i), ids, tuple(bounds),
                                     bool(flushes[i]))
                if pending is not None:
                    _store(pending, job, bar)
                pending = launched
            if pending is not None:
                _store(pending, job, bar)
    finally:
        _unwrap(runner).train(was_training)


class _HostBuffers:
    """Two pinned host buffers the batches' embeddings are copied into, alternately, without waiting (CUDA);
    on the CPU the embeddings are used as they are."""

    def __init__(self, job: _EncodeJob):
        self.cuda = job.device.type == "cuda"
        self.buffers: list[torch.Tensor] = []
        if self.cuda and len(job.bounds):
            rows = int((job.bounds[:, 1] - job.bounds[:, 0]).max())
            dim = job.embeddings.shape[1]
            self.buffers = [torch.empty((rows, dim), dtype=torch.float32, pin_memory=True) for _ in range(2)]

    def launch(self, vectors: torch.Tensor, batch: int) -> tuple[torch.Tensor, Optional[torch.cuda.Event]]:
        if not self.cuda:
            return vectors, None
        host = self.buffers[batch % 2][: len(vectors)]
        host.copy_(vectors, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return host, ready


def _store(batch: _Launched, job: _EncodeJob, bar: tqdm) -> None:
    """Wait for ``batch``'s embeddings, check them, write its rows; after a block's last batch flush the file and
    then record the progress in the manifest."""
    if batch.ready is not None:
        batch.ready.synchronize()
    vectors = batch.vectors.numpy()
    _refuse_non_finite(vectors, batch.ids, job)
    first, end = batch.bounds
    if job.rows_are_offsets:
        job.embeddings[np.asarray(batch.ids, dtype=np.int64)] = vectors
    else:
        job.embeddings[first - job.first:end - job.first] = vectors
    bar.update(end - first)
    if batch.flush:
        job.embeddings.flush()  # rows on disk before the manifest says so
        job.manifest.update(completed_rows=end - job.first, complete=end == job.end)
        atomic_write_json(manifest_path(job.path), job.manifest)


def _refuse_non_finite(vectors: np.ndarray, ids: Sequence[int], job: _EncodeJob) -> None:
    """Stop the encoding at the first NaN/inf embedding (a NaN row would silently never be retrieved, an inf one
    ranked first for every query); the blocks written so far stay resumable."""
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise RuntimeError(f"{job.path}: the encoder returned NaN/inf for offset {int(ids[int(np.argmax(bad))])} "
                           f"(precision {job.precision}; fp16 overflow? try fp32 or --bf16)")


def _prepare_model(model: torch.nn.Module, device: torch.device, parallel: bool) -> tuple[torch.nn.Module, bool]:
    """Move ``model`` to ``device`` in eval mode; wrap it in DataParallel when ``parallel`` and several GPUs are
    visible."""
    base = _unwrap(model)
    was_training = base.training
    base.eval().to(device)
    if parallel and _n_devices(device) > 1 and not isinstance(model, torch.nn.DataParallel):
        return torch.nn.DataParallel(base), was_training
    return (model if parallel else base), was_training


def _forward(runner: torch.nn.Module, inputs: dict[str, torch.Tensor], job: _EncodeJob) -> torch.Tensor:
    input_ids = inputs["input_ids"].to(job.device, non_blocking=True)
    attention_mask = inputs["attention_mask"].to(job.device, non_blocking=True)
    amp_on = job.precision != "fp32"
    with torch.autocast(job.device.type, dtype=AMP_DTYPES.get(job.precision), enabled=amp_on):
        vectors = runner(input_ids, attention_mask)
    return vectors.float()
