"""Same inputs and seed → identical outputs, run twice through the real CLIs (CPU, 1 thread):
preprocess files, embedding memmaps + rank file, mined hard negatives, and STAR training parameters."""
import pytest
import torch

from helpers import (TINY, hardneg_args, load_weights, make_encoder_inputs, make_star_data, run, star_cli_args,
                     star_inference_args, tree_hash, write_files)


@pytest.fixture(scope="module")
def encoder_inputs(tmp_path_factory):
    return make_encoder_inputs(tmp_path_factory.mktemp("det"))


@pytest.mark.slow
def test_preprocess_is_deterministic(tmp_path, bert_dir):
    data = write_files(tmp_path / "dataset", TINY)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        run(["preprocess.py", "--model_name_or_path", bert_dir, "--data_dir", data, "--out_dir", out,
             "--max_seq_length", "6", "--threads", "2"])
    first = tree_hash(outs[0])
    assert "passages.memmap" in first and first == tree_hash(outs[1])


@pytest.mark.parametrize("stage", [star_inference_args, hardneg_args], ids=["star_inference", "prepare_hardneg"])
@pytest.mark.slow
def test_encoding_and_mining_are_deterministic(tmp_path, encoder_inputs, stage):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        run(stage(encoder_inputs, out))
    first = tree_hash(outs[0])
    assert "passages.memmap" in first and first == tree_hash(outs[1])


@pytest.mark.slow
def test_star_training_parameters_are_deterministic(tmp_path):
    data = make_star_data(tmp_path / "data")
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        run(["-m", "star.train", *star_cli_args(data, out, "star", "--max_steps", "4", "--warmup_steps", "2",
                                            "--seed", "3")])
    a, b = (load_weights(out) for out in outs)
    init = load_weights(data["init"])
    assert any(not torch.equal(a[k], init[k]) for k in a)  # it trained
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
