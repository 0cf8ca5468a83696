"""STAR inference, as the original star/inference.py: encode a query split and the corpus with a trained encoder,
search the corpus exactly by inner product, and write ``{mode}.rank.tsv``.

Outputs in ``--output_dir`` (default ``./data/{data_type}/evaluate/star``):

* ``{mode}-query.memmap`` float32 ``[Nq, dim]`` and ``passages.memmap`` float32 ``[Nd, dim]`` (row = offset),
  each with a ``.manifest.json``; the corpus encode is resumable and a memmap of another model / length is
  refused instead of silently reused (the original reused any existing memmap without checking);
* ``{mode}.rank.tsv``: ``qoffset\\tpoffset\\trank`` (top ``--topk``; ``--with_scores`` adds the score).

Several processes: ``torchrun --nproc_per_node N -m star.inference ...`` shares the encoding and the search among
the ranks; ``--shard_id K --num_shards N`` encodes one shard of the corpus per job (``retrieve_utils``).

Example (README): ``python -m star.inference --data_type passage --max_doc_length 256 --mode dev``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional


import retrieve_utils as ru
from infra import cli_types as ct
from infra.distributed import cleanup_distributed
from infra.io import configure_logging, env_int, refuse_existing, run_cli
from infra.run_lock import output_lock
from preprocess import SPLIT_NAMES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m star.inference", description=__doc__.split("\n\n")[0],
                                     formatter_class=ct.CompactHelpFormatter)
    parser.add_argument("--data_type", choices=["passage", "doc"], required=True, help="chooses the default paths")
    ru.add_query_and_corpus_args(parser, batch_size=32)
    parser.add_argument("--mode", choices=SPLIT_NAMES, required=True,
                        help="query split to encode and rank")
    parser.add_argument("--model_dir", help="encoder folder (default ./data/{data_type}/trained_models/star)")
    parser.add_argument("--preprocess_dir", help="preprocessed data (default ./data/{data_type}/preprocess)")
    parser.add_argument("--output_dir", help="output folder (default ./data/{data_type}/evaluate/star)")
    ru.add_inference_args(parser, topk=100)
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(env_int("RANK", 0) == 0)
    data = Path("data") / args.data_type
    model_dir = Path(args.model_dir or data / "trained_models" / "star")
    preprocess_dir = Path(args.preprocess_dir or data / "preprocess")
    output_dir = Path(args.output_dir or data / "evaluate" / "star")
    rank_path = output_dir / f"{args.mode}.rank.tsv"
    with output_lock(output_dir, shard=args.shard_id):
        refuse_existing(rank_path, args.overwrite)
        placement = ru.resolve_placement(args)
        try:
            encoded = ru.encode_queries_and_corpus(model_dir, preprocess_dir, args.mode, output_dir, args, placement)
            if encoded is not None:
                queries, passages = encoded
                ru.rank_queries(passages, queries, args.topk, rank_path, placement, args.faiss_gpus,
                                args.search_mem_gb, args.with_scores)
        finally:
            cleanup_distributed()


if __name__ == "__main__":
    run_cli(main, torchrun=True)
