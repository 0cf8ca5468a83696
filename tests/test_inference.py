"""star/inference.py and adore/inference.py end to end on CPU: a tiny preprocess folder and tiny saved encoders;
the rank files must equal an independent computation (each sequence encoded alone, numpy scores, stable argsort)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import adore.inference as adore_inference
import star.inference as star_inference
from infra.io import InputError
from helpers import brute_force, encode_one_by_one, tiny_encoder, write_token_memmap

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

DOC_LEN, QUERY_LEN = 12, 6
N_DOCS, N_QUERIES = 40, 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    rng = np.random.default_rng(5)
    pre = root / "preprocess"
    docs = write_token_memmap(pre, "passages", rng.integers(5, 18, N_DOCS).tolist(), width=18, seed=1)
    queries = write_token_memmap(pre, "dev-query", rng.integers(2, 9, N_QUERIES).tolist(), width=8, seed=2)
    star_model, adore_model = tiny_encoder(0, out_dim=24), tiny_encoder(1, out_dim=24)
    star_model.save_pretrained(root / "star_model")
    adore_model.save_pretrained(root / "adore_model")
    return {"root": root, "pre": pre, "docs": docs, "queries": queries, "star": star_model, "adore": adore_model}


def read_rank(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Rank file → (per-query poffset lists as an array [nq, k], the raw rows)."""
    rows = np.array([line.split("\t") for line in path.read_text().splitlines()])
    qids, pids, ranks = (rows[:, c].astype(int) for c in range(3))
    nq = qids.max() + 1
    k = len(rows) // nq
    assert (qids == np.repeat(np.arange(nq), k)).all() and (ranks == np.tile(np.arange(1, k + 1), nq)).all()
    return pids.reshape(nq, k), rows


def assert_ranking_matches(pids: np.ndarray, query_emb: np.ndarray, doc_emb: np.ndarray, k: int) -> None:
    """``pids`` must be the stable-argsort top-k of the reference scores (up to float noise: the score sequence
    of the file's ranking must equal the reference's)."""
    scores = query_emb @ doc_emb.T
    ref_scores, ref_ids = brute_force(doc_emb, query_emb, k)
    assert pids.shape == ref_ids.shape
    np.testing.assert_allclose(np.take_along_axis(scores, pids, 1), ref_scores, atol=1e-5)
    assert (pids == ref_ids).mean() > 0.95  # identical except where two scores agree to ~1e-5


def star_args(setup, out: Path, *extra: str) -> list[str]:
    return ["--data_type", "passage", "--mode", "dev", "--model_dir", str(setup["root"] / "star_model"),
            "--preprocess_dir", str(setup["pre"]), "--output_dir", str(out), "--max_doc_length", str(DOC_LEN),
            "--max_query_length", str(QUERY_LEN), "--eval_batch_size", "4", "--no_cuda", *extra]


def test_star_inference_ranks_like_numpy(setup):
    out = setup["root"] / "star_out"
    star_inference.main(star_args(setup, out, "--topk", "10"))
    doc_ref = encode_one_by_one(setup["star"], setup["docs"], DOC_LEN)
    query_ref = encode_one_by_one(setup["star"], setup["queries"], QUERY_LEN)
    passages = np.fromfile(out / "passages.memmap", np.float32).reshape(N_DOCS, 24)
    queries = np.fromfile(out / "dev-query.memmap", np.float32).reshape(N_QUERIES, 24)
    np.testing.assert_allclose(passages, doc_ref, atol=2e-5)
    np.testing.assert_allclose(queries, query_ref, atol=2e-5)
    pids, rows = read_rank(out / "dev.rank.tsv")
    assert rows.shape == (N_QUERIES * 10, 3)  # faithful: no score column
    np.testing.assert_array_equal(pids, brute_force(passages, queries, 10)[1])  # exactly, from its own memmaps
    assert_ranking_matches(pids, query_ref, doc_ref, 10)


def test_star_rerun_reuses_the_corpus_and_guards_the_rank_file(setup):
    out = setup["root"] / "star_rerun"
    star_inference.main(star_args(setup, out, "--topk", "3"))
    manifest = (out / "passages.memmap.manifest.json").read_text()
    with pytest.raises(InputError, match="--overwrite"):
        star_inference.main(star_args(setup, out, "--topk", "50"))
    star_inference.main(star_args(setup, out, "--topk", "50", "--overwrite", "--with_scores"))
    assert (out / "passages.memmap.manifest.json").read_text() == manifest  # reused, not re-encoded
    pids, rows = read_rank(out / "dev.rank.tsv")
    assert pids.shape == (N_QUERIES, N_DOCS)  # topk > N: only the N real results are written
    passages = np.fromfile(out / "passages.memmap", np.float32).reshape(N_DOCS, 24)
    queries = np.fromfile(out / "dev-query.memmap", np.float32).reshape(N_QUERIES, 24)
    ref_scores, ref_ids = brute_force(passages, queries, N_DOCS)
    np.testing.assert_array_equal(pids, ref_ids)
    np.testing.assert_allclose(rows[:, 3].astype(np.float32).reshape(N_QUERIES, N_DOCS), ref_scores, rtol=1e-6)
    # Another max length no longer matches the corpus memmap: refused, naming the field.
    (out / "dev.rank.tsv").unlink()
    with pytest.raises(InputError, match="max_length"):
        star_inference.main(star_args(setup, out, "--max_doc_length", "9"))


def test_adore_inference_searches_star_embeddings(setup):
    star_out = setup["root"] / "star_for_adore"
    star_inference.main(star_args(setup, star_out, "--topk", "5"))
    out = setup["root"] / "adore_out"
    adore_inference.main(["--model_dir", str(setup["root"] / "adore_model"), "--output_dir", str(out),
                          "--preprocess_dir", str(setup["pre"]), "--mode", "dev", "--topk", "7",
                          "--dmemmap_path", str(star_out / "passages.memmap"), "--max_seq_length", str(QUERY_LEN),
                          "--pergpu_eval_batch_size", "2", "--no_cuda", "--check_finite"])
    qembed = np.fromfile(out / "dev.qembed.memmap", np.float32)
    assert qembed.size == N_QUERIES * 24  # dim from the model (24), not 768
    query_ref = encode_one_by_one(setup["adore"], setup["queries"], QUERY_LEN)
    np.testing.assert_allclose(qembed.reshape(N_QUERIES, 24), query_ref, atol=2e-5)
    doc_emb = np.fromfile(star_out / "passages.memmap", np.float32).reshape(N_DOCS, 24)
    pids, _ = read_rank(out / "dev.rank.tsv")
    np.testing.assert_array_equal(pids, brute_force(doc_emb, qembed.reshape(N_QUERIES, 24), 7)[1])
    assert_ranking_matches(pids, query_ref, encode_one_by_one(setup["star"], setup["docs"], DOC_LEN), 7)


def test_adore_inference_rejects_a_doc_memmap_of_another_dim(setup, tmp_path):
    bad = tmp_path / "docs.memmap"
    np.zeros(N_DOCS * 24 + 5, np.float32).tofile(bad)  # no manifest, size not a multiple of 24 floats
    with pytest.raises(InputError, match=r"docs\.memmap.*multiple of dim 24"):
        adore_inference.main(["--model_dir", str(setup["root"] / "adore_model"), "--output_dir", str(tmp_path),
                              "--preprocess_dir", str(setup["pre"]), "--mode", "dev", "--dmemmap_path", str(bad),
                              "--no_cuda"])
