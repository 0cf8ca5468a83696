"""The training loop ``star/train.py`` and ``adore/train.py`` share: their common flags, resuming a run, and the
epoch / optimizer step / micro-batch skeleton with its logging and checkpoint schedule.

A trainer builds a :class:`TrainingRun` (model, optimizer, schedule, plan, progress: what its checkpoints hold),
an :class:`EpochData` (what each epoch reads) and a :class:`StepDriver` (its own optimizer step and the scalars it
logs), then calls :func:`run_steps`.  The pieces below the loop have their own modules: ``infra.optim``
(Lamb, schedule, mixed precision), ``infra.batch_plan`` (plan, progress, resumable sampler), ``infra.checkpoint_paths``
and ``infra.checkpoints`` (``checkpoint-<step>/`` folders, RNG states), ``infra.distributed`` (DDP and collectives).
"""
from __future__ import annotations

import abc
import argparse
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from infra import cli_types as ct
from infra.batch_plan import BackgroundIterator, GlobalBatchSampler, Progress, TrainingPlan, epoch_seed
from infra.checkpoint_paths import TRAINER_STATE_NAME
from infra.checkpoints import damaged_checkpoint, load_checkpoint, save_checkpoint
from infra.io import PathLike

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainerFlags:
    """Where the flags both trainers share differ: a trainer's defaults and its wording of a few helps."""

    learning_rate: float
    num_train_epochs: float
    warmup_steps: int
    logging_steps: int
    init_help: str
    preprocess_help: str
    clip_help: str
    run_folder: str   # the flag naming the folder a run writes to, e.g. "output_dir"
    run_folders: str  # what --overwrite_output_dir removes there, e.g. "checkpoint-*"


def add_training_args(parser: argparse.ArgumentParser, flags: TrainerFlags) -> argparse._ArgumentGroup:
    """Add the flags both trainers share, as one "training" group, with ``flags``' defaults and helps."""
    g = parser.add_argument_group("training", "the options STAR and ADORE training share")
    g.add_argument("--init_path", required=True, help=flags.init_help)
    g.add_argument("--preprocess_dir", required=True, help=flags.preprocess_help)
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help=f"train into a non-empty {flags.run_folder.upper()}, removing its {flags.run_folders}")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint-<step>")
    g.add_argument("--logging_steps", type=ct.positive_int, default=flags.logging_steps,
                   help="log interval in steps")
    g.add_argument("--save_steps", type=ct.non_negative_int, default=None,
                   help="also checkpoint every N steps (0: epoch ends)")
    g.add_argument("--save_total_limit", type=ct.non_negative_int, default=None,
                   help="keep the newest N checkpoint-* (0: all)")
    g.add_argument("--gradient_accumulation_steps", type=ct.positive_int, default=1, help="micro-batches per step")
    g.add_argument("--learning_rate", type=ct.non_negative_float, default=flags.learning_rate,
                   help="peak learning rate")
    g.add_argument("--weight_decay", type=ct.non_negative_float, default=0.01,
                   help="weight decay")
    g.add_argument("--adam_epsilon", type=ct.non_negative_float, default=1e-8, help="Lamb/AdamW epsilon")
    g.add_argument("--max_grad_norm", type=ct.finite_float, default=1.0, help=flags.clip_help)
    g.add_argument("--score_scale", type=ct.positive_float, default=1.0,
                   help="multiplies every score gap inside the loss's softplus (an inverse temperature); 1 is the "
                        "paper's loss; about 20 suits L2-normalised encoders such as sentence-transformers models, "
                        "whose cosine scores lie in [-1, 1] (docs/own-collection.md)")
    g.add_argument("--num_train_epochs", type=ct.non_negative_float, default=flags.num_train_epochs,
                   help="schedule length in epochs")
    g.add_argument("--max_steps", type=ct.int_range(-1), default=-1,
                   help="> 0: schedule length in steps")
    g.add_argument("--warmup_steps", type=ct.non_negative_int, default=flags.warmup_steps,
                   help="linear warm-up steps")
    g.add_argument("--seed", type=ct.seed, default=42, help="seed of the RNGs and the data order")
    g.add_argument("--no_cuda", action="store_true", help="train on the CPU even with CUDA")
    g.add_argument("--dataloader_num_workers", type=ct.non_negative_int, default=0,
                   help="DataLoader workers (at most the CPUs)")
    return g


def cap_training_args(args: argparse.Namespace, token_files: Mapping[str, Any]) -> None:
    """Size what the shared flags' ranges leave unbounded by the machine and the data: ``--dataloader_num_workers``
    is capped at the CPUs (:func:`infra.cli_types.at_most_cpus`), and each token-length flag of ``token_files``
    (its dest → the ``dataset.TokenIdsCache`` it reads, e.g. ``{"max_doc_length": TokenIdsCache(dir, "passages")}``) at the
    width that file stores: no sequence is longer, so a larger value would only widen the batches padded to full
    length (an absurd one would exhaust memory)."""
    args.dataloader_num_workers = ct.at_most_cpus(args.dataloader_num_workers, "--dataloader_num_workers")
    for dest, cache in token_files.items():
        width = cache.max_length
        if getattr(args, dest) > width:
            logger.info("--%s %d: the %s rows hold at most %d tokens, so batches are padded to %d at most", dest,
                        getattr(args, dest), cache.prefix, width, width)
            setattr(args, dest, width)


# ----------------------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------------------

class TrainLogger:
    """TensorBoard + tqdm + console logging for the main process (a silent no-op on other ranks).

    ``step(n, **postfix)`` advances the bar (steps/s and ETA shown by tqdm), ``log(scalars, step)`` writes every
    scalar to TensorBoard under its name (the original's tags: ``loss``, ``learning_rate``, ``epoch``) and one
    console line.  ``log_dir=None`` disables TensorBoard; ``purge_step`` (on resume: the checkpoint's step) hides
    events a previous, interrupted run logged at or after that step.
    """

    def __init__(self, log_dir: Optional[PathLike], total_steps: int, initial_step: int = 0,
                 enabled: bool = True, desc: str = "train", purge_step: Optional[int] = None):
        from tqdm.auto import tqdm

        self.enabled = enabled
        self.writer = None
        if enabled and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, unit="step", dynamic_ncols=True,
                        disable=None if enabled else True)

    def step(self, n: int = 1, **postfix: Any) -> None:
        self.bar.update(n)
        if postfix and not self.bar.disable:
            self.bar.set_postfix(postfix, refresh=False)

    def log(self, scalars: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
        logger.info("step %d: %s", step, ", ".join(f"{k}={v:.6g}" for k, v in scalars.items()))

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------------------------------------
# A run: its checkpointed state, resume, and the data each epoch reads
# ----------------------------------------------------------------------------------------------------------

def resume_settings(args: argparse.Namespace, keys: Iterable[str], **extra: Any) -> dict[str, Any]:
    """The values of the flags ``keys`` (and ``extra``) that decide the data order and the loss: stored in every
    checkpoint, so that resuming with other values can be warned about."""
    return {**{k: getattr(args, k) for k in keys}, **extra}


def _warn_changed_settings(saved: dict[str, Any], now: dict[str, Any]) -> None:
    changed = [f"{k}: {saved[k]} -> {value}" for k, value in now.items() if k in saved and saved[k] != value]
    if changed:
        logger.warning("resuming with changed settings (the run will not match an uninterrupted one): %s",
                       "; ".join(changed))


@dataclass
class TrainingRun:
    """What a run's checkpoints hold and when they are written.

    ``model`` is the unwrapped model (not its DDP wrapper); ``settings`` come from :func:`resume_settings`.  A
    checkpoint is written at every epoch end, every ``save_steps`` steps (if > 0) and when training stops;
    ``save_total_limit`` keeps only the newest ones.  Its ``extra`` state is ``{"epoch", "step_in_epoch",
    "settings"}`` (:func:`infra.checkpoints.save_checkpoint`).
    """

    output_dir: Path
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    plan: TrainingPlan
    settings: dict[str, Any]
    save_steps: Optional[int] = None
    save_total_limit: Optional[int] = None
    progress: Progress = field(default_factory=Progress)
    resumed_from: Optional[Path] = None

    def resume(self, checkpoint: Path, collator: Any) -> None:
        """Restore ``checkpoint`` (weights, optimizer, schedule, scaler, RNG states, progress), warn about changed
        settings, and tell ``collator`` how many batches it already collated (only its first ones are padded to
        the maximum lengths).  Call before wrapping the model in DDP and before writing anything: a damaged or
        foreign checkpoint raises :class:`InputError` naming its folder (:func:`infra.checkpoints.load_checkpoint`)."""
        extra = load_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler, self.scaler)
        if not all(isinstance(extra.get(key), int) for key in ("epoch", "step_in_epoch")):
            raise damaged_checkpoint(checkpoint, f"{TRAINER_STATE_NAME} lacks the epoch and step_in_epoch of a run")
        _warn_changed_settings(extra.get("settings", {}), self.settings)
        self.progress = Progress(extra["epoch"], extra["step_in_epoch"], extra["global_step"])
        self.resumed_from = checkpoint
        collator.mark_batches_seen(self.plan.micro_batches_before(self.progress))
        logger.info("resuming from %s (epoch %d, step %d in epoch, global step %d)", checkpoint,
                    self.progress.epoch, self.progress.step_in_epoch, self.progress.global_step)

    def save_due(self, epoch_done: bool) -> bool:
        """Whether the step just done is checkpointed: at every epoch end (as the original) and every
        ``save_steps``."""
        every = self.save_steps or 0
        return epoch_done or (every > 0 and self.progress.global_step % every == 0)

    def save(self) -> Path:
        """Write ``checkpoint-<global step>/`` (on every rank; rank 0 writes)."""
        p = self.progress
        return save_checkpoint(self.output_dir, p.global_step, self.model, self.optimizer, self.scheduler, self.scaler,
                               {"epoch": p.epoch, "step_in_epoch": p.step_in_epoch, "settings": self.settings},
                               self.save_total_limit)


@dataclass
class EpochData:
    """What the loop reads: a dataset, its :class:`GlobalBatchSampler` and collator, and the DataLoader settings.
    A dataset whose items depend on the epoch (STAR's sampled negatives) has a ``set_epoch(epoch)`` method.
    ``read_ahead`` > 0 without DataLoader workers: up to that many batches are collated ahead in a background
    thread (:class:`infra.batch_plan.BackgroundIterator`: the same batches in the same order) while the step runs; with
    workers the DataLoader already reads ahead."""

    dataset: Dataset
    sampler: GlobalBatchSampler
    collator: Any
    seed: int
    num_workers: int = 0
    pin_memory: bool = False
    read_ahead: int = 0

    def batches(self, plan: TrainingPlan, progress: Progress) -> Iterator[Any]:
        """The current epoch's micro-batches from ``progress`` on (the ones read before are skipped unread)."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(progress.epoch)
        self.sampler.set_epoch(progress.epoch, start_batch=plan.first_micro_batch(progress.step_in_epoch))
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, progress.epoch))  # not the global RNG
        batches = iter(DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=self.collator,
                                  num_workers=self.num_workers, pin_memory=self.pin_memory, generator=generator))
        if self.read_ahead and not self.num_workers:
            return BackgroundIterator(batches, depth=self.read_ahead)
        return batches


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------

class StepDriver(abc.ABC):
    """A trainer's part of :func:`run_steps`: its optimizer step and the scalars it logs."""

    @abc.abstractmethod
    def step(self, micro_batches: Iterator[Any], n_micro: int) -> dict[str, Any]:
        """Forward and backward over the ``n_micro`` micro-batches of one optimizer step, then the optimizer step;
        returns the progress bar's postfix."""

    @abc.abstractmethod
    def scalars(self, steps: int) -> dict[str, float]:
        """The TensorBoard scalars of the ``steps`` steps since the last log line, and start the next window.
        Called on every rank (a driver may all-reduce here)."""

    def epoch_done(self, epoch: int) -> None:
        """Called when epoch ``epoch`` (1-based) has ended, before its checkpoint is written."""


def run_steps(run: TrainingRun, data: EpochData, driver: StepDriver, *, log_dir: Optional[PathLike],
              logging_steps: int, end_step: Optional[int] = None, main_process: bool = True) -> None:
    """Train in train mode from ``run.progress`` until ``end_step`` (default: the plan's last step), epoch by epoch.

    Each optimizer step reads its micro-batches (:meth:`TrainingPlan.micro_batches_in_step`) and runs
    ``driver.step``; every ``logging_steps`` steps and at the end ``driver.scalars`` go to TensorBoard and the
    console (main process only); checkpoints follow :meth:`TrainingRun.save_due`, plus one at the end unless the
    last step was saved.  An epoch end calls ``driver.epoch_done`` first, so a folder it writes exists before the
    checkpoint that says the epoch is done.
    """
    end = run.plan.total_steps if end_step is None else end_step
    log = TrainLogger(log_dir, end, run.progress.global_step, enabled=main_process,
                      purge_step=run.progress.global_step if run.resumed_from is not None else None)
    try:
        _train_epochs(run, data, driver, log, logging_steps, end)
    finally:
        log.close()


def _train_epochs(run: TrainingRun, data: EpochData, driver: StepDriver, log: TrainLogger, logging_steps: int,
                  end: int) -> None:
    run.model.train()
    progress, plan = run.progress, run.plan
    last_saved, unlogged = progress.global_step, 0
    while progress.global_step < end and progress.epoch < plan.num_epochs:
        batches = data.batches(plan, progress)
        epoch_done = False
        while not epoch_done and progress.global_step < end:
            n_micro = plan.micro_batches_in_step(progress.step_in_epoch)
            postfix = driver.step(itertools.islice(batches, n_micro), n_micro)
            epoch_done = progress.advance(plan.steps_per_epoch)
            unlogged += 1
            log.step(1, **postfix)
            if progress.global_step % logging_steps == 0:
                log.log(driver.scalars(unlogged), progress.global_step)
                unlogged = 0
            if run.save_due(epoch_done):
                if epoch_done:
                    driver.epoch_done(progress.epoch)
                run.save()
                last_saved = progress.global_step
        del batches
    if unlogged:
        log.log(driver.scalars(unlogged), progress.global_step)
    if last_saved != progress.global_step:
        run.save()
