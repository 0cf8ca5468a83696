"""Gather a pipeline's rank files into the paper-shaped results table.

    python results_table.py --eval_dir data/sample/passage/evaluate --preprocess_dir data/sample/passage/preprocess

Reads ``{eval_dir}/{model}/dev.rank.tsv`` and ``{eval_dir}/{model}/test.rank.tsv`` for each model of the paper's
table (Inbatch-Neg, Rand-Neg, STAR, ADORE on each) and scores them with :mod:`msmarco_eval`:
Dev MRR@10 (MRR@100 with ``--doc``) and R@100 against ``dev-qrel.tsv``; Test NDCG@10 (``trec_eval -c`` style,
graded) against ``test-qrel.tsv``.  Prints a markdown table and writes ``results.md`` and ``results.json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from io_utils import PathLike, atomic_write_json, atomic_write_text, run_cli
from msmarco_eval import evaluate_files

MODELS = (
    ("inbatch", "Inbatch-Neg"),
    ("rand", "Rand-Neg"),
    ("star", "STAR"),
    ("adore-inbatch", "ADORE(Inbatch-Neg)"),
    ("adore-rand", "ADORE(Rand-Neg)"),
    ("adore-star", "ADORE(STAR)"),
)


def score_model(model_dir: Path, preprocess_dir: Path, mrr_depth: int) -> dict[str, Optional[float]]:
    """Dev MRR@depth, Dev R@100 and Test NDCG@10 of one model's rank files (None where a file is absent)."""
    row: dict[str, Optional[float]] = {"dev_mrr": None, "dev_r100": None, "test_ndcg10": None}
    dev, test = model_dir / "dev.rank.tsv", model_dir / "test.rank.tsv"
    if dev.is_file():
        m = evaluate_files(preprocess_dir / "dev-qrel.tsv", dev, metrics=(f"MRR@{mrr_depth}", "R@100"))
        row["dev_mrr"], row["dev_r100"] = m[f"MRR@{mrr_depth}"], m["R@100"]
    if test.is_file():
        row["test_ndcg10"] = evaluate_files(preprocess_dir / "test-qrel.tsv", test, metrics=("nDCG@10",))["nDCG@10"]
    return row


def markdown_table(rows: dict[str, dict[str, Optional[float]]], mrr_depth: int) -> str:
    """The README-shaped table: one line per model present."""
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"| Model | Dev MRR@{mrr_depth} | Dev R@100 | Test NDCG@10 |", "|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {fmt(row['dev_mrr'])} | {fmt(row['dev_r100'])} | {fmt(row['test_ndcg10'])} |")
    return "\n".join(lines) + "\n"


def gather(eval_dir: PathLike, preprocess_dir: PathLike, doc: bool = False) -> dict[str, dict[str, Optional[float]]]:
    """Scores of every model of :data:`MODELS` that has a folder in ``eval_dir``."""
    eval_dir, preprocess_dir = Path(eval_dir), Path(preprocess_dir)
    depth = 100 if doc else 10
    return {name: score_model(eval_dir / key, preprocess_dir, depth)
            for key, name in MODELS if (eval_dir / key).is_dir()}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval_dir", required=True, help="folder with one sub-folder of rank files per model")
    parser.add_argument("--preprocess_dir", required=True, help="preprocess output (dev-qrel.tsv, test-qrel.tsv)")
    parser.add_argument("--doc", action="store_true", help="document task: MRR@100 instead of MRR@10")
    parser.add_argument("--out_dir", default=None, help="where results.md/json go (default: --eval_dir)")
    args = parser.parse_args(argv)
    rows = gather(args.eval_dir, args.preprocess_dir, args.doc)
    table = markdown_table(rows, 100 if args.doc else 10)
    out = Path(args.out_dir or args.eval_dir)
    atomic_write_text(out / "results.md", table)
    atomic_write_json(out / "results.json", rows)
    print(table, end="")


if __name__ == "__main__":
    run_cli(main)
