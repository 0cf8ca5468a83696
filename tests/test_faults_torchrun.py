"""Faults under torchrun (issue #22; gloo on the CPU, 2 processes, ``--standalone``):

* a rank of ``star.train`` SIGKILLed right after a checkpoint, the job rerun with ``--resume``: the weights and
  every checkpoint equal those of an uninterrupted 2-process run, bit for bit;
* SIGTERM to the whole job — every process of it, as a scheduler sends at the time limit — during training and
  during inference: every rank exits promptly with one ``terminated`` line, status 143 and no traceback, leaves
  no temporary file of its own, and the rerun (``--resume`` / the same command) ends equal to an uninterrupted run.

Each rank's output is kept apart with torchrun's ``--log-dir``/``--redirects`` (torchrun's own report of the
signal is its business, not the ranks').
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import (ENV, REPO, kill_rank_script, load_weights, make_encoder_inputs, make_star_data, run_cli,
                     star_cli_args, star_inference_args, torchrun_args, tree_hash)

pytestmark = pytest.mark.slow

TRAIN = ("-m", "star.train")
TERMINATED = "terminated (SIGTERM)"


def train_args(data: dict, out: Path) -> list:
    """12 queries, 2 per process and step: 3 steps per epoch, a checkpoint at each epoch end, 12 steps."""
    return star_cli_args(data, out, "star", "--max_steps", "12", "--warmup_steps", "2", "--seed", "7", batch=2)


def torchrun(command: tuple, args: list, log_dir: Path | None = None) -> subprocess.CompletedProcess:
    logs = ["--log-dir", log_dir, "--redirects", "3"] if log_dir else []
    return run_cli([*torchrun_args(2, *logs, *command), *args], timeout=300)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), (a, b)


def same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def assert_same_run(out: Path, reference: Path) -> None:
    """The same folders; every checkpoint's and the final weights equal; the optimizer states too."""
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in reference.iterdir())
    assert_same_weights(out, reference)
    for name in (n for n in names if n.startswith("checkpoint-")):
        assert_same_weights(out / name, reference / name)
        ref = torch.load(reference / name / "trainer_state.pt", weights_only=True)
        got = torch.load(out / name / "trainer_state.pt", weights_only=True)
        for a, b in zip(ref["optimizer"]["state"].values(), got["optimizer"]["state"].values()):
            assert a.keys() == b.keys() and all(same(a[k], b[k]) for k in a), name


@pytest.fixture(scope="module")
def star_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("star_ddp")
    data = make_star_data(root / "data")
    straight = root / "straight"
    result = torchrun(TRAIN, train_args(data, straight))
    assert result.returncode == 0, result.stderr[-3000:]
    return data, straight


def test_star_rank_killed_after_a_checkpoint_and_job_resumed_equals_uninterrupted(star_reference, tmp_path):
    data, straight = star_reference
    script = kill_rank_script(tmp_path, "star")
    out = tmp_path / "resumed"
    killed = torchrun((script,), ["3", *train_args(data, out)])
    assert killed.returncode != 0
    assert f"exitcode  : {-signal.SIGKILL}" in killed.stderr  # torchrun's report: rank 1 died by SIGKILL
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "log"]
    resumed = torchrun(TRAIN, [*train_args(data, out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, straight)


# -- SIGTERM to the whole job --------------------------------------------------------------------------------------

def terminate_job_when(args: list, log_dir: Path, ready, timeout: float = 300) -> tuple[int, float]:
    """Start the torchrun job in its own process group; once ``ready()``, SIGTERM every process of the group (as a
    scheduler does); return torchrun's status and the seconds from the signal to the job's end."""
    proc = subprocess.Popen([sys.executable, *map(str, torchrun_args(2, "--log-dir", log_dir, "--redirects", "3",
                                                                     *args))],
                            cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    start = time.monotonic()
    while not ready():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() - start < timeout, "the signal point was never reached"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    proc.wait(timeout=120)
    return proc.returncode, time.monotonic() - sent


def rank_logs(log_dir: Path) -> dict[int, str]:
    """{rank: its stderr} from torchrun's --log-dir layout (RUN_ID/attempt_0/RANK/stderr.log)."""
    files = sorted(log_dir.glob("*/attempt_*/*/stderr.log"))
    return {int(f.parent.name): f.read_text() for f in files}


def assert_ranks_terminated_cleanly(log_dir: Path) -> None:
    logs = rank_logs(log_dir)
    assert sorted(logs) == [0, 1], logs.keys()
    for rank, text in logs.items():
        assert "Traceback" not in text, (rank, text[-3000:])
        assert [line for line in text.splitlines() if TERMINATED in line or "error:" in line] == \
               [line for line in text.splitlines() if line.startswith(TERMINATED)] and TERMINATED in text, \
            (rank, text[-3000:])


def own_temporaries(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if re.search(r"\.(tmp|old)-\d+$", p.name)]


def test_sigterm_to_a_training_job_ends_every_rank_cleanly_and_resume_equals_uninterrupted(star_reference, tmp_path):
    data, straight = star_reference
    out, logs = tmp_path / "out", tmp_path / "logs"
    status, seconds = terminate_job_when([*TRAIN, *train_args(data, out), "--resume"], logs,
                                         lambda: (out / "checkpoint-3").is_dir())
    print(f"training job ended {seconds:.2f} s after SIGTERM, status {status}")
    assert status != 0 and seconds < 60
    assert not (out / "checkpoint-12").exists(), "the job ended before the signal"
    assert_ranks_terminated_cleanly(logs)
    assert own_temporaries(out) == []
    resumed = torchrun(TRAIN, [*train_args(data, out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, straight)


def test_sigterm_to_an_inference_job_ends_every_rank_cleanly_and_rerun_equals_uninterrupted(tmp_path):
    inputs = make_encoder_inputs(tmp_path / "in", n_docs=12_000)
    straight = tmp_path / "straight"
    result = torchrun((), star_inference_args(inputs, straight))
    assert result.returncode == 0, result.stderr[-3000:]
    out, logs = tmp_path / "out", tmp_path / "logs"
    status, seconds = terminate_job_when(star_inference_args(inputs, out), logs,
                                         lambda: any(out.glob("passages.memmap*")))
    print(f"inference job ended {seconds:.2f} s after SIGTERM, status {status}")
    assert status != 0 and seconds < 60
    assert not (out / "dev.rank.tsv").exists(), "the job ended before the signal"
    assert_ranks_terminated_cleanly(logs)
    assert own_temporaries(out) == []
    rerun = torchrun((), star_inference_args(inputs, out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert tree_hash(out, skip_tmp=False) == tree_hash(straight)
