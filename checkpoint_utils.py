"""Checkpoints: the resumable state of a training run, written and restored exactly.

:func:`save_checkpoint` writes ``checkpoint-<step>/`` = a plain model folder (``model.save_pretrained``:
``config.json`` + ``model.safetensors``, loadable by inference as is) plus ``trainer_state.pt`` (optimizer,
scheduler, AMP scaler, every rank's RNG states, ``extra`` such as epoch and step-in-epoch), built in a temporary
folder and renamed into place; :func:`load_checkpoint` restores it.  The RNG states (:func:`get_rng_state` /
:func:`set_rng_state`, after :func:`set_seed`) are part of it, so dropout continues as if never stopped.
:func:`prepare_output_dir` applies the run folder's rules (non-empty, ``--overwrite_output_dir``, ``--resume``) and
:func:`checkpoint_to_resume` picks the checkpoint ``--resume`` continues from (``checkpoint_paths.py`` finds them).
"""
from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file as load_safetensors

from checkpoint_paths import (CHECKPOINT_PREFIX, TRAINER_STATE_NAME, checkpoint_step, latest_checkpoint,
                              list_checkpoints)
from dist_utils import all_gather_object, barrier, get_rank, get_world_size, unwrap_model
from io_utils import InputError, PathLike, atomic_directory, atomic_write_json, remove_stale_temporaries

logger = logging.getLogger(__name__)

STATE_FORMAT_VERSION = 1


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


def checkpoint_to_resume(output_dir: PathLike, resume: bool) -> Optional[Path]:
    """With ``resume``, the latest checkpoint of ``output_dir`` (None, logged, when there is none); else None."""
    if not resume:
        return None
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is None:
        logger.info("--resume: no checkpoint in %s, starting from scratch", output_dir)
    return checkpoint
