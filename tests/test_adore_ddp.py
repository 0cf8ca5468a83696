"""adore/train.py under torchrun (gloo, CPU; issue #13): W processes with --per_gpu_batch_size B train like one
process with B·W — the same TensorBoard scalars and weights within 1e-5 — for 2 processes and for 3 (an uneven
split: 61 documents over 3 shards, the last global batch of 5 queries split 2/2/1, K above a shard's rows, the
tensor index); a rank killed with SIGKILL after the first checkpoint and the job rerun with --resume ends with the
uninterrupted run's folders bit for bit; a configuration that cannot be right under torchrun is refused with one
line before anything is written.

Dropout is off in these models: one process and W processes draw other dropout masks (the RNG streams depend on
the layout), so with dropout the runs differ by design.  Documents 10, 5 and 25 are copied onto rows of other
shards (40, 50, 55): equal scores across shards, which the merge must order by id as one process does.
"""
from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (adore_cli_args, assert_one_error, kill_rank_script, load_weights, make_adore_sized_data,
                     read_scalars, run_cli, torchrun_args, tree_hash)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

N_QUERIES, N_DOCS = 14, 61
DUPLICATES = ((10, 40), (5, 50), (25, 55))
TRAIN = ("-m", "adore.train")  # as `torchrun --nproc_per_node N -m adore.train ...` from the repository root
# 5e-3 without warm-up: the weights move far enough for the retrieved top K to change during the run, and the
# gradient norms (1.4-5) are above --max_grad_norm 1: the clipping after every backward is active
COMMON = ("--learning_rate", "5e-3", "--warmup_steps", "0", "--num_train_epochs", "2")
# per layout: (processes, per-process batch, extra flags); 14 queries
LAYOUTS = {
    # global batch 4: 4+4+4+2 queries per epoch, 2 micro-batches per step (clipping between them): 4 steps
    2: (2, ("--gradient_accumulation_steps", "2", "--save_steps", "1")),
    # global batch 9: 9 + 5 (split 2/2/1) per epoch: 4 steps; shards of 21/20/20 rows < K 25; tensor index
    3: (3, ("--neg_topk", "25", "--index_backend", "tensor")),
}
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_adore_sized_data(tmp_path_factory.mktemp("adore_ddp"), N_QUERIES, N_DOCS, dropout=0.0,
                                 duplicates=DUPLICATES)


def torchrun(nproc: int, command: tuple, args: list, timeout: int = 240):
    return run_cli(torchrun_args(nproc, *command, *args), timeout=timeout)


def train_args(data, out: Path, world: int, batch_scale: int = 1) -> list:
    batch, extra = LAYOUTS[world]
    return adore_cli_args(data, out, *COMMON, *extra, batch=batch * batch_scale)


@pytest.fixture(scope="module")
def two_processes(data, tmp_path_factory):
    """The uninterrupted 2-process run (also the reference of the kill test)."""
    out = tmp_path_factory.mktemp("two") / "out"
    result = torchrun(2, TRAIN, train_args(data, out, 2))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def without_effect(name: str) -> bool:
    """The attention key biases: softmax is invariant to the shift q·b_k they add to a query's scores, so their
    exact gradient is 0 and they never change an output; the computed gradient is rounding noise (1e-12 to 1e-9),
    which Adam's normalisation turns into updates up to the learning rate, different in every layout."""
    return name.endswith("attention.self.key.bias")


def max_weight_difference(a: Path, b: Path) -> float:
    """The largest |difference| between the weights of two model folders (the key biases aside)."""
    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa if not without_effect(k))


def assert_trains_like_one_process(data, distributed: Path, tmp_path: Path, world: int) -> None:
    from adore import train as adore_train

    one = tmp_path / "one"
    adore_train.main(train_args(data, one, world, batch_scale=world))
    assert sorted(p.name for p in distributed.iterdir()) == sorted(p.name for p in one.iterdir())
    assert len(list((distributed / "log").glob("events.out.tfevents.*"))) == 1  # rank 0 only
    ref, got = read_scalars(one / "log"), read_scalars(distributed / "log")
    assert sorted(got) == sorted(ref) == ["lr", "train/all_loss", "train/mrr_10", "train/recall_10"]
    assert [s for s, _ in got["train/all_loss"]] == [1, 2, 3, 4]
    for tag in ref:
        np.testing.assert_allclose([v for _, v in got[tag]], [v for _, v in ref[tag]], rtol=TOLERANCE,
                                   atol=TOLERANCE, err_msg=tag)
    # the retrieval changed during the run (the ranks depend on the encoder being trained)
    assert len({round(v, 6) for _, v in ref["train/mrr_10"]}) > 1
    init = load_weights(data.init)
    for folder in sorted(p.name for p in one.iterdir() if p.name != "log"):
        difference = max_weight_difference(distributed / folder, one / folder)
        print(f"{world} processes, {folder}: max |weight difference| {difference:.3g}")
        assert difference <= TOLERANCE, folder
    last = load_weights(one / "checkpoint-4")
    assert max((last[k] - init[k]).abs().max().item() for k in init) > 1000 * TOLERANCE  # the weights moved


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_the_global_batch(data, two_processes, tmp_path):
    assert_trains_like_one_process(data, two_processes, tmp_path, 2)


@pytest.mark.slow
def test_three_processes_with_uneven_shards_and_batches_train_like_one_process(data, tmp_path):
    out = tmp_path / "three"
    result = torchrun(3, TRAIN, train_args(data, out, 3))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_trains_like_one_process(data, out, tmp_path, 3)


@pytest.mark.slow
def test_rank_killed_after_a_checkpoint_and_job_resumed_equals_uninterrupted(data, two_processes, tmp_path):
    """Rank 1 is SIGKILLed right after checkpoint-1 (mid-epoch); torchrun ends rank 0; the same job rerun with
    --resume ends with every checkpoint-<k> and epoch-<k> folder equal to the uninterrupted run's, bit for bit
    (model, optimizer, schedule, per-rank RNG states and data position restored)."""
    script = kill_rank_script(tmp_path, "adore")
    out = tmp_path / "resumed"
    args = train_args(data, out, 2)
    killed = torchrun(2, (script,), ["1", *args])
    assert killed.returncode != 0
    assert f"exitcode  : {-signal.SIGKILL}" in killed.stderr  # torchrun's report: rank 1 died by SIGKILL
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "log"]
    resumed = torchrun(2, TRAIN, [*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in two_processes.iterdir())
    for name in names:
        if name == "log":
            continue
        straight, again = load_weights(two_processes / name), load_weights(out / name)
        for key in straight:
            assert torch.equal(straight[key], again[key]), (name, key)
        if name.startswith("checkpoint-"):
            ref = torch.load(two_processes / name / "trainer_state.pt", weights_only=True)
            got = torch.load(out / name / "trainer_state.pt", weights_only=True)
            assert got["extra"] == ref["extra"] and got["world_size"] == 2
            for a, b in zip(ref["optimizer"]["state"].values(), got["optimizer"]["state"].values()):
                assert all(torch.equal(a[k], b[k]) for k in a), name
    # the resumed steps log the uninterrupted run's losses (step 1's event is hidden by the resume's purge_step)
    ref = dict(read_scalars(two_processes / "log")["train/all_loss"])
    got = read_scalars(out / "log")["train/all_loss"]
    assert [s for s, _ in got][-3:] == [2, 3, 4] and all(v == ref[s] for s, v in got)


@pytest.mark.parametrize("flags, needle", [
    (["--faiss_gpu_index", "0"], "--faiss_gpu_index cannot be used under torchrun (2 processes)"),
    (["--model_gpu_index", "1"], "--model_gpu_index cannot be used under torchrun (2 processes)"),
    (["--model_device", "cuda:1"], "--model_device cuda:N cannot be used under torchrun (2 processes)"),
])
def test_torchrun_refuses_what_cannot_be_right_before_any_work(data, tmp_path, monkeypatch, capsys, flags, needle):
    """As rank 1 of a 2-process torchrun job would see it: one error line, exit status 2, nothing written, no
    process group joined (the other rank refuses alike)."""
    import subprocess

    from adore import train as adore_train
    from infra.io import run_cli as run_main

    out = tmp_path / "out"
    for name, value in dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_info:
        run_main(adore_train.main, adore_cli_args(data, out, *flags), torchrun=True)
    assert_one_error(subprocess.CompletedProcess([], exit_info.value.code, "", capsys.readouterr().err), needle)
    assert not out.exists()
    assert not torch.distributed.is_initialized()


def test_the_refusal_is_one_line_from_the_command(data, tmp_path):
    """The command itself in torchrun's environment (rank 0 of 2): --faiss_gpu_index is refused, nothing written."""
    out = tmp_path / "out"
    env = dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    before = tree_hash(data.pre)
    result = run_cli([*TRAIN, *adore_cli_args(data, out, "--faiss_gpu_index", "0")], env=env)
    assert_one_error(result, "--faiss_gpu_index cannot be used under torchrun", "CPU faiss")
    assert not out.exists() and tree_hash(data.pre) == before
