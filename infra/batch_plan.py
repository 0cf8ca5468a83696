"""The data order of training: which micro-batches each optimizer step reads, per epoch and per rank, so that a
resumed run reads exactly what an uninterrupted one would have.

* :class:`TrainingPlan` — steps per epoch / total steps / epochs, as the HF Trainer derives them.
* :class:`Progress` — where a run stands (epoch, step in it, global step).
* :class:`GlobalBatchSampler` — a deterministic, resumable batch sampler that splits every *global* batch across
  DDP ranks (rank r gets the r-th contiguous slice of it); the order depends only on (seed, epoch).
* :class:`BackgroundIterator` — reads the next batches in a thread while the current step runs (same batches,
  same order).
"""
from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch

from infra.io import InputError


@dataclass
class Progress:
    """Where training stands: ``epoch`` (0-based, current), optimizer steps done in it, and in total."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0

    def advance(self, steps_per_epoch: int) -> bool:
        """Count one optimizer step; True when it ended the epoch, which then moves to the start of the next one
        (so a checkpoint saved at an epoch end resumes there)."""
        self.step_in_epoch += 1
        self.global_step += 1
        if self.step_in_epoch < steps_per_epoch:
            return False
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return True


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

    def first_micro_batch(self, step_in_epoch: int) -> int:
        """Index in its epoch of the first micro-batch of optimizer step ``step_in_epoch`` (0-based)."""
        return step_in_epoch * self.gradient_accumulation_steps

    def micro_batches_in_step(self, step_in_epoch: int) -> int:
        """How many micro-batches optimizer step ``step_in_epoch`` (0-based) of an epoch accumulates."""
        return min(self.gradient_accumulation_steps,
                   self.micro_batches_per_epoch - self.first_micro_batch(step_in_epoch))

    def micro_batches_before(self, progress: Progress) -> int:
        """How many micro-batches the run has read before ``progress``, over all epochs."""
        return progress.epoch * self.micro_batches_per_epoch + self.first_micro_batch(progress.step_in_epoch)


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


class BackgroundIterator:
    """``iterator``'s items, read up to ``depth`` ahead by one background thread: the same items in the same order
    (one thread calls ``next``, so a stateful collator sees the calls it would see in the main thread), while the
    main thread runs the step — on a GPU while it waits for the device (fp16's GradScaler reads its inf check
    every step), on a CPU while torch's kernels release the GIL.  The iterator must not use the global torch RNG
    (the training datasets draw from their own seeded generators).

    An exception raised by ``iterator`` is raised by the ``next`` call that reaches it.  :meth:`close` (also on
    garbage collection, and at the end) stops the thread after the item it is reading; items read ahead are
    dropped.  Where CUDA is initialised, the thread works on the caller's current CUDA device (as the DataLoader's
    pin-memory thread: pinning from a thread on device 0 would open a context there on every DDP rank).
    """

    _END = object()

    def __init__(self, iterator: Iterator[Any], depth: int = 2):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        cuda_device = torch.cuda.current_device() if torch.cuda.is_initialized() else None
        self._thread = threading.Thread(target=self._fill, args=(iterator, cuda_device), name="batch-prefetch",
                                        daemon=True)
        self._thread.start()

    def _put(self, entry: tuple[Any, Any]) -> bool:
        """Queue ``entry`` unless :meth:`close` is called meanwhile; True if queued."""
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, iterator: Iterator[Any], cuda_device: Optional[int]) -> None:
        try:
            if cuda_device is not None:
                torch.cuda.set_device(cuda_device)
            for item in iterator:
                if not self._put((item, None)):
                    return
            self._put((self._END, None))
        except BaseException as error:  # noqa: BLE001 — handed to the consumer
            self._put((self._END, error))

    def __iter__(self) -> "BackgroundIterator":
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        item, error = self._queue.get()
        if item is self._END:
            self.close()
            if error is not None:
                raise error
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the thread (waiting for the item it is reading) and drop what it read ahead."""
        self._done = True
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __del__(self) -> None:
        if hasattr(self, "_thread"):
            self.close()
