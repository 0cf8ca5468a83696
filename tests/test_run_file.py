"""infra/run_file.py: the run-file rules (numbered as in its module docstring), each on hand-built lines; trec_eval's
order; the integer-array reader; the id-map loader."""
import pickle

import numpy as np
import pytest

from infra import run_file as rf
from infra.io import InputError


def write(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def read(tmp_path, lines, ids="int"):
    return list(rf.iter_run(write(tmp_path / "run.txt", lines), ids))


def error(tmp_path, lines, ids="int"):
    path = write(tmp_path / "run.txt", lines)
    with pytest.raises(InputError) as info:
        list(rf.iter_run(path, ids))
    assert info.value.path == str(path)
    return info.value


# ------------------------------------------------------------------------------------------------- formats

def test_formats_yield_number_ids_rank_and_score(tmp_path):
    assert read(tmp_path, ["3\t7\t1", "3\t8\t2"]) == [(1, 3, 7, 1, None), (2, 3, 8, 2, None)]
    assert read(tmp_path, ["3\t7\t1\t0.5"]) == [(1, 3, 7, 1, 0.5)]
    assert read(tmp_path, ["3 Q0 7 1 0.5 BM25"]) == [(1, 3, 7, None, 0.5)]  # rule 6: no rank on TREC lines


# ------------------------------------------------------------------------------------------- rules 1 to 4

def test_rule1_bom_and_crlf_accepted_non_utf8_refused(tmp_path):
    path = tmp_path / "run.txt"
    path.write_bytes(b"\xef\xbb\xbf3\t7\t1\r\n3\t8\t2\r\n")
    assert list(rf.iter_run(path)) == [(1, 3, 7, 1, None), (2, 3, 8, 2, None)]
    e = error(tmp_path, ["3\t7\t1", b"3\t\xff8\t2"])
    assert "not UTF-8" in str(e) and e.line == 2 and e.value is not None


def test_rule2_tabs_and_spaces_alike(tmp_path):
    assert read(tmp_path, ["3 7  1", "3\t 8\t2"]) == [(1, 3, 7, 1, None), (2, 3, 8, 2, None)]
    assert read(tmp_path, ["3\tQ0\t7\t1\t0.5\tBM25"]) == [(1, 3, 7, None, 0.5)]


def test_rule3_blank_lines_skipped_line_numbers_kept(tmp_path):
    assert read(tmp_path, ["", "3\t7\t1", "  \t", "3\t8\t2", ""]) == [(2, 3, 7, 1, None), (4, 3, 8, 2, None)]
    assert read(tmp_path, ["", " "]) == []


@pytest.mark.parametrize("lines, line, message", [
    (["3\t7"], 1, "expected 3 (qid docid rank), 4 (qid docid rank score) or 6 (TREC qid Q0 docid rank score tag) "
                  "fields, found 2"),
    (["3 Q0 7 1 0.5"], 1, "found 5"),
    (["", "3\t7\t1", "3\t8\t2\t0.5"], 3, "expected 3 fields like the first line (qid docid rank), found 4"),
    (["3 Q0 7 1 0.5 BM25", "3\t8\t2"], 2, "expected 6 fields like the first line (TREC"),
])
def test_rule4_first_line_fixes_the_field_count(tmp_path, lines, line, message):
    e = error(tmp_path, lines)
    assert message in str(e) and e.line == line and e.value == lines[line - 1]


# ------------------------------------------------------------------------------------------------ rule 5: ids

def test_rule5_id_kinds(tmp_path):
    assert read(tmp_path, ["3\tD7\t1"], ids="doc") == [(1, 3, 7, 1, None)]
    assert read(tmp_path, ["3 Q0 D8 1 0.5 t"], ids="doc") == [(1, 3, 8, None, 0.5)]
    assert read(tmp_path, ["q-3 Q0 CACM-1410 1 0.5 t"], ids="str") == [(1, "q-3", "CACM-1410", None, 0.5)]
    assert read(tmp_path, ["03\t007\t1"], ids="str") == [(1, "03", "007", 1, None)]  # text, not numbers


@pytest.mark.parametrize("lines, ids, message, value", [
    (["3\tD7\t1"], "int", "document id is not an integer", "D7"),
    (["3\t-7\t1"], "int", "document id is negative", "-7"),
    (["x3\t7\t1"], "int", "query id is not an integer", "x3"),
    (["-3\t7\t1"], "int", "query id is negative", "-3"),
    (["3\t7\t1"], "doc", "document id lacks the 'D' prefix of doc mode", "7"),
    (["3 Q0 7 1 0.5 t"], "doc", "document id lacks the 'D' prefix of doc mode", "7"),
    (["3\tDx\t1"], "doc", "document id is not an integer", "x"),
    (["D3\tD7\t1"], "doc", "query id is not an integer", "D3"),
])
def test_rule5_bad_ids(tmp_path, lines, ids, message, value):
    e = error(tmp_path, lines, ids)
    assert message in str(e) and (e.line, e.value) == (1, value)


# ----------------------------------------------------------------------------------------------- rule 6: rank

@pytest.mark.parametrize("lines, message, value", [
    (["3\t7\t0"], "ranks are 1-based", "0"),
    (["3\t7\t-1"], "rank is negative", "-1"),
    (["3\t7\t1.5"], "rank is not an integer", "1.5"),
    (["3 Q0 7 -1 0.5 t"], "rank is negative", "-1"),
    (["3 Q0 7 first 0.5 t"], "rank is not an integer", "first"),
])
def test_rule6_bad_ranks(tmp_path, lines, message, value):
    e = error(tmp_path, lines)
    assert message in str(e) and (e.line, e.value) == (1, value)


def test_rule6_trec_rank_column_not_used(tmp_path):
    """Terrier numbers from 0; a TREC line carries no rank, whatever its column says."""
    assert read(tmp_path, ["3 Q0 7 0 0.5 t", "3 Q0 8 0 0.7 t"]) == [(1, 3, 7, None, 0.5), (2, 3, 8, None, 0.7)]


# ---------------------------------------------------------------------------------------------- rule 7: score

@pytest.mark.parametrize("score", ["nan", "inf", "-inf", "-Infinity", "1e400", "high", "0x1p3"])
@pytest.mark.parametrize("template", ["3\t7\t1\t{}", "3 Q0 7 1 {} t"])
def test_rule7_score_must_be_finite(tmp_path, template, score):
    e = error(tmp_path, [template.format(score)])
    assert "score is not a finite number" in str(e) and (e.line, e.value) == (1, score)


def test_rule7_finite_scores(tmp_path):
    lines = ["3\t7\t1\t-1e3", "3\t8\t2\t2.5E-3", "3\t9\t3\t-0"]
    assert [s for *_, s in read(tmp_path, lines)] == [-1000.0, 0.0025, 0.0]


# ------------------------------------------------------------------------------------------------ rule 8: Q0, tag

def test_rule8_q0_and_tag_not_read(tmp_path):
    assert read(tmp_path, ["3 iter0 7 1 0.5 run-a", "3 x 8 2 0.4 run-b"]) == [(1, 3, 7, None, 0.5),
                                                                              (2, 3, 8, None, 0.4)]


# ------------------------------------------------------------------------------------- fast path = the rules

EDGE_LINES = ["3\t7\t1", "3\t7\t+1", "3\t7\t1_0", "+3\t7\t1", "3\t7\t0", "3\t-0\t1", "3\t7\t1\t1e-320",
              "3\t7\t1\t-0.0", "3\t7\t1\t1e400", "3\t7\t1\tnan", "3\t\u0663\t1", "3\tD7\t1", "3\t7\tx",
              "3 Q0 7 0 1.5 t", "3 Q0 7 -0 1.5 t", "3 Q0 D7 1 1.5 t", "3 Q0 7 1 inf t", "3 Q0 7 x 1 t"]


@pytest.mark.parametrize("line", EDGE_LINES)
@pytest.mark.parametrize("ids", ["int", "doc"])
@pytest.mark.parametrize("trec_ranks", [False, True])
def test_integer_fast_path_accepts_exactly_what_the_rules_accept(tmp_path, line, ids, trec_ranks):
    """iter_run reads integer ids without the per-field checks when they all pass; its result must equal the
    per-field parser's, and a line it refuses must be refused with the per-field message."""
    if ids == "doc":
        fields = line.split()
        doc = 2 if len(fields) == 6 else 1
        fields[doc] = fields[doc] if fields[doc].startswith("D") else "D" + fields[doc]
        line = " ".join(fields)
    path = write(tmp_path / "run.txt", [line])
    try:
        expected = rf._parse_line(line.split(), ids, path, 1, trec_ranks)
    except InputError as e:
        with pytest.raises(InputError) as info:
            list(rf.iter_run(path, ids, trec_ranks=trec_ranks))
        assert str(info.value) == str(e)
    else:
        assert list(rf.iter_run(path, ids, trec_ranks=trec_ranks)) == [expected]


def test_missing_file_named_by_what(tmp_path):
    with pytest.raises(InputError, match="candidate file not found"):
        list(rf.iter_run(tmp_path / "nope.tsv", what="candidate file"))
    with pytest.raises(ValueError, match="ids must be one of"):
        list(rf.iter_run(tmp_path / "nope.tsv", ids="bytes"))


# ------------------------------------------------------------------------------------------ trec_eval order

def test_trec_eval_order_score_then_docno_text_descending():
    # score 2.0: docnos "9" > "9" > "10" as text (file order between the two 9s), then score 1.0
    assert rf.trec_eval_order([1.0, 2.0, 2.0, 2.0], [5, 9, 10, 9]).tolist() == [1, 3, 2, 0]
    assert rf.trec_eval_order([1.0, 1.0, 1.0], ["b", "a", "c"]).tolist() == [2, 0, 1]
    queries = np.array([7, 3, 7, 3])
    assert rf.trec_eval_order([1.0, 1.0, 2.0, 1.0], [1, 2, 3, 10], queries).tolist() == [1, 3, 2, 0]


def test_trec_eval_order_equals_a_python_sort_on_heavy_ties():
    rng = np.random.default_rng(0)
    queries = rng.integers(0, 5, 3000)
    scores = rng.integers(0, 4, 3000) / 2
    docids = rng.integers(0, 200, 3000)
    # queries ascending, score and docno text descending; reverse=True keeps equal keys in file order
    expected = sorted(range(3000), key=lambda i: (-queries[i], scores[i], str(docids[i])), reverse=True)
    assert rf.trec_eval_order(scores, docids, queries).tolist() == expected


# ------------------------------------------------------------------------------------------- integer arrays

def test_read_run_arrays_rank_file_keeps_the_rank_column(tmp_path):
    path = write(tmp_path / "run.tsv", ["5\t10\t2", "5\t11\t1", ""])
    qids, docids, ranks = rf.read_run_arrays(path)
    assert [a.dtype for a in (qids, docids, ranks)] == [np.int64] * 3
    assert (qids.tolist(), docids.tolist(), ranks.tolist()) == ([5, 5], [10, 11], [2, 1])


def test_read_run_arrays_trec_run_keeps_its_own_ranks(tmp_path):
    path = write(tmp_path / "run.trec", ["5 Q0 D10 1 0.5 t", "4 Q0 D9 1 0.1 t", "5 Q0 D11 2 0.9 t",
                                         "5 Q0 D9 3 0.5 t", "4 Q0 D8 0 0.3 t"])
    qids, docids, ranks = rf.read_run_arrays(path, "doc")
    assert (qids.tolist(), docids.tolist()) == ([5, 4, 5, 5, 4], [10, 9, 11, 9, 8])
    assert ranks.tolist() == [1, 1, 2, 3, 0]          # the rank column, not trec_eval's score order
    assert [line[3] for line in rf.iter_run(path, "doc")] == [None] * 5   # evaluation: trec_eval reads no rank


def test_read_run_arrays_integer_ids_only(tmp_path):
    with pytest.raises(ValueError, match="integer ids"):
        rf.read_run_arrays(write(tmp_path / "run.tsv", ["5\t10\t1"]), "str")
    path = write(tmp_path / "run.trec", ["5 Q0 D10 1 0.5 t", "5 Q0 D11 2 nan t"])
    with pytest.raises(InputError, match="score is not a finite number") as info:
        rf.read_run_arrays(path, "doc")
    assert (info.value.path, info.value.line, info.value.value) == (str(path), 2, "nan")


# ---------------------------------------------------------------------------------------------------- id maps

def test_load_id_map(tmp_path):
    np.save(tmp_path / "ids.npy", np.array([7, 3, 9], np.int32))
    ids = rf.load_id_map(tmp_path / "ids.npy")
    assert ids.dtype == np.int64 and ids.tolist() == [7, 3, 9]


@pytest.mark.parametrize("make, message", [
    (lambda p: np.save(p, np.array([{"x": 1}], dtype=object), allow_pickle=True), "not a plain .npy array"),
    (lambda p: p.write_bytes(pickle.dumps(list(range(5)))), "not a plain .npy array"),
    (lambda p: p.write_bytes(b"\x93NUMPY"), "not a plain .npy array"),
    (lambda p: np.save(p, np.zeros((2, 2), np.int64)), "expected a 1-D integer array of official ids"),
    (lambda p: np.save(p, np.zeros(3, np.float64)), "expected a 1-D integer array of official ids"),
    (lambda p: None, "id map not found"),
])
def test_load_id_map_refuses(tmp_path, make, message):
    path = tmp_path / "ids.npy"
    make(path)
    with pytest.raises(InputError, match=message) as info:
        rf.load_id_map(path)
    assert info.value.path == str(path)
