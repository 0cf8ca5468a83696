"""Crash safety of the long stages: the real CLI is started as a subprocess on tiny data, killed with SIGKILL at a
seeded random point of its progress, then rerun (``--overwrite``, which reuses/resumes matching embedding memmaps
through their manifests; ``--resume`` for training).  Checked: right after the kill every final output name is
either absent or identical to the uninterrupted run's (an embedding memmap may exist while its manifest says
``complete: false`` — that is its resume state, never taken for a finished file), and after the rerun all outputs
are byte-identical to the uninterrupted run's (training: equal parameters and optimizer state).

Kill points follow the run's progress, not the wall clock from the start (start-up — importing torch — takes most
of a tiny run, and a loaded machine stretches it): encoding/preprocessing are killed a seeded fraction of the
measured work window after their first output appears, training a seeded fraction of a step after a seeded
``checkpoint-<k>`` appears.  Each test also checks that the kill landed before the run was done.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from helpers import (BERT_VOCAB, ENV, REPO, adore_cli_args, hardneg_args, load_weights, make_adore_data,
                     make_encoder_inputs, make_star_data, run, star_cli_args, star_inference_args, tree_hash,
                     write_files)

SEEDS = [0, 1]
POLL_S = 0.002
# big enough that the work after start-up lasts ~1-2 s on one thread: several 4096-row encoding blocks
N_ENCODED_DOCS, N_COLLECTION = 12_000, 40_000


def _entries(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def _start(args: list, log: Path) -> subprocess.Popen:
    with open(log, "w") as stderr:
        return subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=stderr)


def watch_run(args: list, out: Path, log: Path, timeout: float = 300) -> dict[str, float]:
    """Run the CLI uninterrupted; return when each top-level name under ``out`` first appeared (seconds)."""
    start = time.monotonic()
    proc, seen = _start(args, log), {}
    while proc.poll() is None:
        now = time.monotonic() - start
        for name in _entries(out):
            seen.setdefault(name, now)
        assert now < timeout, "the uninterrupted run timed out"
        time.sleep(POLL_S)
    assert proc.returncode == 0, log.read_text()[-3000:]
    return seen


def kill_when(args: list, log: Path, ready: Callable[[], bool], delay: float, timeout: float = 300) -> bool:
    """Start the CLI, wait until ``ready()`` (progress seen on disk), wait ``delay`` seconds more, SIGKILL it.
    Returns False (nothing killed) when the run finished first."""
    start = time.monotonic()
    proc = _start(args, log)
    while not ready():
        if proc.poll() is not None:
            assert proc.returncode == 0, log.read_text()[-3000:]
            return False
        assert time.monotonic() - start < timeout, "the kill point was never reached"
        time.sleep(POLL_S)
    time.sleep(delay)
    if proc.poll() is not None:
        assert proc.returncode == 0, log.read_text()[-3000:]
        return False
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    return True


def assert_nothing_half_written(out: Path, reference: dict) -> None:
    """Each final name is absent or complete; an embedding memmap with a not-complete manifest is resume state."""
    found = tree_hash(out)
    for name, digest in found.items():
        assert name in reference, f"unexpected file {name}"
        if f"{name}.manifest.json" in reference:  # an embedding memmap: its manifest says how far it got
            manifest = out / f"{name}.manifest.json"
            assert manifest.exists(), f"{name} without its manifest"
            if not json.loads(manifest.read_text())["complete"]:
                continue
        if name.endswith(".manifest.json"):
            continue  # a manifest records progress; its final state is compared after the rerun
        assert digest == reference[name], f"{name} exists under its final name but differs from a complete run"


def crash_and_resume(tmp_path: Path, make_args, seed: int, reference_runs: dict) -> None:
    """Kill at a seeded point of the work window (first output appears → last final output appears) of a
    measured uninterrupted run, check, rerun with ``--overwrite``, compare byte for byte."""
    key = make_args.__name__
    if key not in reference_runs:
        ref_out = tmp_path.parent / f"ref-{key}"
        seen = watch_run(make_args(ref_out), ref_out, tmp_path.parent / f"ref-{key}.log")
        finished = max(t for name, t in seen.items() if ".tmp-" not in name)
        reference_runs[key] = (tree_hash(ref_out), finished - min(seen.values()))
    reference, window = reference_runs[key]
    assert window > 0.3, f"the work window ({window:.2f} s) is too short to kill inside: make the input larger"
    delay = random.Random(seed).uniform(0.15, 0.6) * window
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        if kill_when(make_args(out), tmp_path / f"killed{attempt}.log", lambda: bool(_entries(out)), delay) \
                and tree_hash(out) != reference:
            break
        delay /= 2  # this run went faster than the measured one (load changed): kill earlier
    else:
        pytest.fail("three kills in a row landed after the run had written everything: make the input larger")
    assert_nothing_half_written(out, reference)
    run(make_args(out) + ["--overwrite"])
    assert tree_hash(out, skip_tmp=False) == reference  # equal, and the killed run's temporaries are gone


# -- training: kill a seeded fraction of a step after a seeded checkpoint-<k> appeared ---------------------------

def step_seconds(seen: dict[str, float], total: int) -> float:
    """Mean time per step (checkpoint every step) of a watched uninterrupted run."""
    return (seen[f"checkpoint-{total}"] - seen["checkpoint-1"]) / (total - 1)


def kill_training(args: list, out: Path, log: Path, total: int, step_s: float, seed: int) -> int:
    """Kill the run at a seeded point of step k+1, k a seeded step in 20-70 % of ``total``; returns k."""
    rng = random.Random(seed)
    target = rng.randint(max(1, round(0.2 * total)), round(0.7 * total))
    assert kill_when(args, log, lambda: (out / f"checkpoint-{target}").is_dir(), rng.uniform(0.0, 1.0) * step_s), \
        "the run finished before the kill: make it longer"
    assert not (out / f"checkpoint-{total}").exists(), "the kill landed after the last step"
    return target


# -- preprocess ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def preprocess_data(tmp_path_factory, bert_dir):
    rng = random.Random(3)
    words = BERT_VOCAB[5:]
    collection = "".join(f"{pid}\t{' '.join(rng.choices(words, k=rng.randint(0, 30)))}\n"
                         for pid in rng.sample(range(10**6), N_COLLECTION))
    pids = [int(line.split("\t")[0]) for line in collection.splitlines()]
    queries = "".join(f"{q}\t{' '.join(rng.choices(words, k=3))}\n" for q in range(300))
    qrels = "".join(f"{q}\t0\t{rng.choice(pids)}\t1\n" for q in range(300))
    data = write_files(tmp_path_factory.mktemp("faults") / "dataset", {
        "collection.tsv": collection.encode(), "queries.train.tsv": queries.encode(),
        "qrels.train.tsv": qrels.encode()})
    return data, bert_dir


@pytest.fixture(scope="module")
def reference_runs():
    return {}


@pytest.mark.parametrize("seed", SEEDS[:1])
@pytest.mark.slow
def test_preprocess_killed_and_rerun_gives_identical_files(tmp_path, preprocess_data, reference_runs, seed):
    data, tokenizer = preprocess_data

    def preprocess_cli(out):
        return ["preprocess.py", "--model_name_or_path", tokenizer, "--data_dir", data, "--out_dir", out,
                "--max_seq_length", "24", "--threads", "1"]

    crash_and_resume(tmp_path, preprocess_cli, seed, reference_runs)


# -- corpus encoding (star/inference.py) and hard-negative mining (star/prepare_hardneg.py) -------------------

@pytest.fixture(scope="module")
def encoder_inputs(tmp_path_factory):
    return make_encoder_inputs(tmp_path_factory.mktemp("encoder"), n_docs=N_ENCODED_DOCS)


@pytest.mark.parametrize("seed", SEEDS[:1])
@pytest.mark.slow
def test_star_inference_killed_and_resumed_gives_identical_files(tmp_path, encoder_inputs, reference_runs, seed):
    def star_inference(out):
        return star_inference_args(encoder_inputs, out)

    crash_and_resume(tmp_path, star_inference, seed, reference_runs)


@pytest.mark.parametrize("seed", SEEDS[1:])
@pytest.mark.slow
def test_prepare_hardneg_killed_and_resumed_gives_identical_files(tmp_path, encoder_inputs, reference_runs, seed):
    def prepare_hardneg(out):
        return hardneg_args(encoder_inputs, out)

    crash_and_resume(tmp_path, prepare_hardneg, seed, reference_runs)


# -- training: STAR (star/train.py) and ADORE (adore/train.py), rerun with --resume --------------------------------

TRAINING_FOLDER = re.compile(r"(checkpoint|epoch)-\d+")


def _same(a, b, where: str) -> None:
    """Recursive equality of loaded trainer states (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def assert_same_training_folder(folder: Path, reference: Path) -> None:
    """A checkpoint-<k>/epoch-<k> folder is complete and equal to the uninterrupted run's: the same files, equal
    parameters (torch.equal) and, for a checkpoint, an equal optimizer/scheduler/RNG state."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in reference.iterdir()), folder
    straight, resumed = load_weights(reference), load_weights(folder)
    assert straight.keys() == resumed.keys(), folder
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), (folder.name, key)
    if (reference / "trainer_state.pt").exists():
        load = lambda f: torch.load(f / "trainer_state.pt", map_location="cpu", weights_only=True)  # noqa: E731
        _same(load(reference), load(folder), f"{folder.name}/trainer_state.pt")


def assert_complete_or_absent(out: Path, reference: Path) -> None:
    """After a kill: every checkpoint-<k>/epoch-<k> under its final name is complete and equal to the reference;
    anything else is a temporary folder whose name can never be taken for a complete one."""
    for folder in out.iterdir():
        if TRAINING_FOLDER.fullmatch(folder.name):
            assert_same_training_folder(folder, reference / folder.name)
        else:
            assert folder.name == "log" or re.search(r"\.(tmp|old)-\d+$", folder.name), folder.name


@pytest.mark.slow
def test_star_train_killed_and_resumed_equals_uninterrupted(tmp_path):
    """CPU, fixed seed, dropout on, a checkpoint every step: kill a --resume run, rerun the same command, same final
    parameters."""
    data, total = make_star_data(tmp_path / "data"), 24

    def train(out):
        return ["-m", "star.train", *star_cli_args(data, out, "star", "--max_steps", str(total), "--save_steps", "1",
                                                "--warmup_steps", "4", "--seed", "7")]

    straight = tmp_path / "straight"
    seen = watch_run(train(straight), straight, tmp_path / "straight.log")
    out = tmp_path / "resumed"
    kill_training(train(out) + ["--resume"], out, tmp_path / "killed.log", total, step_seconds(seen, total), seed=5)
    assert not (out / "model.safetensors").exists()  # the final model comes after the last checkpoint
    assert_complete_or_absent(out, straight)
    run(train(out) + ["--resume"])
    assert not [p for p in out.iterdir() if ".tmp-" in p.name or ".old-" in p.name]  # temporaries removed
    straight_weights, resumed = load_weights(straight), load_weights(out)
    assert straight_weights.keys() == resumed.keys()
    for key in straight_weights:
        assert torch.equal(straight_weights[key], resumed[key]), key


ADORE_EPOCHS, ADORE_STEPS_PER_EPOCH = 20, 3  # 12 queries, 2 per micro-batch, 2 micro-batches per step


@pytest.fixture(scope="module")
def adore_reference(tmp_path_factory):
    """Tiny ADORE inputs (tests/test_adore_train.py) and an uninterrupted, watched run: dropout on, a checkpoint
    every step, gradient accumulation, 60 steps over 20 epochs (an epoch-<k> folder every 3 steps)."""
    root = tmp_path_factory.mktemp("adore_faults")
    data = make_adore_data(root / "data")

    def train(out: Path) -> list:
        return ["-m", "adore.train", *adore_cli_args(
            data, out, "--num_train_epochs", str(ADORE_EPOCHS), "--save_steps", "1", "--seed", "7",
            "--gradient_accumulation_steps", "2", batch=2)]

    straight = root / "straight"
    seen = watch_run(train(straight), straight, root / "straight.log")
    return train, straight, step_seconds(seen, ADORE_EPOCHS * ADORE_STEPS_PER_EPOCH)


@pytest.mark.parametrize("seed", SEEDS[:1])
@pytest.mark.slow
def test_adore_train_killed_and_resumed_equals_uninterrupted(tmp_path, adore_reference, seed):
    """Kill ADORE training mid-run, rerun the same command with --resume: every checkpoint-<k> and epoch-<k>
    folder equals the uninterrupted run's (parameters, optimizer, scheduler and RNG state), and the killed
    run's temporary folders are gone."""
    train, straight, step_s = adore_reference
    total = ADORE_EPOCHS * ADORE_STEPS_PER_EPOCH
    out = tmp_path / "resumed"
    kill_training(train(out) + ["--resume"], out, tmp_path / "killed.log", total, step_s, seed)
    assert_complete_or_absent(out, straight)
    run(train(out) + ["--resume"])
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in straight.iterdir())  # no *.tmp-<pid> left behind
    for name in names:
        if name != "log":
            assert_same_training_folder(out / name, straight / name)


KILL_INSIDE_SAVE = r"""
import os, signal, sys
from pathlib import Path
import model
from adore import train as adore_train
from infra.io import run_cli
prefix, real_save = sys.argv[1], model.DenseEncoder.save_pretrained
def save_pretrained(self, path):
    real_save(self, path)
    if Path(path).name.startswith(prefix):  # checkpoint-<k>/epoch-<k> or its temporary name: weights written
        os.kill(os.getpid(), signal.SIGKILL)
model.DenseEncoder.save_pretrained = save_pretrained
run_cli(adore_train.main, sys.argv[2:])
"""


@pytest.mark.parametrize("folder", ["checkpoint-6", "epoch-2"])
@pytest.mark.slow
def test_adore_train_killed_at_an_epoch_end_save(tmp_path, adore_reference, folder):
    """SIGKILL exactly at the end of epoch 2 (step 6), inside the save of checkpoint-6 or of epoch-2, right after
    the model weights are written (whichever order the trainer writes the two in, one case falls between them):
    no half-written folder under a final name, and the rerun with --resume ends with every folder, epoch-2
    included, equal to the uninterrupted run's and the killed run's temporary folder removed."""
    train, straight, _ = adore_reference
    kill_step = 2 * ADORE_STEPS_PER_EPOCH
    out = tmp_path / "resumed"
    args = train(out)[2:] + ["--resume"]  # without "-m adore.train"
    result = subprocess.run([sys.executable, "-c", KILL_INSIDE_SAVE, folder, *map(str, args)], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert (out / f"checkpoint-{kill_step - 1}").is_dir() and not (out / f"checkpoint-{kill_step}").exists()
    assert_complete_or_absent(out, straight)
    assert not (out / folder).exists() and list(out.glob(f"{folder}.tmp-*"))  # only under its temporary name
    run(train(out) + ["--resume"])
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in straight.iterdir())
    for name in names:
        if name != "log":
            assert_same_training_folder(out / name, straight / name)
