"""Bad input through the real CLIs (subprocess): exit status 2, exactly one ``error:`` line naming the file
(and line / value where there is one), no traceback, and pre-existing outputs left intact.

Module-level cases already covered in-process elsewhere (not repeated here): tests/test_preprocess.py
``test_bad_input_names_file_line_value_and_writes_nothing`` (15 cases), tests/test_msmarco_eval.py
``test_candidate_errors_name_file_line_and_value`` / ``test_reference_errors``, tests/test_cvt_back.py
``test_bad_rank_files_leave_no_output`` / ``test_offset_out_of_range_names_line_and_value``, tests/test_inference.py
``test_adore_inference_rejects_a_doc_memmap_of_another_dim``.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import (ENV, REPO, TINY, assert_one_error, make_encoder_inputs, run_cli, tiny_encoder, tree_hash,
                     write_files)


# -- preprocess.py ------------------------------------------------------------------------------------------

def _with(name, content):
    return lambda files: files.__setitem__(name, content)


PREPROCESS_CASES = {
    "collection wrong column count": (_with("collection.tsv", b"7\tHello world\n3\n"), "collection.tsv:2"),
    "collection non-integer id": (_with("collection.tsv", b"7\tHello\nnine\tdog\n"), "collection.tsv:2", "nine"),
    "collection negative id": (_with("collection.tsv", b"7\tHello\n-3\tdog\n"), "collection.tsv:2", "-3"),
    "collection duplicate id": (_with("collection.tsv", b"7\tHello\n3\tcat\n7\tdog\n0\tx\n10\ty\n"),
                                "collection.tsv:3", "7"),
    "collection not UTF-8": (_with("collection.tsv", b"7\tHello\n3\tcaf\xe9\n"), "collection.tsv:2"),
    "empty collection": (_with("collection.tsv", b""), "collection.tsv"),
    "qrels unknown passage": (_with("qrels.train.tsv", b"2 0 3 1\n2 0 99 0\n"), "qrels.train.tsv:2", "99"),
    "qrels unknown query": (_with("qrels.train.tsv", b"2 0 3 1\n8 0 3 1\n"), "qrels.train.tsv:2", "8"),
    "queries non-integer id": (_with("queries.train.tsv", b"1\thello\nx2\tthe cat\n"), "queries.train.tsv:2",
                               "x2"),
    "missing collection": (lambda files: files.pop("collection.tsv"), "collection.tsv"),
}


def preprocess_args(bert_dir, data, out, *extra):
    return ["preprocess.py", "--model_name_or_path", bert_dir, "--data_dir", data, "--out_dir", out,
            "--max_seq_length", "6", "--threads", "1", *extra]


@pytest.mark.parametrize("case", list(PREPROCESS_CASES))
@pytest.mark.slow
def test_preprocess_bad_input(tmp_path, bert_dir, case):
    edit, *needles = PREPROCESS_CASES[case]
    files = dict(TINY)
    edit(files)
    data = write_files(tmp_path / "dataset", files)
    before = tree_hash(data, skip_tmp=False)
    out = tmp_path / "out"
    assert_one_error(run_cli(preprocess_args(bert_dir, data, out)), *needles)
    assert tree_hash(data, skip_tmp=False) == before
    assert not out.exists() or not any(out.iterdir())


def test_preprocess_wrong_data_type_is_a_usage_error(tmp_path, bert_dir):
    data = write_files(tmp_path / "dataset", TINY)
    assert_one_error(run_cli(preprocess_args(bert_dir, data, tmp_path / "out", "--data_type", "7")),
                     "--data_type")


@pytest.mark.slow
def test_preprocess_existing_output_is_refused_and_kept(tmp_path, bert_dir):
    data = write_files(tmp_path / "dataset", TINY)
    out = tmp_path / "out"
    assert run_cli(preprocess_args(bert_dir, data, out)).returncode == 0
    (out / "dev-qrel.tsv").write_text("precious")
    before = tree_hash(out, skip_tmp=False)
    assert_one_error(run_cli(preprocess_args(bert_dir, data, out)), "already exists", "--overwrite")
    assert tree_hash(out, skip_tmp=False) == before


def test_preprocess_unwritable_output_location(tmp_path, bert_dir):
    data = write_files(tmp_path / "dataset", TINY)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert_one_error(run_cli(preprocess_args(bert_dir, data, blocker / "out")), str(blocker))
    assert blocker.read_text() == "not a folder"


def test_preprocess_full_disk_leaves_no_partial_output(tmp_path, bert_dir):
    data = write_files(tmp_path / "dataset", TINY)
    out = tmp_path / "out"
    result = run_cli(preprocess_args(bert_dir, data, out), fsize=40)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    leftovers = [p.name for p in out.rglob("*")] if out.exists() else []
    assert leftovers == [], leftovers


@pytest.mark.parametrize("variant", ["bom", "crlf"])
@pytest.mark.slow
def test_preprocess_accepts_bom_and_crlf(tmp_path, bert_dir, variant):
    """A UTF-8 BOM and CRLF line ends are accepted and give exactly the outputs of the clean files."""
    clean = {k: v.replace(b"\r\n", b"\n") for k, v in TINY.items()}
    if variant == "bom":
        dirty = {k: b"\xef\xbb\xbf" + v for k, v in clean.items()}
    else:
        dirty = {k: v.replace(b"\n", b"\r\n") for k, v in clean.items()}
    outs = []
    for name, files in (("clean", clean), ("dirty", dirty)):
        data = write_files(tmp_path / name, files)
        out = tmp_path / f"{name}-out"
        result = run_cli(preprocess_args(bert_dir, data, out))
        assert result.returncode == 0, result.stderr
        outs.append(tree_hash(out, skip_tmp=False))
    assert outs[0] == outs[1] and outs[0]


# -- msmarco_eval.py ----------------------------------------------------------------------------------------

EVAL_CASES = {
    "duplicate rank": (["1\t10\t1", "1\t11\t1"], "c.tsv:2"),
    "rank past eval depth": (["1\t10\t1", "1\t11\t1001"], "c.tsv:2", "1001"),
    "non-integer rank": (["1\t10\tfirst"], "c.tsv:1", "first"),
    "negative doc id": (["1\t-10\t1"], "c.tsv:1"),
    "wrong column count": (["1\t10"], "c.tsv:1"),
    "candidate not UTF-8": ([b"1\t1\xff0\t1"], "c.tsv:1"),
}


def _write_lines(path: Path, lines) -> Path:
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_msmarco_eval_bad_candidate(tmp_path, case):
    lines, *needles = EVAL_CASES[case]
    ref = _write_lines(tmp_path / "q.tsv", ["1\t0\t10\t1"])
    cand = _write_lines(tmp_path / "c.tsv", lines)
    assert_one_error(run_cli(["msmarco_eval.py", ref, cand]), *needles)


def test_msmarco_eval_missing_reference(tmp_path):
    cand = _write_lines(tmp_path / "c.tsv", ["1\t10\t1"])
    assert_one_error(run_cli(["msmarco_eval.py", tmp_path / "nope.tsv", cand]), "nope.tsv")


def test_msmarco_eval_accepts_bom_crlf(tmp_path):
    ref = tmp_path / "q.tsv"
    ref.write_bytes(b"\xef\xbb\xbf1\t0\t10\t1\r\n2\t0\t20\t1\r\n")
    cand = tmp_path / "c.tsv"
    cand.write_bytes(b"\xef\xbb\xbf1\t10\t1\r\n2\t21\t1\r\n2\t20\t2\r\n")
    result = run_cli(["msmarco_eval.py", ref, cand])
    assert result.returncode == 0, result.stderr
    assert "0.75" in result.stdout  # (1 + 1/2) / 2


# -- cvt_back.py --------------------------------------------------------------------------------------------

@pytest.fixture
def offsets(tmp_path):
    pre = tmp_path / "pre"
    pre.mkdir()
    np.save(pre / "passages_ids.npy", np.array([100, 200, 300], np.int64))
    np.save(pre / "dev-query_ids.npy", np.array([7, 8], np.int64))
    evaluate = tmp_path / "eval"
    evaluate.mkdir()
    return pre, evaluate, tmp_path / "official"


def cvt_args(pre, evaluate, out, mode="dev", *extra):
    return ["cvt_back.py", "--input_dir", evaluate, "--preprocess_dir", pre, "--mode", mode, "--output_dir", out,
            "--dataset", "passage", *extra]


CVT_CASES = {
    "passage offset out of range": (["0\t5\t1"], "dev.rank.tsv:1", "5"),
    "query offset out of range": (["0\t1\t1", "9\t1\t1"], "dev.rank.tsv:2", "9"),
    "negative offset": (["0\t-1\t1"], "dev.rank.tsv:1"),
    "non-integer rank": (["0\t1\tone"], "dev.rank.tsv:1", "one"),
}


@pytest.mark.parametrize("case", list(CVT_CASES))
def test_cvt_back_bad_rank_file(offsets, case):
    pre, evaluate, out = offsets
    lines, *needles = CVT_CASES[case]
    _write_lines(evaluate / "dev.rank.tsv", lines)
    assert_one_error(run_cli(cvt_args(pre, evaluate, out)), *needles)
    assert not out.exists() or not any(out.iterdir())


def test_cvt_back_wrong_mode_and_missing_rank_file(offsets):
    pre, evaluate, out = offsets
    assert_one_error(run_cli(cvt_args(pre, evaluate, out, "valid")), "--mode")
    assert_one_error(run_cli(cvt_args(pre, evaluate, out)), "dev.rank.tsv")


def test_cvt_back_existing_output_refused_and_kept(offsets):
    pre, evaluate, out = offsets
    _write_lines(evaluate / "dev.rank.tsv", ["0\t1\t1", "1\t2\t1"])
    assert run_cli(cvt_args(pre, evaluate, out)).returncode == 0
    before = tree_hash(out, skip_tmp=False)
    assert before
    assert_one_error(run_cli(cvt_args(pre, evaluate, out)), "--overwrite")
    assert tree_hash(out, skip_tmp=False) == before


# -- safe loading -------------------------------------------------------------------------------------------

SAFE_RUN = r"""
import pickle, sys, torch
def refuse(*a, **k):
    raise AssertionError("something was unpickled")
pickle.load = pickle.loads = refuse
real_torch_load = torch.load
def guarded_torch_load(*a, weights_only=None, **k):
    if weights_only is not True:
        raise AssertionError("torch.load without weights_only=True")
    return real_torch_load(*a, weights_only=True, **k)
torch.load = guarded_torch_load
import preprocess, msmarco_eval, cvt_back
import star.inference
data, tok, model, root = sys.argv[1:5]
preprocess.main(["--model_name_or_path", tok, "--data_dir", data, "--out_dir", root + "/pre",
                 "--max_seq_length", "6", "--threads", "1"])
star.inference.main(["--data_type", "passage", "--mode", "dev", "--model_dir", model, "--preprocess_dir",
                     root + "/pre", "--output_dir", root + "/eval", "--max_doc_length", "6",
                     "--max_query_length", "6", "--no_cuda", "--topk", "3"])
msmarco_eval.main([root + "/pre/dev-qrel.tsv", root + "/eval/dev.rank.tsv"])
cvt_back.main(["--input_dir", root + "/eval", "--preprocess_dir", root + "/pre", "--mode", "dev",
               "--output_dir", root + "/official", "--dataset", "passage"])
print("SAFE-RUN-OK")
"""


@pytest.mark.slow
def test_full_tiny_run_never_unpickles(tmp_path, bert_dir):
    """preprocess → star inference → msmarco_eval → cvt_back with pickle.load/loads and any torch.load that is
    not weights_only=True made to fail: the project reads no pickle by default (the compat *.pickle files that
    preprocess writes are never read)."""
    data = write_files(tmp_path / "dataset", TINY)
    tiny_encoder(0, out_dim=8).save_pretrained(tmp_path / "model")
    result = subprocess.run([sys.executable, "-c", SAFE_RUN, str(data), str(bert_dir), str(tmp_path / "model"),
                             str(tmp_path)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SAFE-RUN-OK" in result.stdout
    assert (tmp_path / "official" / "dev.rank.tsv").is_file()
    assert (tmp_path / "pre" / "pid2offset.pickle").is_file()  # written for compatibility, never read


# -- adore/inference.py and adore/train.py: document embeddings, model folder, existing output ---------------

ADORE_DIM, ADORE_DOCS = 16, 600  # helpers.make_encoder_inputs: a 16-dim encoder, 600 passages


@pytest.fixture(scope="module")
def adore_inputs(tmp_path_factory):
    """A tiny preprocess folder (train + dev queries and qrels), a tiny 16-dim encoder and a valid [600, 16]
    float32 document-embedding memmap without a manifest (as the original wrote it)."""

    root = tmp_path_factory.mktemp("adore_bad")
    inputs = make_encoder_inputs(root)
    docs = root / "docs.memmap"
    np.random.default_rng(0).standard_normal((ADORE_DOCS, ADORE_DIM)).astype(np.float32).tofile(docs)
    return {**inputs, "docs": docs, "root": root}


def _embeddings(edit):
    """A document-embedding file made by ``edit(path, valid float32 array)``; returns the needles to expect."""
    def make(folder: Path):
        path = folder / "bad_docs.memmap"
        values = np.random.default_rng(0).standard_normal((ADORE_DOCS, ADORE_DIM)).astype(np.float32)
        return path, edit(path, values)
    return make


def _size_off_by(path, values):
    path.write_bytes(values.tobytes() + b"\0" * 6)
    size = values.nbytes + 6
    return [str(size), f"dim {ADORE_DIM}"]


def _non_finite(value, row):
    def edit(path, values):
        values[row, 3] = value
        values.tofile(path)
        return [f"row {row}", "NaN or inf"]
    return edit


def _manifest(**fields):
    def edit(path, values):
        from infra.embedding_memmap import MANIFEST_FORMAT, manifest_path

        values.tofile(path)
        manifest = {"format": MANIFEST_FORMAT, "n_rows": ADORE_DOCS, "dim": ADORE_DIM, "block_rows": 4096,
                    "completed_rows": ADORE_DOCS, "complete": True, **fields}
        manifest_path(path).write_text(json.dumps(manifest))
        return ["incomplete"] if not manifest["complete"] else [f"dim {fields.get('dim')}"]
    return edit


EMBEDDING_CASES = {
    "size not a multiple of dim x 4": (_embeddings(_size_off_by), []),
    "NaN in embeddings": (_embeddings(_non_finite(np.nan, 5)), ["--check_finite"]),
    "inf in embeddings": (_embeddings(_non_finite(-np.inf, 9)), ["--check_finite"]),
    "half-written encoding (manifest says incomplete)": (_embeddings(_manifest(completed_rows=0, complete=False)),
                                                         []),
    "embeddings of another model (manifest dim)": (_embeddings(_manifest(dim=24)), []),
}


def adore_inference_args(inputs, out, docs, *extra, model=None):
    return ["-m", "adore.inference", "--model_dir", model or inputs["model"], "--output_dir", out,
            "--preprocess_dir", inputs["pre"], "--mode", "dev", "--dmemmap_path", docs, "--max_seq_length", "8",
            "--no_cuda", "--topk", "5", *extra]


def adore_train_args(inputs, out, docs, *extra):
    return ["-m", "adore.train", "--init_path", inputs["model"], "--pembed_path", docs, "--preprocess_dir",
            inputs["pre"], "--model_save_dir", out, "--metric_cut", "5", "--neg_topk", "8", "--max_seq_length", "8",
            "--per_gpu_batch_size", "4", "--max_steps", "1", "--no_cuda", "--faiss_omp_num_threads", "1", *extra]


BAD_EMBEDDING_RUNS = [pytest.param(adore_inference_args, case, id=f"inference-{case}") for case in EMBEDDING_CASES] + [
    pytest.param(adore_train_args, case, id=f"train-{case}")
    for case in ("size not a multiple of dim x 4", "NaN in embeddings")]


@pytest.mark.parametrize("make_args, case", BAD_EMBEDDING_RUNS)
@pytest.mark.slow
def test_adore_bad_embeddings(tmp_path, adore_inputs, make_args, case):
    make, extra = EMBEDDING_CASES[case]
    docs, needles = make(tmp_path)

    def inputs_and_outputs() -> tuple[dict, dict]:
        return tree_hash(tmp_path, skip_tmp=False), tree_hash(adore_inputs["root"], skip_tmp=False)

    before = inputs_and_outputs()
    out = tmp_path / "out"
    assert_one_error(run_cli(make_args(adore_inputs, out, docs, *extra)), str(docs), *needles)
    assert inputs_and_outputs() == before  # inputs intact, no output written
    assert not out.exists()


@pytest.mark.slow
def test_adore_inference_missing_model_dir_and_embeddings(tmp_path, adore_inputs):
    out = tmp_path / "out"
    missing_model = tmp_path / "no_such_model"
    assert_one_error(run_cli(adore_inference_args(adore_inputs, out, adore_inputs["docs"], model=missing_model)),
                     str(missing_model), "not found")
    missing_docs = tmp_path / "no_such.memmap"
    assert_one_error(run_cli(adore_inference_args(adore_inputs, out, missing_docs)), str(missing_docs), "not found")
    assert not out.exists()


@pytest.mark.slow
def test_adore_inference_existing_output_refused_and_kept(tmp_path, adore_inputs):
    out = tmp_path / "out"
    result = run_cli(adore_inference_args(adore_inputs, out, adore_inputs["docs"]))
    assert result.returncode == 0, result.stderr
    (out / "dev.rank.tsv").write_text("precious")
    before = tree_hash(out, skip_tmp=False)
    assert_one_error(run_cli(adore_inference_args(adore_inputs, out, adore_inputs["docs"])),
                     str(out / "dev.rank.tsv"), "already exists", "--overwrite")
    assert tree_hash(out, skip_tmp=False) == before


# -- #13 "never silent duplicate work": commands that do not split their work refuse a multi-process torchrun -----

def test_run_cli_refuses_several_torchrun_processes_unless_the_command_splits_its_work(monkeypatch, capsys):
    from infra.io import run_cli as run_main

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_info:
        run_main(calls.append, [])
    assert exit_info.value.code == 2 and not calls
    assert "torchrun started 2: each would redo the whole work" in capsys.readouterr().err
    run_main(calls.append, [], torchrun=True)   # star/train.py: DDP splits the batch
    monkeypatch.setenv("WORLD_SIZE", "1")
    run_main(calls.append, [])
    assert calls == [[], []]


@pytest.mark.parametrize("command", [["-m", "preprocess"], ["-m", "cvt_back"],
                                     ["-m", "star.prepare_hardneg", "--data_type", "passage", "--run_file", "run.tsv"]])
def test_commands_started_by_torchrun_refuse_before_any_work(tmp_path, command):
    """Commands whose work does not split over processes (the inference drivers and both trainers do) refuse
    instead of running it once per rank into the same files; mining from a run file is one of them."""
    torchrun = dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999")
    result = run_cli([*command, "--output_dir", tmp_path / "out"], timeout=300, env=torchrun)
    assert_one_error(result, "torchrun started 2")
    assert not (tmp_path / "out").exists()
