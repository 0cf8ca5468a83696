"""Issue #15, class 4: a user error about the content of a file names that file, also where the problem is found
after the file was read (an empty qrels file, a reference without a relevant grade, a ranking too short, a
collection that changed while it was read)."""
import numpy as np
import pytest

import msmarco_eval as me
import preprocess
import star.prepare_hardneg as ph
from adore import train as adore_train
from helpers import (TINY, adore_cli_args, assert_one_error, make_adore_data, make_star_data, run_cli,
                     star_cli_args, write_files)
from infra.io import InputError
from star import train as star_train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture
def star_data(tmp_path):
    return make_star_data(tmp_path / "star")


def empty_qrels(pre) -> str:
    path = pre / "train-qrel.tsv"
    path.write_text("")
    return str(path)


def test_star_train_names_an_empty_qrels_file(star_data, tmp_path):
    qrels = empty_qrels(star_data["pre"])
    with pytest.raises(InputError, match="no training query has a positive") as info:
        star_train.main(star_cli_args(star_data, tmp_path / "out", "inbatch", "--max_steps", "1"))
    assert info.value.path == qrels


def test_adore_train_names_an_empty_qrels_file(tmp_path):
    data = make_adore_data(tmp_path / "adore")
    qrels = empty_qrels(data.pre)
    with pytest.raises(InputError, match="no training query has a positive") as info:
        adore_train.main(adore_cli_args(data, tmp_path / "out", "--max_steps", "1"))
    assert info.value.path == qrels


@pytest.mark.slow
def test_empty_qrels_through_the_cli_is_one_error_line_naming_the_file(star_data, tmp_path):
    qrels = empty_qrels(star_data["pre"])
    args = star_cli_args(star_data, tmp_path / "out", "inbatch", "--max_steps", "1")
    error = assert_one_error(run_cli(["-m", "star.train", *args], timeout=300))
    assert error == f"error: {qrels}: no training query has a positive in the qrels (empty qrels file?)"


def test_msmarco_eval_names_the_reference_without_a_relevant_grade(tmp_path):
    ref, cand = tmp_path / "qrels.tsv", tmp_path / "run.tsv"
    ref.write_text("1 0 10 1\n2 0 20 1\n")
    cand.write_text("1\t10\t1\n2\t30\t1\n")
    with pytest.raises(InputError, match=r"no reference judgment has a grade >= 2") as info:
        me.evaluate_files(ref, cand, ["MRR@10"], rel_threshold=2)
    assert info.value.path == str(ref)


def test_prepare_hardneg_names_the_run_whose_rankings_are_too_short(tmp_path):
    pre = make_star_data(tmp_path / "star")["pre"]
    n_docs, n_queries = 40, 12
    np.save(pre / "passages_ids.npy", np.arange(100, 100 + n_docs, dtype=np.int64))
    np.save(pre / "train-query_ids.npy", np.arange(n_queries, dtype=np.int64))
    run = tmp_path / "run.tsv"
    run.write_text("".join(f"{q}\t{100 + (q + 20) % n_docs}\t1\n" for q in range(n_queries)))  # one doc each
    with pytest.raises(InputError, match="fewer than topk=5 negatives in the run file") as info:
        ph.main(["--data_type", "passage", "--mode", "train", "--run_file", str(run), "--preprocess_dir", str(pre),
                 "--output_dir", str(tmp_path / "out"), "--topk", "5", "--no-fill_random"])
    assert info.value.path == str(run)
    assert not (tmp_path / "out" / "hard.npy").exists()


def test_preprocess_names_a_collection_that_changed_while_read(tmp_path, bert_dir, monkeypatch):
    data = write_files(tmp_path / "dataset", TINY)
    read = preprocess._corpus_texts
    monkeypatch.setattr(preprocess, "_corpus_texts", lambda *a: list(read(*a))[:-1])  # a line vanished
    with pytest.raises(InputError, match="read 3 texts but expected 4") as info:
        preprocess.preprocess(data, tmp_path / "out", preprocess.PASSAGE, preprocess.load_tokenizer(bert_dir))
    assert info.value.path == str(data / "collection.tsv")
    assert not (tmp_path / "out" / "passages.memmap").exists()

