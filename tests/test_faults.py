"""Crash safety of the long stages: the real CLI is started as a subprocess on tiny data, killed with SIGKILL at a
seeded random point of a measured uninterrupted run, then rerun (with ``--overwrite``, which reuses/resumes
matching embedding memmaps through their manifests).  Checked: right after the kill every final output name is
either absent or byte-identical to the uninterrupted run's (an embedding memmap may exist while its manifest says
``complete: false`` — that is its resume state, never taken for a finished file), and after the rerun all outputs
are byte-identical to the uninterrupted run's.
"""
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fault_helpers import ENV, REPO, hardneg_args, make_encoder_inputs, run, star_inference_args, tree_hash
from test_star_train import cli_args, load_weights, make_data
from test_preprocess import BERT_VOCAB, bert_dir, write_files  # noqa: F401  (bert_dir is a fixture)

SEEDS = [0, 1]


def kill_at(args: list, delay: float) -> None:
    """Start the CLI, SIGKILL it after ``delay`` seconds; fail if it had already finished (no fault injected)."""
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(delay)
    assert proc.poll() is None, "the run finished before the kill: make the input larger"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


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
    key = make_args.__name__
    if key not in reference_runs:
        ref_out = tmp_path.parent / f"ref-{key}"
        start = time.monotonic()
        run(make_args(ref_out))
        reference_runs[key] = (tree_hash(ref_out), time.monotonic() - start)
    reference, duration = reference_runs[key]
    out = tmp_path / "out"
    kill_at(make_args(out), random.Random(seed).uniform(0.1, 0.4) * duration)
    assert_nothing_half_written(out, reference)
    run(make_args(out) + ["--overwrite"])
    assert tree_hash(out) == reference


# -- preprocess ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def preprocess_data(tmp_path_factory, bert_dir):
    rng = random.Random(3)
    words = BERT_VOCAB[5:]
    collection = "".join(f"{pid}\t{' '.join(rng.choices(words, k=rng.randint(0, 30)))}\n"
                         for pid in rng.sample(range(10**6), 4000))
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
def test_preprocess_killed_and_rerun_gives_identical_files(tmp_path, preprocess_data, reference_runs, seed):
    data, tokenizer = preprocess_data

    def preprocess_cli(out):
        return ["preprocess.py", "--model_name_or_path", tokenizer, "--data_dir", data, "--out_dir", out,
                "--max_seq_length", "24", "--threads", "1"]

    crash_and_resume(tmp_path, preprocess_cli, seed, reference_runs)


# -- corpus encoding (star/inference.py) and hard-negative mining (star/prepare_hardneg.py) -------------------

@pytest.fixture(scope="module")
def encoder_inputs(tmp_path_factory):
    return make_encoder_inputs(tmp_path_factory.mktemp("encoder"))


@pytest.mark.parametrize("seed", SEEDS[:1])
def test_star_inference_killed_and_resumed_gives_identical_files(tmp_path, encoder_inputs, reference_runs, seed):
    def star_inference(out):
        return star_inference_args(encoder_inputs, out)

    crash_and_resume(tmp_path, star_inference, seed, reference_runs)


@pytest.mark.parametrize("seed", SEEDS[1:])
def test_prepare_hardneg_killed_and_resumed_gives_identical_files(tmp_path, encoder_inputs, reference_runs, seed):
    def prepare_hardneg(out):
        return hardneg_args(encoder_inputs, out)

    crash_and_resume(tmp_path, prepare_hardneg, seed, reference_runs)


# -- STAR training (star/train.py): rerun with --resume ---------------------------------------------------------

def test_star_train_killed_and_resumed_equals_uninterrupted(tmp_path):
    """CPU, fixed seed, dropout on, a checkpoint every step: kill, rerun with --resume, same final parameters."""
    data = make_data(tmp_path / "data")

    def train(out):
        return ["-m", "star.train", *cli_args(data, out, "star", "--max_steps", "12", "--save_steps", "1",
                                                "--warmup_steps", "4", "--seed", "7")]

    start = time.monotonic()
    run(train(tmp_path / "straight"))
    duration = time.monotonic() - start
    out = tmp_path / "resumed"
    kill_at(train(out), random.Random(5).uniform(0.25, 0.5) * duration)
    for folder in out.glob("checkpoint-*"):  # a checkpoint folder under its final name is complete
        assert (folder / "model.safetensors").is_file() and ".tmp" not in folder.name
    if (out / "model.safetensors").exists():  # the final model is renamed into place only when complete
        assert load_weights(out).keys() == load_weights(tmp_path / "straight").keys()
    run(train(out) + ["--resume"])
    straight, resumed = load_weights(tmp_path / "straight"), load_weights(out)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
