"""``preprocess_meta.json``: how a preprocess folder's texts became tokens, and the check every later stage makes
against the model folder it loads.

The file (written by ``preprocess.py`` with its other outputs; UTF-8 JSON object)::

    {"format_version": 1,
     "tokenizer": {"name_or_path": "<--model_name_or_path as given>", "vocab_sha256": "<hex>", "vocab_size": N},
     "query_prefix": "query: ", "doc_prefix": "passage: ",
     "prefix_given": {"query": false, "doc": true},
     "max_seq_length": 256, "max_query_length": 256, "max_doc_character": 10000, "input_format": "beir"}

``vocab_sha256`` is the SHA-256 of the tokenizer's vocabulary (token -> id, added tokens included, serialised as
sorted ``[token, id]`` pairs in compact JSON): the same for every copy of a tokenizer whatever its files
(``tokenizer.json`` or ``vocab.json`` + ``merges.txt``).  The prefixes were prepended to every query / document
text before tokenisation; ``prefix_given`` says whether ``--query_prefix`` / ``--doc_prefix`` set them (true) or
they are the tokenizer folder's prompts (false, :mod:`infra.model_folder`).  Folders preprocessed before this
file existed have none, and are not checked.

The check (:func:`check_model_matches`), one line naming this file and the model folder:

* **prompts differ** from those a sentence-transformers model folder declares (a plain folder, e.g. a STAR
  checkpoint, declares none and is not checked): **refused** (:class:`~infra.io.InputError`) when the recorded
  prefix is the preprocessing tokenizer folder's own prompt, because a wrong or missing prompt silently costs
  accuracy and nothing in the run would show it; only **warned** when ``--query_prefix`` / ``--doc_prefix`` set
  it, a deliberate choice (e.g. an ablation without prompts);
* **vocabularies differ**: **warned**, not refused, since a user may legitimately pair a model with data
  tokenized by another tokenizer (a variant with added tokens, a retrained copy); the ids then index another
  vocabulary, which the warning makes visible.  A model folder without tokenizer files is not checked.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

from infra.io import InputError, PathLike, read_json
from infra.model_folder import ST_CONFIG, VOCABULARY_FILES, load_local_tokenizer, read_folder_settings

logger = logging.getLogger(__name__)

META_NAME = "preprocess_meta.json"
FORMAT_VERSION = 1
SIDES = ("query", "doc")


class Prefixes(NamedTuple):
    """The texts prepended to every query / document before tokenisation, and whether a flag gave each."""
    query: str = ""
    doc: str = ""
    query_given: bool = False
    doc_given: bool = False


def vocab_fingerprint(backend: Any) -> tuple[str, int]:
    """(``vocab_sha256``, vocabulary size) of a ``tokenizers.Tokenizer`` (module docstring)."""
    vocab = backend.get_vocab(with_added_tokens=True)
    text = json.dumps(sorted(vocab.items()), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest(), len(vocab)


def meta_record(tokenizer_name: str, backend: Any, prefixes: Prefixes, max_seq_length: int,
                max_query_length: int, max_doc_character: int, input_format: str) -> dict[str, Any]:
    """The ``preprocess_meta.json`` object of a run (module docstring)."""
    sha, size = vocab_fingerprint(backend)
    return {"format_version": FORMAT_VERSION,
            "tokenizer": {"name_or_path": tokenizer_name, "vocab_sha256": sha, "vocab_size": size},
            "query_prefix": prefixes.query, "doc_prefix": prefixes.doc,
            "prefix_given": {"query": prefixes.query_given, "doc": prefixes.doc_given},
            "max_seq_length": max_seq_length, "max_query_length": max_query_length,
            "max_doc_character": max_doc_character, "input_format": input_format}


def read_preprocess_meta(preprocess_dir: PathLike) -> Optional[dict[str, Any]]:
    """The ``preprocess_meta.json`` of ``preprocess_dir``, or None for a folder preprocessed without one."""
    path = Path(preprocess_dir) / META_NAME
    if not path.exists():
        return None
    meta = read_json(path, META_NAME)
    for key in ("query_prefix", "doc_prefix"):
        if not isinstance(meta.get(key), str):
            raise InputError(f"{META_NAME} lacks a string {key}", path=path, value=meta.get(key))
    if not isinstance(meta.get("prefix_given"), dict) or not isinstance(meta.get("tokenizer"), dict):
        raise InputError(f"{META_NAME} lacks prefix_given or tokenizer", path=path)
    return meta


def model_vocab_fingerprint(model_dir: PathLike) -> Optional[str]:
    """The ``vocab_sha256`` of the tokenizer a model folder carries; None when it carries none."""
    folder = Path(model_dir)
    if not any((folder / name).is_file() for name in VOCABULARY_FILES):
        return None
    tokenizer = load_local_tokenizer(folder, "the model folder's tokenizer")
    if not getattr(tokenizer, "is_fast", False):
        return None
    return vocab_fingerprint(tokenizer.backend_tokenizer)[0]


def check_model_matches(preprocess_dir: PathLike, model_dir: PathLike, sides: Sequence[str] = SIDES) -> None:
    """Refuse or warn (module docstring) when the model folder ``model_dir`` expects other prompts (on
    ``sides``: "query", "doc") or another vocabulary than the preprocessing of ``preprocess_dir`` used."""
    meta = read_preprocess_meta(preprocess_dir)
    if meta is None:
        return
    meta_path = Path(preprocess_dir) / META_NAME
    settings = read_folder_settings(model_dir)
    if settings.declares_prompts:
        expected = {"query": settings.query_prompt, "doc": settings.doc_prompt}
        for side in sides:
            _check_prompt(meta, meta_path, side, expected[side], model_dir)
    model_sha = model_vocab_fingerprint(model_dir)
    data_sha = meta["tokenizer"].get("vocab_sha256")
    if model_sha is not None and model_sha != data_sha:
        logger.warning("%s: the tokens come from the tokenizer %s, whose vocabulary differs from that of the model "
                       "folder %s", meta_path, meta["tokenizer"].get("name_or_path"), model_dir)


def _check_prompt(meta: dict[str, Any], meta_path: Path, side: str, expected: str, model_dir: PathLike) -> None:
    recorded = meta[f"{side}_prefix"]
    if recorded == expected:
        return
    what = "queries" if side == "query" else "documents"
    message = (f"the {what} were preprocessed with the prefix {recorded!r}, but the model folder {model_dir} "
               f"expects {expected!r} ({ST_CONFIG})")
    if meta["prefix_given"].get(side):
        logger.warning("%s: %s; kept, since --%s_prefix set it", meta_path, message, side)
        return
    raise InputError(f"{message}: preprocess again with --model_name_or_path {model_dir}, or give --{side}_prefix "
                     f"to preprocess.py to choose the prefix deliberately", path=meta_path)
