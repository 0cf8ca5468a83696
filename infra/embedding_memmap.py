"""The embedding memmap file: its format and manifest, opening it read-only with checks, and reading its rows in
blocks of bounded memory.  numpy only (no torch), so a search can open embeddings without the encoder.

Embedding memmap (written by ``infra.corpus_encoding.encode_to_memmap``)
------------------------------------------------------------------
Raw float32 ``[N, dim]`` (``np.memmap``, no header), row = offset, plus ``<path>.manifest.json``::

    {"format": "star-adore-embeddings/1", "model_id": "sha256:…", "max_length": 256, "n_rows": N, "dim": 768,
     "dtype": "float32", "precision": "fp32", "order_hash": "sha256:…", "block_rows": 4096,
     "completed_rows": 8192, "complete": false}

Rows are encoded longest first (``order_hash`` fingerprints that order: the offsets and their lengths), in blocks of
``block_rows``; after each block the memmap is flushed and then the manifest is replaced atomically, so an
interrupted encode resumes at the last finished block and (same batch size and devices) gives the same bytes as
an uninterrupted one.
``model_id`` … ``order_hash`` are the *identity* of the file: an existing memmap whose identity differs from the
current run, or that has no manifest, is never reused silently (the original star/inference.py and
star/prepare_hardneg.py reused any existing memmap without checking).
"""
from __future__ import annotations

import mmap
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple, Optional, Union

import numpy as np

from infra.io import InputError, PathLike, read_json, require_file
from infra.token_meta import read_token_meta

MANIFEST_FORMAT = "star-adore-embeddings/1"


def manifest_path(out_path: PathLike) -> Path:
    """``<out_path>.manifest.json``."""
    return Path(f"{out_path}.manifest.json")


def read_manifest(out_path: PathLike) -> Optional[dict]:
    """The manifest beside an embedding memmap, or None if there is none; one without the counts (``dim`` >= 1)
    raises :class:`InputError`.  Whether the file matches it: :func:`manifest_mismatch`."""
    path = manifest_path(out_path)
    if not path.is_file():
        return None
    manifest = read_json(path, "embedding manifest", expect=None)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise InputError(f"not an embedding manifest (format {MANIFEST_FORMAT!r} expected)", path=path)
    counts = [manifest.get(key) for key in ("n_rows", "dim", "block_rows", "completed_rows")]
    if not all(isinstance(c, int) and c >= 0 for c in counts) or not isinstance(manifest.get("complete"), bool):
        raise InputError("embedding manifest lacks n_rows/dim/block_rows/completed_rows/complete", path=path)
    if manifest["dim"] < 1:
        raise InputError("embedding manifest has dim < 1", path=path, value=manifest["dim"])
    return manifest


class CorpusRows(NamedTuple):
    """The passage count of a preprocessed corpus (``count``) and the ``{prefix}_meta`` file it comes from
    (``meta``, named in errors): the rows an embedding file of that corpus must have."""
    count: int
    meta: Path


def corpus_rows(preprocess_dir: PathLike) -> Optional[CorpusRows]:
    """The ``total_number`` of ``{preprocess_dir}/passages_meta`` (:func:`preprocess.read_token_meta`), or
    None when the folder has no ``passages_meta`` (e.g. one holding only queries).  A meta file without a count
    >= 0 raises :class:`InputError`."""
    meta = Path(preprocess_dir) / "passages_meta"
    if not meta.is_file():
        return None
    return CorpusRows(read_token_meta(meta).total_number, meta)


def open_embeddings(path: PathLike, dim: Optional[int] = None, check_finite: bool = False,
                    n_rows: Union[int, CorpusRows, None] = None) -> np.memmap:
    """Open an embedding memmap read-only as float32 ``[N, dim]``.

    ``dim`` defaults to the manifest's.  With a manifest the encode must be complete, its dim must equal ``dim``,
    its dtype must be float32 and the file must hold exactly its ``n_rows`` x ``dim`` x 4 bytes; a file without one
    (e.g. from the original code) is accepted when its size is a positive multiple of ``dim × 4`` bytes.
    ``n_rows`` (e.g. :func:`corpus_rows` of the corpus the embeddings claim to cover) is the number of rows the file
    must have, with or without a manifest.  ``check_finite`` scans the rows (bounded memory) and rejects NaN/inf,
    naming the first bad row.  Every problem is an :class:`InputError` naming the file (and both numbers).
    """
    p = require_file(path, "embedding memmap")
    size = p.stat().st_size
    manifest = read_manifest(p)
    if manifest is not None:
        if not manifest.get("complete"):
            raise InputError(f"encoding is incomplete ({manifest.get('completed_rows')} of "
                             f"{manifest.get('n_rows')} rows); rerun the encoding to resume it", path=p)
        if dim is not None and dim != manifest.get("dim"):
            raise InputError(f"embeddings have dim {manifest.get('dim')} (manifest) but the model's is {dim}",
                             path=p)
        problem = manifest_mismatch(size, manifest)
        if problem is not None:
            raise InputError(problem, path=p)
        dim = manifest.get("dim")
    if dim is None:
        raise InputError("embedding size unknown: no manifest beside the file and no dim given", path=p)
    if size == 0 or size % (dim * 4):
        raise InputError(f"size is not a positive multiple of dim {dim} x 4 bytes (float32)", path=p,
                         value=size)
    rows = size // (dim * 4)
    if n_rows is not None:
        _check_rows(p, rows, n_rows)
    embeddings = np.memmap(p, dtype=np.float32, mode="r", shape=(rows, dim))
    if check_finite:
        _check_finite(embeddings, p)
    return embeddings


def manifest_mismatch(size: int, manifest: dict) -> Optional[str]:
    """Why a file of ``size`` bytes is not the one ``manifest`` describes (its dtype must be float32, its size
    ``n_rows`` x ``dim`` x 4 bytes), or None when it is."""
    dtype = manifest.get("dtype", "float32")  # the only dtype the format has had
    if dtype != "float32":
        return f"is {dtype} according to its manifest, but embedding files are float32"
    n_rows, dim = manifest["n_rows"], manifest["dim"]
    expected = n_rows * dim * 4
    if size == expected:
        return None
    if size == 2 * expected:
        return f"is 2x the float32 size its manifest describes (float64?): {size} bytes, {expected} expected"
    if size % (dim * 4) == 0:
        return f"holds {size // (dim * 4)} rows but its manifest says {n_rows}"
    return f"is {size} bytes but its manifest describes {n_rows} x {dim} x 4 = {expected}"


def _check_rows(path: Path, rows: int, n_rows: Union[int, CorpusRows]) -> None:
    expected, source = ((n_rows.count, f"the corpus in {n_rows.meta} has") if isinstance(n_rows, CorpusRows)
                        else (n_rows, "expected:"))
    if rows != expected:
        hint = " (a float64 file?)" if rows == 2 * expected else ""
        raise InputError(f"covers {rows} passages{hint} but {source} {expected}", path=path)


def _check_finite(embeddings: np.ndarray, path: Path, block_rows: int = 65536) -> None:
    for start, block in iter_row_blocks(embeddings, block_rows):
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            raise InputError(f"row {start + int(np.argmax(bad))} holds NaN or inf", path=path)


def _is_file_memmap(x: np.ndarray) -> bool:
    """True for a top-level float32 ``np.memmap`` (not a view), whose rows can be read from its file."""
    return (isinstance(x, np.memmap) and isinstance(x.base, mmap.mmap) and x.filename is not None
            and x.dtype == np.float32 and x.ndim == 2 and x.flags.c_contiguous)


def iter_row_blocks(embeddings: np.ndarray, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_row, rows)`` float32 blocks of at most ``block_rows`` rows.

    A file-backed ``np.memmap`` is read with plain file reads into one reused buffer (each yielded block is
    valid until the next one), so resident memory stays at one block however large the file: slicing the map
    instead would keep every page it touched resident.  Other arrays are sliced.
    """
    n, dim = embeddings.shape
    if not _is_file_memmap(embeddings):
        for start in range(0, n, block_rows):
            yield start, np.ascontiguousarray(embeddings[start:start + block_rows], dtype=np.float32)
        return
    buffer = np.empty((min(block_rows, n), dim), np.float32)
    with open(embeddings.filename, "rb", buffering=0) as f:
        f.seek(embeddings.offset)
        for start in range(0, n, block_rows):
            block = buffer[: min(block_rows, n - start)]
            _read_into(f, block, embeddings.filename)
            yield start, block


def _read_into(f: BinaryIO, array: np.ndarray, path: str) -> None:
    view = memoryview(array).cast("B")
    got = 0
    while got < len(view):
        count = f.readinto(view[got:])
        if not count:
            raise InputError("embedding file is shorter than its shape says", path=path)
        got += count
