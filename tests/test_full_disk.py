"""A full disk (issue #22), as the file-size limit RLIMIT_FSIZE makes it (a write past the limit fails with EFBIG,
as one past a full disk fails with ENOSPC): while writing embeddings, a rank file, hard negatives and a checkpoint,
the real CLI stops with one line naming the file it was writing and exit status 2, leaves nothing half-written
under a final name (only an embedding memmap's resume state, which its manifest marks incomplete), keeps the
earlier outputs and checkpoints byte for byte, and the rerun without the limit ends equal to an uninterrupted run."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (N_QUERIES, assert_one_error, hardneg_args, load_weights, make_encoder_inputs, make_star_data,
                     run, run_cli, star_cli_args, star_inference_args, tree_hash)

SAVE_UNDER_LIMIT = """
import resource, sys
import numpy as np
from infra.io import atomic_save_npy
resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))
atomic_save_npy(sys.argv[1], np.zeros((12, 5), np.int32))  # 128 + 240 bytes
"""


def test_a_save_cut_short_is_an_error_naming_the_file_not_a_short_file(tmp_path):
    """numpy's tofile ignores a write cut short (the file ends at the limit, no error): atomic_save_npy checks the
    size and fails naming the file, and nothing is left under the final name."""
    import subprocess
    import sys

    from helpers import ENV, REPO

    path = tmp_path / "hard.npy"
    result = subprocess.run([sys.executable, "-c", SAVE_UNDER_LIMIT, str(path)], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "OSError: [Errno 28] no room to write it" in result.stderr, result.stderr
    assert f"'{path}'" in result.stderr
    assert list(tmp_path.iterdir()) == []


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """make_encoder_inputs (600 passages of dimension 16: 38 400 bytes of embeddings) with official ids and a
    20-deep run file of the train queries for prepare_hardneg --run_file."""
    root = tmp_path_factory.mktemp("full_disk")
    inputs = make_encoder_inputs(root)
    pids, qids = np.arange(600, dtype=np.int64) + 7000, np.arange(N_QUERIES, dtype=np.int64) + 100
    np.save(inputs["pre"] / "passages_ids.npy", pids)
    np.save(inputs["pre"] / "train-query_ids.npy", qids)
    inputs["run"] = root / "train.run.tsv"
    inputs["run"].write_text("".join(f"{qid}\t{pids[(7 * q + 13 * j) % 600]}\t{j + 1}\n"
                                     for q, qid in enumerate(qids) for j in range(20)))
    reference = root / "reference"
    run(star_inference_args(inputs, reference))
    inputs["reference"] = reference
    return inputs


@pytest.mark.slow
def test_full_disk_while_writing_embeddings(inputs, tmp_path):
    out = tmp_path / "out"
    result = run_cli(star_inference_args(inputs, out), fsize=20_000)
    assert_one_error(result, f"{out / 'passages.memmap'}: no room to write it (File too large)")
    reference = tree_hash(inputs["reference"])
    found = tree_hash(out, skip_tmp=False)
    assert '"complete": false' in (out / "passages.memmap.manifest.json").read_text()  # resume state
    resume_state = {"passages.memmap", "passages.memmap.manifest.json"}
    assert {name for name in found if found[name] != reference.get(name)} == resume_state  # the rest is complete
    run(star_inference_args(inputs, out) + ["--overwrite"])
    assert tree_hash(out, skip_tmp=False) == tree_hash(inputs["reference"])


@pytest.mark.slow
def test_full_disk_while_writing_the_rank_file(inputs, tmp_path):
    """The embeddings are reused (complete, manifest matches); the new rank file does not fit: the earlier one
    stays."""
    out = tmp_path / "out"
    shutil.copytree(inputs["reference"], out)
    before = tree_hash(out, skip_tmp=False)
    assert (out / "dev.rank.tsv").stat().st_size > 500
    result = run_cli(star_inference_args(inputs, out) + ["--overwrite"], fsize=500)
    assert_one_error(result, f"{out / 'dev.rank.tsv'}: no room to write it")
    assert tree_hash(out, skip_tmp=False) == before
    run(star_inference_args(inputs, out) + ["--overwrite"])
    assert tree_hash(out, skip_tmp=False) == tree_hash(inputs["reference"])


@pytest.mark.slow
def test_full_disk_while_writing_hard_negatives(inputs, tmp_path):
    """prepare_hardneg --run_file: hard_qids.npy (224 bytes) fits under 300 bytes, hard.npy (368) does not."""
    def mine(out: Path) -> list:
        return [*hardneg_args(inputs, out), "--run_file", inputs["run"]]

    reference = tmp_path / "reference"
    run(mine(reference))
    assert (reference / "hard.npy").stat().st_size > 300 >= (reference / "hard_qids.npy").stat().st_size
    out = tmp_path / "out"
    assert_one_error(run_cli(mine(out), fsize=300), f"{out / 'hard.npy'}: no room to write it")
    assert not (out / "hard.npy").exists() and no_temporaries(out)
    run(mine(out) + ["--overwrite"])
    assert tree_hash(out, skip_tmp=False) == tree_hash(reference)


@pytest.mark.slow
def test_full_disk_while_writing_a_checkpoint(tmp_path):
    """star.train stopped after checkpoint-6, resumed under a limit below the weights' size: checkpoint-9 cannot
    be written — one line naming it, checkpoint-3 and -6 intact, no temporary folder; the rerun with --resume ends
    with the uninterrupted run's weights."""
    data = make_star_data(tmp_path / "data")

    def train(out: Path, *extra: str) -> list:
        return ["-m", "star.train", *star_cli_args(data, out, "star", "--max_steps", "12", "--save_steps", "3",
                                                "--warmup_steps", "2", "--seed", "7", *extra)]

    straight = tmp_path / "straight"
    run(train(straight))
    weights_size = (straight / "checkpoint-3" / "model.safetensors").stat().st_size
    out = tmp_path / "out"
    run(train(out, "--stop_after_steps", "6"))
    before = tree_hash(out)
    result = run_cli(train(out, "--resume"), fsize=weights_size - 1)
    assert_one_error(result, f"{out / 'checkpoint-9'}: no room to write it")
    assert not (out / "checkpoint-9").exists() and no_temporaries(out)
    assert {k: v for k, v in tree_hash(out).items() if k.startswith("checkpoint-")} == \
           {k: v for k, v in before.items() if k.startswith("checkpoint-")}
    run(train(out, "--resume"))
    expected, got = load_weights(straight), load_weights(out)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
