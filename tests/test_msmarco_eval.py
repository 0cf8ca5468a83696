"""msmarco_eval.py: MRR@N as the official MS MARCO script, recall, and trec_eval-exact nDCG/P/MAP; input errors.

Expected values are hand-computed from the definitions (docstring of msmarco_eval), published trec_eval figures
(tests/data/cacm_trec_eval.tsv, from ../shared/data/cacm/PROVENANCE.md), or ir_measures (an independent
implementation backed by trec_eval's own C code through pytrec_eval).
"""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import msmarco_eval as me
from infra.io import InputError

DATA = Path(__file__).parent / "data"


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def dcg(gains):
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


# ------------------------------------------------------------------------------------------ MRR@N and recall

@pytest.fixture
def small(tmp_path):
    """3 reference queries (1, 2, 3); the candidate ranks 1, 2 and an unknown query 4, not 3."""
    ref = write(tmp_path / "qrels.tsv", ["1\t0\t10\t1", "2\t0\t20\t1", "2\t0\t21\t1", "3\t0\t30\t1"])
    cand = write(tmp_path / "run.tsv", [
        "1\t11\t1", "1\t10\t2", "1\t12\t3",                       # q1: first positive at rank 2
        "2\t99\t1", "2\t20\t12", "2\t21\t15",                     # q2: positives at 12 and 15 (rank gap kept)
        "4\t10\t1",                                               # unknown to the reference
    ])
    return ref, cand


def test_mrr_divides_by_reference_queries_and_counts_ranked_queries(small, capsys):
    ref, cand = small
    result = me.evaluate_files(ref, cand, ["MRR@10", "MRR@12", "MRR@15"])
    assert result["MRR@10"] == pytest.approx((1 / 2) / 3)
    assert result["MRR@12"] == pytest.approx((1 / 2 + 1 / 12) / 3)
    assert result["MRR@15"] == pytest.approx((1 / 2 + 1 / 12) / 3)
    assert result["QueriesRanked"] == 3
    assert "1 of the 3 candidate query ids are not in the reference" in capsys.readouterr().err


def test_recall_counts_relevant_within_k_over_reference_queries(small):
    ref, cand = small
    result = me.evaluate_files(ref, cand, ["R@1", "R@2", "R@12", "R@15"])
    assert result["R@1"] == 0.0
    assert result["R@2"] == pytest.approx(1 / 3)
    assert result["R@12"] == pytest.approx((1 + 1 / 2 + 0) / 3)
    assert result["R@15"] == pytest.approx((1 + 1 + 0) / 3)


def test_cli_prints_the_original_block(small, capsys):
    ref, cand = small
    me.main([str(ref), str(cand)])
    assert capsys.readouterr().out.splitlines() == [
        "#####################", f"MRR @10: {(1 / 2) / 3}", "QueriesRanked: 3", "#####################"]
    me.main([str(ref), str(cand), "12", "--metrics", "R@15"])
    assert capsys.readouterr().out.splitlines() == [
        "#####################", f"MRR @12: {(1 / 2 + 1 / 12) / 3}", f"R@15: {2 / 3}", "QueriesRanked: 3",
        "#####################"]


def test_mrr_sum_is_bit_identical_to_the_original_formula(tmp_path):
    """The original adds 1/(i+1) per candidate query in file order and divides once."""
    rng = np.random.default_rng(3)
    ranks = rng.integers(1, 11, size=200)
    write(tmp_path / "q.tsv", [f"{q}\t0\t{1000 + q}\t1" for q in range(250)])
    write(tmp_path / "r.tsv", [f"{q}\t{1000 + q}\t{r}" for q, r in enumerate(ranks.tolist())])
    expected = 0.0
    for r in ranks.tolist():
        expected += 1 / r
    expected = expected / 250
    assert me.evaluate_files(tmp_path / "q.tsv", tmp_path / "r.tsv")["MRR@10"] == expected


def test_grade_threshold_and_the_issue_8_trap(tmp_path, capsys):
    """Grade-0 lines are relevant to the original (rel_threshold 0), not at the default 1."""
    ref = write(tmp_path / "test-qrel.tsv", ["1\t0\t10\t0", "1\t0\t11\t2", "2\t0\t20\t0", "3\t0\t30\t1"])
    cand = write(tmp_path / "test.rank.tsv", ["1\t10\t1", "1\t11\t2", "2\t20\t1", "3\t31\t1", "3\t30\t4"])
    original = me.evaluate_files(ref, cand, ["MRR@10", "R@1"], rel_threshold=0)
    assert original["MRR@10"] == pytest.approx((1 + 1 + 1 / 4) / 3)
    assert original["R@1"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    default = me.evaluate_files(ref, cand, ["MRR@10", "R@1"])
    assert "2 reference judgments have a grade < 1" in capsys.readouterr().err
    assert default["MRR@10"] == pytest.approx((1 / 2 + 1 / 4) / 2)      # query 2 has no relevant judgment
    assert default["R@1"] == 0.0
    trec_dl = me.evaluate_files(ref, cand, ["MRR@10"], rel_threshold=2)
    assert trec_dl["MRR@10"] == pytest.approx(1 / 2)                     # only query 1 has a grade >= 2
    with pytest.raises(InputError, match="grade >= 3"):
        me.evaluate_files(ref, cand, ["MRR@10"], rel_threshold=3)


def test_doc_mode_ids_and_cutoff(tmp_path, capsys):
    ref = tmp_path / "docdev-qrels.tsv"
    ref.write_bytes(b"2\t0\tD1650436\t1\r\n1215 0 D1202771 1\r\n")
    cand = write(tmp_path / "dev.rank.tsv", ["2\tD7\t1", "2\tD1650436\t50", "1215\tD1202771\t101"])
    me.main([str(ref), str(cand), "doc"])
    assert capsys.readouterr().out.splitlines()[1] == f"MRR @100: {(1 / 50) / 2}"
    write(tmp_path / "plain.tsv", ["2\t1650436\t1"])
    with pytest.raises(InputError, match="'D' prefix") as e:
        me.evaluate_files(ref, tmp_path / "plain.tsv", ids="doc")
    assert e.value.line == 1 and e.value.value == "1650436"


def test_repeated_document_counts_once(tmp_path, capsys):
    ref = write(tmp_path / "q.tsv", ["1 0 10 1", "1 0 11 1"])
    cand = write(tmp_path / "r.tsv", ["1\t10\t1", "1\t10\t2", "1\t12\t3"])
    result = me.evaluate_files(ref, cand, ["MRR@10", "R@3", "P@3"])
    assert "list a document more than once" in capsys.readouterr().err
    assert result == {"MRR@10": 1.0, "R@3": 0.5, "P@3": pytest.approx(1 / 3), "QueriesRanked": 1}


# ------------------------------------------------------------------------------------- trec_eval family

@pytest.fixture
def graded(tmp_path):
    """q1 graded with score ties; q2 judged but unranked (-c: counts 0); q3 judged all non-relevant."""
    ref = write(tmp_path / "qrels.txt", ["q1 Q0 a 3", "q1 Q0 b 2", "q1 Q0 c 0", "q1 Q0 d 1", "q1 Q0 e 2",
                                         "q2 Q0 x 1", "q3 Q0 y 0"])
    run = write(tmp_path / "run.trec", ["q1 Q0 c 5 3.0 t", "q1 Q0 a 3 4.0 t", "q1 Q0 b 1 5.0 t",
                                        "q1 Q0 d 4 3.0 t", "q1 Q0 z 2 4.0 t", "q3 Q0 y 1 1.0 t"])
    return ref, run


def test_ndcg_precision_map_follow_trec_eval(graded):
    """trec_eval order: score desc, ties by docno desc -> b(5) z(4) a(4) d(3) c(3); ranks are ignored."""
    ref, run = graded
    result = me.evaluate_files(ref, run, ["nDCG@10", "nDCG@2", "P@3", "MAP", "MRR@10"], ids="str")
    q1_ndcg = dcg([2, 0, 3, 1, 0]) / dcg([3, 2, 2, 1])
    assert result["nDCG@10"] == pytest.approx(q1_ndcg / 3)
    assert result["nDCG@2"] == pytest.approx(dcg([2, 0]) / dcg([3, 2]) / 3)
    assert result["P@3"] == pytest.approx((2 / 3) / 3)
    assert result["MAP"] == pytest.approx((1 / 1 + 2 / 3 + 3 / 4) / 4 / 3)
    assert result["MRR@10"] == pytest.approx(1 / 2)       # MS MARCO family: q1 and q2 have relevant judgments


def test_trec_levels_apply_to_precision_and_map_not_ndcg(graded):
    ref, run = graded
    level1 = me.evaluate_files(ref, run, ["nDCG@10"], ids="str")
    level2 = me.evaluate_files(ref, run, ["nDCG@10", "P@3", "MAP"], ids="str", rel_threshold=2)
    assert level2["nDCG@10"] == level1["nDCG@10"]
    assert level2["P@3"] == pytest.approx((2 / 3) / 3)
    assert level2["MAP"] == pytest.approx((1 / 1 + 2 / 3) / 3 / 3)


def test_rank_file_scores_and_ranks(tmp_path):
    """A 3-column file scores 1/rank (file order irrelevant); a 4-column file's MRR follows ranks, nDCG scores."""
    ref = write(tmp_path / "q.tsv", ["1\t0\t10\t1", "1\t0\t11\t3"])
    three = write(tmp_path / "three.tsv", ["1\t11\t3", "1\t12\t1", "1\t10\t2"])
    result = me.evaluate_files(ref, three, ["nDCG@10", "MRR@10"])
    assert result["nDCG@10"] == pytest.approx(dcg([0, 1, 3]) / dcg([3, 1]))
    assert result["MRR@10"] == pytest.approx(1 / 2)
    four = write(tmp_path / "four.tsv", ["1\t12\t1\t0.5", "1\t10\t2\t0.9", "1\t11\t3\t0.9"])
    result = me.evaluate_files(ref, four, ["nDCG@10", "MRR@10"])
    assert result["nDCG@10"] == pytest.approx(dcg([3, 1, 0]) / dcg([3, 1]))   # ties: "11" > "10"
    assert result["MRR@10"] == pytest.approx(1 / 2)


def test_cacm_matches_published_trec_eval(shared_dir):
    cacm = shared_dir / "data" / "cacm"
    expected = {}
    for line in (DATA / "cacm_trec_eval.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            name, value, _ = line.split("\t")
            expected[name] = float(value)
    result = me.evaluate_files(cacm / "qrels.cacm.txt", cacm / "run.cacm.bm25.anserini.txt", list(expected),
                               ids="str")
    assert {name: round(result[name], 4) for name in expected} == expected
    assert result["QueriesRanked"] == 64


# ---------------------------------------------------------------------- independent implementation: ir_measures

def _random_collection(rng, tmp_path, tied):
    """60 judged queries (grades 0-3, five all-zero), a run over 55 of them + 5 unknown, 150 docs each."""
    qrels, run = [], []
    for q in range(60):
        docs = rng.choice(400, size=40, replace=False)
        grades = rng.choice(4, size=40, p=[0.55, 0.2, 0.15, 0.1]) if q >= 5 else np.zeros(40, dtype=int)
        if q >= 5:
            grades[0] = 3
        qrels += [f"{q} 0 d{d} {g}" for d, g in zip(docs.tolist(), grades.tolist())]
    for q in list(range(5, 60)) + list(range(100, 105)):
        docs = rng.choice(400, size=150, replace=False)
        scores = rng.random(150) * 10
        if tied:
            scores = np.round(scores, 0)
        run += [f"{q} Q0 d{d} 1 {s!r} tag" for d, s in zip(docs.tolist(), scores.tolist())]
    return write(tmp_path / "qrels.txt", qrels), write(tmp_path / "run.trec", run)


def _n_relevant_queries(qrels_path, level):
    rows = [line.split() for line in qrels_path.read_text().splitlines()]
    return len({q for q, _, _, g in rows if int(g) >= level}), len({row[0] for row in rows})


@pytest.mark.parametrize("tied", [False, True])
def test_equals_ir_measures_on_random_graded_run(tmp_path, tied):
    ir_measures = pytest.importorskip("ir_measures")
    if not ir_measures.providers.registry["pytrec_eval"].is_available():
        pytest.skip("ir_measures has no pytrec_eval provider here")
    from ir_measures import AP, P, R, RR, nDCG
    qrels_path, run_path = _random_collection(np.random.default_rng(7 + tied), tmp_path, tied)
    qrels = list(ir_measures.read_trec_qrels(str(qrels_path)))
    run = list(ir_measures.read_trec_run(str(run_path)))
    # pytrec_eval (trec_eval's code) for everything; RR@k is only in the msmarco provider, without trec_eval's
    # tie order, so it is compared on the tie-free run only.
    provider = ir_measures.pytrec_eval
    for level in (1, 2):
        ours = me.evaluate_files(qrels_path, run_path, ["nDCG@10", "P@30", "MAP", "R@100", "MRR@10"], ids="str",
                                 rel_threshold=level)
        theirs = provider.calc_aggregate([nDCG @ 10, P(rel=level) @ 30, AP(rel=level), R(rel=level) @ 100],
                                         qrels, run)
        # MRR/R average over the queries with a relevant judgment; ir_measures over all judged queries.
        with_rel, judged = _n_relevant_queries(qrels_path, level)
        assert ours["nDCG@10"] == pytest.approx(theirs[nDCG @ 10], abs=1e-12)
        assert ours["P@30"] == pytest.approx(theirs[P(rel=level) @ 30], abs=1e-12)
        assert ours["MAP"] == pytest.approx(theirs[AP(rel=level)], abs=1e-12)
        assert ours["R@100"] * with_rel / judged == pytest.approx(theirs[R(rel=level) @ 100], abs=1e-12)
        if not tied:
            rr = ir_measures.calc_aggregate([RR(rel=level) @ 10], qrels, run)[RR(rel=level) @ 10]
            assert ours["MRR@10"] * with_rel / judged == pytest.approx(rr, abs=1e-12)


def test_rank_file_equals_trec_run_without_ties(tmp_path):
    """The same distinct-score run as a 4-column rank file (ranks in score order) gives every metric equal."""
    qrels_path, run_path = _random_collection(np.random.default_rng(11), tmp_path, tied=False)
    rows = [line.split() for line in run_path.read_text().splitlines()]
    by_query = {}
    for q, _, d, _, s, _ in rows:
        by_query.setdefault(q, []).append((float(s), d))
    lines = [f"{q}\t{d}\t{rank}\t{s!r}" for q, docs in by_query.items()
             for rank, (s, d) in enumerate(sorted(docs, reverse=True), start=1)]
    rank_path = write(tmp_path / "run.tsv", lines)
    metrics = ["MRR@10", "R@100", "nDCG@10", "P@30", "MAP"]
    assert (me.evaluate_files(qrels_path, rank_path, metrics, ids="str")
            == me.evaluate_files(qrels_path, run_path, metrics, ids="str"))


# ------------------------------------------------------------------------------------------- real MS MARCO

def test_real_msmarco_qrels_formats(shared_dir):
    passage = shared_dir / "data" / "msmarco-passage-eval"
    tabs = me.load_reference(passage / "qrels.dev.small.tsv")
    assert tabs == me.load_reference(passage / "qrels.msmarco-passage.dev-subset.txt")
    assert len(tabs) == 6980 and sum(map(len, tabs.values())) == 7437
    docs = me.load_reference(shared_dir / "data" / "msmarco-doc-eval" / "msmarco-docdev-qrels.tsv", ids="doc")
    assert len(docs) == 5193 and docs[2] == {1650436: 1}
    dl19 = me.load_reference(passage / "2019qrels-pass.txt")
    assert len(dl19) == 43 and me.count_below_threshold(dl19, 1) == 5158


def test_real_dev_qrels_perfect_and_shifted_runs(shared_dir, tmp_path):
    """Positives first → MRR@10 = R@100 = 1; positives pushed to ranks 11.. → MRR@10 = 0, R@100 = 1."""
    qrels_path = shared_dir / "data" / "msmarco-passage-eval" / "qrels.dev.small.tsv"
    qrels = me.load_reference(qrels_path)
    for first_rank, mrr in ((1, 1.0), (11, 0.0)):
        lines = [f"{q}\t{p}\t{first_rank + i}" for q, judged in qrels.items() for i, p in enumerate(judged)]
        run_path = write(tmp_path / f"run{first_rank}.tsv", lines)
        result = me.evaluate_files(qrels_path, run_path, ["MRR@10", "R@100"])
        assert result == {"MRR@10": mrr, "R@100": 1.0, "QueriesRanked": 6980}


# ----------------------------------------------------------------------------------------------- input errors

@pytest.mark.parametrize("lines, line, message, value", [
    (["1\t10\t1", "1\t11\t1"], 2, "already has a document at this rank", 1),
    (["1\t10\t1", "1\t11"], 2, "expected 3 fields", "1\t11"),
    (["1 10"], 1, "expected 3", "1 10"),
    (["1\tabc\t1"], 1, "document id is not an integer", "abc"),
    (["x1\t10\t1"], 1, "query id is not an integer", "x1"),
    (["1\t10\tfirst"], 1, "rank is not an integer", "first"),
    (["1\t10\t0"], 1, "ranks are 1-based", "0"),
    (["1\t10\t1001"], 1, "1000 slots", 1001),
    (["1\t10\t1\tnan"], 1, "score is not a finite number", "nan"),
    (["1 Q0 10 1 high run"], 1, "score is not a finite number", "high"),
])
def test_candidate_errors_name_file_line_and_value(tmp_path, lines, line, message, value):
    ref = write(tmp_path / "q.tsv", ["1\t0\t10\t1"])
    cand = write(tmp_path / "c.tsv", lines)
    with pytest.raises(InputError, match=message) as e:
        me.evaluate_files(ref, cand)
    assert (e.value.path, e.value.line, e.value.value) == (str(cand), line, value)


def test_reference_errors(tmp_path):
    cand = write(tmp_path / "c.tsv", ["1\t10\t1"])
    for lines, message in ((["1\t0\t10"], "expected 4 fields"), (["1\t0\t10\tyes"], "grade is not an integer"),
                           ([], "no judgments")):
        with pytest.raises(InputError, match=message):
            me.evaluate_files(write(tmp_path / "q.tsv", lines), cand)


def test_unknown_and_empty_candidates(tmp_path):
    ref = write(tmp_path / "q.tsv", ["1\t0\t10\t1"])
    with pytest.raises(InputError, match="no matching qids") as e:
        me.evaluate_files(ref, write(tmp_path / "other.tsv", ["7\t10\t1", "8\t10\t1"]))
    assert e.value.path == str(tmp_path / "other.tsv")
    with pytest.raises(InputError, match="no results"):
        me.evaluate_files(ref, write(tmp_path / "empty.tsv", ["", ""]))
    with pytest.raises(InputError, match="unknown metric"):
        me.evaluate_files(ref, ref, ["MRR@0"])


def test_max_rank_is_configurable(tmp_path):
    ref = write(tmp_path / "q.tsv", ["1\t0\t10\t1"])
    cand = write(tmp_path / "c.tsv", ["1\t11\t1", "1\t10\t2000"])
    assert me.evaluate_files(ref, cand, ["R@2000"], max_rank=2000)["R@2000"] == 1.0


def test_cli_input_error_is_one_line_exit_2(tmp_path, repo_dir):
    ref = write(tmp_path / "q.tsv", ["1\t0\t10\t1"])
    cand = write(tmp_path / "c.tsv", ["1\t10\t1", "1\t11\t1"])
    done = subprocess.run([sys.executable, str(repo_dir / "msmarco_eval.py"), str(ref), str(cand)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"error: {cand}:2: query 1 already has a document at this rank (got 1)"]
    assert "Traceback" not in done.stderr


def test_module_does_not_import_torch(repo_dir):
    code = "import sys, msmarco_eval; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=repo_dir)
    assert done.stdout.strip() == "False"
