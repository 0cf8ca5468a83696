"""Where a training run's checkpoints are: the ``checkpoint-<step>/`` folder names and finding them.

Torch-free, so that ``results_table.py`` and ``reproduce.sh`` can list checkpoints without importing torch.
A checkpoint counts once complete, i.e. once its ``trainer_state.pt`` exists (``infra/checkpoints.py`` writes the folder
under a temporary name and renames it into place).

    python -m infra.checkpoint_paths DIR      # prints DIR's latest checkpoint; exit status 1 when there is none
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

from infra.io import PathLike

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_NAME = "trainer_state.pt"
#: The weights file of a model folder, and so of each checkpoint (a checkpoint is a model folder plus state).
SAFETENSORS_NAME = "model.safetensors"


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


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m infra.checkpoint_paths DIR``: print DIR's latest checkpoint, or say there is none (status 1)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m infra.checkpoint_paths DIR", file=sys.stderr)
        return 2
    latest = latest_checkpoint(args[0])
    if latest is None:
        print(f"no checkpoint-* in {args[0]}", file=sys.stderr)
        return 1
    print(latest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
