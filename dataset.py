"""Token-id memmaps → training and encoding batches: the readers of the preprocessed files and the datasets and
collators of the original dataset.py, star/train.py and adore/train.py.

Files read here (all written by ``preprocess.py`` / ``star/prepare_hardneg.py``)
------------------------------------------------------------------------------
* ``{prefix}.memmap``: raw int32 ``[total_number, embedding_size]``, row = offset, each row
  ``<s> … </s>`` right-padded with 0; ``{prefix}_length.npy``: the stored length of each row;
  ``{prefix}_meta``: JSON ``{"type": "int32", "total_number": N, "embedding_size": L}``.
* ``{split}-qrel.tsv``: ``qoffset 0 poffset rel`` (whitespace separated).
* ``{mode}.rank.tsv``: ``qoffset poffset rank [score]``.
* Hard negatives: ``hard.npy`` int32 ``[n, k]`` with sibling ``hard_qids.npy`` int64 ``[n]`` (query offset of
  each row), or the original ``hard.json`` ``{"qoffset": [poffset, ...]}`` (k poffsets in rank order, no
  positives).

Randomness of the training datasets
-----------------------------------
Every random choice of item ``index`` comes from ``np.random.default_rng((seed, epoch, index))``, so a sample
depends only on (seed, epoch, index): not on the DataLoader worker, the process, or what was drawn before.
``set_epoch`` re-draws positives and negatives for a new epoch; resuming mid-epoch reproduces the same items.
"""
from __future__ import annotations

import operator
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from infra.io import InputError, PathLike, iter_lines, parse_int, read_json, require_file
from infra.token_meta import read_token_meta
from infra.run_file import iter_run

RelDict = Mapping[int, Sequence[int]]


def _check_index(index: Any, n: int) -> int:
    """Normalise a (possibly negative) integer index into ``[0, n)`` or raise IndexError."""
    i = operator.index(index)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"index {index} out of range for {n} items")
    return i


# --------------------------------------------------------------------------------------------------------------
# Token-id cache and end-preserving truncation
# --------------------------------------------------------------------------------------------------------------

class TokenIdsCache:
    """Read-only view of a preprocessed token memmap: ``cache[i]`` = ``ids[i, :length[i]]`` (int32).

    Like the original, the files are looked up in ``data_dir`` and, failing that, in ``data_dir/memmap``.
    The token matrix stays an ``np.memmap`` (``.ids``); pickling (DataLoader workers started by spawn,
    DDP) re-opens the file instead of copying it.

    Attributes: ``.ids`` (np.memmap ``[N, L]``), ``.lengths`` (np.ndarray ``[N]``), ``.max_length`` (the stored
    width L, meta ``embedding_size``), ``.path`` (the memmap file).
    """

    def __init__(self, data_dir: PathLike, prefix: str):
        folder = Path(data_dir)
        if not (folder / f"{prefix}_meta").is_file() and (folder / "memmap" / f"{prefix}_meta").is_file():
            folder = folder / "memmap"
        self.data_dir = folder
        self.prefix = prefix
        meta_path = require_file(folder / f"{prefix}_meta", "token meta file")
        self.dtype, n, width = read_token_meta(meta_path)
        self.path = require_file(folder / f"{prefix}.memmap", "token memmap")
        expected = n * width * self.dtype.itemsize
        actual = self.path.stat().st_size
        if actual != expected:
            raise InputError(f"size does not match {meta_path.name} ({n} x {width} x {self.dtype.itemsize} = "
                             f"{expected} bytes)", path=self.path, value=actual)
        self.max_length = width
        self.size = expected
        self.lengths = _read_lengths(require_file(folder / f"{prefix}_length.npy", "token length file"), n, width)
        self._open()

    def _open(self) -> None:
        n = len(self.lengths)
        self.ids = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(n, self.max_length))
        self._file = open(self.path, "rb")  # noqa: SIM115 - held for check_intact's fstat, closed with the object

    def check_intact(self) -> None:
        """Raise :class:`InputError` naming the file if another process cut it short since it was opened: reading
        a page of a memmap past the file's end would end the process with SIGBUS.  Checked before each read (one
        fstat); a truncation during a read itself still ends the process so."""
        size = os.fstat(self._file.fileno()).st_size
        if size < self.size:
            raise InputError(f"the file was cut short while being read (another process truncated it?); "
                             f"{self.size} bytes expected", path=self.path, value=size)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["ids"], state["_file"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> np.ndarray:
        i = _check_index(index, len(self))
        self.check_intact()
        return np.array(self.ids[i, : self.lengths[i]], dtype=np.int32)


def _read_lengths(path: Path, n: int, width: int) -> np.ndarray:
    try:
        lengths = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"not a .npy array ({e})", path=path) from None
    if lengths.shape != (n,) or lengths.dtype.kind not in "iu":
        raise InputError(f"expected an integer array of shape ({n},)", path=path,
                         value=f"{lengths.dtype} {lengths.shape}")
    if n and (lengths.min() < 0 or lengths.max() > width):
        raise InputError(f"lengths must lie in [0, {width}]", path=path,
                         value=f"[{lengths.min()}, {lengths.max()}]")
    return lengths


def truncate_keep_end(ids: Union[np.ndarray, Sequence[int]], max_len: int) -> np.ndarray:
    """End-preserving truncation (faithful): sequences of at most ``max_len`` tokens are unchanged; longer ones
    become the first ``max_len − 1`` tokens followed by the stored last token (``</s>``)."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    ids = np.asarray(ids)
    if len(ids) <= max_len:
        return ids
    return np.concatenate([ids[: max_len - 1], ids[-1:]])


class SequenceDataset(Dataset):
    """Sequences of a cache (all offsets, or the given ``offsets`` in the given order), truncated to
    ``max_seq_length`` with :func:`truncate_keep_end`.

    Item: ``{"input_ids": list[int], "id": int}`` where ``id`` is the offset in the cache.
    ``.lengths`` holds the truncated length of every item (for length-sorted batching).
    """

    def __init__(self, cache: TokenIdsCache, max_seq_length: int, offsets: Optional[Sequence[int]] = None):
        self.cache = cache
        self.max_seq_length = max_seq_length
        if offsets is None:
            self.offsets = np.arange(len(cache), dtype=np.int64)
        else:
            self.offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
            bad = (self.offsets < 0) | (self.offsets >= len(cache))
            if bad.any():
                raise InputError(f"offset out of range for {len(cache)} rows", path=cache.path,
                                 value=int(self.offsets[bad][0]))
        # No row is wider than the stored width: capping there also keeps a huge max_seq_length out of int32.
        self.lengths = np.minimum(cache.lengths[self.offsets], min(max_seq_length, cache.max_length))

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> dict:
        offset = int(self.offsets[_check_index(index, len(self))])
        return {"input_ids": truncate_keep_end(self.cache[offset], self.max_seq_length).tolist(), "id": offset}

    def padded_batch(self, indices: np.ndarray, pad_token_id: int) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        """The items ``indices`` collated at once, as :class:`SequenceCollator` (``padding=False``,
        ``full_pad_batches=0``) collates them one by one: ``({"input_ids", "attention_mask"} int64 [B, longest],
        offsets int64 [B])``, padded with ``pad_token_id`` / 0 to the batch's longest truncated item.  Vectorised:
        one read of the rows, no Python loop per item (the encoder's batches hold thousands of items)."""
        indices = np.asarray(indices, dtype=np.int64)
        offsets = self.offsets[indices]
        lengths = self.lengths[indices].astype(np.int64)
        width = int(lengths.max(initial=0))
        ascending = np.sort(offsets)  # one forward pass over the file
        self.cache.check_intact()
        rows = np.asarray(self.cache.ids[ascending], dtype=np.int64)[np.searchsorted(ascending, offsets)]
        stored = self.cache.lengths[offsets].astype(np.int64)
        input_ids = rows[:, :width].copy()
        cut = np.flatnonzero(stored > lengths)  # truncate_keep_end: the stored last token ends the sequence
        input_ids[cut, lengths[cut] - 1] = rows[cut, stored[cut] - 1]
        mask = np.arange(width) < lengths[:, None]
        input_ids[~mask] = pad_token_id
        return ({"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))},
                offsets)


# --------------------------------------------------------------------------------------------------------------
# Qrels, rank files, hard negatives
# --------------------------------------------------------------------------------------------------------------

def _iter_fields(path: PathLike, columns: tuple[int, ...], what: str) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line_number, fields)`` of a whitespace-separated file; blank lines are skipped and a line with
    a column count outside ``columns`` raises :class:`InputError`."""
    for number, line in iter_lines(path, what):
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in columns:
            expected = " or ".join(map(str, columns))
            raise InputError(f"expected {expected} whitespace-separated columns", path=path, line=number,
                             value=line)
        yield number, fields


class Qrels(dict):
    """``{qoffset: [poffset, ...]}`` as :func:`load_rel` reads it, remembering ``path``, the file it came from, so
    that an error about its content names the file."""

    def __init__(self, path: Optional[PathLike] = None):
        super().__init__()
        self.path = path


def load_rel(path: PathLike) -> Qrels:
    """``qoffset 0 poffset rel`` lines → ``{qoffset: [poffset, ...]}`` in file order (a :class:`Qrels`).

    Faithful: the grade column is ignored, so every listed pair counts as relevant (rel=0 lines included), and
    a pair listed twice appears twice.
    """
    rel = Qrels(path)
    for number, fields in _iter_fields(path, (4,), "qrel file"):
        q = parse_int(fields[0], path, number, "query offset")
        p = parse_int(fields[2], path, number, "passage offset")
        rel.setdefault(q, []).append(p)
    return rel


def load_rel_graded(path: PathLike) -> dict[int, dict[int, int]]:
    """``qoffset 0 poffset rel`` lines → ``{qoffset: {poffset: grade}}`` (a repeated pair keeps its last grade)."""
    rel: dict[int, dict[int, int]] = {}
    for number, fields in _iter_fields(path, (4,), "qrel file"):
        q = parse_int(fields[0], path, number, "query offset")
        p = parse_int(fields[2], path, number, "passage offset")
        rel.setdefault(q, {})[p] = parse_int(fields[3], path, number, "relevance grade", allow_negative=True)
    return rel


def load_rank(path: PathLike) -> dict[int, list[int]]:
    """An offset rank file (``qoffset poffset rank [score]``, read by :func:`infra.run_file.iter_run`, whose rules it
    follows) → ``{qoffset: [poffset, ...]}`` in file order.  A TREC run is refused: its order is not the file's."""
    ranking: dict[int, list[int]] = {}
    for number, q, p, rank, _ in iter_run(path, ids="int", what="rank file"):
        if rank is None:
            raise InputError("expected a rank file (qoffset poffset rank [score]), found a TREC run", path=path,
                             line=number)
        ranking.setdefault(q, []).append(p)
    return ranking


def hardneg_qids_path(path: PathLike) -> Path:
    """The query-offset file beside a hard-negative ``.npy``: ``hard.npy`` → ``hard_qids.npy``."""
    p = Path(path)
    return p.with_name(f"{p.stem}_qids.npy")


def load_hardneg(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Load hard negatives → ``(qoffsets int64 [n], negs int32 [n, k])``, rows in file order.

    ``*.npy``: ``negs`` from the file and ``qoffsets`` from :func:`hardneg_qids_path`; ``*.json``: the original
    ``{"qoffset": [poffset, ...]}``.  Every row must have the same k, offsets must be non-negative and each query
    must appear once.
    """
    p = require_file(path, "hard-negative file")
    if p.suffix == ".json":
        qoffsets, negs = _hardneg_from_json(p)
    elif p.suffix == ".npy":
        qoffsets = _load_npy(require_file(hardneg_qids_path(p), "hard-negative query-offset file"))
        negs = _load_npy(p)
    else:
        raise InputError("hard negatives must be a .npy (with _qids.npy beside it) or a .json file", path=p)
    return _validated_hardneg(qoffsets, negs, p)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"not a readable .npy array ({e})", path=path) from None


def _hardneg_from_json(path: Path) -> tuple[np.ndarray, np.ndarray]:
    obj = read_json(path, "hard negatives file", expect=None)
    if not isinstance(obj, dict):
        raise InputError("expected a JSON object {\"qoffset\": [poffset, ...]}", path=path)
    lists = list(obj.values())
    for key, negs in obj.items():
        if not isinstance(negs, list):
            raise InputError(f"query {key}: expected a list of passage offsets", path=path, value=negs)
    k = len(lists[0]) if lists else 0
    for key, negs in obj.items():
        if len(negs) != k:
            raise InputError(f"every query needs the same number of negatives ({k}); query {key} has",
                             path=path, value=len(negs))
    qoffsets = np.array([parse_int(key, path, None, "query offset") for key in obj], dtype=np.int64)
    negs = np.array(lists) if k else np.zeros((len(lists), 0), dtype=np.int64)
    if negs.dtype.kind not in "iu":
        raise InputError("negative offsets must be integers", path=path, value=str(negs.dtype))
    return qoffsets, negs


def _validated_hardneg(qoffsets: np.ndarray, negs: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if qoffsets.ndim != 1 or negs.ndim != 2 or len(qoffsets) != len(negs):
        raise InputError("expected query offsets [n] and negatives [n, k]", path=path,
                         value=f"{qoffsets.shape} and {negs.shape}")
    if qoffsets.dtype.kind not in "iu" or negs.dtype.kind not in "iu":
        raise InputError("hard-negative arrays must hold integers", path=path,
                         value=f"{qoffsets.dtype} and {negs.dtype}")
    if len(qoffsets) and qoffsets.min() < 0:
        raise InputError("negative query offset", path=path, value=int(qoffsets.min()))
    if negs.size and (negs.min() < 0 or negs.max() > np.iinfo(np.int32).max):
        raise InputError("passage offsets must lie in [0, 2**31)", path=path,
                         value=f"[{negs.min()}, {negs.max()}]")
    unique, counts = np.unique(qoffsets, return_counts=True)
    if (counts > 1).any():
        raise InputError("query listed more than once", path=path, value=int(unique[counts > 1][0]))
    return qoffsets.astype(np.int64), negs.astype(np.int32)


class HardNegatives:
    """Lookup qoffset → that query's row of hard negatives (int32 [k], rank order).

    ``HardNegatives(qoffsets, negs, path=None)`` or ``HardNegatives.load(path)``; ``hn[qoffset]``,
    ``qoffset in hn``, ``len(hn)``, ``.k``, ``.qoffsets``, ``.negs``, ``.path`` (for messages; may be None).
    """

    def __init__(self, qoffsets: np.ndarray, negs: np.ndarray, path: Optional[PathLike] = None):
        self.qoffsets = np.asarray(qoffsets, dtype=np.int64)
        self.negs = np.asarray(negs, dtype=np.int32)
        if self.negs.ndim != 2 or self.qoffsets.shape != (len(self.negs),):
            raise ValueError(f"expected qoffsets [n] and negs [n, k], got {self.qoffsets.shape}, {self.negs.shape}")
        self.path = path
        self._row = {int(q): i for i, q in enumerate(self.qoffsets)}

    @classmethod
    def load(cls, path: PathLike) -> "HardNegatives":
        return cls(*load_hardneg(path), path=path)

    @property
    def k(self) -> int:
        return self.negs.shape[1]

    def __len__(self) -> int:
        return len(self.qoffsets)

    def __contains__(self, qoffset: object) -> bool:
        return qoffset in self._row

    def __getitem__(self, qoffset: int) -> np.ndarray:
        return self.negs[self._row[qoffset]]


# --------------------------------------------------------------------------------------------------------------
# Padding and the sequence collator
# --------------------------------------------------------------------------------------------------------------

def pack_tensor_2D(lists: Sequence[Sequence[int]], default: Union[int, float], dtype: torch.dtype,
                   length: Optional[int] = None) -> torch.Tensor:
    """Right-pad ``lists`` with ``default`` to ``length`` (or to the longest list) → tensor ``[len(lists), length]``."""
    if length is None:
        length = max((len(x) for x in lists), default=0)
    out = torch.full((len(lists), length), default, dtype=dtype)
    for row, values in enumerate(lists):
        if len(values) > length:
            raise ValueError(f"sequence of length {len(values)} does not fit in {length} columns")
        if len(values):
            out[row, : len(values)] = torch.as_tensor(np.asarray(values), dtype=dtype)
    return out


class SequenceCollator:
    """Collate :class:`SequenceDataset` items → ``({"input_ids", "attention_mask"}, ids)``.

    Input ids are padded with ``pad_token_id`` (RoBERTa's 1), the attention mask is 1 on tokens and 0 on padding
    (both int64).  Faithful quirk: the first ``full_pad_batches`` batches this instance collates are padded to
    ``max_len`` (which surfaces out-of-memory errors at the start); later batches are padded to the longest
    sequence in the batch, unless ``padding=True`` always pads to ``max_len``.  The counter is per instance, so
    per DataLoader worker.
    """

    seq_key = "input_ids"
    id_key = "id"

    def __init__(self, max_len: int, pad_token_id: int = 1, padding: bool = False, full_pad_batches: int = 10):
        self.max_len = max_len
        self.pad_token_id = pad_token_id
        self.padding = padding
        self.full_pad_batches = full_pad_batches
        self.batches_seen = 0

    def mark_batches_seen(self, n: int) -> None:
        """Resume: ``n`` batches were already collated (so the first ``full_pad_batches`` are not padded again)."""
        self.batches_seen = n

    def next_batch_full(self) -> bool:
        """Count one batch; True if it must be padded to ``max_len``."""
        full = self.padding or self.batches_seen < self.full_pad_batches
        self.batches_seen += 1
        return full

    def pad(self, seqs: Sequence[Sequence[int]], full: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` int64 ``[len(seqs), max_len if full else longest]``."""
        length = self.max_len if full else None
        input_ids = pack_tensor_2D(seqs, self.pad_token_id, torch.int64, length)
        attention_mask = pack_tensor_2D([[1] * len(s) for s in seqs], 0, torch.int64, length)
        return input_ids, attention_mask

    def __call__(self, batch: Sequence[Mapping[str, Any]]) -> tuple[dict[str, torch.Tensor], list]:
        input_ids, attention_mask = self.pad([item[self.seq_key] for item in batch], self.next_batch_full())
        return {"input_ids": input_ids, "attention_mask": attention_mask}, [item[self.id_key] for item in batch]


class QueryCollator(SequenceCollator):
    """ADORE: collate :class:`TrainQueryDataset` items → ``({"input_ids", "attention_mask"}, [rel_ids, ...])``
    with the same padding rule as :class:`SequenceCollator`."""

    seq_key = "query_ids"
    id_key = "rel_ids"

    def __init__(self, max_query_length: int, pad_token_id: int = 1, padding: bool = False,
                 full_pad_batches: int = 10):
        super().__init__(max_query_length, pad_token_id, padding, full_pad_batches)


# --------------------------------------------------------------------------------------------------------------
# Training datasets
# --------------------------------------------------------------------------------------------------------------

def _train_qids(rel_dict: RelDict) -> np.ndarray:
    """Sorted query offsets that have at least one listed positive."""
    return np.array(sorted(q for q, ps in rel_dict.items() if len(ps)), dtype=np.int64)


def _check_offsets(offsets: np.ndarray, n: int, what: str, cache: TokenIdsCache) -> None:
    if len(offsets) and (offsets.min() < 0 or offsets.max() >= n):
        bad = offsets[(offsets < 0) | (offsets >= n)][0]
        raise InputError(f"{what} out of range for {n} rows (data from another preprocess run?)",
                         path=cache.path, value=int(bad))


class TrainQueryDataset(Dataset):
    """ADORE training queries: the sorted query offsets of ``rel_dict`` that have a positive.

    Item: ``{"query_ids": list[int]`` (truncated to ``max_query_length``, end kept)``, "qid": int`` (query
    offset)``, "rel_ids": list[int]`` (its positive passage offsets, as listed)``}``.
    """

    def __init__(self, rel_dict: RelDict, query_cache: TokenIdsCache, max_query_length: int):
        self.rel_dict = rel_dict
        self.query_cache = query_cache
        self.max_query_length = max_query_length
        self.qids = _train_qids(rel_dict)
        if not len(self.qids):
            raise InputError("no training query has a positive in the qrels (empty qrels file?)",
                             path=getattr(rel_dict, "path", None))
        _check_offsets(self.qids, len(query_cache), "query offset", query_cache)

    def __len__(self) -> int:
        return len(self.qids)

    def _query(self, index: int) -> tuple[int, list[int]]:
        qid = int(self.qids[index])
        return qid, truncate_keep_end(self.query_cache[qid], self.max_query_length).tolist()

    def __getitem__(self, index: int) -> dict:
        qid, query_ids = self._query(_check_index(index, len(self)))
        return {"query_ids": query_ids, "qid": qid, "rel_ids": list(self.rel_dict[qid])}


class TrainInbatchDataset(TrainQueryDataset):
    """(query, one positive) pairs for in-batch-negative training; subclasses add extra documents.

    Item: ``{"qid": int, "query_ids": list[int], "pos_id": int, "doc_ids": list[int], "extra_ids": list[int],
    "extra_doc_ids": list[list[int]]}``: the query offset and its tokens (truncated to ``max_query_length``),
    the positive drawn uniformly from the query's listed positives and its tokens, and the extra (hard or
    random) documents' offsets and tokens (truncated to ``max_doc_length``; empty here).  All draws use
    ``np.random.default_rng((seed, epoch, index))``; call :meth:`set_epoch` at the start of every epoch.
    """

    def __init__(self, rel_dict: RelDict, query_cache: TokenIdsCache, doc_cache: TokenIdsCache,
                 max_query_length: int, max_doc_length: int, seed: int = 42):
        super().__init__(rel_dict, query_cache, max_query_length)
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.doc_cache = doc_cache
        self.max_doc_length = max_doc_length
        self.seed = seed
        self.epoch = 0
        positives = np.fromiter((p for q in self.qids for p in rel_dict[int(q)]), dtype=np.int64)
        _check_offsets(positives, len(doc_cache), "positive passage offset", doc_cache)

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def _doc(self, offset: int) -> list[int]:
        return truncate_keep_end(self.doc_cache[offset], self.max_doc_length).tolist()

    def _extra_ids(self, qid: int, rng: np.random.Generator) -> list[int]:
        """Offsets of the extra documents of one item (none for Inbatch-Neg)."""
        return []

    def __getitem__(self, index: int) -> dict:
        index = _check_index(index, len(self))
        rng = np.random.default_rng((self.seed, self.epoch, index))
        qid, query_ids = self._query(index)
        positives = self.rel_dict[qid]
        pos_id = int(positives[rng.integers(len(positives))])
        extra_ids = self._extra_ids(qid, rng)
        return {"qid": qid, "query_ids": query_ids, "pos_id": pos_id, "doc_ids": self._doc(pos_id),
                "extra_ids": extra_ids, "extra_doc_ids": [self._doc(e) for e in extra_ids]}


class TrainInbatchWithHardDataset(TrainInbatchDataset):
    """STAR: each item also brings ``hard_num`` static hard negatives, sampled uniformly without
    replacement from the query's k mined negatives (which exclude its positives; not re-filtered).

    ``hardneg`` is ``(qoffsets, negs)`` from :func:`load_hardneg` or a :class:`HardNegatives`.  Every training
    query must have a row.
    """

    def __init__(self, rel_dict: RelDict, query_cache: TokenIdsCache, doc_cache: TokenIdsCache,
                 max_query_length: int, max_doc_length: int, seed: int = 42, *,
                 hardneg: Union[tuple[np.ndarray, np.ndarray], HardNegatives], hard_num: int = 1):
        super().__init__(rel_dict, query_cache, doc_cache, max_query_length, max_doc_length, seed)
        self.hardneg = hardneg if isinstance(hardneg, HardNegatives) else HardNegatives(*hardneg)
        where = self.hardneg.path
        if not 1 <= hard_num <= self.hardneg.k:
            raise InputError(f"hard_num must lie in [1, {self.hardneg.k}] (negatives per query in the file)",
                             path=where, value=hard_num)
        self.hard_num = hard_num
        missing = [int(q) for q in self.qids if int(q) not in self.hardneg]
        if missing:
            raise InputError(f"{len(missing)} of {len(self.qids)} training queries have no hard negatives, "
                             f"e.g. query offset {missing[0]}: were they mined for another split? "
                             "(run python -m star.prepare_hardneg with --mode train, DRhard issue #24)", path=where)
        _check_offsets(self.hardneg.negs.ravel(), len(doc_cache), "hard-negative passage offset", doc_cache)

    def _extra_ids(self, qid: int, rng: np.random.Generator) -> list[int]:
        row = self.hardneg[qid]
        return [int(row[j]) for j in rng.choice(len(row), size=self.hard_num, replace=False)]


class TrainInbatchWithRandDataset(TrainInbatchDataset):
    """Rand-Neg: each item also brings ``rand_num`` offsets drawn uniformly (with replacement) from the
    whole corpus (so at most its size); positives are not filtered here (the collator's masks handle them)."""

    def __init__(self, rel_dict: RelDict, query_cache: TokenIdsCache, doc_cache: TokenIdsCache,
                 max_query_length: int, max_doc_length: int, seed: int = 42, *, rand_num: int):
        super().__init__(rel_dict, query_cache, doc_cache, max_query_length, max_doc_length, seed)
        if not 1 <= rand_num <= len(doc_cache):
            raise InputError(f"rand_num must lie in [1, {len(doc_cache)}] (documents in the corpus)",
                             path=doc_cache.path, value=rand_num)
        self.rand_num = rand_num

    def _extra_ids(self, qid: int, rng: np.random.Generator) -> list[int]:
        return rng.integers(len(self.doc_cache), size=self.rand_num).tolist()


# --------------------------------------------------------------------------------------------------------------
# Training collator and masks
# --------------------------------------------------------------------------------------------------------------

def not_relevant_mask(qids: Sequence[int], doc_ids: Sequence[int], rel_dict: RelDict) -> torch.Tensor:
    """float32 ``[len(qids), len(doc_ids)]``: 1 where ``doc_ids[j]`` is not relevant to ``qids[i]`` (not listed
    in ``rel_dict[qids[i]]``), else 0."""
    columns: dict[int, list[int]] = {}
    for j, d in enumerate(doc_ids):
        columns.setdefault(d, []).append(j)
    mask = torch.ones(len(qids), len(doc_ids), dtype=torch.float32)
    for i, q in enumerate(qids):
        for p in rel_dict.get(q, ()):
            mask[i, columns.get(p, [])] = 0.0
    return mask


class TrainCollator:
    """Collate :class:`TrainInbatchDataset` (and subclass) items into one training batch.

    Returns a dict:
      * ``query_input_ids``, ``query_attention_mask``: int64 ``[B, Lq]``;
      * ``doc_input_ids``, ``doc_attention_mask``: int64 ``[B, Ld]`` (each query's positive);
      * ``rel_pair_mask``: float32 ``[B, B]``, 1 where positive j is NOT relevant to query i (so the diagonal
        and duplicate positives across queries are 0);
      * when the items carry extra documents: ``other_doc_input_ids``, ``other_doc_attention_mask`` int64
        ``[B*H, Ld']`` (flattened in item order) and ``other_pair_mask`` float32 ``[B, B*H]``, 1 where extra doc
        k is NOT relevant to query i (every query against all extra docs of the batch), plus ``other_ids``;
      * ``qids``, ``pos_ids``: lists of offsets, for logging.
    Padding follows :class:`SequenceCollator` (pad id, first ``full_pad_batches`` batches padded to the maximum
    lengths); query and doc widths are padded independently, extra docs to their own longest unless full.
    """

    def __init__(self, max_query_length: int, max_doc_length: int, rel_dict: RelDict, pad_token_id: int = 1,
                 padding: bool = False, full_pad_batches: int = 10):
        self.queries = SequenceCollator(max_query_length, pad_token_id, padding, full_pad_batches)
        self.docs = SequenceCollator(max_doc_length, pad_token_id, padding, full_pad_batches)
        self.rel_dict = rel_dict

    def mark_batches_seen(self, n: int) -> None:
        """Resume: ``n`` batches were already collated (see :meth:`SequenceCollator.mark_batches_seen`)."""
        self.queries.mark_batches_seen(n)
        self.docs.mark_batches_seen(n)

    def __call__(self, batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        query_full, doc_full = self.queries.next_batch_full(), self.docs.next_batch_full()
        qids = [item["qid"] for item in batch]
        pos_ids = [item["pos_id"] for item in batch]
        out: dict[str, Any] = {}
        out["query_input_ids"], out["query_attention_mask"] = self.queries.pad(
            [item["query_ids"] for item in batch], query_full)
        out["doc_input_ids"], out["doc_attention_mask"] = self.docs.pad([item["doc_ids"] for item in batch],
                                                                        doc_full)
        out["rel_pair_mask"] = not_relevant_mask(qids, pos_ids, self.rel_dict)
        other_ids = [e for item in batch for e in item.get("extra_ids", ())]
        if other_ids:
            other_docs = [d for item in batch for d in item["extra_doc_ids"]]
            out["other_doc_input_ids"], out["other_doc_attention_mask"] = self.docs.pad(other_docs, doc_full)
            out["other_pair_mask"] = not_relevant_mask(qids, other_ids, self.rel_dict)
            out["other_ids"] = other_ids
        out["qids"], out["pos_ids"] = qids, pos_ids
        return out
