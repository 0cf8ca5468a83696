"""One run per output (issue #22, infra/run_lock.py): every command that writes an output folder holds a lock on
it for its whole run.  A second run into the same place, started while the first runs, refuses at once — before
it reads anything — with one line naming the folder and the holder (pid, host), exit status 2; a lock left by a
killed process never blocks; the ranks of one torchrun job share their job's lock; ``--shard_id`` jobs share a
folder with each other but never with a whole run."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import (ENV, REPO, AdoreData, adore_cli_args, assert_one_error, make_encoder_inputs, make_star_data,
                     run, run_cli, star_cli_args, star_inference_args, torchrun_args, tree_hash)
from infra.io import InputError
from infra.run_lock import lock_file, output_lock

HOLD = """
import sys, time
from infra.run_lock import output_lock
shard = None if sys.argv[2] == "-" else int(sys.argv[2])
with output_lock(sys.argv[1], shard=shard):
    print("held", flush=True)
    time.sleep(600)
"""


def hold(output: Path, shard: int | None = None) -> subprocess.Popen:
    """A process holding ``output``'s lock (as a running command does) until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(output), "-" if shard is None else str(shard)],
                            cwd=REPO, env={**ENV, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


# -- the lock itself (in one process: flock locks of two opens of a file exclude each other) ----------------------

def test_second_holder_is_refused_naming_the_first_and_the_lock_goes_with_the_run(tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        assert lock_file(out) == tmp_path / ".out.lock" and lock_file(out).exists()
        with pytest.raises(InputError) as refused:
            with output_lock(tmp_path / "." / "out"):  # another spelling of the same folder
                pytest.fail("entered a busy lock")
        message = str(refused.value)
        assert message.startswith(f"{out}: another run is writing here")
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
    assert not lock_file(out).exists()  # a finished run leaves nothing behind
    with output_lock(out):  # free again
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_shard_jobs_share_a_folder_but_never_with_a_whole_run(tmp_path):
    out = tmp_path / "out"
    with output_lock(out, shard=0), output_lock(out, shard=1):
        with pytest.raises(InputError, match="another run is writing here"):
            with output_lock(out):
                pass
        with pytest.raises(InputError, match="another run is writing here"):
            with output_lock(out, shard=1):  # the same shard twice
                pass
    with output_lock(out):
        with pytest.raises(InputError, match="another run is writing here"):
            with output_lock(out, shard=0):
                pass
    assert list(tmp_path.iterdir()) == []


def test_lock_of_a_killed_holder_never_blocks(tmp_path):
    """SIGKILL leaves the lock file with the dead holder's record; the kernel dropped its flock: the next run takes
    the lock and, when it ends, removes the file."""
    out = tmp_path / "out"
    holder = hold(out)
    with pytest.raises(InputError, match=f"pid {holder.pid} on host"):
        with output_lock(out):
            pass
    stop(holder)
    assert str(holder.pid) in lock_file(out).read_text()
    with output_lock(out):
        assert str(os.getpid()) in lock_file(out).read_text()
    assert not lock_file(out).exists()


def test_torchrun_ranks_wait_for_their_job_and_not_for_another(tmp_path, monkeypatch):
    """Rank 1 of a job goes on once rank 0 holds the lock for the same job (TORCHELASTIC_RUN_ID), not before."""
    import threading

    import infra.run_lock as run_lock

    out = tmp_path / "out"
    monkeypatch.setattr(run_lock, "_POLL_S", 0.01)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    monkeypatch.setenv("RANK", "0")
    with output_lock(out):  # rank 0 of job-a
        monkeypatch.setenv("RANK", "1")
        with output_lock(out):  # rank 1 of job-a: shares it
            pass
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
        monkeypatch.setattr(run_lock, "RANK_WAIT_S", 0.2)
        waited = threading.Event()
        with pytest.raises(InputError, match="rank 0 of torchrun job job-b did not take the lock"):
            with output_lock(out):  # rank 1 of job-b: waits for its own rank 0, never runs beside job-a
                waited.set()
        assert not waited.is_set()


# -- every command: refused before it reads anything, nothing written ------------------------------------------

MISSING = "missing-input"  # relative to the test's folder: no such file


def commands(tmp: Path, out: Path) -> dict[str, list]:
    """Each command with inputs that do not exist: a run that got past the lock would fail naming one of them."""
    m = tmp / MISSING
    star = {"pre": m, "hard": m / "hard.npy", "init": m}
    return {
        "preprocess": ["preprocess.py", "--model_name_or_path", m, "--data_dir", m, "--out_dir", out],
        "star.inference": ["-m", "star.inference", "--data_type", "passage", "--mode", "dev", "--model_dir", m,
                           "--preprocess_dir", m, "--output_dir", out, "--no_cuda"],
        "star.prepare_hardneg": ["-m", "star.prepare_hardneg", "--data_type", "passage", "--mode", "train",
                                 "--model_dir", m, "--preprocess_dir", m, "--output_dir", out, "--no_cuda",
                                 "--not_faiss_cuda"],
        "star.train": ["-m", "star.train", *star_cli_args(star, out, "star", "--resume")],
        "adore.train": ["-m", "adore.train", *adore_cli_args(AdoreData(m, m / "emb", m), out, "--resume")],
        "adore.inference": ["-m", "adore.inference", "--model_dir", m, "--output_dir", out, "--preprocess_dir", m,
                            "--mode", "dev", "--dmemmap_path", m / "emb", "--no_cuda"],
        "cvt_back": ["cvt_back.py", "--input_dir", m, "--preprocess_dir", m, "--mode", "dev", "--output_dir", out,
                     "--dataset", "passage"],
        "results_table.py": ["results_table.py", "--root", m, "--out_dir", out],
    }


@pytest.mark.parametrize("command", list(commands(Path("."), Path("."))))
def test_every_command_refuses_a_busy_output_before_reading_anything(tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("an earlier output")
    holder = hold(out)
    try:
        result = run_cli(commands(tmp_path, out)[command])
    finally:
        stop(holder)
    line = assert_one_error(result, str(out), "another run is writing here",
                            f"pid {holder.pid} on host {socket.gethostname()}")
    assert MISSING not in line
    assert tree_hash(out, skip_tmp=False) == {"earlier.txt": tree_hash(out)["earlier.txt"]}


@pytest.mark.slow
def test_sharded_encoding_jobs_run_side_by_side_but_refuse_a_busy_shard(tmp_path):
    inputs = make_encoder_inputs(tmp_path / "in", n_docs=40)
    out = tmp_path / "out"
    holder = hold(out, shard=0)  # shard job 0 running
    try:
        run(star_inference_args(inputs, out) + ["--shard_id", "1", "--num_shards", "2"])
        assert_one_error(run_cli(star_inference_args(inputs, out) + ["--shard_id", "0", "--num_shards", "2"]),
                         "another run is writing here", f"pid {holder.pid}")
        assert_one_error(run_cli(star_inference_args(inputs, out)), "another run is writing here")
    finally:
        stop(holder)
    assert not (out / "dev.rank.tsv").exists()


START_ON_INPUT = """
import os, sys
sys.path.insert(0, os.getcwd())
from star import train
from infra.io import run_cli
print("ready", flush=True)
sys.stdin.readline()
run_cli(train.main, sys.argv[1:], torchrun=True)
"""


# -- the case: a second star.train --resume with another learning rate into a training folder ------------

@pytest.mark.slow
def test_second_training_into_a_busy_folder_never_runs(tmp_path):
    """star.train writes checkpoint-* into a folder; a second ``star.train --resume`` with another learning rate
    into the same folder, started meanwhile, is refused at once; the first ends as it would alone."""
    data = make_star_data(tmp_path / "data")

    def train(out: Path, lr: str) -> list:
        return ["-m", "star.train", *star_cli_args(data, out, "star", "--max_steps", "12", "--save_steps", "1",
                                                "--warmup_steps", "2", "--seed", "7", "--learning_rate", lr)]

    alone = tmp_path / "alone"
    run(train(alone, "1e-3"))
    out = tmp_path / "out"
    # the second command, its imports done, starts its run on a line on stdin: it tries while the first runs
    second = subprocess.Popen([sys.executable, "-c", START_ON_INPUT, *map(str, train(out, "5e-4")[2:]), "--resume"],
                              cwd=REPO, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    assert second.stdout.readline().strip() == "ready"
    first = subprocess.Popen([sys.executable, *map(str, train(out, "1e-3"))], cwd=REPO, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (out / "checkpoint-1").is_dir():
        assert first.poll() is None, first.stderr.read()[-3000:]
        time.sleep(0.01)
    _, stderr = second.communicate("start\n", timeout=120)
    assert first.poll() is None, "the first run ended before the second was refused: make it longer"
    assert_one_error(subprocess.CompletedProcess([], second.returncode, "", stderr), str(out),
                     "another run is writing here", f"pid {first.pid}")
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    assert tree_hash(out / "checkpoint-12") == tree_hash(alone / "checkpoint-12")
    assert not lock_file(out).exists()


@pytest.mark.slow
def test_torchrun_job_into_a_busy_folder_never_runs(tmp_path):
    """A 2-process star.inference job into a folder another run holds: the job fails with rank 0's refusal line
    (torchrun then ends rank 1, which waits for its job's lock) and writes nothing."""
    inputs = make_encoder_inputs(tmp_path / "in", n_docs=40)
    out = tmp_path / "out"
    holder = hold(out)
    try:
        result = run_cli(torchrun_args(2, *star_inference_args(inputs, out)))
    finally:
        stop(holder)
    assert result.returncode != 0
    refusals = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert refusals == [f"error: {out}: another run is writing here: pid {holder.pid} on host "
                        f"{socket.gethostname()}; wait for it to end or choose another output"], result.stderr[-3000:]
    assert not out.exists()


def test_second_reproduce_sh_on_a_task_folder_is_refused_before_any_stage(tmp_path):
    """reproduce.sh holds its task folder (ROOT = DATA/sample/passage) with the same lock file and record."""
    root = tmp_path / "sample" / "passage"
    holder = hold(root)
    try:
        result = subprocess.run(["bash", "reproduce.sh", "sample"], cwd=REPO, env={**ENV, "DATA": str(tmp_path)},
                                capture_output=True, text=True, timeout=120)
        written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    finally:
        stop(holder)
    assert_one_error(result, str(root), "another run is writing here", f"pid {holder.pid} on host")
    assert "===" not in result.stdout  # no stage started
    assert written == ["sample", "sample/.passage.lock"]  # the holder's lock, nothing else
