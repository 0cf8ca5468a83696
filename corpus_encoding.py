"""Corpus encoding: a dense encoder turned into an embedding memmap (``embedding_memmap`` describes the file and
its manifest), resumably, in length-sorted batches; plus the pieces of the inference drivers that load an
encoder and encode a preprocessed split (``star/inference.py``, ``adore/inference.py``,
``star/prepare_hardneg.py``).

An existing memmap is reused only when its manifest's identity (model, max length, rows, dim, dtype, precision,
encoding order: :data:`IDENTITY_FIELDS`) equals the current run's (:func:`encode_to_memmap`).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

import cli_types as ct
from exact_search import add_search_args  # faiss before torch (JPQ PR #2: the other order failed on some machines)

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset import SequenceCollator, SequenceDataset, TokenIdsCache
from embedding_memmap import MANIFEST_FORMAT, manifest_mismatch, manifest_path, read_manifest
from io_utils import InputError, PathLike, atomic_write_json
from model import DenseEncoder, model_identity

logger = logging.getLogger(__name__)

IDENTITY_FIELDS = ("model_id", "max_length", "n_rows", "dim", "dtype", "precision", "order_hash")
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
BLOCK_TARGET_ROWS = 4096          # rows per resumable encoding block (rounded to whole batches)


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
    problem = manifest_mismatch(path.stat().st_size, manifest)  # e.g. replaced, truncated or float64
    return None if problem is None else f"the file {problem}"


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


def add_inference_args(parser: argparse.ArgumentParser, topk: int) -> None:
    """The flags every inference driver has: :func:`add_encoding_args` and :func:`exact_search.add_search_args`
    (``--topk`` defaulting to ``topk``)."""
    add_encoding_args(parser)
    add_search_args(parser, topk=topk)


def inference_device(no_cuda: bool) -> torch.device:
    """``cuda`` when available and not disabled, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() and not no_cuda else "cpu")


def load_encoder(model_dir: PathLike, allow_pickle: bool = False) -> tuple[DenseEncoder, str, int]:
    """``(model, model_id, pad_token_id)`` of a saved encoder; the pad id comes from the config (RoBERTa 1)."""
    model = DenseEncoder.from_pretrained(model_dir, allow_pickle=allow_pickle)
    return model, model_identity(model_dir, model), model.pad_token_id


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


def add_query_and_corpus_args(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """``--max_query_length``, ``--max_doc_length`` and ``--eval_batch_size`` (default ``batch_size``): the flags
    :func:`encode_queries_and_corpus` reads besides :func:`add_encoding_args`' (the original's defaults)."""
    parser.add_argument("--max_query_length", type=ct.positive_int, default=32,
                        help="query truncation in tokens (default %(default)s)")
    parser.add_argument("--max_doc_length", type=ct.positive_int, default=512,
                        help="passage/doc truncation (default %(default)s; the README uses 256 for passages)")
    parser.add_argument("--eval_batch_size", type=ct.positive_int, default=batch_size,
                        help="encoding batch size per GPU (default %(default)s)")


def encode_queries_and_corpus(model_dir: PathLike, preprocess_dir: PathLike, mode: str, output_dir: PathLike,
                              args: argparse.Namespace) -> tuple[np.memmap, np.memmap]:
    """Load the encoder of ``model_dir`` and encode the ``{mode}-query`` split and the ``passages`` of
    ``preprocess_dir`` into ``output_dir/{mode}-query.memmap`` and ``output_dir/passages.memmap`` (resumable,
    :func:`encode_split`), as star/inference.py and star/prepare_hardneg.py do: the flags of
    :func:`add_encoding_args` and :func:`add_query_and_corpus_args`.
    Returns ``(queries, passages)``."""
    model, model_id, pad = load_encoder(model_dir, allow_pickle=args.allow_pickle)
    common = dict(batch_size=args.eval_batch_size, device=inference_device(args.no_cuda), pad_token_id=pad,
                  amp=args.amp, overwrite=args.overwrite)
    output_dir = Path(output_dir)
    queries = encode_split(model, model_id, preprocess_dir, f"{mode}-query", args.max_query_length,
                           output_dir / f"{mode}-query.memmap", **common)
    passages = encode_split(model, model_id, preprocess_dir, "passages", args.max_doc_length,
                            output_dir / "passages.memmap", **common)
    return queries, passages
