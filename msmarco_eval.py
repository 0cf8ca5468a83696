"""MS MARCO evaluation: the original msmarco_eval.py's MRR@N, plus recall, and precision, MAP and nDCG computed
exactly as ``trec_eval -c``.

    python -m msmarco_eval REF CAND          # MRR@10 (the original's command line, unchanged)
    python -m msmarco_eval REF CAND 100      # MRR@100
    python -m msmarco_eval REF CAND doc      # MRR@100, document ids carry a "D" prefix (D1650436)
    python -m msmarco_eval REF CAND --metrics R@100 R@1000 nDCG@10 --rel_threshold 2   # TREC DL conventions

It prints the original's block (rules around ``MRR @10: 0.3404...`` and ``QueriesRanked: 6980``), with any extra
metric inside it.  The input files: :func:`evaluate_files`; the definitions of the metrics and of
``--rel_threshold``: :func:`compute_metrics`; the deviations from the original: docs/deviations.md, section
"msmarco_eval".  This module imports no torch: ``from msmarco_eval import evaluate_files``.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Hashable, Optional, Sequence

from infra import cli_types as ct
from infra.beir_input import QRELS_HEADER as BEIR_HEADER
from infra.io import InputError, PathLike, iter_lines, parse_int, run_cli
from infra.run_file import check_ids, iter_run, parse_docid, parse_qid, trec_eval_order

MAX_RANK = 1000          # slots per query in the original's candidate table
DEFAULT_CUTOFF = 10      # MRR@10
DOC_CUTOFF = 100         # `doc` mode: MRR@100
METRIC_RE = re.compile(r"^(?:(MRR|R|P|nDCG)@([1-9][0-9]*)|(MAP))$")
BLOCK_RULE = "#####################"
QRELS_COLUMNS, BEIR_COLUMNS = "qid iter docid grade", "qid docid grade"   # reference formats (module docstring)

Qrels = dict[Hashable, dict[Hashable, int]]


@dataclass
class Ranking:
    """One query's results in file order.

    ``ranks[i]`` is the position of ``docids[i]``: the rank column of a rank file, or for a TREC run the position
    in trec_eval order (the run's own rank column is ignored).  ``scores`` is the score column, or ``None`` for a
    3-column rank file (score = 1/rank then, see :meth:`score_list`).
    """
    docids: list = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    scores: Optional[list[float]] = None

    def score_list(self) -> list[float]:
        """The scores, 1/rank where the file had none (the original ``test_trec_eval.py``)."""
        return self.scores if self.scores is not None else [1.0 / r for r in self.ranks]

    def trec_order(self) -> list:
        """Docids in trec_eval order (score descending, ties by the id as text descending), each docid once, at
        its first position."""
        return list(dict.fromkeys(self.docids[i] for i in trec_eval_order(self.score_list(), self.docids).tolist()))


Run = dict[Hashable, Ranking]


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def load_reference(path: PathLike, ids: str = "int") -> Qrels:
    """Read qrels (``qid ITER docid grade``) → ``{qid: {docid: grade}}``, every judgment kept whatever its grade.

    A BEIR qrels file (first line ``query-id corpus-id score``) has 3 fields ``qid docid grade`` per later line.
    Raises :class:`InputError` on a line with another field count, a non-integer id (``ids`` "int"/"doc") or grade,
    a missing ``D`` prefix (``ids="doc"``), or a file with no judgment.  A pair judged twice keeps its highest grade.
    """
    check_ids(ids)
    qrels: Qrels = {}
    repeated = 0
    columns: Optional[str] = None   # the format, fixed by the first non-blank line
    for number, line in iter_lines(path, "reference file"):
        parts = line.split()
        if not parts:
            continue
        if columns is None:
            columns = BEIR_COLUMNS if tuple(parts) == BEIR_HEADER else QRELS_COLUMNS
            if columns == BEIR_COLUMNS:
                continue
        if len(parts) != len(columns.split()):
            raise InputError(f"expected {len(columns.split())} fields ({columns}), found {len(parts)}", path=path,
                             line=number, value=line)
        if columns == BEIR_COLUMNS:
            parts.insert(1, "0")
        qid = parse_qid(parts[0], ids, path, number)
        docid = parse_docid(parts[2], ids, path, number)
        grade = parse_int(parts[3], path, number, "relevance grade", allow_negative=True)
        judged = qrels.setdefault(qid, {})
        if docid in judged:
            repeated += 1
            grade = max(grade, judged[docid])
        judged[docid] = grade
    if not qrels:
        raise InputError("no judgments in the reference file", path=path)
    if repeated:
        _warn(f"{path}: {repeated} (qid, docid) pairs are judged more than once; each keeps its highest grade")
    return qrels


def load_candidate(path: PathLike, ids: str = "int", max_rank: int = MAX_RANK) -> Run:
    """Read a run file (:func:`infra.run_file.iter_run`) → ``{qid: Ranking}`` in file order.

    Raises :class:`InputError` on a malformed line, a rank past ``max_rank``, a (qid, rank) pair given twice, or
    an empty file.  A docid listed twice for a query is only a warning (the original printed a message).  Memory
    follows the file, whatever ``max_rank`` is.
    """
    run: Run = {}
    taken: dict[Hashable, set[int]] = {}    # per query, the ranks already given
    is_trec = False
    for number, qid, docid, rank, score in iter_run(path, ids, "candidate file"):
        ranking = run.get(qid)
        if ranking is None:
            ranking = run[qid] = Ranking(scores=None if score is None else [])
            taken[qid] = set()
        if rank is None:
            is_trec = True
            rank = len(ranking.ranks) + 1          # replaced by the trec_eval position below
        elif rank > max_rank:
            raise InputError(f"rank is past the {max_rank} slots per query of the MS MARCO evaluator",
                             path=path, line=number, value=rank)
        elif rank in taken[qid]:
            raise InputError(f"query {qid} already has a document at this rank", path=path, line=number,
                             value=rank)
        else:
            taken[qid].add(rank)
        ranking.docids.append(docid)
        ranking.ranks.append(rank)
        if score is not None:
            ranking.scores.append(score)
    if not run:
        raise InputError("no results in the candidate file", path=path)
    if is_trec:
        for qid, ranking in run.items():
            run[qid] = _trec_positions(ranking)
    _warn_repeated_docids(run, path)
    return run


def _trec_positions(ranking: Ranking) -> Ranking:
    """A TREC run's ranking re-sorted into trec_eval order, with positions 1..n as its ranks."""
    order = trec_eval_order(ranking.scores, ranking.docids).tolist()
    return Ranking(docids=[ranking.docids[i] for i in order], ranks=list(range(1, len(order) + 1)),
                   scores=[ranking.scores[i] for i in order])


def _warn_repeated_docids(run: Run, path: PathLike) -> None:
    repeated = [qid for qid, ranking in run.items() if len(set(ranking.docids)) != len(ranking.docids)]
    if repeated:
        _warn(f"{path}: {len(repeated)} queries list a document more than once (first: query {repeated[0]}); "
              f"each document counts once, at its best position")


def parse_metric(name: str) -> tuple[str, Optional[int]]:
    """``"MRR@10"`` → ``("MRR", 10)``; ``"MAP"`` → ``("MAP", None)``.  Raises :class:`InputError` otherwise."""
    match = METRIC_RE.match(name)
    if match is None:
        raise InputError("unknown metric; use MRR@N, R@k, P@k, nDCG@k or MAP", value=name)
    if match.group(3):
        return "MAP", None
    return match.group(1), int(match.group(2))


def relevant_docs(qrels: Qrels, rel_threshold: int) -> dict[Hashable, set]:
    """``{qid: {docid with grade >= rel_threshold}}``, only for qids with at least one such docid."""
    relevant = {qid: {d for d, g in judged.items() if g >= rel_threshold} for qid, judged in qrels.items()}
    return {qid: docs for qid, docs in relevant.items() if docs}


def _first_relevant_rank(ranking: Ranking, relevant: set, cutoff: int) -> Optional[int]:
    ranks = [r for d, r in zip(ranking.docids, ranking.ranks) if r <= cutoff and d in relevant]
    return min(ranks) if ranks else None


def _recall(ranking: Ranking, relevant: set, k: int) -> float:
    return len({d for d, r in zip(ranking.docids, ranking.ranks) if r <= k and d in relevant}) / len(relevant)


def _ndcg(order: list, judged: dict[Hashable, int], k: int) -> float:
    dcg = sum(max(judged.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(order[:k]))
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def _precision(order: list, judged: dict[Hashable, int], k: int, rel_threshold: int) -> float:
    return sum(1 for d in order[:k] if judged.get(d, rel_threshold - 1) >= rel_threshold) / k


def _average_precision(order: list, judged: dict[Hashable, int], rel_threshold: int) -> float:
    n_relevant = sum(1 for g in judged.values() if g >= rel_threshold)
    hits, total = 0, 0.0
    for position, d in enumerate(order, start=1):
        if judged.get(d, rel_threshold - 1) >= rel_threshold:
            hits += 1
            total += hits / position
    return total / n_relevant if n_relevant else 0.0


def compute_metrics(qrels: Qrels, run: Run, metrics: Sequence[str] = ("MRR@10",),
                    rel_threshold: int = 1, reference: Optional[PathLike] = None) -> dict[str, float]:
    """Mean of each metric (definitions below) → ``{metric name: value}``, in ``metrics`` order.

    Queries of ``run`` absent from ``qrels`` are ignored.  Raises :class:`InputError` (naming ``reference``, the
    qrels file, when given) if no query of ``run`` is in ``qrels`` (the original's "no matching qids"), or if MRR/R
    is asked and no judgment reaches ``rel_threshold``.

    Definitions (``T`` = ``rel_threshold``, default 1; a judgment is *relevant* when its grade >= T)
    ---------------------------------------------------------------------------------------------------
    Two families, both averaged with unranked queries counting 0:

    * MS MARCO family, ``MRR@N`` and ``R@k``, in rank order.  Averaged over the *reference queries*: the qids with at
      least one relevant judgment.
      ``MRR@N`` = Σ over ranked reference queries of 1 / (smallest rank <= N of a relevant docid), divided by the
      number of reference queries (not the number ranked: the original's denominator).
      ``R@k`` = |relevant docids ranked <= k| / |relevant docids of the query|.
    * trec_eval family, ``nDCG@k``, ``P@k`` and ``MAP``, exactly as ``trec_eval -c -l T``: each query's documents are
      re-sorted by score descending, ties broken by docno in *descending* string order (the ranks are ignored; a
      rank file without scores uses score = 1/rank, as the original ``test_trec_eval.py``); a docid listed twice
      counts once, at its first position.  Averaged over every qid of the qrels, including queries whose
      judgments are all non-relevant (-c: queries without results count 0).
      ``nDCG@k``: gain = grade (negative grades count 0; independent of T), discount 1/log2(position + 1),
      ideal = the query's judged grades sorted descending, cut at k; 0 when the ideal is 0.
      ``P@k`` = relevant in the first k / k.  ``MAP`` = Σ over relevant retrieved of precision at its position,
      divided by the number of relevant judgments.

    ``T`` and the original: the original script ignores the grade, so every reference line is relevant.  With the
    official MS MARCO qrels (all grade 1) T = 1 gives the same numbers.  On graded qrels with grade-0 lines, such as
    ``test-qrel.tsv`` of TREC DL, the original counts the grade-0 lines as relevant and its MRR is meaningless (DRhard
    issue #8).  Here they are not relevant at the default T = 1 (a note is printed); ``--rel_threshold 0`` reproduces
    the original.  TREC DL reports MRR, recall and MAP at T = 2 (``trec_eval -l 2``) and nDCG@10 on the graded
    judgments.  The two families also differ where a qrels query has no relevant judgment: MRR@N and R@k leave it
    out of the average, trec_eval's recall and reciprocal rank would count it as 0.
    """
    parsed = {name: parse_metric(name) for name in metrics}
    if not any(qid in qrels for qid in run):
        raise InputError(f"none of the {len(run)} candidate query ids is in the reference (no matching qids)",
                         path=reference)
    relevant = relevant_docs(qrels, rel_threshold)
    if not relevant and any(kind in ("MRR", "R") for kind, _ in parsed.values()):
        raise InputError(f"no reference judgment has a grade >= {rel_threshold} (--rel_threshold)", path=reference)
    needs_order = any(kind in ("nDCG", "P", "MAP") for kind, _ in parsed.values())
    sums = dict.fromkeys(metrics, 0.0)
    for qid, ranking in run.items():       # candidate order: sums bit-identical to the original's MRR
        judged = qrels.get(qid)
        if judged is None:
            continue
        order = ranking.trec_order() if needs_order else []
        for name, (kind, k) in parsed.items():
            sums[name] += _query_value(kind, k, ranking, order, judged, relevant.get(qid), rel_threshold)
    return {name: sums[name] / (len(relevant) if kind in ("MRR", "R") else len(qrels))
            for name, (kind, _) in parsed.items()}


def _query_value(kind: str, k: Optional[int], ranking: Ranking, order: list, judged: dict[Hashable, int],
                 relevant: Optional[set], rel_threshold: int) -> float:
    """One query's value of one metric (0 for MRR/R when the query has no relevant judgment)."""
    if kind == "MRR":
        first = _first_relevant_rank(ranking, relevant, k) if relevant else None
        return 0.0 if first is None else 1 / first
    if kind == "R":
        return _recall(ranking, relevant, k) if relevant else 0.0
    if kind == "nDCG":
        return _ndcg(order, judged, k)
    if kind == "P":
        return _precision(order, judged, k, rel_threshold)
    return _average_precision(order, judged, rel_threshold)


def count_below_threshold(qrels: Qrels, rel_threshold: int) -> int:
    """Number of judgments with grade < ``rel_threshold`` (relevant to the original script, not here)."""
    return sum(1 for judged in qrels.values() for g in judged.values() if g < rel_threshold)


def evaluate_files(reference: PathLike, candidate: PathLike, metrics: Sequence[str] = ("MRR@10",),
                   ids: str = "int", rel_threshold: int = 1, max_rank: int = MAX_RANK) -> dict[str, Any]:
    """Load both files and compute ``metrics``; the result also holds ``QueriesRanked`` (candidate qids).

    Warns on stderr about candidate qids unknown to the reference and about judgments below ``rel_threshold``.

    Input files (fields split on any whitespace; blank lines skipped; CRLF and a UTF-8 BOM accepted)
    -------------------------------------------------------------------------------------------------
    * Reference (qrels), 4 columns ``qid ITER docid grade``: the preprocessed ``{split}-qrel.tsv``
      (``qoffset\\t0\\tpoffset\\trel``), the official ``qrels.dev.small.tsv`` (tabs), TREC qrels (spaces, ``Q0``), the
      document qrels (``D`` ids).  ITER is ignored.  A pair judged twice keeps its highest grade (with a warning).
      BEIR qrels (``qrels/<split>.tsv``) are read too: a first line ``query-id corpus-id score`` announces 3 columns
      ``qid docid grade`` on every later line.
    * Candidate (run): a rank file ``qid docid rank [score]`` (the original's) or a TREC run
      ``qid Q0 docid rank score tag``, read by :mod:`run_file` (formats and line rules there).  In a rank file the
      rank column is the position, at most ``max_rank`` (the original's 1000 slots), and a (qid, rank) pair given
      twice is an error (the original silently kept the later line).  In a TREC run the rank column is ignored, as
      trec_eval does: positions come from the trec_eval order.
    * Ids (the qrels' and the candidate's): ``ids="int"`` (default; qid and docid are integers), ``"doc"`` (docids are
      ``D`` + integer, the original's ``doc`` argument; the prefix is removed), ``"str"`` (any token, e.g.
      ``CACM-1410``; trec_eval semantics).
    """
    for name in metrics:
        parse_metric(name)
    qrels = load_reference(reference, ids)
    run = load_candidate(candidate, ids, max_rank)
    unknown = sum(1 for qid in run if qid not in qrels)
    if unknown == len(run):
        raise InputError(f"none of the {len(run)} candidate query ids is in the reference {reference} (no "
                         f"matching qids)", path=candidate)
    if unknown:
        _warn(f"{unknown} of the {len(run)} candidate query ids are not in the reference; they are ignored")
    below = count_below_threshold(qrels, rel_threshold)
    if below and any(parse_metric(name)[0] != "nDCG" for name in metrics):
        print(f"note: {below} reference judgments have a grade < {rel_threshold} and are not relevant; the "
              f"original msmarco_eval.py counted every line as relevant (DRhard issue #8), which "
              f"--rel_threshold 0 reproduces", file=sys.stderr)
    result: dict[str, Any] = compute_metrics(qrels, run, metrics, rel_threshold, reference)
    result["QueriesRanked"] = len(run)
    return result


def format_block(result: dict[str, Any]) -> str:
    """The original's printout: rule, ``MRR @N: value`` (metrics in order), ``QueriesRanked: n``, rule."""
    lines = [BLOCK_RULE]
    for name, value in result.items():
        label = name.replace("MRR@", "MRR @") if name.startswith("MRR@") else name
        lines.append(f"{label}: {value}")
    lines.append(BLOCK_RULE)
    return "\n".join(lines)


def _mode(text: str) -> str:
    if text == "doc" or (text.isdigit() and int(text) >= 1):
        return text
    raise argparse.ArgumentTypeError(f"expected a positive integer N (MRR@N) or 'doc', got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m msmarco_eval",
        description="MS MARCO evaluation: MRR@N as the official script (divided by the number of reference "
                    "queries), plus R@k, and P@k, MAP and nDCG@k as trec_eval -c (definitions: "
                    "msmarco_eval.compute_metrics).")
    parser.add_argument("reference", help="qrels: qid ITER docid grade (offset qrels, qrels.dev.small.tsv, TREC)")
    parser.add_argument("candidate", help="run: qid docid rank [score], or TREC qid Q0 docid rank score tag")
    parser.add_argument("mode", nargs="?", type=_mode, default=str(DEFAULT_CUTOFF),
                        help="N for MRR@N (default 10), or 'doc': MRR@100 with D-prefixed document ids")
    parser.add_argument("--metrics", nargs="+", default=[],
                        help="extra metrics: R@k, P@k, nDCG@k, MAP, MRR@N (e.g. --metrics R@100 R@1000 nDCG@10)")
    parser.add_argument("--rel_threshold", type=ct.integer, default=1,
                        help="grade from which a judgment is relevant for MRR, R, P and MAP (trec_eval -l); "
                             "default 1; 2 for TREC DL; 0 reproduces the original (every line relevant)")
    parser.add_argument("--string_ids", action="store_true",
                        help="ids are arbitrary tokens (e.g. CACM-1410), not integers")
    parser.add_argument("--max_rank", type=ct.positive_int, default=MAX_RANK,
                        help=f"largest rank accepted in a rank file (default {MAX_RANK}, the original's slots)")
    return parser


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    doc = args.mode == "doc"
    if doc and args.string_ids:
        raise InputError("'doc' and --string_ids exclude each other")
    cutoff = DOC_CUTOFF if doc else int(args.mode)
    metrics = list(dict.fromkeys([f"MRR@{cutoff}", *args.metrics]))
    ids = "doc" if doc else ("str" if args.string_ids else "int")
    result = evaluate_files(args.reference, args.candidate, metrics, ids, args.rel_threshold, args.max_rank)
    print(format_block(result))
    return result


if __name__ == "__main__":
    run_cli(main)
