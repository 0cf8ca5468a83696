"""Run files (a ranking per query) with one rule set, and the preprocessing's id maps that translate them.

Read by msmarco_eval.py (candidate files), cvt_back.py (offset rank files) and star/prepare_hardneg.py
(``--run_file``).  This module imports no torch.

Formats (the number of fields of the first non-blank line decides)
------------------------------------------------------------------
* MS MARCO rank file, 3 fields ``qid docid rank``: the original's rank files, the MS MARCO leaderboard's
  submission format, and what star/adore inference and cvt_back write (offsets or official ids);
* the same with a score, 4 fields ``qid docid rank score`` (inference with ``--with_scores``);
* TREC run, 6 fields ``qid Q0 docid rank score tag``: trec_eval's input, written by Anserini, Pyserini, Terrier,
  ``cvt_back.py --trec``, and the format of the official document runs (``msmarco-doctrain-top100``).

Rules, each with its reason
---------------------------
1. Text: UTF-8, LF or CRLF line ends, a leading byte-order mark ignored (:func:`infra.io.iter_lines`); bytes that
   are not UTF-8 are an error naming the line.
2. Fields are split on any run of whitespace, tabs or spaces: the original msmarco_eval.py split candidate lines
   on tabs, trec_eval splits on any whitespace, and both kinds of files circulate in either form.
3. A line holding only whitespace is skipped: a trailing blank line is common and carries no result.
4. The first non-blank line must have 3, 4 or 6 fields and every later line the same number: a file mixing
   formats (two runs concatenated, a truncated write) would otherwise have its columns read with the wrong
   meaning.
5. Ids (``ids`` argument, the same for the query and the document column):

   * ``"int"``: both are non-negative integers (offsets, MS MARCO passage ids, qids);
   * ``"doc"``: the document id is ``D`` + a non-negative integer, the prefix required and removed; the query id
     is an integer.  MS MARCO document ids are written ``D1650436`` everywhere (collection, qrels, runs) and the
     original msmarco_eval.py's ``doc`` mode expects the prefix; a document id without it means the file is not
     a document run (a passage run, an offset file);
   * ``"str"``: any token, compared as text, as trec_eval does (``CACM-1410``).

6. Rank: in a rank file (3 or 4 fields) an integer >= 1, the position of the document in its query's ranking
   (the original evaluator stores rank r in slot r - 1, so rank 0 would land in the last slot).  In a TREC run the
   column must be a non-negative integer (Terrier numbers from 0); checking it catches a file whose columns are
   shifted or swapped, whose score column would otherwise be read from the wrong place.  What the TREC rank means
   is the reader's choice, and there are two: an evaluation orders a TREC run by score as trec_eval does
   (:func:`trec_eval_order`; trec_eval never reads the column), so :func:`iter_run` yields ``rank=None`` for it;
   mining negatives from a run (``iter_run(..., trec_ranks=True)``, :func:`read_run_arrays`) takes the run's own
   ranks, the order its author gave (the official BM25 runs list ties in their own order, which the scores do not
   record).
7. Score (4 and 6 fields): a finite number.  trec_eval orders by score: NaN has no order (the result would
   depend on the sort algorithm), and an infinite score comes from an overflow or a padded result, not a ranking.
8. The ``Q0`` and ``tag`` columns of a TREC run are not read (trec_eval ignores them too).

Anything else raises :class:`infra.io.InputError` naming the file, the line and the value.  Rules over a whole
ranking (how deep it may go, a rank or a document given twice) belong to the caller: msmarco_eval follows the
original's 1000-slot table, prepare_hardneg keeps each document's best rank.
"""
from __future__ import annotations

import array
import math
from typing import Hashable, Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from infra.io import InputError, PathLike, iter_lines, parse_int, require_file

ID_KINDS = ("int", "doc", "str")
FORMATS = {3: "qid docid rank", 4: "qid docid rank score", 6: "TREC qid Q0 docid rank score tag"}
TREC_FIELDS = 6


#: One validated line, ``(line number, qid, docid, rank, score)``: ``rank`` is ``None`` on a TREC line (rule 6),
#: ``score`` on a 3-field line.  A plain tuple: millions are built per run file.
RunLine = tuple[int, Hashable, Hashable, Optional[int], Optional[float]]


def check_ids(ids: str) -> None:
    """Raise ``ValueError`` unless ``ids`` is one of :data:`ID_KINDS` (a programming error, not a user one)."""
    if ids not in ID_KINDS:
        raise ValueError(f"ids must be one of {ID_KINDS}, got {ids!r}")


def parse_qid(text: str, ids: str, path: PathLike, line: int) -> Hashable:
    """A query id under rule 5 (qrels follow the same rule)."""
    return text if ids == "str" else parse_int(text, path, line, "query id")


def parse_docid(text: str, ids: str, path: PathLike, line: int) -> Hashable:
    """A document id under rule 5 (qrels follow the same rule)."""
    if ids == "str":
        return text
    if ids == "doc":
        if not text.startswith("D"):
            raise InputError("document id lacks the 'D' prefix of doc mode", path=path, line=line, value=text)
        text = text[1:]
    return parse_int(text, path, line, "document id")


def parse_score(text: str, path: PathLike, line: int) -> float:
    """A score under rule 7."""
    try:
        score = float(text)
    except ValueError:
        score = math.nan
    if not math.isfinite(score):
        raise InputError("score is not a finite number", path=path, line=line, value=text)
    return score


def _first_field_count(fields: list[str], path: PathLike, line: int, text: str) -> int:
    """The field count of the file's first line (rule 4), which must be a known format."""
    if len(fields) not in FORMATS:
        *first, last = (f"{n} ({fmt})" for n, fmt in FORMATS.items())
        raise InputError(f"expected {', '.join(first)} or {last} fields, found {len(fields)}", path=path, line=line,
                         value=text)
    return len(fields)


def _parse_line(fields: list[str], ids: str, path: PathLike, line: int, trec_ranks: bool) -> RunLine:
    """One line whose field count is checked, under rules 5-7."""
    trec = len(fields) == TREC_FIELDS
    doc = 2 if trec else 1
    qid = parse_qid(fields[0], ids, path, line)
    docid = parse_docid(fields[doc], ids, path, line)
    rank = parse_int(fields[doc + 1], path, line, "rank")
    if rank < 1 and not trec:
        raise InputError("ranks are 1-based", path=path, line=line, value=fields[doc + 1])
    score = parse_score(fields[doc + 2], path, line) if len(fields) > 3 else None
    return line, qid, docid, None if trec and not trec_ranks else rank, score


def iter_run(path: PathLike, ids: str = "int", what: str = "run file", trec_ranks: bool = False) -> Iterator[RunLine]:
    """Yield a :data:`RunLine` for each non-blank line of a run file, in file order, validated under the rules
    of the module docstring.  ``what`` names the file in the message when it does not exist.  A TREC line's rank
    is ``None`` (trec_eval's reading) unless ``trec_ranks`` (rule 6)."""
    check_ids(ids)
    prefix = "D" if ids == "doc" else ""
    n_fields: Optional[int] = None
    for number, text in iter_lines(path, what):
        fields = text.split()
        if not fields:
            continue
        if n_fields is None:
            n_fields = _first_field_count(fields, path, number, text)
            trec = n_fields == TREC_FIELDS
            doc, min_rank = (2, 0) if trec else (1, 1)
            drop_rank = trec and not trec_ranks
        elif len(fields) != n_fields:
            raise InputError(f"expected {n_fields} fields like the first line ({FORMATS[n_fields]}), found "
                             f"{len(fields)}", path=path, line=number, value=text)
        if ids != "str":   # fast path: _parse_line's checks at once; _parse_line names the field that fails them
            try:
                docid_text = fields[doc]
                qid, docid, rank = int(fields[0]), int(docid_text[len(prefix):]), int(fields[doc + 1])
                score = float(fields[doc + 2]) if n_fields > 3 else None
            except ValueError:
                qid = -1
            if (qid >= 0 and docid >= 0 and rank >= min_rank and docid_text.startswith(prefix)
                    and (score is None or math.isfinite(score))):
                yield number, qid, docid, None if drop_rank else rank, score
                continue
        yield _parse_line(fields, ids, path, number, trec_ranks)


def trec_eval_order(scores: Sequence[float], docids: Sequence[Hashable],
                    queries: Optional[np.ndarray] = None) -> np.ndarray:
    """Indices of the lines in trec_eval's order: by query when integer ``queries`` are given, then score
    descending, ties broken by the document id's text in descending order (trec_eval compares docnos as strings;
    an integer id's text is its decimal digits, which orders ``D``-prefixed ids as their full text would); equal
    score and text keep file order."""
    scores = np.asarray(scores, dtype=np.float64)
    keys = [-scores] if queries is None else [-scores, queries]
    order = np.lexsort(keys)
    tie = scores[order][1:] == scores[order][:-1]
    if queries is not None:
        tie &= queries[order][1:] == queries[order][:-1]
    if not tie.any():
        return order
    tied = np.flatnonzero(np.r_[tie, False] | np.r_[False, tie])         # positions inside a tie group
    group = np.cumsum(np.r_[True, ~tie])[tied]
    text = np.asarray(docids)[order[tied]].astype(str)
    _, text_rank = np.unique(text, return_inverse=True)
    order[tied] = order[tied][np.lexsort((-text_rank, group))]
    return order


def read_run_arrays(path: PathLike, ids: str = "int",
                    what: str = "run file") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(qids, docids, ranks)`` int64 arrays of a run file with integer ids (``ids`` "int" or "doc"), in line
    order; ``ranks`` is the rank column, of a TREC run too (rule 6: the run's own order)."""
    if ids == "str":
        raise ValueError("read_run_arrays reads integer ids only")
    qids, docids, ranks = array.array("q"), array.array("q"), array.array("q")
    for _, qid, docid, rank, _ in tqdm(iter_run(path, ids, what, trec_ranks=True), desc="read run",
                                       unit=" lines", disable=None):
        qids.append(qid)
        docids.append(docid)
        ranks.append(rank)
    return tuple(np.frombuffer(a, dtype=np.int64) for a in (qids, docids, ranks))


def load_id_map(path: PathLike) -> np.ndarray:
    """A preprocessing id map (``passages_ids.npy``, ``{split}-query_ids.npy``: the official id of each offset),
    a 1-D ``.npy`` loaded without unpickling: integer ids (MS MARCO) → int64 array; string ids (the BEIR layout,
    dtype ``<U``) → that unicode array."""
    require_file(path, "id map")
    try:
        ids = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"not a plain .npy array ({e})", path=path) from None
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.dtype.kind == "U"):
        raise InputError("expected a 1-D integer array of official ids (or a unicode array of string ids)",
                         path=path, value=f"{ids.dtype} {ids.shape}")
    return ids if ids.dtype.kind == "U" else ids.astype(np.int64, copy=False)
