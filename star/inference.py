"""STAR inference (spec §3.10): encode a query split and the corpus with a trained encoder, search the corpus
exactly by inner product, and write ``{mode}.rank.tsv``.

Outputs in ``--output_dir`` (default ``./data/{data_type}/evaluate/star``):

* ``{mode}-query.memmap`` float32 ``[Nq, dim]`` and ``passages.memmap`` float32 ``[Nd, dim]`` (row = offset),
  each with a ``.manifest.json``; the corpus encode is resumable and a memmap of another model / length is
  refused instead of silently reused (original bug, spec §10.11);
* ``{mode}.rank.tsv``: ``qoffset\\tpoffset\\trank`` (top ``--topk``; ``--with_scores`` adds the score).

Example (README): ``python star/inference.py --data_type passage --max_doc_length 256 --mode dev``.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional

import numpy as np

import retrieve_utils as ru
from io_utils import refuse_existing, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_type", choices=["passage", "doc"], required=True, help="chooses the default paths")
    parser.add_argument("--max_query_length", type=int, default=32,
                        help="query truncation in tokens (default %(default)s)")
    parser.add_argument("--max_doc_length", type=int, default=512,
                        help="passage/doc truncation (default %(default)s; the README uses 256 for passages)")
    parser.add_argument("--eval_batch_size", type=int, default=32,
                        help="encoding batch size per GPU (default %(default)s)")
    parser.add_argument("--mode", choices=["train", "dev", "test", "lead"], required=True,
                        help="query split to encode and rank")
    parser.add_argument("--model_dir", help="encoder folder (default ./data/{data_type}/trained_models/star)")
    parser.add_argument("--preprocess_dir", help="preprocessed data (default ./data/{data_type}/preprocess)")
    parser.add_argument("--output_dir", help="output folder (default ./data/{data_type}/evaluate/star)")
    ru.add_encoding_args(parser)
    ru.add_search_args(parser, topk=100)
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = Path("data") / args.data_type
    model_dir = Path(args.model_dir or data / "trained_models" / "star")
    preprocess_dir = Path(args.preprocess_dir or data / "preprocess")
    output_dir = Path(args.output_dir or data / "evaluate" / "star")
    rank_path = output_dir / f"{args.mode}.rank.tsv"
    refuse_existing(rank_path, args.overwrite)

    device = ru.inference_device(args.no_cuda)
    model, model_id, pad = ru.load_encoder(model_dir, allow_pickle=args.allow_pickle)
    common = dict(batch_size=args.eval_batch_size, device=device, pad_token_id=pad, amp=args.amp,
                  overwrite=args.overwrite)
    queries = ru.encode_split(model, model_id, preprocess_dir, f"{args.mode}-query", args.max_query_length,
                              output_dir / f"{args.mode}-query.memmap", **common)
    passages = ru.encode_split(model, model_id, preprocess_dir, "passages", args.max_doc_length,
                               output_dir / "passages.memmap", **common)
    scores, ids = ru.exact_search(passages, queries, args.topk, gpus=args.faiss_gpus, mem_gb=args.search_mem_gb)
    lines = ru.write_rank_file(rank_path, np.arange(len(queries)), ids, scores if args.with_scores else None)
    logging.getLogger(__name__).info("wrote %d lines to %s", lines, rank_path)


if __name__ == "__main__":
    run_cli(main)
