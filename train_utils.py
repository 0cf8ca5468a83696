"""Training mechanics shared by ``star/train.py`` and ``adore/train.py`` (spec §3.6, §3.9, §6).

* :class:`Lamb` — the original's Lamb (§3.6): no bias correction, L2 decay inside the trust ratio, ‖w‖ clamped
  to 10.  :func:`param_groups` / :func:`build_optimizer` / :func:`linear_schedule` reproduce the original
  ``DRTrainer.create_optimizer_and_scheduler``.
* :func:`set_seed`, :func:`get_rng_state` / :func:`set_rng_state` (Python, numpy, torch, CUDA).
* Checkpoints: :func:`save_checkpoint` writes ``checkpoint-<step>/`` = a plain model folder
  (``model.save_pretrained``: ``config.json`` + ``model.safetensors``, loadable by inference as is) plus
  ``trainer_state.pt`` (optimizer, scheduler, AMP scaler, every rank's RNG states, ``extra`` such as epoch and
  step-in-epoch), built in a temporary folder and renamed into place.  :func:`latest_checkpoint` /
  :func:`load_checkpoint` resume exactly: the data order depends only on (seed, epoch) (:class:`GlobalBatchSampler`)
  so a resumed run skips the batches already consumed in the epoch without reading them.
* :class:`GlobalBatchSampler` — a deterministic, resumable batch sampler that splits every *global* batch
  across DDP ranks (rank r gets the r-th contiguous slice of it).
* :class:`HelpFormatter` — the trainers' ``--help`` layout; :class:`Progress` — where a run stands.
* :class:`TrainingPlan` — steps per epoch / total steps / epochs, as the HF Trainer derives them.
* :class:`TrainLogger` — TensorBoard scalars + a tqdm bar (steps/s, ETA) + console lines, rank 0 only.
* DDP: :func:`init_distributed` (torchrun environment), :func:`all_gather_with_grad`, :func:`all_gather_object`,
  :func:`all_reduce_sum`, :func:`barrier`, :func:`cleanup_distributed`.
* AMP: :func:`autocast_context`, :func:`make_grad_scaler`, and :func:`optimizer_step` (unscale → clip → step →
  scaler update → scheduler step → zero grads).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file as load_safetensors
from torch.optim.lr_scheduler import LambdaLR

from io_utils import InputError, PathLike, atomic_directory, atomic_write_json, remove_stale_temporaries

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_NAME = "trainer_state.pt"
STATE_FORMAT_VERSION = 1
NO_DECAY_PATTERNS = ("bias", "LayerNorm.weight")


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The trainers' ``--help``: keeps the epilog's line breaks and appends each meaningful default (not None,
    False or [], not a ``store_const`` flag's, not one the help already shows)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and action.const is None \
                and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


# ----------------------------------------------------------------------------------------------------------
# Optimizer, parameter groups, schedule, seeds
# ----------------------------------------------------------------------------------------------------------

class Lamb(torch.optim.Optimizer):
    """The original STAR Lamb optimizer (spec §3.6).  Per parameter ``p`` with gradient ``g``::

        m ← β1·m + (1−β1)·g ;  v ← β2·v + (1−β2)·g²          (no bias correction)
        u ← m / (√v + eps)  [+ weight_decay·p]                 (L2 decay inside the trust ratio)
        r ← clamp(‖p‖, 0, 10) / ‖u‖   (1 if either norm is 0; 1 when adam=True)
        p ← p − lr · r · u

    ``state[p]`` keeps ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v) and, like the original, the last
    ``weight_norm``, ``adam_norm`` and ``trust_ratio`` (before ``adam`` forces 1).  Computed without host
    synchronisation (the trust ratio stays a tensor).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, adam: bool = False):
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if eps < 0.0:
            raise ValueError(f"invalid epsilon {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        self.adam = adam
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                self._update(p, p.grad, group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
        return loss

    def _update(self, p: torch.Tensor, grad: torch.Tensor, lr: float, beta1: float, beta2: float, eps: float,
                weight_decay: float) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        weight_norm = p.detach().float().norm().clamp(0.0, 10.0)
        adam_step = exp_avg / exp_avg_sq.sqrt().add(eps)
        if weight_decay != 0:
            adam_step.add_(p, alpha=weight_decay)
        adam_norm = adam_step.float().norm()
        both_nonzero = (weight_norm > 0) & (adam_norm > 0)
        trust_ratio = torch.where(both_nonzero, weight_norm / torch.where(both_nonzero, adam_norm, 1.0), 1.0)
        state["weight_norm"], state["adam_norm"], state["trust_ratio"] = weight_norm, adam_norm, trust_ratio
        if self.adam:
            trust_ratio = torch.ones_like(trust_ratio)
        p.sub_(adam_step * (lr * trust_ratio).to(adam_step.dtype))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer groups, as the original ``DRTrainer``: parameters whose name contains ``bias`` or
    ``LayerNorm.weight`` get weight decay 0, all others ``weight_decay``.

    Faithful quirk: the head's ``norm.weight`` does not contain ``LayerNorm.weight`` and IS decayed
    (transformers 5 still names RoBERTa/BERT layer norms ``LayerNorm``).  Frozen parameters are left out.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if any(pattern in name for pattern in NO_DECAY_PATTERNS) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


OPTIMIZERS = ("lamb", "adamw")


def build_optimizer(name: str, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.Optimizer:
    """``"lamb"`` → :class:`Lamb` (the original passed only lr and eps; its default betas equal ours) or
    ``"adamw"`` → ``torch.optim.AdamW`` (decoupled decay; replaces the removed ``transformers.AdamW``)."""
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=eps)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warm-up then linear decay to 0 (HF ``get_linear_schedule_with_warmup``)::

        factor(s) = s / max(1, warmup)                                 for s < warmup
                  = max(0, (total − s) / max(1, total − warmup))       otherwise

    The factor is a closure, so a checkpoint restores the step count but not the horizon: resuming with
    another ``total_steps`` re-targets the decay.
    """
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return LambdaLR(optimizer, factor)


def set_seed(seed: int) -> None:
    """Seed Python's ``random``, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def get_rng_state() -> dict[str, Any]:
    """Every global RNG state as tensors and plain types (loadable with ``torch.load(weights_only=True)``)."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt_state), gauss],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` captured (CUDA states only where CUDA is in use)."""
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------
# Plan and data order
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Progress:
    """Where training stands: ``epoch`` (0-based, current), optimizer steps done in it, and in total."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


@dataclass(frozen=True)
class TrainingPlan:
    """Optimizer steps per epoch, total steps and epochs to run.

    ``steps_per_epoch = ⌈micro_batches_per_epoch / accum⌉`` (the last step of an epoch takes the leftover
    micro-batches); ``total_steps = max_steps`` if ``max_steps > 0`` else ``⌈num_train_epochs · steps_per_epoch⌉``
    (HF Trainer); ``num_epochs = ⌈total_steps / steps_per_epoch⌉``.
    """

    micro_batches_per_epoch: int
    gradient_accumulation_steps: int
    steps_per_epoch: int
    total_steps: int
    num_epochs: int

    @classmethod
    def create(cls, micro_batches_per_epoch: int, gradient_accumulation_steps: int, num_train_epochs: float,
               max_steps: int = -1) -> "TrainingPlan":
        if micro_batches_per_epoch < 1:
            raise InputError("the training set does not fill one batch", value=micro_batches_per_epoch)
        if gradient_accumulation_steps < 1:
            raise InputError("--gradient_accumulation_steps must be >= 1", value=gradient_accumulation_steps)
        steps_per_epoch = math.ceil(micro_batches_per_epoch / gradient_accumulation_steps)
        total = max_steps if max_steps > 0 else math.ceil(num_train_epochs * steps_per_epoch)
        if total < 1:
            raise InputError("nothing to train: set --num_train_epochs > 0 or --max_steps > 0",
                             value=num_train_epochs)
        return cls(micro_batches_per_epoch, gradient_accumulation_steps, steps_per_epoch, total,
                   math.ceil(total / steps_per_epoch))

    def micro_batches_in_step(self, step_in_epoch: int) -> int:
        """How many micro-batches optimizer step ``step_in_epoch`` (0-based) of an epoch accumulates."""
        start = step_in_epoch * self.gradient_accumulation_steps
        return min(self.gradient_accumulation_steps, self.micro_batches_per_epoch - start)


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed derived from (seed, epoch) with numpy's SeedSequence (no collisions like seed + epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Deterministic, resumable batch sampler shared by single-process and DDP training.

    Epoch e visits ``torch.randperm(num_items)`` drawn from a ``torch.Generator`` seeded by
    :func:`epoch_seed` (seed, e) (or ``0..n-1`` when ``shuffle=False``), cut into *global* batches of
    ``batch_size · world_size`` items; rank r yields the r-th contiguous slice of each global batch, so the union
    of the ranks' k-th batches is exactly the k-th batch of a single process with the global batch size.
    A short last global batch is split as evenly as possible (the first ranks get one more item); if it has
    fewer items than ranks it is dropped (at most ``world_size − 1`` items per epoch, DDP only).

    ``set_epoch(epoch, start_batch)`` chooses the epoch and skips its first ``start_batch`` batches (resume).
    ``len()`` is the number of batches still to come in the epoch; ``batches_per_epoch`` the full count.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, world_size: int = 1, rank: int = 0,
                 shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.world_size, self.rank, self.shuffle = world_size, rank, shuffle
        self.epoch, self.start_batch = 0, 0
        global_batch = batch_size * world_size
        full, rest = divmod(num_items, global_batch)
        self.batches_per_epoch = full + (1 if rest >= world_size else 0)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.batches_per_epoch}]")
        self.epoch, self.start_batch = epoch, start_batch

    def order(self) -> torch.Tensor:
        """The epoch's item order (int64 [num_items])."""
        if not self.shuffle:
            return torch.arange(self.num_items)
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.num_items, generator=generator)

    def rank_slice(self, batch_index: int) -> tuple[int, int]:
        """``(start, end)`` positions in :meth:`order` of this rank's part of global batch ``batch_index``."""
        global_batch = self.batch_size * self.world_size
        begin = batch_index * global_batch
        size = min(global_batch, self.num_items - begin)
        base, extra = divmod(size, self.world_size)
        start = begin + self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        for k in range(self.start_batch, self.batches_per_epoch):
            start, end = self.rank_slice(k)
            yield order[start:end].tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------

def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def checkpoint_step(path: PathLike) -> Optional[int]:
    """The step of a ``checkpoint-<step>`` folder name, else None."""
    match = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: PathLike) -> list[Path]:
    """Complete checkpoints (a ``trainer_state.pt`` inside) of ``output_dir``, oldest step first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in folder.iterdir()
             if p.is_dir() and checkpoint_step(p) is not None and (p / TRAINER_STATE_NAME).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: PathLike) -> Optional[Path]:
    """The complete checkpoint with the highest step in ``output_dir``, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def _state_dict_or_none(obj: Any) -> Any:
    return None if obj is None else obj.state_dict()


def save_checkpoint(output_dir: PathLike, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any = None, scaler: Any = None, extra_state: Optional[dict[str, Any]] = None,
                    save_total_limit: Optional[int] = None) -> Path:
    """Write ``output_dir/checkpoint-<step>/`` atomically and return its path.  Call it on every rank.

    Contents: the model folder written by ``unwrap_model(model).save_pretrained`` (``config.json`` +
    ``model.safetensors``: inference and ``DenseEncoder.from_pretrained`` load it directly),
    ``trainer_state.pt`` (``torch.save`` of ``{"format_version", "global_step", "optimizer", "scheduler",
    "scaler", "rng": [per-rank get_rng_state()], "world_size", "extra": extra_state}`` — tensors and plain types
    only, so ``torch.load(weights_only=True)`` reads it) and ``trainer_state.json`` (``global_step`` + ``extra``
    for humans; ``extra`` must be JSON-serialisable).  Rank 0 writes into ``checkpoint-<step>.tmp-<pid>`` and
    renames it into place.  With ``save_total_limit`` only the newest that many checkpoints are kept.
    """
    rng_states = all_gather_object(get_rng_state())
    final = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    if get_rank() == 0:
        with atomic_directory(final) as tmp:
            unwrap_model(model).save_pretrained(tmp)
            extra = dict(extra_state or {})
            state = {"format_version": STATE_FORMAT_VERSION, "global_step": step,
                     "optimizer": optimizer.state_dict(), "scheduler": _state_dict_or_none(scheduler),
                     "scaler": _state_dict_or_none(scaler), "rng": rng_states, "world_size": len(rng_states),
                     "extra": extra}
            torch.save(state, tmp / TRAINER_STATE_NAME)
            atomic_write_json(tmp / "trainer_state.json", {"global_step": step, **extra})
        if save_total_limit is not None and save_total_limit > 0:
            for old in list_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: PathLike, model: Optional[torch.nn.Module] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None, scheduler: Any = None, scaler: Any = None,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into the given objects; return the state's ``extra`` dict
    with ``global_step`` added.

    Model weights are read from ``model.safetensors`` (strict: every key must match).  The RNG state restored is
    this rank's (rank 0's, with a warning, when the world size changed).  Call after moving the model to its
    device and before building DDP.
    """
    folder = Path(path)
    state_path = folder / TRAINER_STATE_NAME
    if not state_path.is_file():
        raise InputError("not a training checkpoint (no trainer_state.pt)", path=folder)
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: report it as an input problem
        raise InputError(f"cannot read the trainer state: {e}", path=state_path) from None
    if state.get("format_version") != STATE_FORMAT_VERSION:
        raise InputError("unsupported trainer_state.pt format", path=state_path, value=state.get("format_version"))
    if model is not None:
        target = unwrap_model(model)
        weights = load_safetensors(str(folder / "model.safetensors"))
        target.load_state_dict(weights, strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        rank, states = get_rank(), state["rng"]
        if len(states) != get_world_size():
            logger.warning("%s was saved by %d process(es), resuming with %d: RNG streams differ from an "
                           "uninterrupted run", folder, len(states), get_world_size())
        set_rng_state(states[rank] if rank < len(states) else states[0])
    return {**state["extra"], "global_step": state["global_step"]}


def prepare_output_dir(output_dir: PathLike, overwrite: bool, resume: bool) -> None:
    """Refuse a non-empty ``output_dir`` unless ``resume`` or ``overwrite`` (HF Trainer rule); then delete the
    ``*.tmp-<pid>`` / ``*.old-<pid>`` folders a killed run left there (:func:`io_utils.remove_stale_temporaries`).

    With ``overwrite`` (and not ``resume``) the old ``checkpoint-*`` folders are deleted (rank 0), so a later
    ``--resume`` cannot pick up a previous run's checkpoint.
    """
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise InputError("output_dir is a file", path=folder)
    non_empty = folder.is_dir() and any(folder.iterdir())
    if non_empty and not (overwrite or resume):
        raise InputError("output_dir exists and is not empty; pass --overwrite_output_dir to train into it "
                         "anyway, or --resume to continue from its latest checkpoint", path=folder)
    if (overwrite or resume) and get_rank() == 0:
        for stale in remove_stale_temporaries(folder):
            logger.info("removed %s, left by an interrupted run", stale)
    if overwrite and not resume and get_rank() == 0:
        for old in folder.glob(f"{CHECKPOINT_PREFIX}*") if folder.is_dir() else ():
            if old.is_dir() and checkpoint_step(old) is not None:
                logger.info("removing the previous run's %s", old)
                shutil.rmtree(old)
    barrier()


# ----------------------------------------------------------------------------------------------------------
# Precision and the optimizer step
# ----------------------------------------------------------------------------------------------------------

def autocast_context(device: torch.device, fp16: bool = False, bf16: bool = False) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in float16 / bfloat16 on ``device``'s type, or a no-op when neither is asked."""
    if fp16 and bf16:
        raise InputError("choose one of --fp16 and --bf16")
    if not (fp16 or bf16):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.float16 if fp16 else torch.bfloat16)


def fp32_context(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast disabled: scores and losses are computed in float32 (the original's ``autocast(enabled=False)``)."""
    return torch.autocast(device_type=device.type, enabled=False)


def make_grad_scaler(device: torch.device, fp16: bool) -> torch.amp.GradScaler:
    """A GradScaler for fp16 training (disabled — a pass-through — otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=fp16)


def optimizer_step(parameters: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any,
                   scaler: torch.amp.GradScaler, max_grad_norm: float) -> torch.Tensor:
    """Unscale (fp16), clip the global gradient norm to ``max_grad_norm`` (skipped if ≤ 0), step the optimizer
    through the scaler, update the scale, step the schedule (not when fp16 skipped a step on inf/NaN, like the
    HF Trainer), zero the gradients.  Returns the gradient norm before clipping (a tensor; nan if not clipped)."""
    scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    else:
        grad_norm = torch.tensor(float("nan"))
    scale_before = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    skipped = scale_before is not None and scaler.get_scale() < scale_before
    if scheduler is not None and not skipped:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


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
# Distributed training
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistInfo:
    """Process placement: ``rank``/``world_size``/``local_rank`` (0/1/0 without torchrun) and the device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {name} is not an integer", value=value) from None


def init_distributed(no_cuda: bool = False) -> DistInfo:
    """Read torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; with ``WORLD_SIZE > 1`` join the process group
    (``nccl`` when training on CUDA, else ``gloo``).  Each process uses ``cuda:LOCAL_RANK`` (or the CPU when
    CUDA is absent or ``no_cuda``)."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() and not no_cuda
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, device)


def cleanup_distributed() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if _active() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _active() else 1


def barrier() -> None:
    if _active():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` without a process group)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor, no gradient; ``t`` itself without a process group)."""
    if not _active():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's rows; backward sums the global gradient over ranks and returns this rank's rows.

    Each rank's loss depends on every rank's rows, so the gradient of the summed loss w.r.t. this rank's rows is
    the sum over ranks of each rank's gradient for them (an all-reduce) — replacing only the local slice of a
    plain all_gather would drop the other ranks' contributions.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        longest = max(sizes)
        padded = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return total[start: start + ctx.sizes[ctx.rank]], None, None


def all_gather_with_grad(t: torch.Tensor, sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Rows of ``t`` from every rank concatenated in rank order (first dims may differ across ranks).

    Differentiable: the gradient reaching this rank's ``t`` is the sum over all ranks of the gradient of
    their losses w.r.t. these rows, so DDP's gradient averaging of per-rank losses over local queries × global
    documents reproduces single-process gradients (see ``star/train.py``).  ``sizes`` (rows per rank), when
    known, saves one collective.  Without a process group ``t`` is returned unchanged.
    """
    if not _active():
        return t
    if sizes is None:
        sizes = [int(n) for n in all_gather_object(int(t.shape[0]))]
    return _GatherWithGrad.apply(t, list(sizes), dist.get_rank())


__all__ = [
    "Lamb", "param_groups", "build_optimizer", "OPTIMIZERS", "linear_schedule", "set_seed", "get_rng_state",
    "set_rng_state", "TrainingPlan", "epoch_seed", "GlobalBatchSampler", "unwrap_model", "checkpoint_step",
    "list_checkpoints", "latest_checkpoint", "save_checkpoint", "load_checkpoint", "prepare_output_dir",
    "autocast_context", "fp32_context", "make_grad_scaler", "optimizer_step", "TrainLogger", "DistInfo",
    "init_distributed", "cleanup_distributed", "get_rank", "get_world_size", "barrier", "all_gather_object",
    "all_reduce_sum", "all_gather_with_grad",
]
