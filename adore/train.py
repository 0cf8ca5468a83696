"""ADORE: train a query encoder against a frozen document index with dynamic hard negatives (Zhan et al. 2021;
the original adore/train.py).

    python -m adore.train --data_type passage --init_path data/passage/trained_models/star \\
        --pembed_path data/passage/evaluate/star/passages.memmap --preprocess_dir data/passage/preprocess \\
        --model_save_dir data/passage/adore_train/models --log_dir data/passage/adore_train/log
    torchrun --nproc_per_node 4 -m adore.train ... --per_gpu_batch_size 8     # the same global batch of 32

Every micro-batch encodes the queries (train mode), searches the top --neg_topk documents of the detached queries
in the frozen exact index, labels them with the training qrels (appending missing positives), scores them against
the frozen embeddings and takes the ΔMRR-weighted pairwise loss (``model.adore_batch_loss``).  Only the query
encoder trains.  The steps with their formulas, the torchrun layout and every deviation from the original:
docs/deviations.md, section "adore.train".
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from infra import cli_types as ct
from infra import distributed
from infra.embedding_memmap import corpus_rows, open_embeddings
from infra.training_index import INDEX_BACKENDS, TrainingIndex, build_training_index
from infra.batch_plan import GlobalBatchSampler, TrainingPlan
from infra.checkpoints import checkpoint_to_resume, prepare_output_dir, set_seed
from infra.distributed import DistInfo, all_reduce_sum, cleanup_distributed, get_world_size, init_distributed
from infra.optim import build_optimizer, fp32_context, linear_schedule, make_grad_scaler, optimizer_step, param_groups
from infra.training_loop import (EpochData, StepDriver, TrainerFlags, TrainingRun, add_training_args,
                                 cap_training_args, resume_settings, run_steps)
from infra.model_folder import length_or_folder_default
from infra.preprocess_meta import check_model_matches
from model import load_init_model
from dataset import QueryCollator, TokenIdsCache, TrainQueryDataset, load_rel
from infra.exact_search import shard_rows
from infra.io import InputError, atomic_directory, atomic_write_json, configure_logging, env_int, require_file, run_cli
from infra.run_lock import output_lock
from model import adore_batch_loss
from model import DenseEncoder

logger = logging.getLogger("adore.train")

APPEND_MODES = ("none_retrieved", "always")
DATA_TYPES = ("passage", "doc")
PASSAGE_METRIC_CUT = 200  # README passage command
QUERY_LENGTH = 64         # the original's query truncation, for an init folder that declares no length
EPOCH_PREFIX = "epoch-"
TOP_METRIC_DEPTH = 10     # train/mrr_10 and train/recall_10
# settings that decide the data order and the loss: a resume with other values is not exact
RESUME_KEYS = ("seed", "per_gpu_batch_size", "gradient_accumulation_steps", "max_seq_length", "neg_topk",
               "metric_cut", "append_missing_positives", "score_scale")
ADORE_FLAGS = TrainerFlags(
    learning_rate=5e-6, num_train_epochs=6.0, warmup_steps=2000, logging_steps=100,
    init_help="initial query encoder (e.g. the STAR model)",
    preprocess_help="preprocess.py output folder",
    clip_help="clip per backward; <= 0: off", run_folder="model_save_dir", run_folders="checkpoint-*/epoch-*")
DETAILS = 'docs/deviations.md, section "adore.train"'



# ----------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adore.train", description=__doc__.split("\n\n")[0],
                                epilog=f"Details, formulas and the deviations from the original: {DETAILS}.",
                                formatter_class=ct.CompactHelpFormatter)
    add_training_args(p, ADORE_FLAGS)
    data = p.add_argument_group("data and model")
    data.add_argument("--pembed_path", "--doc_embeddings", required=True,
                      help="frozen document embeddings (star.inference)")
    data.add_argument("--data_type", choices=DATA_TYPES, default=None,
                      help="passage: --metric_cut 200 by default")
    data.add_argument("--max_seq_length", type=ct.positive_int, default=None,
                      help=f"query truncation in tokens (default: the init folder's max_seq_length, "
                           f"else {QUERY_LENGTH})")
    data.add_argument("--allow_pickle", action="store_true",
                      help="load a legacy pytorch_model.bin (trusted)")
    data.add_argument("--check_finite", action="store_true", help="check the embeddings for NaN/inf")

    adore = p.add_argument_group("ADORE")
    adore.add_argument("--metric_cut", type=ct.positive_int, default=None,
                       help="depth cut of the 1/rank pair weights (>= 1)")
    adore.add_argument("--neg_topk", type=ct.positive_int, default=200,
                       help="documents retrieved per query")
    adore.add_argument("--append_missing_positives", choices=APPEND_MODES, default="none_retrieved",
                       help="none_retrieved: the original; always: JPQ's")

    out = p.add_argument_group("output")
    out.add_argument("--model_save_dir", required=True,
                     help="epoch-<k>/ and checkpoint-<step>/ folders")
    out.add_argument("--log_dir", default=None, help="TensorBoard (default: MODEL_SAVE_DIR/log)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--per_gpu_batch_size", type=ct.positive_int, default=32, help="queries per micro-batch")

    hw = p.add_argument_group("devices and index")
    hw.add_argument("--model_device", default=None,
                    help="cpu, cuda or cuda:N (default: cuda:MODEL_GPU_INDEX if CUDA, else cpu)")
    hw.add_argument("--model_gpu_index", type=ct.non_negative_int, default=None,
                    help="the encoder's GPU (0; not under torchrun)")
    hw.add_argument("--index_backend", choices=INDEX_BACKENDS, default="auto", help="where the index lives")
    hw.add_argument("--index_on_model_device", dest="index_backend", action="store_const", const="tensor",
                    help="same as --index_backend tensor")
    hw.add_argument("--faiss_gpu_index", "--faiss_gpus", type=ct.non_negative_int, nargs="*", default=[],
                    help="faiss GPUs (several: sharded; none: CPU)")
    hw.add_argument("--faiss_omp_num_threads", type=ct.positive_int, default=None,
                    help="CPU faiss threads (default: one per core)")
    return p


def resolve_metric_cut(metric_cut: Optional[int], data_type: Optional[str]) -> int:
    """The ΔRR depth cut: an explicit ``metric_cut`` (must be ≥ 1), else 200 for passages; documents and an
    unknown task must pass it (the original's None trained on a zero loss)."""
    if metric_cut is not None:
        if isinstance(metric_cut, bool) or metric_cut < 1:
            raise InputError("--metric_cut must be >= 1 (0 or no cut makes every pair weight 0: no training)",
                             value=metric_cut)
        return int(metric_cut)
    if data_type == "passage":
        return PASSAGE_METRIC_CUT
    if data_type == "doc":
        raise InputError("pass --metric_cut for --data_type doc: the paper's document value is not documented "
                         "(JPQ uses 10)")
    raise InputError("pass --metric_cut (the README uses 200 for passages) or --data_type passage")


def parse_model_device(model_device: str) -> torch.device:
    """``--model_device`` as a torch device (cpu, cuda or cuda:N; else :class:`InputError`)."""
    try:
        device = torch.device(model_device)
    except RuntimeError:
        raise InputError("--model_device must be cpu, cuda or cuda:N", value=model_device) from None
    if device.type not in ("cpu", "cuda"):
        raise InputError("--model_device must be cpu, cuda or cuda:N", value=model_device)
    return device


def resolve_model_device(model_device: Optional[str], model_gpu_index: int, no_cuda: bool) -> torch.device:
    """``--model_device`` if given, else ``cuda:<model_gpu_index>`` when CUDA is usable, else the CPU."""
    if model_device is not None:
        device = parse_model_device(model_device)
        if device.type == "cpu":
            return device
        if no_cuda:
            raise InputError("--no_cuda contradicts --model_device", value=model_device)
        model_gpu_index = device.index or 0
    elif no_cuda or not torch.cuda.is_available():
        if not no_cuda:
            logger.info("CUDA is not available: the encoder trains on the CPU")
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not 0 <= model_gpu_index < count:
        raise InputError(f"CUDA device {model_gpu_index} requested but {count} visible", value=model_gpu_index)
    return torch.device("cuda", model_gpu_index)


def check_torchrun_args(args: argparse.Namespace, world_size: int) -> None:
    """In one of ``world_size`` > 1 processes started by torchrun, refuse (:class:`InputError`, before any file is
    read or written) the flags that cannot be right there: ``--faiss_gpu_index`` (one index on several GPUs, where
    each process holds its own shard on its own GPU or in CPU faiss), ``--model_gpu_index`` and ``--model_device
    cuda:N`` (each process trains on ``cuda:LOCAL_RANK``), ``--model_device cuda`` without CUDA."""
    if world_size <= 1:
        return
    where = f"under torchrun ({world_size} processes)"
    if args.faiss_gpu_index:
        raise InputError(f"--faiss_gpu_index cannot be used {where}: each process holds its own shard of the index, "
                         f"on its own GPU (cuda:LOCAL_RANK) or in CPU faiss; drop the flag",
                         value=args.faiss_gpu_index)
    if args.model_gpu_index is not None:
        raise InputError(f"--model_gpu_index cannot be used {where}: each process trains on cuda:LOCAL_RANK; drop "
                         f"the flag", value=args.model_gpu_index)
    if args.model_device is None:
        return
    device = parse_model_device(args.model_device)
    if device.type == "cuda" and device.index is not None:
        raise InputError(f"--model_device cuda:N cannot be used {where}: each process trains on cuda:LOCAL_RANK; "
                         f"pass --model_device cuda", value=args.model_device)
    if device.type == "cuda" and args.no_cuda:
        raise InputError("--no_cuda contradicts --model_device", value=args.model_device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--model_device cuda but CUDA is not available", value=args.model_device)


def dist_info_for(args: argparse.Namespace) -> DistInfo:
    """Where this process trains.  One process: rank 0 of 1 on :func:`resolve_model_device`.  Under torchrun: the
    process group is joined (:func:`infra.distributed.init_distributed`: ``cuda:LOCAL_RANK`` over nccl, or the CPU over
    gloo with ``--no_cuda`` / ``--model_device cpu`` / no CUDA)."""
    if env_int("WORLD_SIZE", 1) <= 1:
        device = resolve_model_device(args.model_device, args.model_gpu_index, args.no_cuda)
        return DistInfo(0, 1, 0, device)
    on_cpu = args.no_cuda or (args.model_device is not None and parse_model_device(args.model_device).type == "cpu")
    return init_distributed(no_cuda=on_cpu)


def validate_args(args: argparse.Namespace) -> None:
    """Check the arguments (each flag's range is checked while parsing) and the init folder against the
    preprocessing (:func:`infra.preprocess_meta.check_model_matches`), and fill in the resolved ``metric_cut``,
    ``max_seq_length`` and ``log_dir``; cap the query length, workers and faiss threads by the data and the machine
    (:func:`infra.training_loop.cap_training_args`); under torchrun refuse what cannot be right there
    (:func:`check_torchrun_args`).  Raises :class:`InputError`."""
    check_torchrun_args(args, env_int("WORLD_SIZE", 1))
    if args.model_gpu_index is None and env_int("WORLD_SIZE", 1) <= 1:
        args.model_gpu_index = 0
    args.metric_cut = resolve_metric_cut(args.metric_cut, args.data_type)
    check_model_matches(args.preprocess_dir, args.init_path, sides=("query",))
    args.max_seq_length = length_or_folder_default(args.max_seq_length, args.init_path, QUERY_LENGTH,
                                                   "--max_seq_length")
    cap_training_args(args, {"max_seq_length": TokenIdsCache(args.preprocess_dir, "train-query")})
    args.faiss_omp_num_threads = ct.at_most_cpus(args.faiss_omp_num_threads, "--faiss_omp_num_threads")
    if args.log_dir is None:
        args.log_dir = str(Path(args.model_save_dir) / "log")


# ----------------------------------------------------------------------------------------------------------
# The frozen index: the whole corpus in one process, one shard per process under torchrun
# ----------------------------------------------------------------------------------------------------------

class ShardedIndex:
    """This process's shard of the frozen embeddings under torchrun, searched together with the other processes'
    shards; the interface of :class:`retrieve_utils.TrainingIndex` that a training step uses.

    ``local`` is the :class:`retrieve_utils.TrainingIndex` over the rows ``[start, start + local.ntotal)`` of
    ``embeddings`` (the whole read-only memmap); the shards of ranks 0, 1, … are consecutive increasing row ranges
    (:func:`infra.exact_search.shard_rows`).  :meth:`search` is a collective (every rank calls it once per micro-batch,
    with the same k): :func:`distributed.sharded_topk`.  :meth:`gather` reads any row, of any shard, from the
    memmap (as the original did)."""

    def __init__(self, embeddings: np.ndarray, local: TrainingIndex, start: int):
        self.embeddings, self.local, self.start = embeddings, local, start
        self.ntotal, self.dim = embeddings.shape

    def search(self, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact top-k ``(scores, ids)`` over ALL rows of this rank's (detached) ``queries``, in the format of
        :mod:`exact_search` (ids are corpus rows)."""
        return distributed.sharded_topk(self.local.search, queries, k, self.start, self.ntotal)

    def gather(self, ids: np.ndarray, device: torch.device | str) -> torch.Tensor:
        """float32 embeddings ``[*ids.shape, dim]`` of the corpus rows ``ids`` (int64, all valid), on ``device``."""
        rows = self.embeddings[np.asarray(ids, dtype=np.int64)]
        return torch.from_numpy(np.asarray(rows, dtype=np.float32)).to(device)

    def describe(self) -> str:
        return f"rows {self.start}..{self.start + self.local.ntotal - 1} of {self.ntotal}: {self.local.describe()}"


def build_index(args: argparse.Namespace, docs: np.ndarray, device: torch.device,
                info: DistInfo) -> TrainingIndex | ShardedIndex:
    """One process: :func:`retrieve_utils.build_training_index` over all rows (``--index_backend``,
    ``--faiss_gpu_index``, the model's device).  Under torchrun: the same over this rank's rows only, without
    faiss GPUs (refused there), wrapped in a :class:`ShardedIndex`."""
    if not info.distributed:
        return build_training_index(docs, args.index_backend, args.faiss_gpu_index, device,
                                       args.faiss_omp_num_threads)
    if len(docs) < info.world_size:
        raise InputError(f"{len(docs)} document embeddings cannot be sharded over {info.world_size} processes",
                         path=args.pembed_path)
    start, end = shard_rows(len(docs), info.rank, info.world_size)
    local = build_training_index(docs[start:end], args.index_backend, [], device, args.faiss_omp_num_threads)
    index = ShardedIndex(docs, local, start)
    logger.info("the index is sharded over %d processes; rank %d holds %s", info.world_size, info.rank,
                index.describe())
    return index


# ----------------------------------------------------------------------------------------------------------
# One micro-batch: retrieve → labels → scores → loss
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Candidates:
    """Each query's list (a row): its retrieved documents in rank order, then any appended positives.

    ``ids`` int64 [B, n] document offsets and ``labels`` bool [B, n] (True = positive), left-aligned and padded
    (id 0, label False) beyond ``lengths`` [B]; ``n_retrieved`` [B] how many of the row were retrieved;
    ``mrr10`` / ``hit10`` float64 [B]: 1/rank of the first positive in the retrieved top 10 (else 0) and whether
    there is one (the original's train/mrr_10 and train/recall_10).
    """

    ids: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    n_retrieved: np.ndarray
    mrr10: np.ndarray
    hit10: np.ndarray


def label_candidates(retrieved: np.ndarray, positives: Sequence[Sequence[int]], append: str) -> Candidates:
    """Label each query's retrieved ids (``[B, K]`` int64 in rank order; ``-1`` entries, if any, are dropped) with
    its ``positives`` and append positives:

    * ``"none_retrieved"`` (original): if no retrieved id is a positive, append ALL of the query's positives as
      listed (a pair listed twice in the qrels appears twice, as the original); otherwise append none;
    * ``"always"`` (JPQ): append the positives not among the retrieved ids, each once, in listed order.
    """
    if append not in APPEND_MODES:
        raise ValueError(f"append must be one of {APPEND_MODES}, got {append!r}")
    if len(retrieved) != len(positives):
        raise ValueError(f"{len(retrieved)} rows of results for {len(positives)} queries")
    rows, labels = [], []
    mrr10, hit10 = np.zeros(len(retrieved)), np.zeros(len(retrieved))
    n_retrieved = np.zeros(len(retrieved), np.int64)
    for i, (row, pos) in enumerate(zip(np.asarray(retrieved, np.int64), positives)):
        row = row[row >= 0]
        is_pos = np.isin(row, np.asarray(pos, np.int64))
        first = np.flatnonzero(is_pos[:TOP_METRIC_DEPTH])
        if first.size:
            mrr10[i], hit10[i] = 1.0 / (first[0] + 1), 1.0
        if append == "always":
            seen = set(row.tolist())
            extra = [p for p in dict.fromkeys(int(p) for p in pos) if p not in seen]
        else:
            extra = [int(p) for p in pos] if not is_pos.any() else []
        n_retrieved[i] = len(row)
        rows.append(np.concatenate([row, np.asarray(extra, np.int64)]))
        labels.append(np.concatenate([is_pos, np.ones(len(extra), bool)]))
    lengths = np.array([len(r) for r in rows], np.int64)
    ids = np.zeros((len(rows), int(lengths.max(initial=0))), np.int64)
    flags = np.zeros(ids.shape, bool)
    for i, (row, label) in enumerate(zip(rows, labels)):
        ids[i, : len(row)], flags[i, : len(label)] = row, label
    return Candidates(ids, flags, lengths, n_retrieved, mrr10, hit10)


def retrieve_candidates(index: TrainingIndex | ShardedIndex, q: torch.Tensor, positives: Sequence[Sequence[int]],
                        k: int, append: str) -> Candidates:
    """Search the top ``k`` of the detached queries (one call for the batch) and label them
    (:func:`label_candidates`)."""
    _, ids = index.search(q.detach(), k)
    return label_candidates(ids, positives, append)


def candidate_scores(index: TrainingIndex | ShardedIndex, q: torch.Tensor, candidates: Candidates) -> torch.Tensor:
    """``f[i, r] = q_i · e(ids[i, r])`` in float32 ``[B, n]`` (padding included; masked by the loss); the frozen
    embeddings come from the index, the gradient flows to ``q`` only."""
    docs = index.gather(candidates.ids, q.device)                 # [B, n, dim], no grad
    with fp32_context(q.device):
        return torch.bmm(docs, q.float().unsqueeze(2)).squeeze(2)


@dataclass(frozen=True)
class LossSettings:
    k: int
    append: str
    metric_cut: int
    divisor: float  # per_gpu_batch_size × gradient_accumulation_steps (nominal, faithful)
    score_scale: float = 1.0  # γ inside the softplus (1: the paper's loss)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LossSettings":
        return cls(args.neg_topk, args.append_missing_positives, args.metric_cut,
                   float(args.per_gpu_batch_size * args.gradient_accumulation_steps), args.score_scale)


def micro_batch_loss(model: torch.nn.Module, index: TrainingIndex | ShardedIndex, inputs: dict[str, torch.Tensor],
                     positives: Sequence[Sequence[int]], settings: LossSettings,
                     device: torch.device) -> tuple[torch.Tensor, Candidates]:
    """Encode (train mode), retrieve, label, score and return the ADORE loss of one micro-batch."""
    q = model(inputs["input_ids"].to(device, non_blocking=True),
              inputs["attention_mask"].to(device, non_blocking=True))
    candidates = retrieve_candidates(index, q, positives, settings.k, settings.append)
    scores = candidate_scores(index, q, candidates)
    labels = torch.from_numpy(candidates.labels).to(device)
    lengths = torch.from_numpy(candidates.lengths).to(device)
    return adore_batch_loss(scores, labels, settings.metric_cut, settings.divisor, lengths,
                            settings.score_scale), candidates


# ----------------------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Window:
    """Sums over the steps since the last log line."""

    loss: float = 0.0
    mrr: float = 0.0
    hits: float = 0.0
    queries: int = 0

    def add_candidates(self, c: Candidates) -> None:
        self.mrr += float(c.mrr10.sum())
        self.hits += float(c.hit10.sum())
        self.queries += len(c.mrr10)

    def summed_over_ranks(self, device: torch.device) -> "Window":
        """Under torchrun: the window of the whole job (the ranks' sums added, the loss divided by the world size,
        as one process with the global batch logs it); in one process: itself."""
        world = get_world_size()
        if world == 1:
            return self
        sums = torch.tensor([self.loss, self.mrr, self.hits, self.queries], dtype=torch.float64, device=device)
        loss, mrr, hits, queries = all_reduce_sum(sums).tolist()
        return Window(loss / world, mrr, hits, int(queries))

    def scalars(self, lr: float, steps: int) -> dict[str, float]:
        """The original's tags over the window's ``steps`` steps: ``lr``, ``train/all_loss`` (mean step loss),
        ``train/mrr_10`` and ``train/recall_10`` (means over its queries)."""
        return {"lr": lr, "train/all_loss": self.loss / steps,
                "train/mrr_10": self.mrr / max(self.queries, 1), "train/recall_10": self.hits / max(self.queries, 1)}


@dataclass
class AdoreStep(StepDriver):
    """Everything a run holds (built by :func:`setup`), and ADORE's part of :func:`infra.training_loop.run_steps`: its
    optimizer step (clipping after every micro-batch's backward, then AdamW without clipping), its ``Window`` of
    logged scalars and the ``epoch-<k>`` model folders.

    ``model`` is the encoder; ``wrapped`` the module the forward runs through (``model`` itself in one process,
    its DDP wrapper under torchrun, which all-reduces the gradients at every backward: docs/deviations.md,
    "adore.train")."""

    args: argparse.Namespace
    info: DistInfo
    model: DenseEncoder
    wrapped: torch.nn.Module
    index: TrainingIndex | ShardedIndex
    data: EpochData
    run: TrainingRun
    parameters: list[torch.nn.Parameter] = field(init=False)
    settings: LossSettings = field(init=False)
    window: Window = field(init=False)

    def __post_init__(self) -> None:
        self.parameters = [q for q in self.model.parameters() if q.requires_grad]
        self.settings = LossSettings.from_args(self.args)
        self.window = Window()

    @property
    def device(self) -> torch.device:
        return self.info.device

    def step(self, micro_batches: Iterator[tuple[dict[str, torch.Tensor], list]], n_micro: int) -> dict[str, Any]:
        step_loss = 0.0
        for inputs, positives in micro_batches:
            loss, candidates = micro_batch_loss(self.wrapped, self.index, inputs, positives, self.settings,
                                                self.device)
            loss.backward()  # under DDP: gradients averaged over the ranks here, also mid-accumulation (no no_sync)
            if self.args.max_grad_norm > 0:  # faithful: after every backward, also mid-accumulation
                torch.nn.utils.clip_grad_norm_(self.parameters, self.args.max_grad_norm)
            step_loss += loss.item()
            self.window.add_candidates(candidates)
        run = self.run
        optimizer_step(self.parameters, run.optimizer, run.scheduler, run.scaler, max_grad_norm=0.0)  # clipped above
        self.window.loss += step_loss
        return {"loss": f"{step_loss:.4f}"}

    def scalars(self, steps: int) -> dict[str, float]:
        out = self.window.summed_over_ranks(self.device).scalars(self.run.scheduler.get_last_lr()[0], steps)
        self.window = Window()
        return out

    def epoch_done(self, epoch: int) -> None:
        """Write the ``epoch-<epoch>`` model folder (before the checkpoint that says the epoch is done; rank 0).

        Both appear under their final names only when complete (written under ``*.tmp-<pid>``, then renamed).  The
        epoch folder goes first: a run killed between the two resumes from the previous checkpoint, trains the same
        step again and replaces the folder with the same weights; the other order would leave a resumed run with
        no ``epoch-<k>`` at all (the checkpoint already says the epoch is done)."""
        if not self.info.is_main:
            return
        with atomic_directory(Path(self.args.model_save_dir) / f"{EPOCH_PREFIX}{epoch}") as tmp:
            self.model.save_pretrained(tmp)
            atomic_write_json(tmp / "training_args.json", vars(self.args))


def load_queries(preprocess_dir: Path, max_seq_length: int, n_docs: int) -> TrainQueryDataset:
    """The training queries (``train-query`` memmaps + ``train-qrel.tsv``); every positive must be a row of the
    document embeddings."""
    qrel_path = require_file(preprocess_dir / "train-qrel.tsv", "training qrels")
    rel = load_rel(qrel_path)
    dataset = TrainQueryDataset(rel, TokenIdsCache(preprocess_dir, "train-query"), max_seq_length)
    largest = max(max(p) for p in rel.values())
    if largest >= n_docs:
        raise InputError(f"a positive offset is beyond the {n_docs} document embeddings (other corpus?)",
                         path=qrel_path, value=largest)
    return dataset


def _remove_old_epochs(save_dir: Path) -> None:
    for old in save_dir.glob(f"{EPOCH_PREFIX}*"):
        if old.is_dir() and old.name[len(EPOCH_PREFIX):].isdigit():
            logger.info("removing the previous run's %s", old)
            shutil.rmtree(old)


def setup(args: argparse.Namespace, info: DistInfo) -> AdoreStep:
    """Model, frozen index (this rank's shard under torchrun), data, optimizer and schedule (restored from the latest
    checkpoint with --resume), on ``info.device`` (:func:`dist_info_for`).

    The inputs (init model, document embeddings against the corpus of --preprocess_dir, queries) are checked
    before the output folder is touched; a damaged checkpoint is refused before anything is written."""
    set_seed(args.seed)
    device = info.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = load_init_model(args.init_path, allow_pickle=args.allow_pickle).to(device)
    docs = open_embeddings(args.pembed_path, dim=model.output_dim, check_finite=args.check_finite,
                              n_rows=corpus_rows(args.preprocess_dir))
    dataset = load_queries(Path(args.preprocess_dir), args.max_seq_length, len(docs))
    save_dir = Path(args.model_save_dir)
    prepare_output_dir(save_dir, overwrite=args.overwrite_output_dir, resume=args.resume)
    if args.overwrite_output_dir and not args.resume and info.is_main:
        _remove_old_epochs(save_dir)
    checkpoint = checkpoint_to_resume(save_dir, args.resume)
    index = build_index(args, docs, device, info)
    collator = QueryCollator(args.max_seq_length, pad_token_id=model.pad_token_id)
    sampler = GlobalBatchSampler(len(dataset), args.per_gpu_batch_size, args.seed, info.world_size, info.rank)
    if info.is_main:
        _warn_dropped_queries(len(dataset), args.per_gpu_batch_size, info.world_size)
    plan = TrainingPlan.create(sampler.batches_per_epoch, args.gradient_accumulation_steps,
                                  args.num_train_epochs, args.max_steps)
    optimizer = build_optimizer("adamw", param_groups(model, args.weight_decay), args.learning_rate,
                                   eps=args.adam_epsilon)
    scheduler = linear_schedule(optimizer, args.warmup_steps, plan.total_steps)
    run = TrainingRun(save_dir, model, optimizer, scheduler, make_grad_scaler(device, fp16=False), plan,
                         resume_settings(args, RESUME_KEYS, world_size=info.world_size), args.save_steps,
                         args.save_total_limit)
    if checkpoint is not None:
        run.resume(checkpoint, collator)  # before DDP wraps the model
    wrapped: torch.nn.Module = model
    if info.distributed:
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    data = EpochData(dataset, sampler, collator, args.seed, args.dataloader_num_workers,
                        pin_memory=device.type == "cuda")
    return AdoreStep(args, info, model, wrapped, index, data, run)


def _warn_dropped_queries(n_queries: int, per_process: int, world_size: int) -> None:
    rest = n_queries % (per_process * world_size)
    if 0 < rest < world_size:
        logger.warning("the last global batch of every epoch (%d queries, fewer than the %d processes) is left out "
                       "(infra.batch_plan.GlobalBatchSampler): one process with --per_gpu_batch_size %d would train on "
                       "it", rest, world_size, per_process * world_size)


def train(args: argparse.Namespace) -> Path:
    """Run ADORE training as configured by the validated ``args`` (under torchrun: this process's part of it);
    returns ``model_save_dir``."""
    info = dist_info_for(args)
    try:
        t = setup(args, info)
        plan = t.run.plan
        logger.info("ADORE: %d training queries, batch %d x %d process(es) x %d accumulation, %d steps/epoch, %d "
                    "steps (%d epochs), encoder on %s, metric_cut %d, K %d", len(t.data.dataset),
                    args.per_gpu_batch_size, info.world_size, args.gradient_accumulation_steps, plan.steps_per_epoch,
                    plan.total_steps, plan.num_epochs, t.device, args.metric_cut, args.neg_topk)
        run_steps(t.run, t.data, t, log_dir=args.log_dir, logging_steps=args.logging_steps,
                     main_process=info.is_main)
    finally:
        cleanup_distributed()
    return Path(args.model_save_dir)


def main(argv: Optional[list[str]] = None) -> Path:
    args = build_parser().parse_args(argv)
    configure_logging(main_process=os.environ.get("RANK", "0") in ("", "0"))
    with output_lock(args.model_save_dir):
        validate_args(args)
        return train(args)


if __name__ == "__main__":
    run_cli(main, torchrun=True)
