"""ADORE inference, as the original adore/inference.py: encode a query split with an ADORE query encoder, search
the frozen STAR document embeddings (``--dmemmap_path``, row = offset) exactly by inner product, and write
``{output_dir}/{mode}.rank.tsv`` (``qoffset\\tpoffset\\trank``).

The query embeddings go to ``{output_dir}/{mode}.qembed.memmap`` (float32 ``[Nq, dim]``; dim is the model's,
not the 768 that the original hard-codes).  The document memmap is checked against that dim, its manifest and
the passage count of ``--preprocess_dir`` (where it has ``passages_meta``) before anything is encoded or written.

Under ``torchrun --nproc_per_node N`` the ranks share the query encoding and each searches its rows of the
document embeddings; rank 0 merges and writes the rank file (``retrieve_utils``).

Example (README): ``python -m adore.inference --model_dir data/passage/trained_models/adore-star
--output_dir data/passage/evaluate/adore-star --preprocess_dir data/passage/preprocess --mode dev
--dmemmap_path data/passage/evaluate/star/passages.memmap``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional


from infra import cli_types as ct
import retrieve_utils as ru
from infra.embedding_memmap import corpus_rows, open_embeddings
from infra.distributed import cleanup_distributed
from infra.io import configure_logging, env_int, refuse_existing, run_cli
from infra.model_folder import length_or_folder_default
from infra.run_lock import output_lock
from preprocess import SPLIT_NAMES

QUERY_LENGTH = 64  # the original's query truncation, for a model folder that declares no length


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adore.inference", description=__doc__.split("\n\n")[0],
                                     formatter_class=ct.CompactHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="ADORE query-encoder checkpoint folder")
    parser.add_argument("--output_dir", required=True, help="where the query memmap and the rank file go")
    parser.add_argument("--preprocess_dir", required=True, help="preprocessed data ({mode}-query memmaps)")
    parser.add_argument("--mode", choices=SPLIT_NAMES, required=True, help="query split")
    parser.add_argument("--dmemmap_path", "--doc_embeddings", required=True,
                        help="document embeddings (STAR passages.memmap)")
    parser.add_argument("--max_seq_length", type=ct.positive_int, default=None,
                        help=f"query truncation in tokens (default: the model folder's max_seq_length, "
                             f"else {QUERY_LENGTH})")
    parser.add_argument("--pergpu_eval_batch_size", type=ct.positive_int, default=32,
                        help="encoding batch size per GPU (default %(default)s)")
    parser.add_argument("--check_finite", action="store_true", help="scan the document embeddings for NaN/inf")
    ru.add_inference_args(parser, topk=100)
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(env_int("RANK", 0) == 0)
    output_dir = Path(args.output_dir)
    rank_path = output_dir / f"{args.mode}.rank.tsv"
    with output_lock(output_dir):
        refuse_existing(rank_path, args.overwrite)
        infer(args, output_dir, rank_path)


def infer(args: argparse.Namespace, output_dir: Path, rank_path: Path) -> None:
    """Encode the queries and rank the corpus, as ``args`` say (under torchrun: this process's part)."""
    model, model_id, pad = ru.load_encoder(args.model_dir, args.allow_pickle, args.preprocess_dir, sides=("query",))
    max_seq_length = length_or_folder_default(args.max_seq_length, args.model_dir, QUERY_LENGTH, "--max_seq_length")
    docs = open_embeddings(args.dmemmap_path, dim=model.output_dim, check_finite=args.check_finite,
                              n_rows=corpus_rows(args.preprocess_dir))
    placement = ru.resolve_placement(args)
    try:
        queries = ru.encode_split(model, model_id, args.preprocess_dir, f"{args.mode}-query", max_seq_length,
                                  output_dir / f"{args.mode}.qembed.memmap", batch_size=args.pergpu_eval_batch_size,
                                  device=placement.device, pad_token_id=pad, amp=args.amp, overwrite=args.overwrite,
                                  batch_tokens=ru.batch_tokens_for(args, placement.device), placement=placement)
        ru.rank_queries(docs, queries, args.topk, rank_path, placement, args.faiss_gpus, args.search_mem_gb,
                        args.with_scores)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    run_cli(main, torchrun=True)
