"""cvt_back.py: offsets → official ids through passages_ids.npy / {mode}-query_ids.npy; MS MARCO and TREC output."""
import pickle

import numpy as np
import pytest

import cvt_back
import msmarco_eval as me
from infra.io import InputError, run_cli
from infra.run_file import iter_run


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def offsets(tmp_path):
    """A preprocess dir with shuffled official ids (50 passages, 8 dev queries) and an offset rank file."""
    rng = np.random.default_rng(5)
    pre = tmp_path / "preprocess"
    pre.mkdir()
    pids = rng.choice(10_000_000, size=50, replace=False).astype(np.int64)
    qids = rng.choice(1_200_000, size=8, replace=False).astype(np.int64)
    np.save(pre / "passages_ids.npy", pids)
    np.save(pre / "dev-query_ids.npy", qids)
    lines = [f"{q}\t{p}\t{r}" for q in rng.permutation(8).tolist()
             for r, p in enumerate(rng.choice(50, size=20, replace=False).tolist(), start=1)]
    evaluate = tmp_path / "evaluate"
    evaluate.mkdir()
    write(evaluate / "dev.rank.tsv", lines)
    return {"pre": pre, "input": evaluate, "out": tmp_path / "official", "pids": pids, "qids": qids,
            "lines": [tuple(map(int, line.split("\t"))) for line in lines]}


def run(o, *extra, dataset="passage"):
    return cvt_back.main(["--input_dir", str(o["input"]), "--preprocess_dir", str(o["pre"]), "--mode", "dev",
                          "--output_dir", str(o["out"]), "--dataset", dataset, *extra])


def back_to_offsets(o, path, ids):
    """Read a converted file with msmarco_eval's own loader and invert the id maps → offset lines."""
    qoff = {int(q): i for i, q in enumerate(o["qids"])}
    poff = {int(p): i for i, p in enumerate(o["pids"])}
    return [(qoff[q], poff[d], r) for q, ranking in me.load_candidate(path, ids=ids).items()
            for d, r in zip(ranking.docids, ranking.ranks)]


def test_round_trip_passage(offsets):
    assert run(offsets) == 0
    out = offsets["out"] / "dev.rank.tsv"
    first = out.read_text().splitlines()[0].split("\t")
    q, p, r = offsets["lines"][0]
    assert first == [str(offsets["qids"][q]), str(offsets["pids"][p]), str(r)]
    assert back_to_offsets(offsets, out, "int") == offsets["lines"]


def test_doc_ids_get_the_d_prefix(offsets):
    run(offsets, dataset="doc")
    out = offsets["out"] / "dev.rank.tsv"
    assert all(line.split("\t")[1].startswith("D") for line in out.read_text().splitlines())
    assert back_to_offsets(offsets, out, "doc") == offsets["lines"]
    with pytest.raises(InputError, match="not an integer"):
        me.load_candidate(out)


def test_scores_are_kept(offsets):
    lines = [f"{q}\t{p}\t{r}\t{1.5 - r / 8}" for q, p, r in offsets["lines"]]
    write(offsets["input"] / "dev.rank.tsv", lines)
    run(offsets)
    scores = [s for *_, s in iter_run(offsets["out"] / "dev.rank.tsv")]
    assert scores == [1.5 - r / 8 for *_, r in offsets["lines"]]


def test_refuses_to_overwrite(offsets):
    run(offsets)
    out = offsets["out"] / "dev.rank.tsv"
    out.write_text("keep me\n")
    with pytest.raises(InputError, match="--overwrite"):
        run(offsets)
    assert out.read_text() == "keep me\n"
    run(offsets, "--overwrite")
    assert back_to_offsets(offsets, out, "int") == offsets["lines"]


def test_offset_out_of_range_names_line_and_value(offsets, capsys):
    lines = [f"{q}\t{p}\t{r}" for q, p, r in offsets["lines"]]
    lines[6] = "3\t50\t7"
    write(offsets["input"] / "dev.rank.tsv", lines)
    with pytest.raises(InputError, match="passage offset is out of range") as e:
        run(offsets)
    assert (e.value.line, e.value.value) == (7, 50)
    assert not offsets["out"].exists() or not any(offsets["out"].iterdir())     # nothing half-written
    lines[6] = "8\t0\t7"
    write(offsets["input"] / "dev.rank.tsv", lines)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(cvt_back.main, ["--input_dir", str(offsets["input"]), "--preprocess_dir", str(offsets["pre"]),
                                "--mode", "dev", "--output_dir", str(offsets["out"]), "--dataset", "passage"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {offsets['input'] / 'dev.rank.tsv'}:7: query offset is out of range (the id map has 8 entries) "
        f"(got 8)"]


def test_pickled_or_wrong_id_maps_are_refused(offsets):
    np.save(offsets["pre"] / "passages_ids.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="not a plain .npy"):
        run(offsets)
    np.save(offsets["pre"] / "passages_ids.npy", np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(InputError, match="1-D integer"):
        run(offsets)
    (offsets["pre"] / "passages_ids.npy").write_bytes(pickle.dumps(list(range(50))))
    with pytest.raises(InputError, match="not a plain .npy"):
        run(offsets)


def test_trec_output_reads_with_our_loader_and_ir_measures(offsets):
    run(offsets, "--trec", "--tag", "STAR")
    out = offsets["out"] / "dev.trec"
    rows = [line.split(" ") for line in out.read_text().splitlines()]
    assert {(len(r), r[1], r[5]) for r in rows} == {(6, "Q0", "STAR")}
    assert [float(r[4]) for r in rows] == [1 / r for *_, r in offsets["lines"]]
    # our loader (6 columns: positions from trec order on score = 1/rank give back the ranks)
    assert sorted(back_to_offsets(offsets, out, "int")) == sorted(offsets["lines"])
    ir_measures = pytest.importorskip("ir_measures")
    theirs = [(int(d.query_id), int(d.doc_id), d.score) for d in ir_measures.read_trec_run(str(out))]
    assert theirs == [(int(offsets["qids"][q]), int(offsets["pids"][p]), 1 / r) for q, p, r in offsets["lines"]]


def test_real_dev_qrels_end_to_end(shared_dir, tmp_path):
    """Official dev qrels → a preprocess-style id space → an offset run with each first positive at rank
    1 + (i mod 12) → cvt_back → msmarco_eval against the real qrels.dev.small.tsv gives the hand-computed MRR@10."""
    qrels_path = shared_dir / "data" / "msmarco-passage-eval" / "qrels.dev.small.tsv"
    qrels = me.load_reference(qrels_path)
    qids = np.array(sorted(qrels), dtype=np.int64)
    pids = np.array(sorted({p for judged in qrels.values() for p in judged}), dtype=np.int64)
    pre = tmp_path / "preprocess"
    pre.mkdir()
    np.save(pre / "passages_ids.npy", pids)
    np.save(pre / "dev-query_ids.npy", qids)
    poff = {int(p): i for i, p in enumerate(pids)}
    lines, expected = [], 0.0
    for qoff, qid in enumerate(qids.tolist()):
        rank = 1 + qoff % 12
        lines.append(f"{qoff}\t{poff[next(iter(qrels[qid]))]}\t{rank}")
        expected += 1 / rank if rank <= 10 else 0.0
    (tmp_path / "in").mkdir()
    write(tmp_path / "in" / "dev.rank.tsv", lines)
    cvt_back.main(["--input_dir", str(tmp_path / "in"), "--preprocess_dir", str(pre), "--mode", "dev",
                   "--output_dir", str(tmp_path / "out"), "--dataset", "passage"])
    result = me.evaluate_files(qrels_path, tmp_path / "out" / "dev.rank.tsv")
    assert result["MRR@10"] == pytest.approx(expected / 6980) and result["QueriesRanked"] == 6980


@pytest.mark.parametrize("lines, message", [([], "no lines"), (["0 Q0 1 1 2.5 run"], "not a TREC run"),
                                            (["0\t1"], "expected 3")])
def test_bad_rank_files_leave_no_output(offsets, lines, message):
    write(offsets["input"] / "dev.rank.tsv", lines)
    with pytest.raises(InputError, match=message):
        run(offsets)
    assert not (offsets["out"] / "dev.rank.tsv").exists()
