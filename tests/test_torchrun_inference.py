"""Encoding, mining and inference over several processes (gloo on the CPU): ``torchrun`` with 2 and 3 ranks, and
``--shard_id`` jobs, write the same files, byte for byte, as one process; a rank killed with SIGKILL mid-encoding
and the job restarted ends identical too."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import (ENV, QUERY_LEN, REPO, assert_one_error, hardneg_args, make_encoder_inputs, run, run_cli,
                     star_inference_args, torchrun_args, tree_hash)

TIMEOUT = 300


def torchrun(nproc: int, args: list) -> subprocess.Popen:
    """``torchrun`` with ``nproc`` processes of ``args`` (``-m MODULE ...``), started in the background from the
    repository root with one thread per process."""
    return subprocess.Popen([sys.executable, *torchrun_args(nproc, *args)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_torchrun(nproc: int, args: list) -> str:
    result = run_cli(torchrun_args(nproc, *args), timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_encoder_inputs(tmp_path_factory.mktemp("torchrun"))


@pytest.fixture(scope="module")
def one_process(inputs, tmp_path_factory):
    """star.inference and prepare_hardneg in one process: the reference files."""
    root = tmp_path_factory.mktemp("one_process")
    run(star_inference_args(inputs, root / "star"))
    run(hardneg_args(inputs, root / "hardneg"))
    return root


@pytest.mark.parametrize("nproc", [2, 3])
@pytest.mark.slow
def test_star_inference_under_torchrun_writes_the_files_of_one_process(inputs, one_process, tmp_path, nproc):
    err = run_torchrun(nproc, star_inference_args(inputs, tmp_path / "star"))
    assert tree_hash(tmp_path / "star") == tree_hash(one_process / "star")  # memmaps, manifests, rank file
    assert f"torchrun rank 0 of {nproc}" in err and "assembled from" in err


@pytest.mark.slow
def test_prepare_hardneg_under_torchrun_mines_the_negatives_of_one_process(inputs, one_process, tmp_path):
    run_torchrun(3, hardneg_args(inputs, tmp_path / "hardneg"))
    assert tree_hash(tmp_path / "hardneg") == tree_hash(one_process / "hardneg")


@pytest.mark.slow
def test_adore_inference_under_torchrun_ranks_like_one_process(inputs, one_process, tmp_path):
    docs = one_process / "star" / "passages.memmap"
    args = ["-m", "adore.inference", "--model_dir", inputs["model"], "--preprocess_dir", inputs["pre"], "--mode",
            "dev", "--dmemmap_path", docs, "--max_seq_length", QUERY_LEN, "--no_cuda", "--topk", 25,
            "--with_scores"]
    run([*args, "--output_dir", tmp_path / "one"])
    run_torchrun(2, [*args, "--output_dir", tmp_path / "two"])
    assert tree_hash(tmp_path / "two") == tree_hash(tmp_path / "one")


@pytest.mark.slow
def test_shard_jobs_then_a_final_run_write_the_files_of_one_process(inputs, one_process, tmp_path):
    out = tmp_path / "star"
    for shard in (1, 0):
        result = run([*star_inference_args(inputs, out), "--shard_id", shard, "--num_shards", 2])
        assert "shard %d of 2 of the corpus encoded" % shard in result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "passages.memmap.shard-0-of-2", "passages.memmap.shard-0-of-2.manifest.json",
        "passages.memmap.shard-1-of-2", "passages.memmap.shard-1-of-2.manifest.json"]
    run(star_inference_args(inputs, out))
    assert tree_hash(out) == tree_hash(one_process / "star")


def worker_pids(launcher: int) -> dict[int, int]:
    """``{rank: pid}`` of torchrun's worker processes (the children of its agent, with RANK in their environment)."""
    found = {}
    for pid in _descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks = [int(v[5:]) for v in environ if v.startswith(b"RANK=")]
        if ranks:
            found[ranks[0]] = pid
    return found


def _descendants(pid: int) -> list[int]:
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return children + [d for c in children for d in _descendants(c)]


@pytest.mark.slow
def test_a_rank_killed_mid_encoding_resumes_its_share_and_the_job_ends_identical(tmp_path):
    """12,000 passages in blocks of 4,096 rows: rank 1 is killed once its shard has a finished block and no more,
    torchrun stops the job; the restarted job resumes each shard and ends with one process's bytes."""
    inputs = make_encoder_inputs(tmp_path / "data", n_docs=12000)
    args = star_inference_args(inputs, tmp_path / "killed")
    job = torchrun(2, args)
    shard_manifest = tmp_path / "killed" / "passages.memmap.shard-1-of-2.manifest.json"
    deadline = time.monotonic() + TIMEOUT
    killed = False
    while job.poll() is None and time.monotonic() < deadline:
        if shard_manifest.is_file() and '"completed_rows": 0,' not in shard_manifest.read_text():
            os.kill(worker_pids(job.pid)[1], signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    job.communicate(timeout=TIMEOUT)
    assert killed and job.returncode != 0, "the job ended before rank 1 finished its first block"
    assert '"complete": false' in shard_manifest.read_text()
    run_torchrun(2, args)
    run(star_inference_args(inputs, tmp_path / "one"))
    assert tree_hash(tmp_path / "killed") == tree_hash(tmp_path / "one")
    assert np.fromfile(tmp_path / "one" / "passages.memmap", np.float32).size == 12000 * 16


TORCHRUN_RANK_1 = dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999")


@pytest.mark.parametrize("extra, env, needle", [
    (["--shard_id", 1], {}, "--shard_id and --num_shards go together"),
    (["--shard_id", 2, "--num_shards", 2], {}, "--shard_id must be below --num_shards 2"),
    (["--shard_id", 0, "--num_shards", 2], TORCHRUN_RANK_1, "under torchrun the ranks are the shards"),
])
@pytest.mark.slow
def test_inconsistent_sharding_flags_are_refused(inputs, tmp_path, extra, env, needle):
    assert_one_error(run_cli([*star_inference_args(inputs, tmp_path / "out"), *extra], env=env), needle)
    assert not (tmp_path / "out").exists()
