"""What a sentence-transformers model folder says about how its authors use it, read in one place.

A sentence-transformers folder lists its modules in ``modules.json`` (in the folder itself, or in its parent for
the older ``0_Transformer/`` layout, where the parent lists the folder as a module) and keeps::

    sentence_bert_config.json          {"max_seq_length": 256, ...}  beside the Transformer module (this folder;
                                       else the parent): the truncation length its authors encode with
    config_sentence_transformers.json  {"prompts": {"query": "query: ", "passage": "passage: "},
                                        "default_prompt_name": null, ...}  at the root (this folder or the parent)
    <Pooling module>/config.json       the pooling mode (mean or CLS here); a ``Normalize`` module: L2 normalisation

The prompts are prepended to the raw text as sentence-transformers' ``encode_query`` / ``encode_document`` do: a
query gets ``prompts["query"]``, a document the first of ``prompts["document"]``, ``["passage"]``,
``["corpus"]``; a side without its own prompt gets the ``default_prompt_name``'s prompt, else none.

A folder without ``modules.json`` is not a sentence-transformers folder (e.g. a STAR checkpoint): it declares
no length and no prompts (:attr:`FolderSettings.declares_prompts` is False), and the callers keep their own
defaults.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from infra.io import InputError, PathLike, read_json

logger = logging.getLogger(__name__)

MODULES = "modules.json"
SBERT_CONFIG = "sentence_bert_config.json"
ST_CONFIG = "config_sentence_transformers.json"
DOC_PROMPT_NAMES = ("document", "passage", "corpus")
#: A model folder carries a tokenizer when it holds one of these vocabulary files.
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
                    "tokenizer.model")


@dataclass(frozen=True)
class FolderSettings:
    """A model folder's declared use: ``max_seq_length`` (None: not declared), the query and document prompts
    (``""``: none), whether it is a sentence-transformers folder (which always declares its prompts, maybe none),
    its ``pooling`` ("mean" / "first"; None: not declared) and ``normalize``."""
    max_seq_length: Optional[int] = None
    query_prompt: str = ""
    doc_prompt: str = ""
    declares_prompts: bool = False
    pooling: Optional[str] = None
    normalize: bool = False


def _modules(root: Path) -> Optional[list[dict]]:
    """The module list of ``root/modules.json``, or None when there is none."""
    path = root / MODULES
    if not path.is_file():
        return None
    modules = read_json(path, MODULES, expect=list)
    if not all(isinstance(m, dict) for m in modules):
        raise InputError("modules.json is not a list of module objects", path=path)
    return modules


def _st_root(folder: Path) -> tuple[Optional[Path], list[dict]]:
    """(root, modules) of the sentence-transformers layout ``folder`` belongs to: the folder itself or a parent
    whose ``modules.json`` lists it; (None, []) when there is none."""
    modules = _modules(folder)
    if modules is not None:
        return folder, modules
    modules = _modules(folder.parent)
    if modules is not None and folder.name in [str(m.get("path", "")) for m in modules]:
        return folder.parent, modules
    return None, []


def _st_pooling(path: Path) -> str:
    """Map a sentence-transformers Pooling config onto "mean" / "first"."""
    cfg = read_json(path, "pooling config listed in modules.json")
    modes = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode") and v is True)
    if modes == ["pooling_mode_mean_tokens"]:
        return "mean"
    if modes == ["pooling_mode_cls_token"]:
        return "first"
    raise InputError("unsupported sentence-transformers pooling (only mean or CLS)", path=path, value=modes)


def _max_seq_length(folder: Path, root: Path) -> Optional[int]:
    for path in (folder / SBERT_CONFIG, root / SBERT_CONFIG):
        if path.is_file():
            value = read_json(path, SBERT_CONFIG).get("max_seq_length")
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise InputError("max_seq_length must be an integer >= 2", path=path, value=value)
            return value
    return None


def _prompts(root: Path) -> tuple[str, str]:
    """(query prompt, document prompt) of ``root/config_sentence_transformers.json`` (module docstring)."""
    path = root / ST_CONFIG
    if not path.is_file():
        return "", ""
    config = read_json(path, ST_CONFIG)
    prompts = config.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise InputError("prompts must be an object of strings", path=path, value=prompts)
    default_name = config.get("default_prompt_name")
    if default_name is not None and default_name not in prompts:
        raise InputError("default_prompt_name names no prompt", path=path, value=default_name)
    default = prompts[default_name] if default_name is not None else ""
    doc_names = [name for name in DOC_PROMPT_NAMES if name in prompts]
    return prompts.get("query", default), prompts[doc_names[0]] if doc_names else default


def read_folder_settings(path: PathLike) -> FolderSettings:
    """The :class:`FolderSettings` of a model folder (module docstring); a plain folder gives the empty settings,
    except that a bare ``1_Pooling/config.json`` in it still declares the pooling."""
    folder = Path(path)
    root, modules = _st_root(folder)
    if root is None:
        pooling_config = folder / "1_Pooling" / "config.json"
        return FolderSettings(pooling=_st_pooling(pooling_config) if pooling_config.is_file() else None)
    types = [str(m.get("type", "")) for m in modules]
    pooling_dirs = [str(m.get("path", "")) for m, t in zip(modules, types) if t.endswith("Pooling")]
    query_prompt, doc_prompt = _prompts(root)
    return FolderSettings(
        max_seq_length=_max_seq_length(folder, root), query_prompt=query_prompt, doc_prompt=doc_prompt,
        declares_prompts=True,
        pooling=_st_pooling(root / pooling_dirs[0] / "config.json") if pooling_dirs else None,
        normalize=any(t.endswith("Normalize") for t in types))


def load_local_tokenizer(folder: Path, what: str) -> Any:
    """``AutoTokenizer.from_pretrained`` of a local folder (nothing is downloaded); a folder it cannot read raises
    :class:`InputError` "cannot load ``what``: <the first line of the reason>"."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"cannot load {what}: {first_line}", path=folder) from None


def length_or_folder_default(given: Optional[int], folder: Optional[PathLike], fallback: int, flag: str) -> int:
    """A token-length flag's value: ``given`` when the user gave one, else the ``max_seq_length`` of the model
    ``folder``'s ``sentence_bert_config.json`` (logged), else ``fallback`` (the original's default)."""
    if given is not None:
        return given
    declared = None if folder is None else read_folder_settings(folder).max_seq_length
    if declared is None:
        return fallback
    logger.info("%s %d: the max_seq_length of the sentence-transformers folder %s", flag, declared, folder)
    return declared
