"""Reading a collection in the BEIR layout (string ids), for ``preprocess.py --input_format beir``.

Layout of ``--data_dir`` (UTF-8, one JSON object per line, LF or CRLF line ends; blank lines are an error)::

    corpus.jsonl        {"_id": "CACM-0001", "title": "...", "text": "..."}   ("title" optional; other keys ignored)
    queries.jsonl       {"_id": "1", "text": "..."}                             (other keys ignored)
    qrels/train.tsv     header line ``query-id<TAB>corpus-id<TAB>score``, then one line per judgment
    qrels/dev.tsv       (each split of :data:`SPLITS` whose qrels file exists is written; at least one must)
    qrels/test.tsv

Rules: ``_id``, ``title`` and ``text`` are JSON strings (an id non-empty and without whitespace, since rank and
run files split their columns on whitespace); an id is unique within its file; a qrels line names a query of
``queries.jsonl`` and a document of ``corpus.jsonl``; its score is an integer, kept as written.  A split keeps
the queries its qrels name, in ``queries.jsonl`` order.  A document's text is ``(title + " " + text).strip()``,
the text alone when the title is missing or empty: how BEIR, sentence-transformers and MTEB encode a document
(BEIR's ``models/sentence_bert.py``), so that a zero-shot figure is the published one; a query's text is
right-stripped, as an MS MARCO query's.  Anything else raises :class:`infra.io.InputError` naming the
file, the line and the value.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from infra.io import InputError, iter_lines, parse_int, require_file

CORPUS, QUERIES, QRELS_DIR = "corpus.jsonl", "queries.jsonl", "qrels"
SPLITS = ("train", "dev", "test")
QRELS_HEADER = ("query-id", "corpus-id", "score")
CORPUS_KEYS = ("_id", "title", "text")


class BeirSplit(NamedTuple):
    """One split: kept query ids and texts (``queries.jsonl`` order), qrels as (query offset, doc offset, grade)."""
    name: str
    qids: list[str]
    texts: list[str]
    qrels: list[tuple[int, int, str]]


def iter_records(path: Path, keys: Sequence[str], what: str,
                 optional: Sequence[str] = ()) -> Iterator[tuple[int, list[str]]]:
    """(line number, the string values of ``keys``) per line of a JSON-lines file; ``keys[0]`` is the id; a key of
    ``optional`` that a line lacks reads as ``""``."""
    for number, line in iter_lines(path, what):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"not a JSON object ({e.msg})", path=path, line=number, value=line[:120]) from None
        if not isinstance(record, dict):
            raise InputError("not a JSON object", path=path, line=number, value=line[:120])
        values = []
        for key in keys:
            if key not in record and key in optional:
                values.append("")
                continue
            if key not in record:
                raise InputError(f"missing field {key!r}", path=path, line=number, value=line[:120])
            if not isinstance(record[key], str):
                raise InputError(f"field {key!r} is not a string", path=path, line=number, value=record[key])
            values.append(record[key])
        if not values[0] or any(c.isspace() for c in values[0]):
            raise InputError("an _id must be non-empty and hold no whitespace", path=path, line=number,
                             value=values[0])
        yield number, values


def _unique_records(path: Path, keys: Sequence[str], what: str, keep: bool,
                    optional: Sequence[str] = ()) -> dict[str, list[str]]:
    """{id: the other values (``[]`` unless ``keep``)} of a JSON-lines file in line order, every line validated;
    a repeated id or an empty file raises."""
    seen: dict[str, int] = {}
    records: dict[str, list[str]] = {}
    for number, (rid, *values) in iter_records(path, keys, what, optional):
        if rid in seen:
            raise InputError(f"duplicate _id (first on line {seen[rid]})", path=path, line=number, value=rid)
        seen[rid] = number
        records[rid] = values if keep else []
    if not records:
        raise InputError(f"the {what} is empty", path=path)
    return records


def scan_corpus(data_dir: Path) -> np.ndarray:
    """The document ids of ``corpus.jsonl`` (:func:`string_ids`, line order), every line validated."""
    path = require_file(data_dir / CORPUS, "corpus")
    return string_ids(_unique_records(path, CORPUS_KEYS, "corpus", keep=False, optional=("title",)))


def document_text(title: str, text: str) -> str:
    """BEIR's document string ``(title + " " + text).strip()``: the stripped text alone for an empty title."""
    return (title + " " + text).strip()


def corpus_texts(data_dir: Path, ids: np.ndarray, max_chars: int) -> Iterator[str]:
    """Second pass over ``corpus.jsonl``: :func:`document_text` cut to ``max_chars``, checked against ``ids``."""
    path = data_dir / CORPUS
    for number, (rid, title, text) in iter_records(path, CORPUS_KEYS, "corpus", optional=("title",)):
        if number > len(ids) or rid != ids[number - 1]:
            raise InputError("the corpus changed while it was being read", path=path, line=number)
        yield document_text(title, text)[:max_chars]


def qrels_paths(data_dir: Path) -> list[tuple[str, Path]]:
    """(split, qrels path) of each split whose ``qrels/<split>.tsv`` exists; none at all raises."""
    found = [(name, data_dir / QRELS_DIR / f"{name}.tsv") for name in SPLITS]
    found = [(name, path) for name, path in found if path.is_file()]
    if not found:
        raise InputError(f"no qrels file: expected at least one of {', '.join(f'{s}.tsv' for s in SPLITS)}",
                         path=data_dir / QRELS_DIR)
    return found


def read_qrels(path: Path) -> list[tuple[int, str, str, str]]:
    """(line number, query id, document id, grade) per judgment of a BEIR qrels file (header line required)."""
    rows = []
    for number, line in iter_lines(path, "qrels file"):
        fields = line.rstrip("\r\n").split("\t")
        if number == 1:
            if tuple(f.strip() for f in fields) != QRELS_HEADER:
                raise InputError(f"expected the header line {chr(9).join(QRELS_HEADER)!r}", path=path, line=1,
                                 value=line[:120])
            continue
        if len(fields) != 3:
            raise InputError(f"expected 3 tab-separated columns, found {len(fields)}", path=path, line=number,
                             value=line[:120])
        qid, docid, grade = (f.strip() for f in fields)
        parse_int(grade, path, number, "score", allow_negative=True)
        rows.append((number, qid, docid, grade))
    return rows


def read_splits(data_dir: Path, doc_ids: np.ndarray) -> list[BeirSplit]:
    """Every split present, validated against ``queries.jsonl`` and the corpus ids."""
    query_path = require_file(data_dir / QUERIES, "query file")
    queries = {rid: text.rstrip() for rid, (text,) in
               _unique_records(query_path, ("_id", "text"), "query file", keep=True).items()}
    doc_offset = {rid: i for i, rid in enumerate(doc_ids.tolist())}
    splits = []
    for name, path in qrels_paths(data_dir):
        rows = read_qrels(path)
        wanted = {qid for _, qid, _, _ in rows}
        kept = [qid for qid in queries if qid in wanted]
        qoffset = {qid: i for i, qid in enumerate(kept)}
        qrels = []
        for number, qid, docid, grade in rows:
            if qid not in qoffset:
                raise InputError(f"query id is not in {QUERIES}", path=path, line=number, value=qid)
            if docid not in doc_offset:
                raise InputError(f"document id is not in {CORPUS}", path=path, line=number, value=docid)
            qrels.append((qoffset[qid], doc_offset[docid], grade))
        if not kept:
            raise InputError("no judgments in this qrels file", path=path)
        splits.append(BeirSplit(name, kept, [queries[q] for q in kept], qrels))
    return splits


def string_ids(ids: Iterable[str]) -> np.ndarray:
    """The id map written for string ids: a unicode ``.npy`` array (``<U{longest}``), loadable without pickle."""
    return np.array(list(ids), dtype=str)

