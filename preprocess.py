"""Tokenize MS MARCO passages/documents and queries once, into int32 memmaps, as the original preprocess.py
(with its vendored transformers-2.8 RobertaTokenizer) does.

    python -m preprocess --data_type 1 --model_name_or_path ../shared/data/roberta-base-tokenizer
    python -m preprocess --data_type 0 --model_name_or_path path/to/roberta-base --threads 32

The tokenizer must be a local folder (nothing is downloaded).  Every output is written to a temporary name and
renamed into place only when the whole run succeeded.  The input and output files: :func:`preprocess` (the BEIR
layout: :mod:`infra.beir_input`); the tokenization, id for id that of transformers 2.8.0:
:class:`Faithful28Tokenizer`.
A sentence-transformers folder sets the default lengths and prompts (:mod:`infra.model_folder`).
"""
from __future__ import annotations

import argparse
import array
import contextlib
import itertools
import json
import logging
import os
import pickle
import re
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence, TypeVar

import numpy as np
from tqdm import tqdm

from infra import beir_input
from infra import cli_types as ct
from infra.io import (InputError, PathLike, atomic_output, check_written, iter_lines, parse_int, refuse_existing,
                      require_file, run_cli)
from infra.model_folder import length_or_folder_default, load_local_tokenizer, read_folder_settings
from infra.preprocess_meta import META_NAME, Prefixes, meta_record
from infra.run_lock import output_lock

log = logging.getLogger("preprocess")

DOC, PASSAGE = 0, 1
KIND = {DOC: "doc", PASSAGE: "passage"}
COLLECTION = {DOC: "msmarco-docs.tsv", PASSAGE: "collection.tsv"}
#: split name -> (query file, qrels file or None), in the original's processing order.
SPLITS = {
    PASSAGE: {
        "train": ("queries.train.tsv", "qrels.train.tsv"),
        "dev": ("queries.dev.small.tsv", "qrels.dev.small.tsv"),
        "test": ("msmarco-test2019-queries.tsv", "2019qrels-pass.txt"),  # TREC DL 2019
        "test2020": ("msmarco-test2020-queries.tsv", "2020qrels-pass.txt"),  # TREC DL 2020
        "lead": ("queries.eval.small.tsv", None),
    },
    DOC: {
        "train": ("msmarco-doctrain-queries.tsv", "msmarco-doctrain-qrels.tsv"),
        "test": ("msmarco-test2019-queries.tsv", "2019qrels-docs.txt"),
        "test2020": ("msmarco-test2020-queries.tsv", "2020qrels-docs.txt"),
        "dev": ("msmarco-docdev-queries.tsv", "msmarco-docdev-qrels.tsv"),
        "lead": ("docleaderboard-queries.tsv", None),
    },
}
SPLIT_NAMES = tuple(dict.fromkeys(name for splits in SPLITS.values() for name in splits))  # the drivers' --mode
DOC_FIELD_SEP = "<sep>"  # a literal string, tokenized like any text (not a special token)
BATCH_SIZE = 2048
MAX_SEQ_LENGTH, MAX_QUERY_LENGTH = 512, 64  # the original's defaults, for a folder that declares no length
CHARS_PER_TOKEN = 12  # prefix shortcut: tokenize ~this many characters per needed token first

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------

def load_tokenizer(path: PathLike) -> Any:
    """Load a Hugging Face *fast* tokenizer from a local folder (``tokenizer.json``, or ``vocab.json`` +
    ``merges.txt`` for RoBERTa, or ``vocab.txt`` for BERT).  Never downloads."""
    folder = Path(path)
    if not folder.is_dir():
        raise InputError("tokenizer folder not found: pass --model_name_or_path a local folder holding the "
                         "tokenizer files (e.g. roberta-base's vocab.json and merges.txt); nothing is downloaded",
                         path=folder)
    tokenizer = load_local_tokenizer(folder, "a tokenizer from this folder")
    if not getattr(tokenizer, "is_fast", False):
        raise InputError("the tokenizer is not a fast (Rust) tokenizer", path=folder)
    return tokenizer


def _lower_chars(text: str) -> str:
    """Lower-case character by character, as 2.8's ``re.sub(r"(.+?)", lower)`` did.

    ``str.lower`` differs from that only for a capital sigma, which it maps to final-sigma ``ς`` at the end of
    a word; character-wise lowering always gives ``σ``."""
    return text.lower() if "Σ" not in text else "".join(map(str.lower, text))


def _members(component: Any) -> list[dict]:
    """The serialized parts of a normalizer / pre-tokenizer: the members of a ``Sequence``, else itself."""
    if component is None:
        return []
    state = json.loads(component.__getstate__())
    if state["type"] == "Sequence":
        return state.get("pretokenizers", state.get("normalizers", []))
    return [state]


_CUT_SAFE_PRE = {"ByteLevel", "BertPreTokenizer", "Whitespace", "WhitespaceSplit"}
_CUT_SAFE_NORM = {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents"}


def lower_cases_itself(tokenizer: Any) -> bool:
    """Whether a fast tokenizer lower-cases its input: ``do_lower_case`` set, or a ``Lowercase`` /
    lower-casing ``BertNormalizer`` in its backend normalizer (an uncased BERT)."""
    if getattr(tokenizer, "do_lower_case", False):
        return True
    return any(n["type"] == "Lowercase" or (n["type"] == "BertNormalizer" and n.get("lowercase"))
               for n in _members(tokenizer.backend_tokenizer.normalizer))


class Faithful28Tokenizer:
    """transformers-2.8 ``encode(text, add_special_tokens=True, max_length=L)`` on a modern fast tokenizer.

    For a text ``t`` the 2.8 RoBERTa tokenizer (with ``do_lower_case=True``)

    1. prefixes a space unless ``t[0].isspace()`` (byte-level BPE tokenizers only; the fast tokenizer's own
       ``add_prefix_space`` is switched off because it would also prefix a leading tab or no-break space);
    2. lower-cases every character except inside special-token strings (``<s>``, ``</s>``, ``<mask>``…);
    3. splits on special-token strings, right-stripping every piece (so whitespace before an in-text special
       token disappears), which for ordinary text is a right-strip of the whole text;
    4. byte-level-BPE-tokenizes the pieces, keeps the first ``L - 2`` ids and returns ``[cls] + ids + [sep]``.

    Empty or whitespace-only text gives ``[cls, sep]`` (2.8 itself crashed on the empty string).  Any other
    fast tokenizer works with its own cls/bos and sep/eos ids (e.g. BERT's ``[CLS] … [SEP]``).  Step 2 (the
    original's ``do_lower_case=True``) belongs to the byte-level RoBERTa emulation: another tokenizer gets it
    only when it lower-cases itself (:func:`lower_cases_itself`, an uncased BERT), so a cased one sees the
    text's own case (``lower_case`` says which).

    Long texts are first tokenized from a prefix ending at a space, about ``chars_per_token`` characters per
    needed token; the ids of that prefix are a prefix of the full text's ids (the cut is a pre-tokenizer
    boundary), so when it yields ``L - 2`` ids the result is identical; otherwise the full text is encoded.
    ``stats`` counts ``prefix`` (shortcut used) and ``fallback`` (full text re-encoded) texts.
    """

    def __init__(self, tokenizer: Any, chars_per_token: Optional[int] = CHARS_PER_TOKEN):
        import tokenizers

        self.cls_id, self.sep_id = _boundary_ids(tokenizer)
        self.name_or_path: str = getattr(tokenizer, "name_or_path", "") or ""
        self._backend = tokenizers.Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._backend.no_padding()
        self._backend.no_truncation()
        self._budget: Optional[int] = None  # the backend's current truncation length
        self.prefix_space = self._disable_backend_prefix_space()
        self.lower_case = self.prefix_space or lower_cases_itself(tokenizer)
        specials = sorted(set(tokenizer.all_special_tokens), key=len, reverse=True)
        alternation = "|".join(map(re.escape, specials))
        self._special = re.compile(f"({alternation})") if specials else None
        self._space_before_special = re.compile(rf"\s+(?={alternation})") if specials else None
        cut_safe = not any(any(c.isspace() for c in s) for s in specials) and self._cut_is_boundary()
        self.chars_per_token = chars_per_token if cut_safe else None
        self.stats = {"prefix": 0, "fallback": 0}

    def _disable_backend_prefix_space(self) -> bool:
        """Turn off ``add_prefix_space`` of byte-level pre-tokenizers; True if there is one (2.8 prefixed a
        space for the byte-level RoBERTa/GPT-2 tokenizers only)."""
        pre = self._backend.pre_tokenizer
        if pre is None:
            return False
        if json.loads(pre.__getstate__())["type"] == "Sequence":
            parts = [pre[i] for i, m in enumerate(_members(pre)) if m["type"] == "ByteLevel"]
        else:
            parts = [pre] if _members(pre)[0]["type"] == "ByteLevel" else []
        for part in parts:  # the objects are views on the backend's own pre-tokenizer
            part.add_prefix_space = False
        return bool(parts)

    def _cut_is_boundary(self) -> bool:
        """Whether a cut before a space (after a non-space) is a token boundary for this tokenizer."""
        pre = _members(self._backend.pre_tokenizer)
        norm = _members(self._backend.normalizer)
        return (bool(pre) and all(p["type"] in _CUT_SAFE_PRE and p.get("use_regex", True) for p in pre)
                and all(n["type"] in _CUT_SAFE_NORM for n in norm))

    def normalize(self, text: str) -> str:
        """The text 2.8 BPE-tokenized: steps 1–3 above (prefix space, lower-case where it belongs, strip)."""
        if self.prefix_space and text and not text[0].isspace():
            text = " " + text
        if self.lower_case and (self._special is None or not self._special.search(text)):
            text = _lower_chars(text)
        elif self.lower_case:
            parts = self._special.split(text)  # odd positions are special-token strings: kept as is
            text = "".join(p if i % 2 else _lower_chars(p) for i, p in enumerate(parts))
        if self._special is not None and self._special.search(text):
            text = self._space_before_special.sub("", text)
        return text.rstrip()

    def _prefix(self, text: str, budget: int) -> str:
        """A prefix of ``text`` ending before a space that follows a non-space, past ``budget`` tokens'
        worth of characters; ``text`` itself when there is none."""
        cut = text.find(" ", budget * self.chars_per_token)
        while cut > 0 and text[cut - 1].isspace():
            cut = text.find(" ", cut + 1)
        return text if cut <= 0 else text[:cut]

    def _encode_raw(self, texts: list[str], budget: int) -> list[list[int]]:
        """Ids of ``texts`` (no special tokens), the first ``budget`` of each (truncated in Rust)."""
        if budget != self._budget:
            self._backend.enable_truncation(budget)
            self._budget = budget
        return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_content(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """The ids between cls and sep of each text's encoding: at most ``max_length - 2`` of them.  The batch
        is encoded on all the Rust tokenizer's threads."""
        if max_length < 2:
            raise ValueError("max_length must be at least 2 (room for the cls and sep tokens)")
        budget = max_length - 2
        if budget == 0:
            return [[] for _ in texts]
        full = [self.normalize(t) for t in texts]
        cut = full if self.chars_per_token is None else [self._prefix(t, budget) for t in full]
        ids = self._encode_raw(cut, budget)
        redo = [i for i, (c, f, x) in enumerate(zip(cut, full, ids)) if len(x) < budget and len(c) < len(f)]
        if redo:
            for i, x in zip(redo, self._encode_raw([full[i] for i in redo], budget)):
                ids[i] = x
        self.stats["prefix"] += sum(len(c) < len(f) for c, f in zip(cut, full)) - len(redo)
        self.stats["fallback"] += len(redo)
        return ids

    def encode(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """One id list per text: ``[cls] + ids[:max_length - 2] + [sep]``, as 2.8's ``encode``."""
        return [[self.cls_id, *x, self.sep_id] for x in self.encode_content(texts, max_length)]


def _boundary_ids(tokenizer: Any) -> tuple[int, int]:
    """(first, last) special ids: cls (else bos) and sep (else eos)."""
    first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    last = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if first is None or last is None:
        raise InputError("the tokenizer defines no cls/bos or no sep/eos token",
                         path=getattr(tokenizer, "name_or_path", None))
    return first, last


_FAITHFUL: "weakref.WeakKeyDictionary[Any, Faithful28Tokenizer]" = weakref.WeakKeyDictionary()


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Faithful transformers-2.8 encoding of ``texts`` (see :class:`Faithful28Tokenizer`), each at most
    ``max_length`` ids including the cls and sep tokens.  ``tokenizer`` is a HF fast tokenizer (its wrapper is
    built once and cached) or a :class:`Faithful28Tokenizer`."""
    if not isinstance(tokenizer, Faithful28Tokenizer):
        if tokenizer not in _FAITHFUL:
            _FAITHFUL[tokenizer] = Faithful28Tokenizer(tokenizer)
        tokenizer = _FAITHFUL[tokenizer]
    return tokenizer.encode(texts, max_length)


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _pipelined(work: Callable[[list[str]], list[list[int]]], batches: Iterable[list[str]]) -> Iterator[list[list[int]]]:
    """Yield ``work(batch)`` per batch, in order.  Batch k+1 is read (by the caller's iterator) and results of
    batch k are consumed while a worker thread encodes: the Rust tokenizer releases the GIL."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in batches:
            future = pool.submit(work, batch)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()


# --------------------------------------------------------------------------------------------------
# Reading inputs
# --------------------------------------------------------------------------------------------------

def _fields(line: str, count: int, path: Path, number: int, tabs: bool = True) -> list[str]:
    parts = line.split("\t") if tabs else line.split()
    if len(parts) != count:
        kind = "tab" if tabs else "whitespace"
        raise InputError(f"expected {count} {kind}-separated columns, found {len(parts)}", path=path,
                         line=number, value=line[:120])
    return parts


def _parse_corpus_id(text: str, data_type: int, path: Path, number: int) -> int:
    """Passage id, or document id with its ``D`` prefix removed."""
    if data_type == DOC:
        text = text[1:] if text.startswith("D") else text
        return parse_int(text, path, number, "document id")
    return parse_int(text, path, number, "passage id")


def parse_corpus_line(line: str, path: Path, number: int, data_type: int, max_chars: int) -> tuple[int, str]:
    """(official id, text) of one collection line.  Passage text: the right-stripped second field; document
    text: ``url<sep>title<sep>body`` of the right-stripped fields; both cut to ``max_chars`` characters."""
    if data_type == DOC:
        docid, *parts = _fields(line, 4, path, number)
        text = DOC_FIELD_SEP.join(p.rstrip() for p in parts)
        return _parse_corpus_id(docid, DOC, path, number), text[:max_chars]
    pid, text = _fields(line, 2, path, number)
    return _parse_corpus_id(pid, PASSAGE, path, number), text.rstrip()[:max_chars]


class IdIndex:
    """Official id -> offset lookup over an int64 id array (a sorted copy; no per-id Python objects)."""

    def __init__(self, ids: np.ndarray):
        self.ids = ids
        self._order = np.argsort(ids, kind="stable")
        self._sorted = ids[self._order]

    def first_duplicate(self) -> Optional[tuple[int, int]]:
        """(first offset, repeated offset) of the duplicated id whose repetition comes first, or None."""
        same = np.flatnonzero(self._sorted[1:] == self._sorted[:-1])
        if same.size == 0:
            return None
        # the sort is stable, so _order[k + 1] is a repetition of the id at _order[k]
        k = same[np.argmin(self._order[same + 1])]
        first = np.searchsorted(self._sorted, self._sorted[k])
        return int(self._order[first]), int(self._order[k + 1])

    def lookup(self, query: np.ndarray) -> np.ndarray:
        """Offsets of ``query`` ids; -1 where absent."""
        pos = np.searchsorted(self._sorted, query)
        pos = np.minimum(pos, len(self._sorted) - 1)
        found = self._sorted[pos] == query
        return np.where(found, self._order[pos], -1)


def scan_corpus_ids(path: Path, data_type: int) -> np.ndarray:
    """First pass over the collection: validate every line's columns and id, return the ids (int64, line
    order).  Raises InputError for a bad line, an empty collection or a duplicate id."""
    collected = array.array("q")
    for number, line in tqdm(iter_lines(path, "collection"), desc="scan ids", unit=" lines", disable=None):
        collected.append(parse_corpus_line(line, path, number, data_type, 0)[0])
    if not collected:
        raise InputError("the collection is empty", path=path)
    ids = np.frombuffer(collected, dtype=np.int64).copy()
    duplicate = IdIndex(ids).first_duplicate()
    if duplicate is not None:
        first, again = duplicate
        raise InputError(f"duplicate {KIND[data_type]} id (first on line {first + 1})", path=path,
                         line=again + 1, value=int(ids[again]))
    return ids


def read_queries(path: Path) -> list[tuple[int, str]]:
    """(qid, right-stripped text) per line of a query file, file order; duplicate qids are an error."""
    queries, seen = [], {}
    for number, line in iter_lines(path, "query file"):
        qid_text, text = _fields(line, 2, path, number)
        qid = parse_int(qid_text, path, number, "query id")
        if qid in seen:
            raise InputError(f"duplicate query id (first on line {seen[qid]})", path=path, line=number, value=qid)
        seen[qid] = number
        queries.append((qid, text.rstrip()))
    return queries


class QrelLine(NamedTuple):
    """One qrels line: its line number, the query and passage/document ids, the grade as written."""
    number: int
    qid: int
    pid: int
    grade: str


def read_qrels(path: Path, data_type: int) -> list[QrelLine]:
    """Every line of a qrels file ``qid <ignored> pid grade`` (whitespace-separated; doc ids lose ``D``)."""
    rows = []
    for number, line in iter_lines(path, "qrels file"):
        qid, _, pid, grade = _fields(line, 4, path, number, tabs=False)
        rows.append(QrelLine(number, parse_int(qid, path, number, "query id"),
                             _parse_corpus_id(pid, data_type, path, number), grade))
    return rows


@dataclass
class SplitPlan:
    """A validated query split: kept queries (query-file order) and qrels in offset space."""
    name: str
    qids: list[Any]  # int (MS MARCO) or str (BEIR) ids
    texts: list[str]
    qrels: Optional[list[tuple[int, int, str]]]  # (query offset, passage offset, grade)


def plan_split(name: str, query_path: Path, qrels_path: Optional[Path], data_type: int,
               index: IdIndex) -> SplitPlan:
    """Read and validate one split; with qrels, keep only the queries they name (any grade)."""
    queries = read_queries(query_path)
    if qrels_path is None:
        kept, qrels = queries, None
    else:
        rows = read_qrels(qrels_path, data_type)
        wanted = {r.qid for r in rows}
        kept = [q for q in queries if q[0] in wanted]
        qoffset = {qid: i for i, (qid, _) in enumerate(kept)}
        for r in rows:
            if r.qid not in qoffset:
                raise InputError(f"query id is not in {query_path.name}", path=qrels_path, line=r.number, value=r.qid)
        poffsets = index.lookup(np.fromiter((r.pid for r in rows), np.int64, len(rows)))
        missing = np.flatnonzero(poffsets < 0)
        if missing.size:
            r = rows[missing[0]]
            raise InputError(f"{KIND[data_type]} id is not in the collection", path=qrels_path, line=r.number,
                             value=r.pid)
        qrels = [(qoffset[r.qid], int(p), r.grade) for r, p in zip(rows, poffsets)]
    if not kept:
        raise InputError("no queries to write for this split (empty query or qrels file)", path=query_path)
    return SplitPlan(name, [q for q, _ in kept], [t for _, t in kept], qrels)


# --------------------------------------------------------------------------------------------------
# Writing outputs
# --------------------------------------------------------------------------------------------------

def _pad_rows(contents: list[list[int]], width: int, cls_id: int, sep_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``cls, content..., sep, 0...`` (int32 [n, width]) and their lengths (int32 [n]) of id lists no longer
    than ``width - 2``."""
    n = len(contents)
    inner = np.fromiter(map(len, contents), np.int32, n)
    flat = np.fromiter(itertools.chain.from_iterable(contents), np.int32, int(inner.sum()))
    block = np.zeros((n, width), np.int32)
    block[:, 0] = cls_id
    column = np.arange(width)
    block[(column >= 1) & (column <= inner[:, None])] = flat
    block[np.arange(n), inner + 1] = sep_id
    return block, inner + 2


class _IdDictPickle:
    """Pickles as a plain ``dict`` {official id: offset}, streamed from an id array (no dict in memory)."""

    def __init__(self, ids: np.ndarray):
        self.ids = ids

    def __reduce__(self):
        items = ((int(i), offset) for offset, i in enumerate(self.ids))
        return dict, (), None, None, items


class OutputStage:
    """All outputs of a run, written under temporary names; renamed into place together when the ``with``
    block succeeds, all removed when it fails (so a failed run leaves no half-written output)."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "OutputStage":
        self._stack.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Optional[bool]:
        return self._stack.__exit__(*exc)

    def path(self, name: str) -> Path:
        """Temporary path for output file ``name``."""
        return self._stack.enter_context(atomic_output(self.out_dir / name))

    def npy(self, name: str, values: np.ndarray) -> None:
        with open(self.path(name), "wb") as f:
            np.save(f, values)
            check_written(f, self.out_dir / name)

    def text(self, name: str, text: str) -> None:
        with open(self.path(name), "w", encoding="utf-8", newline="\n") as f:
            f.write(text)

    def id_pickle(self, name: str, ids: np.ndarray) -> None:
        with open(self.path(name), "wb") as f:
            pickle.dump(_IdDictPickle(ids), f, protocol=4)


def write_token_matrix(stage: OutputStage, prefix: str, texts: Iterable[str], n: int, width: int,
                       faithful: Faithful28Tokenizer, batch_size: int, desc: str,
                       source: Optional[PathLike] = None) -> np.ndarray:
    """Tokenize ``n`` texts in batches into ``{prefix}.memmap`` (int32 [n, width], written sequentially, so
    memory stays flat); write ``{prefix}_length.npy`` and ``{prefix}_meta``.  Returns the lengths.  ``source``,
    the file the texts stream from, is named when it yields another number of texts."""
    lengths = np.zeros(n, np.int32)
    filled = 0
    encoded = _pipelined(lambda batch: faithful.encode_content(batch, width), _chunks(texts, batch_size))
    with open(stage.path(f"{prefix}.memmap"), "wb") as f, tqdm(total=n, desc=desc, unit=" texts", disable=None) as bar:
        for contents in encoded:
            block, lengths[filled:filled + len(contents)] = _pad_rows(contents, width, faithful.cls_id, faithful.sep_id)
            block.tofile(f)
            filled += len(contents)
            bar.update(len(contents))
        check_written(f, stage.out_dir / f"{prefix}.memmap")
    if filled != n:
        raise InputError(f"read {filled} texts but expected {n} (did the file change while running?)", path=source)
    stage.npy(f"{prefix}_length.npy", lengths)
    stage.text(f"{prefix}_meta", json.dumps({"type": "int32", "total_number": n, "embedding_size": width}))
    return lengths


def _corpus_texts(path: Path, data_type: int, max_chars: int, ids: np.ndarray) -> Iterator[str]:
    """Second pass over the collection: the texts, checked against the ids of the first pass."""
    for number, line in iter_lines(path, "collection"):
        official, text = parse_corpus_line(line, path, number, data_type, max_chars)
        if number > len(ids) or official != ids[number - 1]:
            raise InputError("the collection changed while it was being read", path=path, line=number)
        yield text


def output_names(splits: Iterable[tuple[str, bool]], pickles: bool = True) -> list[str]:
    """Every output file name of a run over ``(split name, has qrels)`` pairs (the id pickles unless not
    ``pickles``)."""
    names = [META_NAME, "passages.memmap", "passages_length.npy", "passages_meta", "passages_ids.npy"]
    names += ["pid2offset.pickle"] if pickles else []
    for name, has_qrels in splits:
        names += [f"{name}-query.memmap", f"{name}-query_length.npy", f"{name}-query_meta", f"{name}-query_ids.npy"]
        names += [f"{name}-qid2offset.pickle"] if pickles else []
        names += [f"{name}-qrel.tsv"] if has_qrels else []
    return names


@contextlib.contextmanager
def rust_threads(threads: Optional[int]) -> Iterator[None]:
    """Run the block with the Rust tokenizer on ``threads`` threads (None: leave the environment alone).

    ``RAYON_NUM_THREADS`` only takes effect if no batch was encoded earlier in this process."""
    if threads is None:
        yield
        return
    names = ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(RAYON_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="true" if threads > 1 else "false")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def preprocess(data_dir: PathLike, out_dir: PathLike, data_type: int, tokenizer: Any,
               max_seq_length: int = MAX_SEQ_LENGTH, max_query_length: int = MAX_QUERY_LENGTH,
               max_doc_character: int = 10000, overwrite: bool = False, batch_size: int = BATCH_SIZE,
               threads: Optional[int] = None, input_format: str = "msmarco",
               prefixes: Prefixes = Prefixes()) -> dict[str, int]:
    """Preprocess one MS MARCO task (``data_type`` 0 = doc, 1 = passage), or with ``input_format="beir"`` a
    collection in the BEIR layout (:mod:`beir_input`); returns the row count per output (``"passages"`` and each
    split).  ``prefixes`` are prepended to every query / document text (after the ``max_doc_character`` cut)
    before tokenisation.  Everything is validated before the collection is tokenized.

    Inputs (``--data_dir``, default ``./data/{doc|passage}/dataset``), UTF-8, LF or CRLF line ends:

    * passage collection ``collection.tsv``: ``pid \\t text``;
      document collection ``msmarco-docs.tsv``: ``D<docid> \\t url \\t title \\t body``.
    * per split (see :data:`SPLITS`) a query file ``qid \\t text`` and a qrels file ``qid Q0 pid grade``
      (any whitespace; doc ids keep their ``D``).  A split whose query file is absent is skipped.

    Outputs (``--out_dir``, default ``./data/{doc|passage}/preprocess``), every one written to a temporary
    name and renamed into place only when the whole run succeeded:

    * ``passages.memmap`` — raw int32 (C order, no header; open with ``np.memmap(path, np.int32, "r", shape=(N, L))``),
      shape ``[N, max_seq_length]``, row = offset = collection line order.
      Row ``i`` holds the tokenizer's cls/bos id, the text's token ids, its sep/eos id, then 0-padding.
    * ``passages_length.npy`` — ``np.save`` of int32 ``[N]``: the unpadded length of each row.
    * ``passages_meta`` — JSON ``{"type": "int32", "total_number": N, "embedding_size": max_seq_length}``
      ("embedding_size" is the token width, the original's name).
    * ``passages_ids.npy`` — int64 ``[N]``: the official pid / docid (``D`` stripped) of each offset.
    * ``pid2offset.pickle`` — dict official id -> offset (pickle protocol 4), for compatibility only.
    * ``preprocess_meta.json`` — how the texts became tokens (:mod:`infra.preprocess_meta`, which also holds the
      check later stages make against their model folder)::

          {"format_version": 1,
           "tokenizer": {"name_or_path": "<--model_name_or_path>", "vocab_sha256": "<hex>", "vocab_size": N},
           "query_prefix": "query: ", "doc_prefix": "passage: ", "prefix_given": {"query": false, "doc": false},
           "max_seq_length": 256, "max_query_length": 256, "max_doc_character": 10000, "input_format": "beir"}

      ``vocab_sha256``: SHA-256 of the sorted ``[token, id]`` pairs (added tokens included) in compact JSON;
      ``prefix_given``: whether ``--query_prefix`` / ``--doc_prefix`` set the prefix (else the folder's prompts).
    * per split: ``{split}-query.memmap`` (int32 ``[Nq, max_query_length]``), ``{split}-query_length.npy``,
      ``{split}-query_meta``, ``{split}-query_ids.npy`` (official qids in offset order),
      ``{split}-qid2offset.pickle`` and, when the split has qrels, ``{split}-qrel.tsv`` with one line
      ``qoffset \\t 0 \\t poffset \\t grade`` per qrels line (grade kept as written, 0 included).
      With qrels, only the queries named in them are kept, in query-file order.

    BEIR layout (``--input_format beir``, read by :mod:`beir_input`: ``corpus.jsonl``, ``queries.jsonl``,
    ``qrels/{train,dev,test}.tsv``, string ids): the same outputs, a document's text being BEIR's
    ``(title + " " + text).strip()`` (:func:`infra.beir_input.document_text`), except that the id maps keep the
    string ids and there are no pickles:

    * ``passages_ids.npy`` and ``{split}-query_ids.npy`` — ``np.save`` of a 1-D unicode array (dtype ``<U{longest
      id}``, loadable with ``allow_pickle=False``; :func:`infra.run_file.load_id_map` reads both kinds): the
      ``_id`` of each offset.  ``cvt_back.py`` writes these ids back.

    A sentence-transformers folder as ``--model_name_or_path`` (:mod:`infra.model_folder`) is used as its authors
    use it: ``--max_seq_length`` and ``--max_query_length`` default to its ``max_seq_length``, and its prompts (E5's
    ``query: `` / ``passage: ``, BGE's query instruction) are prepended to every query / document text before
    tokenisation (``--query_prefix`` / ``--doc_prefix`` replace them; ``""`` disables).  A tokenizer folder with
    neither (roberta-base) keeps 512 / 64 and no prefix: the original's tokens, byte for byte.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    faithful = tokenizer if isinstance(tokenizer, Faithful28Tokenizer) else Faithful28Tokenizer(tokenizer)
    meta = meta_record(faithful.name_or_path, faithful._backend, prefixes, max_seq_length, max_query_length,
                       max_doc_character, input_format)
    tokenize = TokenizeSpec(faithful, max_seq_length, max_query_length, prefixes, meta)
    if input_format == "beir":
        names = output_names(((name, True) for name, _ in beir_input.qrels_paths(data_dir)), pickles=False)
        for name in names:
            refuse_existing(out_dir / name, overwrite)
        ids = beir_input.scan_corpus(data_dir)
        plans = [SplitPlan(*split) for split in beir_input.read_splits(data_dir, ids)]
        texts = beir_input.corpus_texts(data_dir, ids, max_doc_character)
        return write_outputs(out_dir, tokenize, ids, texts, data_dir / beir_input.CORPUS, plans, batch_size, threads,
                             "tokenize corpus")
    collection = require_file(data_dir / COLLECTION[data_type], "collection")
    splits = []
    for name, (query_file, qrels_file) in SPLITS[data_type].items():
        if not (data_dir / query_file).is_file():
            log.warning("skipping split %r: %s not found", name, data_dir / query_file)
            continue
        qrels_path = None if qrels_file is None else require_file(data_dir / qrels_file, "qrels file")
        splits.append((name, data_dir / query_file, qrels_path))
    for name in output_names((s[0], s[2] is not None) for s in splits):
        refuse_existing(out_dir / name, overwrite)

    ids = scan_corpus_ids(collection, data_type)
    index = IdIndex(ids)
    plans = [plan_split(name, q, r, data_type, index) for name, q, r in splits]
    texts = _corpus_texts(collection, data_type, max_doc_character, ids)
    return write_outputs(out_dir, tokenize, ids, texts, collection, plans, batch_size, threads,
                         f"tokenize {KIND[data_type]}s")


class TokenizeSpec(NamedTuple):
    """How a run turns texts into token rows: the tokenizer, the row widths, the prefixes, the meta record."""
    faithful: Faithful28Tokenizer
    max_seq_length: int
    max_query_length: int
    prefixes: Prefixes
    meta: dict[str, Any]


def _prefixed(prefix: str, texts: Iterable[str]) -> Iterable[str]:
    """``prefix + text`` for every text (the texts themselves without a prefix)."""
    return texts if not prefix else (prefix + text for text in texts)


def write_outputs(out_dir: Path, tokenize: TokenizeSpec, ids: np.ndarray, texts: Iterable[str], source: Path,
                  plans: Sequence[SplitPlan], batch_size: int, threads: Optional[int], desc: str) -> dict[str, int]:
    """Tokenize the corpus ``texts`` (streamed from ``source``) and each split, write every output; returns the
    row counts.  Integer ``ids`` also get the id pickles; string ids (a unicode array) get unicode id maps only."""
    string = ids.dtype.kind == "U"
    counts = {"passages": len(ids)}
    faithful = tokenize.faithful
    with rust_threads(threads), OutputStage(out_dir) as stage:
        stage.text(META_NAME, json.dumps(tokenize.meta, indent=2, ensure_ascii=False) + "\n")
        write_token_matrix(stage, "passages", _prefixed(tokenize.prefixes.doc, texts), len(ids),
                           tokenize.max_seq_length, faithful, batch_size, desc, source=source)
        stage.npy("passages_ids.npy", ids)
        if not string:
            stage.id_pickle("pid2offset.pickle", ids)
        for plan in plans:
            prefix = f"{plan.name}-query"
            write_token_matrix(stage, prefix, _prefixed(tokenize.prefixes.query, plan.texts), len(plan.qids),
                               tokenize.max_query_length, faithful, batch_size, f"tokenize {plan.name}")
            qids = beir_input.string_ids(plan.qids) if string else np.asarray(plan.qids, np.int64)
            stage.npy(f"{prefix}_ids.npy", qids)
            if not string:
                stage.id_pickle(f"{plan.name}-qid2offset.pickle", qids)
            if plan.qrels is not None:
                stage.text(f"{plan.name}-qrel.tsv", "".join(f"{q}\t0\t{p}\t{g}\n" for q, p, g in plan.qrels))
            counts[plan.name] = len(plan.qids)
    return counts


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def fit_model_length(tokenizer: Any, flag: str, length: int) -> int:
    """``length`` capped at the tokenizer's ``model_max_length`` (the longest input of its model: 512 for
    roberta-base) when that is smaller, with a warning naming ``flag``: a token memmap is N x length int32, and
    columns past the model's input would only cost memory and disk (truncating longer rows later gives the same
    tokens)."""
    limit = getattr(tokenizer, "model_max_length", None)
    if not isinstance(limit, int) or length <= limit:
        return length
    log.warning("--%s %d exceeds the tokenizer's model_max_length %d (the longest input of its model): storing "
                "%d tokens per row", flag, length, limit, limit)
    return limit


def resolve_prefixes(query_prefix: Optional[str], doc_prefix: Optional[str], folder: PathLike) -> Prefixes:
    """The flags' prefixes where given, else the prompts of the tokenizer ``folder`` (logged when not empty)."""
    settings = read_folder_settings(folder)
    prefixes = Prefixes(settings.query_prompt if query_prefix is None else query_prefix,
                        settings.doc_prompt if doc_prefix is None else doc_prefix,
                        query_given=query_prefix is not None, doc_given=doc_prefix is not None)
    for side, text in (("query", prefixes.query), ("document", prefixes.doc)):
        if text:
            log.info("every %s text starts with the prefix %r", side, text)
    return prefixes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m preprocess",
        description="Tokenize the MS MARCO collection and queries once, with the transformers-2.8 RoBERTa "
                    "tokenization the STAR/ADORE checkpoints expect, into int32 memmaps.",
        epilog="Writes passages.memmap (int32 [N, max_seq_length], <s> ids </s> then 0-padding), "
               "passages_length.npy, passages_meta, passages_ids.npy, pid2offset.pickle, preprocess_meta.json "
               "(tokenizer, prefixes, lengths) and, per split "
               "(train, dev, test = TREC DL 2019, test2020 = DL 2020, lead; skipped when its query file is absent), "
               "{split}-query.memmap, {split}-query_length.npy, {split}-query_meta, {split}-query_ids.npy, "
               "{split}-qid2offset.pickle and {split}-qrel.tsv (qoffset 0 poffset grade). Nothing is written unless "
               "the whole run succeeds.")
    p.add_argument("--input_format", choices=["msmarco", "beir"], default="msmarco",
                   help="msmarco (default): the MS MARCO files of --data_type; beir: corpus.jsonl, queries.jsonl "
                        "and qrels/{train,dev,test}.tsv with string ids (see infra/beir_input.py)")
    p.add_argument("--data_type", type=ct.integer, choices=[DOC, PASSAGE], default=PASSAGE,
                   help="0 = documents (msmarco-docs.tsv), 1 = passages (collection.tsv) (default 1)")
    p.add_argument("--model_name_or_path", default="roberta-base",
                   help="LOCAL tokenizer folder (e.g. roberta-base's vocab.json + merges.txt); nothing is "
                        "downloaded, so pass a folder path (default: a folder named 'roberta-base')")
    p.add_argument("--max_seq_length", type=ct.token_length, default=None,
                   help="stored tokens per passage/document, including <s> and </s>, at most the tokenizer's "
                        f"model_max_length (default: a sentence-transformers folder's max_seq_length, else "
                        f"{MAX_SEQ_LENGTH})")
    p.add_argument("--max_query_length", type=ct.token_length, default=None,
                   help="stored tokens per query, at most the tokenizer's model_max_length (default: a "
                        f"sentence-transformers folder's max_seq_length, else {MAX_QUERY_LENGTH})")
    p.add_argument("--query_prefix", default=None,
                   help="text prepended to every query before tokenizing (default: the folder's query prompt in "
                        "config_sentence_transformers.json, else none; '' for none)")
    p.add_argument("--doc_prefix", default=None,
                   help="text prepended to every passage/document (default: the folder's document / passage / "
                        "corpus prompt, else none; '' for none)")
    p.add_argument("--max_doc_character", type=ct.positive_int, default=10000,
                   help="cut passage/document text to this many characters before tokenizing (default 10000)")
    p.add_argument("--threads", type=ct.positive_int, default=_cpu_count(),
                   help="tokenizer threads, at most the CPUs (default: all available cores)")
    p.add_argument("--data_dir", help="input folder (default ./data/{doc,passage}/dataset)")
    p.add_argument("--out_dir", help="output folder (default ./data/{doc,passage}/preprocess)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    kind = KIND[args.data_type]
    out_dir = args.out_dir or f"./data/{kind}/preprocess"
    with output_lock(out_dir):
        tokenizer = load_tokenizer(args.model_name_or_path)
        folder = args.model_name_or_path
        max_seq_length = length_or_folder_default(args.max_seq_length, folder, MAX_SEQ_LENGTH, "--max_seq_length")
        max_query_length = length_or_folder_default(args.max_query_length, folder, MAX_QUERY_LENGTH,
                                                    "--max_query_length")
        counts = preprocess(
            data_dir=args.data_dir or f"./data/{kind}/dataset",
            out_dir=out_dir,
            data_type=args.data_type,
            tokenizer=tokenizer,
            max_seq_length=fit_model_length(tokenizer, "max_seq_length", max_seq_length),
            max_query_length=fit_model_length(tokenizer, "max_query_length", max_query_length),
            max_doc_character=args.max_doc_character,
            overwrite=args.overwrite,
            threads=ct.at_most_cpus(args.threads, "--threads"),
            input_format=args.input_format,
            prefixes=resolve_prefixes(args.query_prefix, args.doc_prefix, folder),
        )
    print(" ".join(f"{name}={n}" for name, n in counts.items()))
    return 0


if __name__ == "__main__":
    run_cli(main)
