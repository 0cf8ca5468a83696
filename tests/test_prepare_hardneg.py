"""star/prepare_hardneg.py on CPU: a tiny preprocess folder and a tiny saved encoder.  The hard negatives must equal
an independent numpy computation (full ranking by stable argsort, positives dropped, first k); external run files
(MS MARCO and TREC, official ids) must give the run's order; random fill, counts and input errors are checked."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import star.prepare_hardneg as ph
from dataset import HardNegatives, load_hardneg
from infra.io import InputError
from helpers import brute_force, encode_one_by_one, tiny_encoder, write_token_memmap

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

DOC_LEN, QUERY_LEN, DIM = 12, 6, 24
N_DOCS = 40
N_QUERIES = {"train": 8, "dev": 5, "test": 4}
TEST_Q0_POSITIVES = 12  # test query 0 is judged on its own top 12: its top topk + 10 holds only topk - 2 negatives


def write_qrels(folder: Path, split: str, pairs: list[tuple[int, int, int]]) -> None:
    (folder / f"{split}-qrel.tsv").write_text("".join(f"{q}\t0\t{p}\t{g}\n" for q, p, g in pairs))


def positives_of(pairs: list[tuple[int, int, int]]) -> dict[int, set[int]]:
    rel: dict[int, set[int]] = {}
    for q, p, _ in pairs:
        rel.setdefault(q, set()).add(p)
    return rel


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardneg")
    rng = np.random.default_rng(11)
    pre = root / "preprocess"
    docs = write_token_memmap(pre, "passages", rng.integers(5, 18, N_DOCS).tolist(), width=18, seed=1)
    pids = rng.choice(10**6, N_DOCS, replace=False) + 10**6
    np.save(pre / "passages_ids.npy", pids.astype(np.int64))
    model = tiny_encoder(3, out_dim=DIM)
    model.save_pretrained(root / "model")
    doc_ref = encode_one_by_one(model, docs, DOC_LEN)
    queries, qrels = {}, {}
    for seed, (split, n) in enumerate(N_QUERIES.items(), start=2):
        queries[split] = write_token_memmap(pre, f"{split}-query", rng.integers(2, 9, n).tolist(), width=8, seed=seed)
        np.save(pre / f"{split}-query_ids.npy", (rng.choice(10**5, n, replace=False) + 500).astype(np.int64))
    # train: queries 0..6 in the qrels (7 is not), 1-3 positives, one of them graded 0 (still a positive)
    qrels["train"] = [(q, int(p), 1) for q in range(7) for p in rng.choice(N_DOCS, rng.integers(1, 4), replace=False)]
    qrels["train"].append((2, int(np.setdiff1d(np.arange(N_DOCS), [p for q, p, _ in qrels["train"] if q == 2])[0]), 0))
    qrels["dev"] = [(q, int(rng.integers(N_DOCS)), 1) for q in range(N_QUERIES["dev"])]
    top = np.argsort(-(encode_one_by_one(model, queries["test"][:1], QUERY_LEN) @ doc_ref.T)[0], kind="stable")
    qrels["test"] = [(0, int(p), i % 4) for i, p in enumerate(top[:TEST_Q0_POSITIVES])]
    qrels["test"] += [(q, int(p), int(rng.integers(4))) for q in range(1, 4) for p in rng.choice(N_DOCS, 3, False)]
    for split, pairs in qrels.items():
        write_qrels(pre, split, pairs)
    return {"root": root, "pre": pre, "model": model, "docs": docs, "doc_ref": doc_ref, "queries": queries,
            "qrels": qrels, "pids": pids}


def model_args(setup, out: Path, mode: str = "train", *extra: str) -> list[str]:
    return ["--data_type", "passage", "--mode", mode, "--model_dir", str(setup["root"] / "model"),
            "--preprocess_dir", str(setup["pre"]), "--output_dir", str(out), "--max_doc_length", str(DOC_LEN),
            "--max_query_length", str(QUERY_LEN), "--eval_batch_size", "4", "--no_cuda", *extra]


def embeddings(out: Path, mode: str) -> tuple[np.ndarray, np.ndarray]:
    queries = np.fromfile(out / f"{mode}-query.memmap", np.float32).reshape(N_QUERIES[mode], DIM)
    return queries, np.fromfile(out / "passages.memmap", np.float32).reshape(N_DOCS, DIM)


def first_k_non_positive(rankings: dict[int, list[int]], rel: dict[int, set[int]], k: int) -> np.ndarray:
    """Reference: per qrels query (sorted), the first k documents of its ranking that are not positives."""
    return np.array([[p for p in rankings[q] if p not in rel[q]][:k] for q in sorted(rel)])


def full_rankings(query_emb: np.ndarray, doc_emb: np.ndarray) -> dict[int, list[int]]:
    return dict(enumerate(np.argsort(-(query_emb @ doc_emb.T), axis=1, kind="stable").tolist()))


def reference_mrr(rankings: dict[int, list[int]], rel: dict[int, set[int]]) -> float:
    total = 0.0
    for q, positives in rel.items():
        hits = [r for r, p in enumerate(rankings.get(q, [])[:10], start=1) if p in positives]
        total += 1 / hits[0] if hits else 0.0
    return total / len(rel)


def printed_mrr(text: str) -> float:
    return float(re.search(r"MRR @10: (\S+)", text).group(1))


# ---------------------------------------------------------------------------------------------------------------
# Mining with the warm-up model
# ---------------------------------------------------------------------------------------------------------------

def test_model_mining_equals_numpy(setup, tmp_path, capsys):
    out = tmp_path / "out"
    ph.main(model_args(setup, out, "train", "--topk", "20", "--write_json"))
    rel = positives_of(setup["qrels"]["train"])
    qids, negs = np.load(out / "hard_qids.npy"), np.load(out / "hard.npy")
    assert qids.dtype == np.int64 and negs.dtype == np.int32 and negs.shape == (7, 20)
    np.testing.assert_array_equal(qids, np.arange(7))  # sorted qrels queries; query 7 has no qrels
    assert not any(set(row) & rel[q] for q, row in zip(qids.tolist(), negs.tolist()))
    assert all(len(set(row)) == 20 for row in negs.tolist())

    # Exactly the numpy ranking of the embeddings it wrote, which are the model's own (each sequence alone).
    query_emb, doc_emb = embeddings(out, "train")
    query_ref = encode_one_by_one(setup["model"], setup["queries"]["train"], QUERY_LEN)
    np.testing.assert_allclose(query_emb, query_ref, atol=2e-5)
    np.testing.assert_allclose(doc_emb, setup["doc_ref"], atol=2e-5)
    rankings = full_rankings(query_emb, doc_emb)
    np.testing.assert_array_equal(negs, first_k_non_positive(rankings, rel, 20))
    ref = first_k_non_positive(full_rankings(query_ref, setup["doc_ref"]), rel, 20)
    np.testing.assert_allclose(np.take_along_axis(query_ref[:7] @ setup["doc_ref"].T, negs.astype(int), 1),
                               np.take_along_axis(query_ref[:7] @ setup["doc_ref"].T, ref, 1), atol=1e-5)

    # The rank file: every query of the split, top 30 = topk + 10, faithful 3 columns.
    rows = np.loadtxt(out / "train.rank.tsv", dtype=np.int64, delimiter="\t")
    assert rows.shape == (N_QUERIES["train"] * 30, 3)
    np.testing.assert_array_equal(rows[:, 1].reshape(-1, 30), brute_force(doc_emb, query_emb, 30)[1])
    np.testing.assert_array_equal(rows[:, 2], np.tile(np.arange(1, 31), N_QUERIES["train"]))

    # Read back by the training code, and hard.json holds the same.
    loaded_q, loaded_negs = load_hardneg(out / "hard.npy")
    np.testing.assert_array_equal(loaded_q, qids)
    np.testing.assert_array_equal(loaded_negs, negs)
    assert json.loads((out / "hard.json").read_text()) == {str(q): row for q, row in zip(qids.tolist(), negs.tolist())}
    json_q, json_negs = load_hardneg(out / "hard.json")
    np.testing.assert_array_equal(json_q, qids)
    np.testing.assert_array_equal(json_negs, negs)
    np.testing.assert_array_equal(HardNegatives.load(out / "hard.npy")[3], negs[3])

    assert printed_mrr(capsys.readouterr().out) == pytest.approx(reference_mrr(rankings, rel), abs=1e-12)


def test_outputs_are_not_overwritten_without_the_flag(setup, tmp_path):
    out = tmp_path / "out"
    ph.main(model_args(setup, out, "train", "--topk", "5"))
    before = (out / "hard.npy").read_bytes()
    manifest = (out / "passages.memmap.manifest.json").read_text()
    with pytest.raises(InputError, match=r"hard\.npy.*--overwrite"):
        ph.main(model_args(setup, out, "train", "--topk", "8"))
    assert (out / "hard.npy").read_bytes() == before
    (out / "hard.npy").unlink()
    with pytest.raises(InputError, match=r"hard_qids\.npy.*--overwrite"):  # the sibling is guarded as well
        ph.main(model_args(setup, out, "train", "--topk", "8"))
    ph.main(model_args(setup, out, "train", "--topk", "8", "--overwrite"))
    assert np.load(out / "hard.npy").shape == (7, 8)
    assert (out / "passages.memmap.manifest.json").read_text() == manifest  # corpus reused, not re-encoded
    for name in ("hard.npy", "hard_qids.npy", "train.rank.tsv"):
        (out / name).unlink()
    with pytest.raises(InputError, match="max_length"):  # a corpus memmap of another length is refused, not reused
        ph.main(model_args(setup, out, "train", "--topk", "8", "--max_doc_length", "9"))


def test_dev_split_and_issue_24_warning(setup, tmp_path, caplog):
    out = tmp_path / "out"
    ph.main(model_args(setup, out, "dev", "--topk", "25"))
    assert "issue #24" in caplog.text
    rel = positives_of(setup["qrels"]["dev"])
    qids, negs = load_hardneg(out / "hard.npy")
    np.testing.assert_array_equal(qids, np.arange(N_QUERIES["dev"]))
    np.testing.assert_array_equal(negs, first_k_non_positive(full_rankings(*embeddings(out, "dev")), rel, 25))


def test_short_queries_are_refused_or_filled_at_random(setup, tmp_path):
    """Test split: query 0's 12 judged documents (grade 0 included: every qrels line is a positive) fill its top
    12, so the top topk + 10 leaves topk - 2 negatives: an error unless --fill_random adds 2 random documents."""
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"1 of 4 queries .* query offset 0, 8 left.*smaller --topk"):
        ph.main(model_args(setup, out, "test", "--topk", "10"))
    assert not (out / "hard.npy").exists()
    ph.main(model_args(setup, out, "test", "--topk", "10", "--fill_random", "--overwrite"))
    rel = positives_of(setup["qrels"]["test"])
    negs = np.load(out / "hard.npy")
    expected = first_k_non_positive(full_rankings(*embeddings(out, "test")), rel, 10)  # row 0 has only 8
    np.testing.assert_array_equal(negs[1:], np.array(expected[1:].tolist()))
    ranked = [p for p in full_rankings(*embeddings(out, "test"))[0][:20] if p not in rel[0]]
    assert negs[0, :8].tolist() == ranked
    filled = negs[0, 8:].tolist()
    assert not set(filled) & (rel[0] | set(ranked)) and len(set(filled)) == 2 and all(0 <= p < N_DOCS for p in filled)
    ph.main(model_args(setup, out, "test", "--topk", "10", "--fill_random", "--overwrite"))
    np.testing.assert_array_equal(np.load(out / "hard.npy"), negs)  # deterministic
    ph.main(model_args(setup, out, "test", "--topk", "10", "--fill_random", "--overwrite", "--seed", "5"))
    reseeded = np.load(out / "hard.npy")
    np.testing.assert_array_equal(reseeded[:, :8], negs[:, :8])
    assert reseeded[0, 8:].tolist() != filled


# ---------------------------------------------------------------------------------------------------------------
# External run files
# ---------------------------------------------------------------------------------------------------------------

def make_run(rng: np.random.Generator, qids: np.ndarray, pids: np.ndarray, skip_query: int,
             depth: int) -> list[tuple[int, int, int]]:
    """(official qid, official pid, rank) of a random ranking per query except ``skip_query``, lines shuffled."""
    lines = [(int(qid), int(pid), rank) for q, qid in enumerate(qids) if q != skip_query
             for rank, pid in enumerate(rng.choice(pids, depth, replace=False).tolist(), start=1)]
    return [lines[i] for i in rng.permutation(len(lines))]


def run_rankings(lines: list[tuple[int, int, int]], qids: np.ndarray, pids: np.ndarray) -> dict[int, list[int]]:
    """Independent mapping: official ids → offsets by dicts, order by rank."""
    q_index = {int(x): i for i, x in enumerate(qids)}
    p_index = {int(x): i for i, x in enumerate(pids)}
    rankings: dict[int, list[int]] = {}
    for qid, pid, _ in sorted(lines, key=lambda line: line[2]):
        rankings.setdefault(q_index[qid], []).append(p_index[pid])
    return rankings


def run_args(pre: Path, out: Path, run: Path, *extra: str, data_type: str = "passage") -> list[str]:
    return ["--data_type", data_type, "--preprocess_dir", str(pre), "--output_dir", str(out), "--run_file", str(run),
            *extra]


def test_msmarco_run_file_gives_the_runs_order_and_fills_missing_queries(setup, tmp_path, capsys, caplog):
    rng = np.random.default_rng(7)
    pre, pids = setup["pre"], setup["pids"]
    qids = np.load(pre / "train-query_ids.npy")
    lines = make_run(rng, qids, pids, skip_query=4, depth=15)
    rankings = run_rankings(lines, qids, pids)
    bad = [(int(qids[0]), 999, 1), (123, int(pids[0]), 1),  # unknown pid, unknown qid
           (int(qids[1]), int(pids[rankings[1][0]]), 99)]     # repeated document, worse rank: ignored
    run = tmp_path / "run.tsv"
    run.write_text("".join(f"{q}\t{p}\t{r}\n" for q, p, r in lines + bad))

    out = tmp_path / "out"
    ph.main(run_args(pre, out, run, "--topk", "10", "--write_json"))
    rel = positives_of(setup["qrels"]["train"])
    qoffsets, negs = load_hardneg(out / "hard.npy")
    np.testing.assert_array_equal(qoffsets, np.arange(7))
    expected = [[p for p in rankings.get(q, []) if p not in rel[q]][:10] for q in range(7)]
    for q in range(7):
        if q == 4:  # no line in the run: 10 random documents
            assert len(set(negs[q].tolist())) == 10 and not set(negs[q].tolist()) & rel[q]
        else:
            assert negs[q].tolist() == expected[q]
    assert "1 of 7 queries had fewer than 10 negatives; added 10 random documents" in caplog.text
    assert printed_mrr(capsys.readouterr().out) == pytest.approx(reference_mrr(rankings, rel), abs=1e-12)
    assert not (out / "train.rank.tsv").exists() and (out / "hard.json").exists()

    stats = ph.run_candidates(run, pre, "train", False, np.arange(7), N_DOCS)[1]
    assert (stats.lines, stats.unknown_doc, stats.unknown_query, stats.duplicates) == (len(lines) + 3, 1, 1, 1)

    again = tmp_path / "again"
    ph.main(run_args(pre, again, run, "--topk", "10"))
    np.testing.assert_array_equal(np.load(again / "hard.npy"), negs)  # the random fill is reproducible
    with pytest.raises(InputError, match=r"query offset 4, 0 left.*--fill_random"):
        ph.main(run_args(pre, again, run, "--topk", "10", "--overwrite", "--no-fill_random"))


def test_trec_run_file_with_d_prefixed_doc_ids(tmp_path):
    rng = np.random.default_rng(9)
    pre = tmp_path / "doc_preprocess"
    n_docs, n_queries = 30, 6
    write_token_memmap(pre, "passages", rng.integers(5, 18, n_docs).tolist(), width=18, seed=1)
    write_token_memmap(pre, "train-query", rng.integers(2, 9, n_queries).tolist(), width=8, seed=2)
    docids = rng.choice(10**6, n_docs, replace=False) + 1
    qids = rng.choice(10**6, n_queries, replace=False)
    np.save(pre / "passages_ids.npy", docids.astype(np.int64))
    np.save(pre / "train-query_ids.npy", qids.astype(np.int64))
    pairs = [(q, int(p), 1) for q in range(n_queries) for p in rng.choice(n_docs, 2, replace=False)]
    write_qrels(pre, "train", pairs)
    lines = make_run(rng, qids, docids, skip_query=-1, depth=20)
    run = tmp_path / "run.trec"
    run.write_text("".join(f"{q} Q0 D{d} {r} {-r / 7:.4f} BM25\n" for q, d, r in lines))

    out = tmp_path / "out"
    ph.main(run_args(pre, out, run, "--topk", "12", data_type="doc"))
    rel = positives_of(pairs)
    qoffsets, negs = load_hardneg(out / "hard.npy")
    np.testing.assert_array_equal(qoffsets, np.arange(n_queries))
    np.testing.assert_array_equal(negs, first_k_non_positive(run_rankings(lines, qids, docids), rel, 12))
    with pytest.raises(InputError, match=r"run\.trec:1: document id is not an integer \(got 'D"):
        ph.main(run_args(pre, out, run, "--topk", "12", "--overwrite"))  # passage ids carry no D

    # The run's own ranks order it, also where the scores tie (here: all equal).
    run.write_text("".join(f"{q} Q0 D{d} {r} 1.0 BM25\n" for q, d, r in lines))
    ph.main(run_args(pre, out, run, "--topk", "12", "--overwrite", data_type="doc"))
    np.testing.assert_array_equal(np.load(out / "hard.npy"), negs)
    run.write_text("".join(f"{q} Q0 {d} {r} {-r / 7:.4f} BM25\n" for q, d, r in lines))
    with pytest.raises(InputError, match=r"run\.trec:1: document id lacks the 'D' prefix"):
        ph.main(run_args(pre, out, run, "--topk", "12", "--overwrite", data_type="doc"))


@pytest.mark.parametrize("text, line, message", [
    ("1\t2\n", 1, "expected 3 (qid docid rank), 4 (qid docid rank score) or 6 (TREC"),
    ("1\t2\t1\nx\t2\t2\n", 2, "query id is not an integer"),
    ("1\t2\t1\n1\t3\t2\t0.5\n", 2, "expected 3 fields like the first line"),
    ("1 Q0 2 1 high run\n", 1, "score is not a finite number"),
    ("1\t2\t-1\n", 1, "rank is negative"),
    ("1\t2\t0\n", 1, "ranks are 1-based"),
])
def test_malformed_run_lines_name_file_line_and_value(setup, tmp_path, text, line, message):
    """prepare_hardneg reads --run_file with run_file's rules (tested in test_run_file.py)."""
    run = tmp_path / "run.txt"
    run.write_bytes(text.encode())
    with pytest.raises(InputError, match=re.escape(message)) as info:
        ph.run_candidates(run, setup["pre"], "train", False, np.arange(7), N_DOCS)
    assert (info.value.path, info.value.line) == (str(run), line) and info.value.value is not None


def test_run_of_another_split_and_lead_without_qrels_are_refused(setup, tmp_path):
    dev_qids = np.load(setup["pre"] / "dev-query_ids.npy")
    run = tmp_path / "dev.tsv"
    run.write_text("".join(f"{q}\t{setup['pids'][0]}\t1\n" for q in dev_qids))
    with pytest.raises(InputError, match="another split than --mode train"):
        ph.main(run_args(setup["pre"], tmp_path / "out", run))
    with pytest.raises(InputError, match="lead split has no qrels"):
        ph.main(model_args(setup, tmp_path / "out", "lead"))


def test_help_defaults_to_train_and_names_issue_24(capsys):
    with pytest.raises(SystemExit):
        ph.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default train" in text and "issue #24" in text
    args = ph.build_parser().parse_args(["--data_type", "doc"])
    assert (args.mode, args.topk, args.max_query_length, args.max_doc_length, args.eval_batch_size) == \
        ("train", 200, None, None, 128)  # lengths: the model folder's max_seq_length, else 32 / 512 (test_st_folder)
