"""Train a dense retriever with STAR (static hard negatives + in-batch negatives) or the Inbatch-Neg / Rand-Neg
baselines (Zhan et al. 2021; the original star/train.py and model.py).

    python -m star.train --init_path data/passage/warmup --preprocess_dir data/passage/preprocess \\
        --hardneg_path data/passage/warmup_retrieve/hard.npy --output_dir data/passage/star_train/models --fp16
    torchrun --nproc_per_node 4 -m star.train ... --per_device_train_batch_size 64     # same global batch 256

The loss of ``--negative_mode`` (pairwise logistic over masked score matrices, ``model.py``): ``star`` pools the
in-batch and the static hard negatives in one mean without alpha, as the original; ``inbatch`` and ``rand`` are
the baselines.  The formulas, the torchrun layout and every deviation from the original: docs/deviations.md,
section "star.train".
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from infra import cli_types as ct
from infra.batch_plan import GlobalBatchSampler, TrainingPlan
from infra.checkpoints import checkpoint_to_resume, prepare_output_dir, set_seed
from infra.distributed import (DistInfo, all_gather_object, all_gather_with_grad, all_reduce_sum, barrier,
                               cleanup_distributed, get_world_size, init_distributed)
from infra.optim import (OPTIMIZERS, autocast_context, build_optimizer, fp32_context, linear_schedule, make_grad_scaler,
                         optimizer_step, param_groups)
from infra.training_loop import (EpochData, StepDriver, TrainerFlags, TrainingRun, add_training_args,
                                 cap_training_args, resume_settings, run_steps)
from infra.preprocess_meta import check_model_matches
from model import load_init_model
from dataset import (HardNegatives, TokenIdsCache, TrainCollator, TrainInbatchDataset, TrainInbatchWithHardDataset,
                     TrainInbatchWithRandDataset, load_rel, not_relevant_mask)
from infra.io import InputError, atomic_write_json, configure_logging, require_file, run_cli
from infra.run_lock import output_lock
from model import inbatch_loss, randneg_loss, star_loss
from model import DenseEncoder

logger = logging.getLogger("star.train")

MODES = ("star", "inbatch", "rand")
READ_AHEAD_STEPS = 2  # optimizer steps of batches collated ahead in a thread (without DataLoader workers)
# settings that decide the data order / batch composition (with the world size): a resume with other values is
# not exact
RESUME_KEYS = ("negative_mode", "seed", "per_device_train_batch_size", "gradient_accumulation_steps", "hard_num",
               "rand_num", "max_query_length", "max_doc_length", "score_scale")
STAR_FLAGS = TrainerFlags(
    learning_rate=1e-4, num_train_epochs=100.0, warmup_steps=1000, logging_steps=50,
    init_help="warm-up model folder (e.g. ANCE's)",
    preprocess_help="preprocess.py output folder",
    clip_help="clip (fp16: unscaled); <= 0: off", run_folder="output_dir", run_folders="checkpoint-*")

DETAILS = 'docs/deviations.md, section "star.train"'


# ----------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m star.train", description=__doc__.split("\n\n")[0],
                                epilog=f"Details, formulas and the deviations from the original: {DETAILS}.",
                                formatter_class=ct.CompactHelpFormatter)
    add_training_args(p, STAR_FLAGS)
    data = p.add_argument_group("data and model")
    data.add_argument("--negative_mode", choices=MODES, default="star",
                      help="star, or the baselines Inbatch-/Rand-Neg")
    data.add_argument("--hardneg_path", help="hard.npy or hard.json of the train queries "
                                             "(star.prepare_hardneg); required for star")
    data.add_argument("--hard_num", type=ct.positive_int, default=1,
                      help="hard negatives per query per epoch")
    data.add_argument("--rand_num", type=ct.positive_int, default=1,
                      help="random docs per query (rand mode)")
    data.add_argument("--max_query_length", type=ct.positive_int, default=24, help="query truncation")
    data.add_argument("--max_doc_length", type=ct.positive_int, default=120,
                      help="doc truncation, end token kept")
    data.add_argument("--padding", action="store_true", help="pad every batch to the maximum lengths")
    data.add_argument("--gradient_checkpointing", action="store_true", help="activation checkpointing")

    out = p.add_argument_group("output")
    out.add_argument("--output_dir", default="./data/passage/star_train/models",
                     help="checkpoint-<step>/ folders, final model")
    out.add_argument("--logging_dir", help="TensorBoard (default: OUTPUT_DIR/log)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--per_device_train_batch_size", type=ct.positive_int, default=256,
                     help="queries per process and micro-batch")
    opt.add_argument("--optimizer_str", choices=OPTIMIZERS, default="lamb", help="optimizer")
    opt.add_argument("--adam_beta1", type=ct.beta, default=0.9, help="Lamb/AdamW beta1, in [0, 1)")
    opt.add_argument("--adam_beta2", type=ct.beta, default=0.999, help="Lamb/AdamW beta2, in [0, 1)")
    opt.add_argument("--stop_after_steps", type=ct.positive_int, default=None,
                     help="stop after N steps, keeping the schedule (as the authors did, around 50k)")

    hw = p.add_argument_group("hardware")
    prec = hw.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="float16 autocast + GradScaler (losses in fp32)")
    prec.add_argument("--bf16", action="store_true", help="bfloat16 autocast (losses in fp32)")
    hw.add_argument("--do_train", action="store_true", help="accepted; always trains")
    hw.add_argument("--local_rank", "--local-rank", type=ct.int_range(-1), default=-1,
                    help="ignored (torchrun sets the rank)")
    return p


def validate_args(args: argparse.Namespace) -> None:
    """Raise :class:`InputError` for inconsistent arguments (each flag's range is checked while parsing) and for an
    init folder whose prompts differ from the preprocessing's (:func:`infra.preprocess_meta.check_model_matches`,
    which also warns on another vocabulary); the lengths keep STAR's training defaults whatever the folder; cap the
    lengths and workers by the data and the machine (:func:`infra.training_loop.cap_training_args`); fill in the default
    ``logging_dir``."""
    if args.negative_mode == "star" and not args.hardneg_path:
        raise InputError("--negative_mode star needs --hardneg_path (hard.npy or hard.json of the train queries)")
    if args.negative_mode != "star" and args.hardneg_path:
        logger.warning("--hardneg_path is ignored with --negative_mode %s", args.negative_mode)
    check_model_matches(args.preprocess_dir, args.init_path)
    cap_training_args(args, {"max_query_length": TokenIdsCache(args.preprocess_dir, "train-query"),
                                 "max_doc_length": TokenIdsCache(args.preprocess_dir, "passages")})
    if args.logging_dir is None:
        args.logging_dir = str(Path(args.output_dir) / "log")


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------

@dataclass
class TrainData:
    dataset: TrainInbatchDataset
    collator: TrainCollator
    rel_dict: dict[int, list[int]]


def load_training_data(args: argparse.Namespace, pad_token_id: int) -> TrainData:
    """``train-qrel.tsv``, ``train-query`` and ``passages`` of ``--preprocess_dir`` → the mode's dataset and
    collator."""
    folder = Path(args.preprocess_dir)
    rel_dict = load_rel(require_file(folder / "train-qrel.tsv", "training qrels"))
    queries, docs = TokenIdsCache(folder, "train-query"), TokenIdsCache(folder, "passages")
    common = (rel_dict, queries, docs, args.max_query_length, args.max_doc_length, args.seed)
    if args.negative_mode == "star":
        dataset = TrainInbatchWithHardDataset(*common, hardneg=HardNegatives.load(args.hardneg_path),
                                              hard_num=args.hard_num)
    elif args.negative_mode == "rand":
        dataset = TrainInbatchWithRandDataset(*common, rand_num=args.rand_num)
    else:
        dataset = TrainInbatchDataset(*common)
    collator = TrainCollator(args.max_query_length, args.max_doc_length, rel_dict, pad_token_id=pad_token_id,
                             padding=args.padding)
    return TrainData(dataset, collator, rel_dict)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors moved to ``device`` (id lists kept as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------
# Model step
# ----------------------------------------------------------------------------------------------------------

class BatchEncoder(torch.nn.Module):
    """Encodes a training batch's queries, positives and extra docs in one module call (one DDP forward)."""

    def __init__(self, encoder: DenseEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        q = self.encoder(batch["query_input_ids"], batch["query_attention_mask"])
        d = self.encoder(batch["doc_input_ids"], batch["doc_attention_mask"])
        others = None
        if "other_doc_input_ids" in batch:
            others = self.encoder(batch["other_doc_input_ids"], batch["other_doc_attention_mask"])
        return q, d, others


def batch_loss(mode: str, q: torch.Tensor, d: torch.Tensor, others: Optional[torch.Tensor],
               batch: dict[str, Any], rel_dict: dict[int, list[int]], score_scale: float = 1.0) -> torch.Tensor:
    """This process's loss for one (micro-)batch of embeddings, in float32.

    One process: the pairwise loss of the mode (``star_loss`` / ``inbatch_loss`` / ``randneg_loss`` with the
    collator's masks; ``score_scale`` is their γ).  Under DDP: the candidates (positives for inbatch; random docs for rand; positives and
    hard docs for star) of ALL ranks are gathered with :func:`infra.distributed.all_gather_with_grad`, the masks are
    rebuilt against them from the gathered ids, and the same pooled formula over local queries × global
    candidates (``randneg_loss`` = Σ mask·sp(q_i·c_k − q_i·d_i) / Σ mask) is rescaled to
    ``local pair sum / global pair count × world_size``, so DDP's gradient average equals the single-process
    gradient and ``Σ_ranks loss / world_size`` equals the single-process loss.
    """
    if get_world_size() == 1:
        if mode == "star":
            return star_loss(q, d, others, batch["rel_pair_mask"], batch["other_pair_mask"], score_scale)
        if mode == "rand":
            return randneg_loss(q, d, others, batch["other_pair_mask"], score_scale)
        return inbatch_loss(q, d, batch["rel_pair_mask"], score_scale)
    ids = all_gather_object((batch["pos_ids"], batch.get("other_ids", [])))
    parts, cand_ids = [], []
    if mode in ("star", "inbatch"):
        parts.append(all_gather_with_grad(d, [len(pos) for pos, _ in ids]))
        cand_ids += [p for pos, _ in ids for p in pos]
    if mode in ("star", "rand"):
        parts.append(all_gather_with_grad(others, [len(other) for _, other in ids]))
        cand_ids += [o for _, other in ids for o in other]
    mask = not_relevant_mask(batch["qids"], cand_ids, rel_dict).to(q.device)
    local_mean = randneg_loss(q, d, torch.cat(parts), mask, score_scale)
    local_count = mask.sum()
    global_count = all_reduce_sum(local_count)
    return local_mean * local_count / global_count.clamp(min=1.0) * get_world_size()


def forward_loss(model: torch.nn.Module, batch: dict[str, Any], mode: str, rel_dict: dict[int, list[int]],
                 device: torch.device, fp16: bool = False, bf16: bool = False,
                 score_scale: float = 1.0) -> torch.Tensor:
    """Encode a collated batch (under autocast if asked) and return :func:`batch_loss` (computed in fp32).
    ``model`` is a :class:`BatchEncoder`, possibly wrapped in DDP."""
    batch = to_device(batch, device)
    with autocast_context(device, fp16, bf16):
        q, d, others = model(batch)
    with fp32_context(device):
        return batch_loss(mode, q.float(), d.float(), None if others is None else others.float(), batch, rel_dict,
                          score_scale)


def accumulate_gradients(model: torch.nn.Module, batches: Iterable[dict[str, Any]], n_micro: int, mode: str,
                         rel_dict: dict[int, list[int]], device: torch.device, scaler: torch.amp.GradScaler,
                         fp16: bool = False, bf16: bool = False, score_scale: float = 1.0) -> torch.Tensor:
    """Forward + backward over the ``n_micro`` micro-batches of one optimizer step (each loss divided by
    ``n_micro``; DDP gradient sync only on the last).  Returns this rank's summed loss (detached)."""
    total = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        no_sync = isinstance(model, DistributedDataParallel) and i < n_micro - 1
        with model.no_sync() if no_sync else contextlib.nullcontext():
            loss = forward_loss(model, batch, mode, rel_dict, device, fp16, bf16, score_scale) / n_micro
            scaler.scale(loss).backward()
        total += loss.detach()
    return total


# ----------------------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------------------

class StarStep(StepDriver):
    """STAR's optimizer step: the micro-batches' gradients accumulated (:func:`accumulate_gradients`), then
    clipping and the optimizer step (:func:`infra.optim.optimizer_step`).  Logged: ``loss`` (averaged over the
    logged steps and the ranks), ``learning_rate`` and the fractional ``epoch``."""

    def __init__(self, args: argparse.Namespace, run: TrainingRun, wrapped: torch.nn.Module,
                 rel_dict: dict[int, list[int]], info: DistInfo):
        self.args, self.run, self.wrapped, self.rel_dict, self.info = args, run, wrapped, rel_dict, info
        self.parameters = [p for p in run.model.parameters() if p.requires_grad]
        self.window_loss = torch.zeros((), device=info.device)

    def step(self, micro_batches: Iterator[dict[str, Any]], n_micro: int) -> dict[str, Any]:
        a, run = self.args, self.run
        self.window_loss += accumulate_gradients(self.wrapped, micro_batches, n_micro, a.negative_mode,
                                                 self.rel_dict, self.info.device, run.scaler, a.fp16, a.bf16,
                                                 a.score_scale)
        optimizer_step(self.parameters, run.optimizer, run.scheduler, run.scaler, a.max_grad_norm)
        return {}

    def scalars(self, steps: int) -> dict[str, float]:
        loss = (all_reduce_sum(self.window_loss) / self.info.world_size / steps).item()
        self.window_loss = torch.zeros((), device=self.info.device)
        p, plan = self.run.progress, self.run.plan
        return {"loss": loss, "learning_rate": self.run.scheduler.get_last_lr()[0],
                "epoch": p.epoch + p.step_in_epoch / plan.steps_per_epoch}


def train(args: argparse.Namespace) -> Path:
    """Run training as configured by the parsed ``args``; returns the output folder holding the final model."""
    info = init_distributed(no_cuda=args.no_cuda)
    try:
        return _train(args, info)
    finally:
        cleanup_distributed()


def _train(args: argparse.Namespace, info: DistInfo) -> Path:
    output_dir = Path(args.output_dir)
    set_seed(args.seed)

    model = load_init_model(args.init_path)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.to(info.device)
    data = load_training_data(args, model.pad_token_id)
    sampler = GlobalBatchSampler(len(data.dataset), args.per_device_train_batch_size, args.seed,
                                    info.world_size, info.rank)
    plan = TrainingPlan.create(sampler.batches_per_epoch, args.gradient_accumulation_steps,
                                  args.num_train_epochs, args.max_steps)
    optimizer = build_optimizer(args.optimizer_str, param_groups(model, args.weight_decay),
                                   args.learning_rate, (args.adam_beta1, args.adam_beta2), args.adam_epsilon)
    scheduler = linear_schedule(optimizer, args.warmup_steps, plan.total_steps)
    run = TrainingRun(output_dir, model, optimizer, scheduler, make_grad_scaler(info.device, args.fp16), plan,
                         resume_settings(args, RESUME_KEYS, world_size=info.world_size), args.save_steps,
                         args.save_total_limit)
    # the inputs are read and checked before --overwrite_output_dir deletes the previous run's checkpoints
    prepare_output_dir(output_dir, overwrite=args.overwrite_output_dir, resume=args.resume)
    checkpoint = checkpoint_to_resume(output_dir, args.resume)
    if checkpoint is not None:
        run.resume(checkpoint, data.collator)
    wrapped: torch.nn.Module = BatchEncoder(model)
    if info.distributed:
        wrapped = DistributedDataParallel(wrapped, device_ids=[info.device.index] if info.device.type == "cuda"
                                          else None)
    if info.is_main:
        logger.info("%s training: %d queries, global batch %d x %d accumulation, %d steps/epoch, %d steps "
                    "(%d epochs), %d process(es) on %s", args.negative_mode, len(data.dataset),
                    args.per_device_train_batch_size * info.world_size, args.gradient_accumulation_steps,
                    plan.steps_per_epoch, plan.total_steps, plan.num_epochs, info.world_size, info.device.type)
    epochs = EpochData(data.dataset, sampler, data.collator, args.seed, args.dataloader_num_workers,
                          pin_memory=info.device.type == "cuda",
                          read_ahead=READ_AHEAD_STEPS * args.gradient_accumulation_steps)
    run_steps(run, epochs, StarStep(args, run, wrapped, data.rel_dict, info), log_dir=args.logging_dir,
                 logging_steps=args.logging_steps, end_step=last_step(args, plan), main_process=info.is_main)
    if info.is_main:
        model.save_pretrained(output_dir)
        atomic_write_json(output_dir / "training_args.json", vars(args))
    barrier()
    return output_dir


def last_step(args: argparse.Namespace, plan: TrainingPlan) -> int:
    """The step training stops at: the schedule's end, or ``--stop_after_steps`` if that comes first."""
    return plan.total_steps if args.stop_after_steps is None else min(plan.total_steps, args.stop_after_steps)


def main(argv: Optional[list[str]] = None) -> Path:
    args = build_parser().parse_args(argv)
    configure_logging(main_process=os.environ.get("RANK", "0") in ("", "0"))
    with output_lock(args.output_dir):
        validate_args(args)
        return train(args)


if __name__ == "__main__":
    run_cli(main, torchrun=True)
