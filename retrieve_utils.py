"""What the inference drivers share (``star/inference.py``, ``star/prepare_hardneg.py``, ``adore/inference.py``;
the role of the original's retrieve_utils.py): their flags, loading an encoder, where each process works, encoding
the preprocessed splits and ranking the corpus for every query into a rank file.

Processes
---------
* one process (the default): encodes everything, searches on its device and writes the rank file;
* ``torchrun --nproc_per_node N [--nnodes M ...]``: every rank encodes its shard of each split (whole batches of
  the one-process plan, balanced by tokens: :mod:`encoding_plan`) into its own resumable shard file, rank 0
  assembles the shards into the usual memmap (the bytes of one process), then every rank searches all queries
  against its consecutive rows of the corpus (:func:`infra.exact_search.shard_rows`: 1/N of the corpus in its memory)
  and rank 0 merges the ranks' top-k (:func:`infra.exact_search.merge_topk`: the ids, scores and tie order of one
  process) and writes the rank file.  The shard files must be on a file system every rank sees;
* ``--shard_id K --num_shards N`` (job arrays without torchrun, e.g. SLURM): the job encodes shard K of the
  corpus and stops; a last run without these flags assembles the finished shards and searches.

Search device: faiss on the GPUs given (``--faiss_gpus``; under torchrun each rank's own GPU when faiss has GPU
support); on a CUDA device without faiss GPU support, the exact torch index on the GPU
(:class:`infra.training_index.TensorIPIndex`) when the rows fit its free memory; else CPU faiss, streamed from disk when
the embeddings exceed the memory budget.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from infra import cli_types as ct
# faiss before torch (JPQ PR #2)
from infra.exact_search import (add_search_args, exact_search, faiss_gpu_count, merge_topk, shard_rows,
                                write_rank_file)

import torch
import torch.distributed as dist

from infra.corpus_encoding import EncodingSettings, encode_to_memmap
from dataset import SequenceDataset, TokenIdsCache
from infra.distributed import barrier, init_distributed
from infra.embedding_memmap import open_embeddings
from infra.io import InputError, PathLike, env_int
from infra.model_folder import length_or_folder_default
from infra.preprocess_meta import SIDES, check_model_matches
from model import DenseEncoder, model_identity
from infra.training_index import TENSOR_CHUNK_BYTES, TensorIPIndex, fits_on_gpu

logger = logging.getLogger(__name__)

CUDA_BATCH_TOKENS = 131072   # default padded tokens per batch on a GPU (512 passages of 256 tokens)
RANK_WAIT_S = 6 * 3600       # how long torchrun ranks wait for each other (rank 0 assembles shards meanwhile)
GATHER_QUERIES = 16384       # queries whose per-rank results are gathered and merged at a time
QUERY_LENGTH, DOC_LENGTH = 32, 512  # the original's truncation, for a model folder that declares no length


# ==============================================================================================================
# Flags
# ==============================================================================================================

def add_encoding_args(parser: argparse.ArgumentParser) -> None:
    """``--no_cuda``, ``--fp16``/``--bf16`` (dest ``amp``), ``--batch_tokens``, ``--allow_pickle``,
    ``--overwrite``."""
    parser.add_argument("--no_cuda", action="store_true", help="encode on the CPU even with CUDA")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", dest="amp", action="store_const", const="fp16",
                           help="fp16 autocast on CUDA (default: fp32)")
    precision.add_argument("--bf16", dest="amp", action="store_const", const="bf16",
                           help="bf16 autocast on CUDA")
    parser.add_argument("--batch_tokens", type=ct.non_negative_int, default=None,
                        help=f"padded tokens per encoding batch (default: {CUDA_BATCH_TOKENS} on CUDA; 0 or CPU: rows)")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="load a legacy pytorch_model.bin (trusted)")
    parser.add_argument("--overwrite", action="store_true",
                        help="re-encode memmaps of another run, replace the rank file")


def add_inference_args(parser: argparse.ArgumentParser, topk: int) -> None:
    """The flags every inference driver has: :func:`add_encoding_args` and :func:`infra.exact_search.add_search_args`
    (``--topk`` defaulting to ``topk``)."""
    add_encoding_args(parser)
    add_search_args(parser, topk=topk)


def add_query_and_corpus_args(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """``--max_query_length``, ``--max_doc_length`` (resolved by :func:`encode_queries_and_corpus`),
    ``--eval_batch_size`` (default ``batch_size``) and ``--shard_id``/``--num_shards``: the flags
    :func:`encode_queries_and_corpus` reads besides :func:`add_encoding_args`' (the original's defaults)."""
    parser.add_argument("--max_query_length", type=ct.positive_int, default=None,
                        help=f"query truncation (default: the model folder's max_seq_length, else {QUERY_LENGTH})")
    parser.add_argument("--max_doc_length", type=ct.positive_int, default=None,
                        help=f"document truncation (default: the folder's max_seq_length, else {DOC_LENGTH})")
    parser.add_argument("--eval_batch_size", type=ct.positive_int, default=batch_size,
                        help="encoding batch size per GPU")
    parser.add_argument("--shard_id", type=ct.non_negative_int, default=None,
                        help="encode corpus shard K only (job arrays without torchrun)")
    parser.add_argument("--num_shards", type=ct.positive_int, default=None, help="the number of shards N")


# ==============================================================================================================
# Processes
# ==============================================================================================================

@dataclasses.dataclass(frozen=True)
class Placement:
    """Where this process works: ``device``, and its share ``shard`` of ``num_shards`` — torchrun's ranks
    (``torchrun``: they assemble and search together) or a ``--shard_id`` job (encodes its shard and stops)."""

    device: torch.device
    shard: int = 0
    num_shards: int = 1
    torchrun: bool = False

    @property
    def is_main(self) -> bool:
        """The process that writes the outputs (rank 0, or the only one)."""
        return self.shard == 0 or not self.torchrun

    @property
    def shard_only(self) -> bool:
        """A ``--shard_id`` job: encode a shard of the corpus, nothing else."""
        return self.num_shards > 1 and not self.torchrun


def inference_device(no_cuda: bool) -> torch.device:
    """``cuda`` when available and not disabled, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() and not no_cuda else "cpu")


def resolve_placement(args: argparse.Namespace) -> Placement:
    """The :class:`Placement` of this process: torchrun's rank (joining its process group: nccl on CUDA, gloo on
    the CPU), a ``--shard_id`` job, or one process.  Inconsistent flags raise :class:`InputError`."""
    shard_id, num_shards = getattr(args, "shard_id", None), getattr(args, "num_shards", None)
    if env_int("WORLD_SIZE", 1) > 1:
        if shard_id is not None or num_shards is not None:
            raise InputError("--shard_id/--num_shards are for jobs started without torchrun; under torchrun the "
                             "ranks are the shards")
        if getattr(args, "faiss_gpus", None):
            raise InputError("under torchrun each rank searches on its own GPU: drop --faiss_gpus")
        info = init_distributed(no_cuda=args.no_cuda, timeout_s=RANK_WAIT_S)
        logger.info("torchrun rank %d of %d on %s", info.rank, info.world_size, info.device)
        return Placement(info.device, info.rank, info.world_size, torchrun=True)
    if (shard_id is None) != (num_shards is None):
        raise InputError("--shard_id and --num_shards go together")
    if shard_id is not None and shard_id >= num_shards:
        raise InputError(f"--shard_id must be below --num_shards {num_shards}", value=shard_id)
    return Placement(inference_device(args.no_cuda), shard_id or 0, num_shards or 1)


def batch_tokens_for(args: argparse.Namespace, device: torch.device) -> Optional[int]:
    """The token budget of the encoding batches (``--batch_tokens``; by default :data:`CUDA_BATCH_TOKENS` on a
    GPU), or None for batches of ``--eval_batch_size`` rows."""
    tokens = getattr(args, "batch_tokens", None)
    if tokens is None:
        tokens = CUDA_BATCH_TOKENS if device.type == "cuda" else 0
    return tokens or None


# ==============================================================================================================
# Encoding
# ==============================================================================================================

def load_encoder(model_dir: PathLike, allow_pickle: bool = False, preprocess_dir: Optional[PathLike] = None,
                 sides: Sequence[str] = SIDES) -> tuple[DenseEncoder, str, int]:
    """``(model, model_id, pad_token_id)`` of a saved encoder; the pad id comes from the config (RoBERTa 1).
    With ``preprocess_dir`` the model folder is first checked against its preprocessing on ``sides``
    (:func:`infra.preprocess_meta.check_model_matches`: other prompts refused, another vocabulary warned)."""
    if preprocess_dir is not None:
        check_model_matches(preprocess_dir, model_dir, sides)
    model = DenseEncoder.from_pretrained(model_dir, allow_pickle=allow_pickle)
    return model, model_identity(model_dir, model), model.pad_token_id


def encode_split(model: torch.nn.Module, model_id: str, preprocess_dir: PathLike, prefix: str, max_length: int,
                 out_path: PathLike, batch_size: int, device: torch.device, pad_token_id: int,
                 amp: Optional[str] = None, overwrite: bool = False, num_workers: int = 0,
                 batch_tokens: Optional[int] = None, placement: Optional[Placement] = None) -> Optional[np.memmap]:
    """Encode the preprocessed ``{prefix}`` token memmap (e.g. ``passages``, ``dev-query``) of ``preprocess_dir``,
    truncated to ``max_length`` (end-preserving), into ``out_path`` with :func:`encode_to_memmap` (resumable).

    With a sharded ``placement`` this process encodes its shard; torchrun's ranks then wait for each other, rank
    0 assembles the shards, and every rank gets the complete memmap; a ``--shard_id`` job gets None."""
    dataset = SequenceDataset(TokenIdsCache(preprocess_dir, prefix), max_length)
    settings = EncodingSettings(batch_size, device, pad_token_id, amp=amp, batch_tokens=batch_tokens,
                                num_workers=num_workers, desc=f"encode {prefix}",
                                unit="query" if prefix.endswith("query") else "passage")

    def encode(shard: Optional[tuple[int, int]], overwrite: bool = overwrite) -> Optional[np.memmap]:
        return encode_to_memmap(model, dataset, out_path, model_id, settings, resume=True, overwrite=overwrite,
                                shard=shard)

    if placement is None or placement.num_shards == 1:
        return encode(None)
    encode((placement.shard, placement.num_shards))
    if placement.shard_only:
        return None
    barrier()
    if placement.is_main:
        encode(None, overwrite=False)  # assembles the shards (--overwrite applied to them)
    barrier()
    return open_embeddings(out_path)


def encode_queries_and_corpus(model_dir: PathLike, preprocess_dir: PathLike, mode: str, output_dir: PathLike,
                              args: argparse.Namespace, placement: Placement
                              ) -> Optional[tuple[np.memmap, np.memmap]]:
    """Load the encoder of ``model_dir`` and encode the ``{mode}-query`` split and the ``passages`` of
    ``preprocess_dir`` into ``output_dir/{mode}-query.memmap`` and ``output_dir/passages.memmap`` (resumable,
    :func:`encode_split`), as star/inference.py and star/prepare_hardneg.py do: the flags of
    :func:`add_encoding_args` and :func:`add_query_and_corpus_args`.
    Unset lengths become the model folder's ``max_seq_length`` (:func:`infra.model_folder.length_or_folder_default`).
    Returns ``(queries, passages)``; None for a ``--shard_id`` job, which encodes only its shard of the corpus."""
    model, model_id, pad = load_encoder(model_dir, args.allow_pickle, preprocess_dir)
    query_length = length_or_folder_default(args.max_query_length, model_dir, QUERY_LENGTH, "--max_query_length")
    doc_length = length_or_folder_default(args.max_doc_length, model_dir, DOC_LENGTH, "--max_doc_length")
    common = dict(batch_size=args.eval_batch_size, device=placement.device, pad_token_id=pad, amp=args.amp,
                  overwrite=args.overwrite, batch_tokens=batch_tokens_for(args, placement.device),
                  placement=placement)
    output_dir = Path(output_dir)
    if placement.shard_only:
        encode_split(model, model_id, preprocess_dir, "passages", doc_length, output_dir / "passages.memmap", **common)
        logger.info("shard %d of %d of the corpus encoded; once every shard is done, run again without --shard_id "
                    "to assemble them and search", placement.shard, placement.num_shards)
        return None
    queries = encode_split(model, model_id, preprocess_dir, f"{mode}-query", query_length,
                           output_dir / f"{mode}-query.memmap", **common)
    passages = encode_split(model, model_id, preprocess_dir, "passages", doc_length,
                            output_dir / "passages.memmap", **common)
    return queries, passages


# ==============================================================================================================
# Search
# ==============================================================================================================

def search_rows(docs: np.ndarray, queries: np.ndarray, k: int, device: torch.device,
                gpus: Optional[Sequence[int]] = None, mem_gb: Optional[float] = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of ``queries`` over ``docs`` (format of :mod:`exact_search`): faiss on ``gpus``; on a CUDA
    ``device`` that faiss cannot use, the torch index on that GPU when the rows fit; else CPU faiss."""
    if not gpus and device.type == "cuda" and faiss_gpu_count() == 0 and fits_on_gpu(
            docs.nbytes, device, TENSOR_CHUNK_BYTES["cuda"], "for the scores"):
        return TensorIPIndex(docs, device).search(queries, k, desc="search")
    return exact_search(docs, queries, k, gpus=gpus, mem_gb=mem_gb)


def rank_queries(docs: np.ndarray, queries: np.ndarray, k: int, rank_path: PathLike, placement: Placement,
                 gpus: Optional[Sequence[int]] = None, mem_gb: Optional[float] = None,
                 with_scores: bool = False, cpu_only: bool = False) -> Optional[np.ndarray]:
    """The exact top-``k`` documents of every query (query offset = row), written by the main process as the rank
    file ``rank_path`` (:func:`infra.exact_search.write_rank_file`, with the scores when ``with_scores``).  Under
    torchrun each rank searches its rows and rank 0 merges (module docstring).  ``cpu_only``: CPU faiss, never a
    GPU.  Returns the ids ``int64 [nq, min(k, N)]`` on the main process, None on the others."""
    if cpu_only:
        gpus, placement = [], dataclasses.replace(placement, device=torch.device("cpu"))
    if placement.torchrun:
        if gpus and placement.device.type == "cuda":  # faiss on this rank's own GPU
            gpus = [placement.device.index]
        start, end = shard_rows(len(docs), placement.shard, placement.num_shards)
        if end > start:
            scores, ids = search_rows(docs[start:end], queries, k, placement.device, gpus, mem_gb)
        else:
            scores, ids = np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        merged = _gather_and_merge(scores, ids + start, min(k, len(docs)), placement)
        if merged is None:
            return None
        scores, ids = merged
    else:
        scores, ids = search_rows(docs, queries, k, placement.device, gpus, mem_gb)
    lines = write_rank_file(rank_path, np.arange(len(queries)), ids, scores if with_scores else None)
    logger.info("wrote %d lines to %s", lines, rank_path)
    return ids


def _gather_and_merge(scores: np.ndarray, ids: np.ndarray, k: int,
                      placement: Placement) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Rank 0: every rank's results merged (:func:`infra.exact_search.merge_topk`, ranks in row order); other ranks:
    None.  Gathered :data:`GATHER_QUERIES` queries at a time, so rank 0 holds one slice of every rank's results."""
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    for q0 in range(0, len(scores), GATHER_QUERIES):
        piece = (scores[q0:q0 + GATHER_QUERIES], ids[q0:q0 + GATHER_QUERIES])
        gathered: Optional[list] = [None] * placement.num_shards if placement.is_main else None
        dist.gather_object(piece, gathered, dst=0)
        if gathered is not None:
            parts.append(merge_topk(gathered, k))
    if not placement.is_main:
        return None
    if not parts:
        return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
