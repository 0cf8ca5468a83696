"""Static hard negatives for STAR, as the original star/prepare_hardneg.py: rank the corpus for every query of a
split, drop the query's positives and keep the first --topk documents in rank order.

    python -m star.prepare_hardneg --data_type passage --max_doc_length 256 --mode train --topk 200

The rankings come from the warm-up model in ``--model_dir`` (the original; torchrun or ``--shard_id`` jobs share the
encoding as in star.inference) or from an external run file (``--run_file``, no model: e.g. the official BM25
top-100).  Every query of ``{mode}-qrel.tsv`` gets exactly ``topk`` negatives, written to ``hard.npy`` +
``hard_qids.npy`` (``dataset.load_hardneg``) in ``--output_dir``; the MS MARCO MRR@10 of the ranking is printed.
The two sources, the random fill and the output files: :func:`main`; the deviations from the original:
docs/deviations.md, section "star.prepare_hardneg".
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from tqdm import tqdm

from infra import cli_types as ct
import retrieve_utils as ru
from infra.exact_search import faiss_gpu_count
from dataset import TokenIdsCache, hardneg_qids_path, load_rel
from infra.distributed import cleanup_distributed
from infra.io import (InputError, PathLike, atomic_save_npy, atomic_write_json, configure_logging, env_int,
                      refuse_existing, refuse_torchrun, run_cli)
from infra.run_lock import output_lock
from preprocess import SPLIT_NAMES, IdIndex
from infra.run_file import load_id_map, read_run_arrays

logger = logging.getLogger(__name__)

SEARCH_MARGIN = 10   # the original searches topk + 10 to have room for the positives it drops
FILL_SEED = 1047     # seed of the original's random fill
MRR_CUTOFF = 10
CHUNK_ROWS = 65536   # queries per vectorised positive-filtering step (bounds memory on 400k train queries)
MISSING = -1


# ==============================================================================================================
# Arguments
# ==============================================================================================================

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m star.prepare_hardneg", description=__doc__.split("\n\n")[0],
                                     epilog="The search depth is topk + 10 (room for the dropped positives).  "
                                            'Details: docs/deviations.md, section "star.prepare_hardneg".',
                                     formatter_class=ct.CompactHelpFormatter)
    parser.add_argument("--data_type", choices=["passage", "doc"], required=True,
                        help="default paths; doc: D-prefixed ids")
    ru.add_query_and_corpus_args(parser, batch_size=128)
    parser.add_argument("--mode", choices=SPLIT_NAMES, default="train",
                        help="query split (default train; the README's dev: issue #24)")
    parser.add_argument("--model_dir", help="warm-up encoder (default: data/TYPE/warmup)")
    parser.add_argument("--preprocess_dir", help="(default: data/TYPE/preprocess)")
    parser.add_argument("--output_dir", help="(default: data/TYPE/warmup_retrieve)")
    parser.add_argument("--not_faiss_cuda", action="store_true",
                        help="search on the CPU (default: faiss's GPUs)")
    ru.add_inference_args(parser, topk=200)
    source = parser.add_argument_group("external run file (no model)")
    source.add_argument("--run_file", help="rank file or TREC run with official ids")
    source.add_argument("--fill_random", action=argparse.BooleanOptionalAction, default=None,
                        help="complete short queries with random negatives (default: with --run_file)")
    source.add_argument("--seed", type=ct.seed, default=FILL_SEED, help="seed of the random fill")
    parser.add_argument("--write_json", action="store_true",
                        help="also write hard.json (the original's format)")
    return parser


@dataclass
class Paths:
    """Input and output locations of one run (defaults under ./data/{data_type})."""
    preprocess_dir: Path
    output_dir: Path
    model_dir: Path
    hard: Path
    json: Path
    rank: Path


def resolve_paths(args: argparse.Namespace) -> Paths:
    data = Path("data") / args.data_type
    out = Path(args.output_dir or data / "warmup_retrieve")
    pre = Path(args.preprocess_dir or data / "preprocess")
    return Paths(pre, out, Path(args.model_dir or data / "warmup"), out / "hard.npy", out / "hard.json",
                 out / f"{args.mode}.rank.tsv")


def output_files(args: argparse.Namespace, paths: Paths) -> list[Path]:
    files = [paths.hard, hardneg_qids_path(paths.hard)]
    if args.write_json:
        files.append(paths.json)
    if not args.run_file:
        files.append(paths.rank)
    return files


def faiss_gpus(args: argparse.Namespace) -> list[int]:
    """``--faiss_gpus``, else every GPU faiss sees, none with ``--not_faiss_cuda``."""
    if args.not_faiss_cuda:
        return []
    return args.faiss_gpus if args.faiss_gpus is not None else list(range(faiss_gpu_count()))


# ==============================================================================================================
# Qrels and candidate rankings
# ==============================================================================================================

def load_positives(preprocess_dir: Path, mode: str) -> dict[int, list[int]]:
    """``{qoffset: [poffset, ...]}`` of ``{mode}-qrel.tsv`` (every line a positive); checks the query offsets
    against the ``{mode}-query`` token memmap."""
    path = preprocess_dir / f"{mode}-qrel.tsv"
    if not path.is_file():
        hint = " (the lead split has no qrels)" if mode == "lead" else ""
        raise InputError(f"qrels of the {mode} split not found; hard negatives are mined for the queries of the "
                         f"qrels{hint}", path=path)
    rel = load_rel(path)
    if not rel:
        raise InputError("the qrels file is empty", path=path)
    n_queries = len(TokenIdsCache(preprocess_dir, f"{mode}-query"))
    if max(rel) >= n_queries:
        raise InputError(f"query offset out of range: the {mode} split has {n_queries} queries", path=path,
                         value=max(rel))
    return rel


def _positive_keys(qoffsets: np.ndarray, rel: dict[int, list[int]]) -> tuple[np.ndarray, int]:
    """(sorted keys ``q * stride + p`` of every positive pair of ``qoffsets``, stride)."""
    pos_q = np.concatenate([np.full(len(rel[q]), q, np.int64) for q in qoffsets.tolist()])
    pos_p = np.concatenate([np.asarray(rel[q], np.int64) for q in qoffsets.tolist()])
    stride = int(pos_p.max()) + 1
    return np.unique(pos_q * stride + pos_p), stride


def iter_positive_masks(candidates: np.ndarray, qoffsets: np.ndarray,
                        rel: dict[int, list[int]]) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield ``(rows, is_positive)`` over chunks of ``candidates`` [n, m] (row i ranks query ``qoffsets[i]``,
    ``MISSING`` = no document): ``is_positive[r, c]`` is True where the document is a positive of its query."""
    keys, stride = _positive_keys(qoffsets, rel)
    for r0 in range(0, len(candidates), CHUNK_ROWS):
        rows = slice(r0, r0 + CHUNK_ROWS)
        chunk = candidates[rows]
        in_range = (chunk >= 0) & (chunk < stride)
        is_pos = np.isin(qoffsets[rows, None] * stride + np.where(in_range, chunk, 0), keys) & in_range
        yield rows, is_pos


def select_negatives(candidates: np.ndarray, qoffsets: np.ndarray, rel: dict[int, list[int]],
                     topk: int) -> np.ndarray:
    """The first ``topk`` non-positive documents of each row of ``candidates`` in column (rank) order →
    int64 ``[n, topk]``, ``MISSING`` where a row has fewer."""
    negs = np.full((len(candidates), topk), MISSING, np.int64)
    for rows, is_pos in iter_positive_masks(candidates, qoffsets, rel):
        chunk = candidates[rows]
        keep = (chunk >= 0) & ~is_pos
        slot = np.cumsum(keep, axis=1) - 1
        keep &= slot < topk
        row_index = np.nonzero(keep)[0]
        negs[rows][row_index, slot[keep]] = chunk[keep]
    return negs


def mrr_at(candidates: np.ndarray, qoffsets: np.ndarray, rel: dict[int, list[int]],
           cutoff: int = MRR_CUTOFF) -> float:
    """msmarco_eval's MRR@cutoff: Σ over queries of 1 / (rank of the first positive within ``cutoff``), divided
    by the number of qrels queries (``len(qoffsets)``; an unranked query counts 0)."""
    total = 0.0
    for rows, is_pos in iter_positive_masks(candidates[:, :cutoff], qoffsets, rel):
        hit = is_pos.any(axis=1)
        total += float((1.0 / (np.argmax(is_pos[hit], axis=1) + 1)).sum())
    return total / len(qoffsets)


def fill_random(negs: np.ndarray, qoffsets: np.ndarray, rel: dict[int, list[int]], n_docs: int,
                seed: int) -> tuple[int, int]:
    """Replace the ``MISSING`` slots of ``negs`` (in place) by distinct random documents that are neither
    positives nor already in the row, drawn from ``np.random.default_rng([seed, qoffset])``.
    Returns (queries filled, documents added)."""
    short = np.flatnonzero((negs == MISSING).any(axis=1))
    added = 0
    for row in tqdm(short.tolist(), desc="random fill", unit="query", disable=None):
        q = int(qoffsets[row])
        slots = np.flatnonzero(negs[row] == MISSING)
        excluded = set(rel[q]) | set(negs[row][negs[row] >= 0].tolist())
        available = n_docs - len({p for p in excluded if p < n_docs})
        if available < len(slots):
            raise InputError(f"query offset {q}: the corpus has only {available} documents that are neither its "
                             f"positives nor already its negatives, {len(slots)} more needed; pass a smaller --topk")
        rng = np.random.default_rng([seed, q])
        draw = rng.choice(n_docs, size=min(n_docs, len(slots) + len(excluded)), replace=False)
        negs[row, slots] = [d for d in draw.tolist() if d not in excluded][: len(slots)]
        added += len(slots)
    return len(short), added


def complete_negatives(negs: np.ndarray, qoffsets: np.ndarray, rel: dict[int, list[int]], n_docs: int,
                       fill: bool, seed: int, depth: str, source: Optional[PathLike] = None) -> None:
    """Make every row of ``negs`` full: random fill when ``fill``, else an error naming ``source`` (the rankings'
    file) and the first short query."""
    counts = (negs != MISSING).sum(axis=1)
    short = np.flatnonzero(counts < negs.shape[1])
    if not short.size:
        return
    if not fill:
        row = int(short[0])
        raise InputError(f"{short.size} of {len(negs)} queries have fewer than topk={negs.shape[1]} negatives in "
                         f"{depth} once their positives are dropped (first: query offset {int(qoffsets[row])}, "
                         f"{int(counts[row])} left); pass a smaller --topk, or --fill_random to complete them "
                         f"with random documents", path=source)
    queries, added = fill_random(negs, qoffsets, rel, n_docs, seed)
    logger.warning("random fill (seed %d): %d of %d queries had fewer than %d negatives; added %d random documents",
                   seed, queries, len(negs), negs.shape[1], added)


# ==============================================================================================================
# External run files
# ==============================================================================================================

@dataclass
class RunStats:
    """Counts of a run file's lines: read, used, and skipped for each reason."""
    lines: int = 0
    unknown_query: int = 0
    unknown_doc: int = 0
    duplicates: int = 0
    used: int = 0


def run_candidates(path: Path, preprocess_dir: Path, mode: str, doc_ids: bool, qoffsets: np.ndarray,
                   n_docs: int) -> tuple[np.ndarray, RunStats]:
    """Rankings of a run file for the queries ``qoffsets`` → (int64 ``[n, m]`` poffsets in rank order, ``MISSING``
    padded, m = the longest ranking; stats).  Ids are mapped with ``passages_ids.npy`` and
    ``{mode}-query_ids.npy``; lines with unknown ids are skipped, and a document listed twice for a query keeps its
    best rank (ties: file order)."""
    doc_map = load_id_map(preprocess_dir / "passages_ids.npy")
    if len(doc_map) != n_docs:
        raise InputError(f"passages_ids.npy has {len(doc_map)} ids but the corpus has {n_docs} rows",
                         path=preprocess_dir / "passages_ids.npy")
    query_map = load_id_map(preprocess_dir / f"{mode}-query_ids.npy")
    qids, docids, ranks = read_run_arrays(path, "doc" if doc_ids else "int")
    stats = RunStats(lines=len(qids))
    if not stats.lines:
        raise InputError("the run file has no lines", path=path)
    qoff, poff = IdIndex(query_map).lookup(qids), IdIndex(doc_map).lookup(docids)
    stats.unknown_query = int((qoff < 0).sum())
    stats.unknown_doc = int(((qoff >= 0) & (poff < 0)).sum())
    known = (qoff >= 0) & (poff >= 0)
    qoff, poff, ranks = qoff[known], poff[known], ranks[known]
    order = np.lexsort((ranks, qoff))  # by query, then rank; stable, so equal ranks keep file order
    qoff, poff = qoff[order], poff[order]
    pair = qoff * n_docs + poff
    _, first = np.unique(pair, return_index=True)
    unique = np.zeros(len(pair), bool)
    unique[first] = True
    stats.duplicates = int(len(pair) - len(first))
    qoff, poff = qoff[unique], poff[unique]
    row = np.searchsorted(qoffsets, qoff)
    in_qrels = (row < len(qoffsets)) & (qoffsets[np.minimum(row, len(qoffsets) - 1)] == qoff)
    row, poff = row[in_qrels], poff[in_qrels]
    stats.used = len(row)
    if not stats.used:
        raise InputError(f"no line of the run names a query of {mode}-qrel.tsv with a known document "
                         f"({stats.unknown_query} lines with unknown query ids: another split than --mode {mode}?)",
                         path=path)
    group_start = np.searchsorted(row, np.arange(len(qoffsets)))
    column = np.arange(len(row)) - group_start[row]
    candidates = np.full((len(qoffsets), int(column.max()) + 1), MISSING, np.int64)
    candidates[row, column] = poff
    return candidates, stats


def log_run_stats(stats: RunStats, path: Path) -> None:
    logger.info("%s: %d lines, %d used for the qrels queries", path, stats.lines, stats.used)
    if stats.unknown_query or stats.unknown_doc:
        logger.warning("%s: skipped %d lines with a query id and %d with a document id unknown to the preprocessing",
                       path, stats.unknown_query, stats.unknown_doc)
    if stats.duplicates:
        logger.warning("%s: %d lines repeat a document already ranked for the query (kept its best rank)", path,
                       stats.duplicates)


# ==============================================================================================================
# Model rankings
# ==============================================================================================================

def model_candidates(args: argparse.Namespace, paths: Paths, qoffsets: np.ndarray) -> Optional[np.ndarray]:
    """Encode the queries and the corpus with the warm-up model, search the top topk + 10, write the rank file;
    return the rankings of ``qoffsets`` (int64 ``[n, topk + 10]``).  Under torchrun the ranks share the encoding
    and the search and only rank 0 gets the rankings; a ``--shard_id`` job encodes its shard of the corpus.  The
    others get None."""
    placement = ru.resolve_placement(args)
    try:
        encoded = ru.encode_queries_and_corpus(paths.model_dir, paths.preprocess_dir, args.mode, paths.output_dir,
                                               args, placement)
        if encoded is None:
            return None
        queries, passages = encoded
        ids = ru.rank_queries(passages, queries, args.topk + SEARCH_MARGIN, paths.rank, placement, faiss_gpus(args),
                              args.search_mem_gb, args.with_scores, cpu_only=args.not_faiss_cuda)
    finally:
        cleanup_distributed()
    return None if ids is None else ids[qoffsets]


# ==============================================================================================================
# Outputs and main
# ==============================================================================================================

def save_hardneg(path: Path, qoffsets: np.ndarray, negs: np.ndarray, json_path: Optional[Path] = None) -> None:
    """``hard.npy`` int32 + ``hard_qids.npy`` int64 (an old ``hard.npy`` is removed first and the new one written
    last, so a crash never pairs it with another run's query offsets), and optionally the original ``hard.json``."""
    path.unlink(missing_ok=True)
    atomic_save_npy(hardneg_qids_path(path), qoffsets.astype(np.int64))
    atomic_save_npy(path, negs.astype(np.int32))
    if json_path is not None:
        atomic_write_json(json_path, {str(q): row for q, row in zip(qoffsets.tolist(), negs.tolist())})


def print_mrr(candidates: np.ndarray, qoffsets: np.ndarray, rel: dict[int, list[int]], source: PathLike) -> float:
    mrr = mrr_at(candidates, qoffsets, rel)
    print("#####################")
    print(f"MRR @{MRR_CUTOFF}: {mrr} ({source}, {len(qoffsets)} qrels queries)")
    print(f"QueriesRanked (of the qrels queries): {int((candidates[:, 0] >= 0).sum())}")
    print("#####################")
    return mrr


def main(argv: Optional[list[str]] = None) -> None:
    """Mine the hard negatives of the ``--mode`` queries and write them.

    Two sources of rankings:

    * **the warm-up model** (default, the original): encode ``{mode}-query`` and the corpus with the model in
      ``--model_dir`` (retrieve_utils: length-sorted batches, resumable corpus encode, memmaps of another model or
      length refused), exact inner-product top-(topk + 10), written as ``{mode}.rank.tsv``;
    * **an external run file** (``--run_file``, no model): e.g. the official MS MARCO BM25 top-100 run, the negatives
      of the document warm-up that the original never shipped (DRhard issue #18).  Lines are MS MARCO
      ``qid pid rank [score]`` or TREC ``qid Q0 docid rank score tag`` with OFFICIAL ids (documents ``D``-prefixed),
      read by :mod:`run_file` (line rules there) and mapped to offsets with ``passages_ids.npy`` and
      ``{mode}-query_ids.npy`` of ``--preprocess_dir``.  The rank column orders a rank file's documents; a TREC run's
      are ordered by score as trec_eval does.  Lines naming ids the preprocessing does not know are skipped and
      counted.

    With the model source, ``torchrun --nproc_per_node N`` shares the encoding and the search among the ranks (rank 0
    mines and writes), and ``--shard_id K --num_shards N`` encodes one shard of the corpus per job
    (``retrieve_utils``); the run-file source runs as one process.

    Every query of ``{mode}-qrel.tsv`` gets exactly ``topk`` negatives (``--topk`` below the corpus size).  Every
    qrels line counts as a positive (the grade is ignored, like the original's ``load_rel``).  A query left with fewer
    than ``topk`` is an error unless ``--fill_random`` (the default with ``--run_file``, as the original's first
    version) completes it with distinct random non-positive documents drawn from ``np.random.default_rng([seed,
    qoffset])`` (reproducible per query).

    Outputs in ``--output_dir`` (default ``./data/{data_type}/warmup_retrieve``), each written atomically:

    * ``hard.npy`` int32 ``[n_queries, topk]`` (negative passage offsets, rank order) and ``hard_qids.npy`` int64
      ``[n_queries]`` (the query offset of each row: the sorted qoffsets of ``{mode}-qrel.tsv``); read them with
      ``dataset.load_hardneg``.  ``hard.npy`` is written last, so it never sits beside another run's ``hard_qids.npy``;
    * ``hard.json`` (``--write_json``): the original format ``{"qoffset": [poffset, ...]}``;
    * model source only: ``{mode}-query.memmap``, ``passages.memmap`` (+ manifests) and ``{mode}.rank.tsv``
      (``qoffset\\tpoffset\\trank``, top topk + 10).

    Finally the MS MARCO MRR@10 of the ranking over the qrels queries is printed (msmarco_eval's definition: the sum
    of reciprocal ranks divided by the number of qrels queries).
    """
    args = build_parser().parse_args(argv)
    configure_logging(env_int("RANK", 0) == 0)
    if args.run_file:
        if args.shard_id is not None:
            raise InputError("--shard_id splits the model's encoding: a run file needs none")
        refuse_torchrun()  # reading a run file does not split over processes
    if args.mode != "train":
        logger.warning("mining the %s queries: STAR training needs the train queries' negatives (--mode train; the "
                       "original README's --mode dev is a bug, DRhard issue #24)", args.mode)
    paths = resolve_paths(args)
    with output_lock(paths.output_dir, shard=args.shard_id):
        mine(args, paths)


def mine(args: argparse.Namespace, paths: Paths) -> None:
    """Select, complete and save the hard negatives, as ``args`` say (under torchrun: this process's part)."""
    for path in output_files(args, paths):
        refuse_existing(path, args.overwrite)
    corpus = TokenIdsCache(paths.preprocess_dir, "passages")
    n_docs = len(corpus)
    rel = load_positives(paths.preprocess_dir, args.mode)
    qoffsets = np.array(sorted(rel), dtype=np.int64)

    if args.run_file:
        candidates, stats = run_candidates(Path(args.run_file), paths.preprocess_dir, args.mode,
                                           args.data_type == "doc", qoffsets, n_docs)
        log_run_stats(stats, Path(args.run_file))
        source, depth = args.run_file, "the run file"
    if args.topk >= n_docs:  # before the corpus is encoded and hard.npy [queries, topk] allocated
        raise InputError(f"--topk must be below the {n_docs} documents of the corpus (each query needs topk "
                         f"negatives besides its positive)", path=corpus.path, value=args.topk)
    if not args.run_file:
        candidates = model_candidates(args, paths, qoffsets)
        if candidates is None:  # another torchrun rank, or a --shard_id job
            return
        source, depth = paths.rank, f"the top {args.topk + SEARCH_MARGIN}"
    negs = select_negatives(candidates, qoffsets, rel, args.topk)
    fill = args.fill_random if args.fill_random is not None else bool(args.run_file)
    complete_negatives(negs, qoffsets, rel, n_docs, fill, args.seed, depth, source)
    save_hardneg(paths.hard, qoffsets, negs, paths.json if args.write_json else None)
    logger.info("wrote %d x %d hard negatives of the %s queries to %s", *negs.shape, args.mode, paths.hard)
    print_mrr(candidates, qoffsets, rel, source)


if __name__ == "__main__":
    run_cli(main, torchrun=True)
