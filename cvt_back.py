"""Convert a rank file from offsets back to official MS MARCO ids, as the original cvt_back.py.

    python -m cvt_back --input_dir data/passage/evaluate/star --preprocess_dir data/passage/preprocess \\
        --mode dev --output_dir data/passage/evaluate/star/official --dataset passage

Reads ``{input_dir}/{mode}.rank.tsv`` (offsets, as the inference commands write it), maps every offset through
the id maps of ``--preprocess_dir`` (never the pickles the original inverted) and writes
``{output_dir}/{mode}.rank.tsv`` or, with ``--trec``, a TREC run ``{mode}.trec``.  The formats:
:func:`convert_rank_file`.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Union

import numpy as np

from infra.io import InputError, PathLike, atomic_output, refuse_existing, require_file, run_cli
from infra.run_lock import output_lock
from preprocess import SPLIT_NAMES
from infra.run_file import iter_run, load_id_map

DEFAULT_TAG = "System"   # the run tag of the original test_trec_eval.py


def _official(ids: np.ndarray, offset: int, what: str, path: PathLike, line: int) -> Union[int, str]:
    """``ids[offset]`` (an int, or a str for a string-id map); an offset past the map raises :class:`InputError`
    naming the line."""
    if offset >= len(ids):
        raise InputError(f"{what} offset is out of range (the id map has {len(ids)} entries)", path=path,
                         line=line, value=offset)
    return ids[offset].item()


def convert_rank_file(rank_path: PathLike, out_path: PathLike, query_ids: np.ndarray, doc_ids: np.ndarray,
                      doc: bool = False, trec: bool = False, tag: str = DEFAULT_TAG) -> int:
    """Write ``rank_path`` (offsets) to ``out_path`` with official ids, atomically; returns the number of lines.

    Output lines: ``qid\tpid\trank[\tscore]`` or, with ``trec``, ``qid Q0 pid rank score tag`` (score = the
    input's score, else 1/rank); ``D`` + docid when ``doc``.  Scores are written as Python's shortest exact repr.
    Raises :class:`InputError` naming the line on a malformed line, an offset outside the id maps, or a
    TREC-format input (the input must be an offset rank file).

    Reads ``{input_dir}/{mode}.rank.tsv`` (``qoffset\\tpoffset\\trank[\\tscore]``, as written by star/adore inference;
    line rules in :mod:`run_file`) and maps every offset through the safe id maps of ``--preprocess_dir`` (never the
    pickles the original inverted):

    * ``passages_ids.npy``: int64 ``[N]``, the official pid/docid of each passage/document offset;
    * ``{mode}-query_ids.npy``: int64 ``[Nq]``, the official qid of each query offset.

    A preprocessing of the BEIR layout (``preprocess.py --input_format beir``) stores string ids (unicode ``.npy``):
    they are written as they are (``CACM-1410``); score such output with ``msmarco_eval.py --string_ids``.

    Output (written atomically; an existing file is refused unless ``--overwrite``):

    * default: ``{output_dir}/{mode}.rank.tsv``, lines ``qid\\tpid\\trank`` (``D`` + docid with ``--dataset doc``), in
      the input's line order, the score column kept when the input has one.  Score it with
      ``python -m msmarco_eval qrels.dev.small.tsv OUT`` (passages) or ``... msmarco-docdev-qrels.tsv OUT doc``;
    * ``--trec``: ``{output_dir}/{mode}.trec``, TREC run lines ``qid Q0 docid rank score tag`` for trec_eval,
      ir_measures or pyserini; score = the input's score column, else 1/rank (as the original test_trec_eval.py).
    """
    require_file(rank_path, "rank file")
    prefix = "D" if doc else ""
    lines = 0
    with atomic_output(out_path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as out:
        for number, qoff, poff, rank, score in iter_run(rank_path, "int", "rank file"):
            if rank is None:
                raise InputError("expected an offset rank file (qoffset poffset rank [score]), not a TREC run",
                                 path=rank_path, line=number)
            qid = _official(query_ids, qoff, "query", rank_path, number)
            pid = f"{prefix}{_official(doc_ids, poff, 'passage', rank_path, number)}"
            if trec:
                trec_score = score if score is not None else 1.0 / rank
                out.write(f"{qid} Q0 {pid} {rank} {trec_score!r} {tag}\n")
            else:
                out.write(f"{qid}\t{pid}\t{rank}" + ("" if score is None else f"\t{score!r}") + "\n")
            lines += 1
        if not lines:
            raise InputError("no lines in the rank file", path=rank_path)
    return lines


def output_path(output_dir: PathLike, mode: str, trec: bool) -> Path:
    """``{output_dir}/{mode}.rank.tsv``, or ``{output_dir}/{mode}.trec`` for TREC output."""
    return Path(output_dir) / (f"{mode}.trec" if trec else f"{mode}.rank.tsv")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cvt_back",
                                     description="Map a rank file from offsets to official MS MARCO ids.")
    parser.add_argument("--input_dir", required=True, help="folder holding {mode}.rank.tsv (offsets)")
    parser.add_argument("--preprocess_dir", required=True,
                        help="preprocess output: passages_ids.npy and {mode}-query_ids.npy")
    parser.add_argument("--mode", required=True, choices=SPLIT_NAMES, help="query split")
    parser.add_argument("--output_dir", required=True, help="where {mode}.rank.tsv (or {mode}.trec) goes")
    parser.add_argument("--dataset", required=True, choices=("passage", "doc"),
                        help="doc: document ids get the D prefix")
    parser.add_argument("--trec", action="store_true",
                        help="write a TREC run {mode}.trec (qid Q0 docid rank score tag) instead")
    parser.add_argument("--tag", default=DEFAULT_TAG, help=f"run tag of --trec lines (default {DEFAULT_TAG})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.trec and (not args.tag or any(c.isspace() for c in args.tag)):
        raise InputError("--tag must be one non-empty token without spaces", value=args.tag)
    out = output_path(args.output_dir, args.mode, args.trec)
    with output_lock(args.output_dir):
        refuse_existing(out, args.overwrite)
        preprocess_dir = Path(args.preprocess_dir)
        query_ids = load_id_map(preprocess_dir / f"{args.mode}-query_ids.npy")
        doc_ids = load_id_map(preprocess_dir / "passages_ids.npy")
        rank_path = Path(args.input_dir) / f"{args.mode}.rank.tsv"
        lines = convert_rank_file(rank_path, out, query_ids, doc_ids, doc=args.dataset == "doc", trec=args.trec,
                                  tag=args.tag)
    print(f"wrote {lines} lines to {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
