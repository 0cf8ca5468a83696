"""The ``{prefix}_meta`` file beside each token memmap that ``preprocess.py`` writes: a JSON object
``{"type": "int32", "total_number": N, "embedding_size": L}`` (the original's field names) — the memmap's integer
dtype, its rows and its width.  One reader for every stage that opens token memmaps."""
from typing import NamedTuple

import numpy as np

from infra.io import InputError, PathLike, read_json


class TokenMeta(NamedTuple):
    """A ``{prefix}_meta`` file: the memmap's integer ``dtype``, ``total_number`` rows, ``embedding_size`` wide."""
    dtype: np.dtype
    total_number: int
    embedding_size: int


def read_token_meta(path: PathLike) -> TokenMeta:
    """Read a ``{prefix}_meta`` file written by :func:`preprocess.write_token_matrix`; a field missing or out of
    range raises :class:`InputError` naming the file and the field."""
    meta = read_json(path, "token meta file")
    try:
        dtype = np.dtype(meta.get("type"))
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "iu":
        raise InputError("token meta file lacks an integer type", path=path, value=meta.get("type"))
    counts = [meta.get(key) for key in ("total_number", "embedding_size")]
    for key, value, least in zip(("total_number", "embedding_size"), counts, (0, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise InputError(f"token meta file lacks a {key} >= {least}", path=path, value=value)
    return TokenMeta(dtype, *counts)
