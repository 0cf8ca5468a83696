"""Checkpoints: the resumable state of a training run, written and restored exactly.

:func:`save_checkpoint` writes ``checkpoint-<step>/`` = a plain model folder (``model.save_pretrained``:
``config.json`` + ``model.safetensors``, loadable by inference as is) plus ``trainer_state.pt`` (optimizer,
scheduler, AMP scaler, every rank's RNG states, ``extra`` such as epoch and step-in-epoch), built in a temporary
folder and renamed into place; :func:`load_checkpoint` restores it, or refuses a damaged or foreign one before
restoring anything (:func:`damaged_checkpoint`).  The RNG states (:func:`get_rng_state` /
:func:`set_rng_state`, after :func:`set_seed`) are part of it, so dropout continues as if never stopped.
:func:`prepare_output_dir` applies the run folder's rules (non-empty, ``--overwrite_output_dir``, ``--resume``) and
:func:`checkpoint_to_resume` picks the checkpoint ``--resume`` continues from (``infra/checkpoint_paths.py`` finds
them).
"""
from __future__ import annotations

import logging
import pickle
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

from infra.checkpoint_paths import (CHECKPOINT_PREFIX, SAFETENSORS_NAME, TRAINER_STATE_NAME, checkpoint_step,
                                    latest_checkpoint, list_checkpoints)
from infra.distributed import all_gather_object, barrier, get_rank, get_world_size, unwrap_model
from infra.io import InputError, PathLike, atomic_directory, atomic_write_json, remove_stale_temporaries

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


def damaged_checkpoint(folder: PathLike, what: str) -> InputError:
    """The :class:`InputError` for a ``checkpoint-<step>`` folder that cannot be resumed: says ``what`` is wrong
    and how to go on."""
    return InputError(f"{what}: a damaged or foreign checkpoint; delete this folder to resume from the previous "
                      f"checkpoint, or pass --overwrite_output_dir instead of --resume to start over", path=folder)


# trainer_state.pt entries (save_checkpoint) and the types load_checkpoint needs
STATE_TYPES: dict[str, Any] = {"global_step": int, "optimizer": dict, "scheduler": (dict, type(None)),
                               "scaler": (dict, type(None)), "rng": list, "extra": dict}


def _read_state(folder: Path) -> dict[str, Any]:
    path = folder / TRAINER_STATE_NAME
    if not path.is_file():
        raise damaged_checkpoint(folder, f"{TRAINER_STATE_NAME} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise damaged_checkpoint(folder, f"{TRAINER_STATE_NAME} holds objects other than tensors and plain types "
                                         f"(not written by this program)") from None
    except Exception:  # noqa: BLE001 - torch raises RuntimeError, OSError, EOFError … for a cut or foreign file
        raise damaged_checkpoint(folder, f"{TRAINER_STATE_NAME} cannot be read (truncated, or not a torch.save "
                                         f"file)") from None
    version = state.get("format_version") if isinstance(state, dict) else None
    if version != STATE_FORMAT_VERSION:
        raise damaged_checkpoint(folder, f"{TRAINER_STATE_NAME} is not a trainer state of format "
                                         f"{STATE_FORMAT_VERSION} (format {version!r})")
    bad = [key for key, kind in STATE_TYPES.items() if not isinstance(state.get(key), kind)]
    if bad or not state["rng"]:
        raise damaged_checkpoint(folder, f"{TRAINER_STATE_NAME} lacks {', '.join(bad) or 'rng'}")
    return state


def _read_weights(folder: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's ``model.safetensors``, which must hold exactly ``model``'s weights, shapes included."""
    path = folder / SAFETENSORS_NAME
    if not path.is_file():
        raise damaged_checkpoint(folder, f"{SAFETENSORS_NAME} is missing")
    try:
        weights = load_safetensors(str(path))
    except (SafetensorError, OSError) as e:
        raise damaged_checkpoint(folder, f"{SAFETENSORS_NAME} cannot be read ({e})") from None
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - weights.keys()), sorted(weights.keys() - own.keys())
    resized = [k for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing:
        problem = f"lacks {len(missing)} of this model's weights, e.g. {missing[0]}"
    elif unexpected:
        problem = f"has {len(unexpected)} weights this model lacks, e.g. {unexpected[0]}"
    elif resized:
        k = resized[0]
        problem = f"has {k} of shape {list(weights[k].shape)}, this model's is {list(own[k].shape)}"
    else:
        return weights
    raise damaged_checkpoint(folder, f"{SAFETENSORS_NAME} {problem} (a model of another size: hidden size, "
                                     f"output dim?)")


def _check_optimizer_state(folder: Path, saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Refuse a saved optimizer state whose parameter groups or per-parameter tensors do not fit ``optimizer``
    (``Optimizer.load_state_dict`` would accept tensors of other shapes and fail at the next step)."""
    groups, own = saved.get("param_groups"), optimizer.param_groups
    if not (isinstance(groups, list) and isinstance(saved.get("state"), dict) and len(groups) == len(own)
            and all(isinstance(g, dict) and len(g.get("params", ())) == len(o["params"]) for g, o in zip(groups, own))):
        raise damaged_checkpoint(folder, f"the optimizer state in {TRAINER_STATE_NAME} has other parameter groups "
                                         f"than this model's optimizer")
    params = {i: p for g, o in zip(groups, own) for i, p in zip(g["params"], o["params"])}
    for i, entries in saved["state"].items():
        target = params.get(i)
        if target is None or not isinstance(entries, dict) or any(
                isinstance(v, torch.Tensor) and v.dim() and v.shape != target.shape for v in entries.values()):
            raise damaged_checkpoint(folder, f"the optimizer state in {TRAINER_STATE_NAME} does not fit this model "
                                             f"(parameter {i})")


def load_checkpoint(path: PathLike, model: Optional[torch.nn.Module] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None, scheduler: Any = None, scaler: Any = None,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into the given objects; return the state's ``extra`` dict
    with ``global_step`` added.

    Model weights are read from ``model.safetensors`` (strict: every key and shape must match).  The RNG state
    restored is this rank's (rank 0's, with a warning, when the world size changed).  Call after moving the model
    to its device and before building DDP.  A missing, truncated or foreign file, or weights / optimizer state that
    do not fit the given objects, raise :class:`InputError` (:func:`damaged_checkpoint`) before anything is
    restored.
    """
    folder = Path(path)
    state = _read_state(folder)
    weights = None if model is None else _read_weights(folder, unwrap_model(model))
    if optimizer is not None:
        _check_optimizer_state(folder, state["optimizer"], optimizer)
    try:
        if weights is not None:
            unwrap_model(model).load_state_dict(weights, strict=True)
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
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:  # inner entries of another format
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise damaged_checkpoint(folder, f"{TRAINER_STATE_NAME} does not fit this run ({type(e).__name__}: "
                                         f"{first_line})") from None
    return {**state["extra"], "global_step": state["global_step"]}


def prepare_output_dir(output_dir: PathLike, overwrite: bool, resume: bool) -> None:
    """Refuse a non-empty ``output_dir`` unless ``resume`` or ``overwrite`` (HF Trainer rule); then delete the
    ``*.tmp-<pid>`` / ``*.old-<pid>`` folders a killed run left there (:func:`infra.io.remove_stale_temporaries`).

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
    """With ``resume``, the latest checkpoint of ``output_dir`` (None, logged, when there is none); else None.

    A ``checkpoint-<step>`` folder of a higher step without ``trainer_state.pt`` (never written by
    :func:`save_checkpoint`, which renames complete folders into place) is refused (:func:`damaged_checkpoint`)
    rather than skipped: training on would replace it."""
    if not resume:
        return None
    checkpoint = latest_checkpoint(output_dir)
    last = -1 if checkpoint is None else checkpoint_step(checkpoint)
    steps = {p: checkpoint_step(p) for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()}
    newer = [p for p, step in steps.items() if step is not None and step > last]
    if newer:
        raise damaged_checkpoint(max(newer, key=checkpoint_step), f"{TRAINER_STATE_NAME} is missing")
    if checkpoint is None:
        logger.info("--resume: no checkpoint in %s, starting from scratch", output_dir)
    return checkpoint
