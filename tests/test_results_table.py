"""results_table.py's table and JSON on a tiny reproduce.sh ROOT: the DL20 NDCG@10 column (TREC DL 2020, the
test2020 split) appears only when some model has a ``test2020.rank.tsv`` and is scored on ``test2020-qrel.tsv``."""
import json
import math
from pathlib import Path

import pytest

import results_table
from helpers import write_files
from msmarco_eval import evaluate_files

QRELS = {"dev-qrel.tsv": "0\t0\t3\t1\n1\t0\t4\t1\n",
         "test-qrel.tsv": "0\t0\t1\t1\n0\t0\t2\t0\n",
         "test2020-qrel.tsv": "0\t0\t5\t2\n0\t0\t6\t0\n1\t0\t7\t3\n1\t0\t8\t1\n"}  # graded, 0 included


def ranking(*per_query: tuple[int, ...]) -> str:
    """A rank file (``qoffset \\t poffset \\t rank``) listing each query's passages in order."""
    return "".join(f"{q}\t{p}\t{r}\n" for q, pids in enumerate(per_query) for r, p in enumerate(pids, 1))


RANKS = {"evaluate/star": {"dev.rank.tsv": ranking((3, 9), (9, 4)), "test.rank.tsv": ranking((1, 2)),
                           "test2020.rank.tsv": ranking((6, 5), (7, 8))},
         "evaluate/inbatch": {"dev.rank.tsv": ranking((9, 3), (4,)), "test.rank.tsv": ranking((2, 1))}}


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    write_files(tmp_path / "preprocess", {name: text.encode() for name, text in QRELS.items()})
    for folder, files in RANKS.items():
        write_files(tmp_path / folder, {name: text.encode() for name, text in files.items()})
    return tmp_path


def run(root: Path, capsys) -> tuple[list[str], dict]:
    """results_table's CLI entry on ``root``: the table lines (the comparison under it checked) and the metrics."""
    result = results_table.main(["--root", str(root), "--task", "passage"])
    printed = capsys.readouterr().out
    text = (root / "results" / "results.md").read_text()
    assert text in printed  # after the note that the plot is skipped, where matplotlib is not installed
    assert json.loads((root / "results" / "results.json").read_text())["metrics"] == result["metrics"]
    table, comparisons = text.split("\n\n")
    assert comparisons == "- STAR vs Inbatch-Neg: at least as good on every metric\n"
    return table.splitlines(), result["metrics"]


def test_dl20_column_scores_test2020_rank_files_on_their_qrels(root, capsys):
    lines, metrics = run(root, capsys)
    assert lines[:2] == ["| passage | Dev MRR@10 | Dev R@100 | Test NDCG@10 | DL20 NDCG@10 |", "|---|---|---|---|---|"]
    star, inbatch = metrics["STAR"], metrics["Inbatch-Neg"]
    assert list(star) == ["dev_mrr", "dev_r100", "test_ndcg10", "dl20_ndcg10"] and list(inbatch) == list(star)
    pre, folder = root / "preprocess", root / "evaluate" / "star"
    expected = evaluate_files(pre / "test2020-qrel.tsv", folder / "test2020.rank.tsv", metrics=("nDCG@10",))
    # by hand: query 0 finds its only relevant passage at rank 2, query 1 ranks both ideally
    assert star["dl20_ndcg10"] == pytest.approx(expected["nDCG@10"]) == pytest.approx((1 / math.log2(3) + 1) / 2)
    assert star["test_ndcg10"] == pytest.approx(1.0) and inbatch["test_ndcg10"] == pytest.approx(1 / math.log2(3))
    assert inbatch["dl20_ndcg10"] is None  # no test2020.rank.tsv for this model
    assert star["dev_mrr"] == pytest.approx(0.75) and inbatch["dev_mrr"] == pytest.approx(0.75)
    assert lines[2:] == ["| Inbatch-Neg | 0.750 | 1.000 | 0.631 | – |", "| STAR | 0.750 | 1.000 | 1.000 | 0.815 |"]


def test_without_test2020_rank_files_the_table_keeps_its_three_columns(root, capsys):
    (root / "evaluate" / "star" / "test2020.rank.tsv").unlink()
    lines, metrics = run(root, capsys)
    assert lines == ["| passage | Dev MRR@10 | Dev R@100 | Test NDCG@10 |", "|---|---|---|---|",
                     "| Inbatch-Neg | 0.750 | 1.000 | 0.631 |", "| STAR | 0.750 | 1.000 | 1.000 |"]
    assert all(list(row) == ["dev_mrr", "dev_r100", "test_ndcg10"] for row in metrics.values())
