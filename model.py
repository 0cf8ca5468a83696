"""The dual encoder of STAR/ADORE (``RobertaDot``): one shared transformer for queries and documents.

Embedding (faithful to the original model.py's ``RobertaDot_NLL_LN``)::

    e = LayerNorm(Linear(h[:, 0]))          # h = last_hidden_state, LayerNorm eps = 1e-5 (torch default)

The backbone lives under the attribute named by the backbone class's ``base_model_prefix`` (``roberta``
for RoBERTa, ``bert`` for BERT), and the head modules are ``embeddingHead`` and ``norm``, so the state-dict
keys are exactly those of the released STAR/ADORE checkpoints and of ANCE's ``RobertaDot_NLL_LN``::

    roberta.embeddings.word_embeddings.weight ... embeddingHead.weight, embeddingHead.bias, norm.weight, norm.bias

Generic HF encoders are also supported, either behind the same head or, for off-the-shelf sentence encoders
(e.g. all-MiniLM-L6-v2), with masked mean pooling, optional L2 normalisation and no head.  The choice is
stored in ``config.json`` (``dr_pooling`` "first"|"mean", ``dr_head``, ``dr_normalize``,
``output_embedding_size``) so that a saved checkpoint always encodes the way it was trained.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import pickle
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from transformers import CONFIG_MAPPING, MODEL_MAPPING, AutoConfig, AutoModel, PretrainedConfig

from io_utils import InputError, PathLike, atomic_output, atomic_write_text, read_json, require_file

logger = logging.getLogger(__name__)

POOLINGS = ("first", "mean")
HEAD_PREFIXES = ("embeddingHead.", "norm.")
SAFETENSORS_NAME = "model.safetensors"
PICKLE_NAME = "pytorch_model.bin"
HEAD_LAYER_NORM_EPS = 1e-5
#: The files of a Hugging Face tokenizer that a model folder may carry (copied byte for byte on save).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")
_VOCABULARY_FILES = {"tokenizer.json", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
                     "tokenizer.model"}


class DenseEncoder(torch.nn.Module):
    """Shared query/document encoder: backbone → pooling ("first" | masked "mean") → optional head → optional L2.

    Attributes: ``config`` (the HF config), the backbone under ``self.<base_model_prefix>``, ``embeddingHead``
    and ``norm`` when ``head`` is true, ``pooling``, ``head``, ``normalize``, and ``tokenizer_files`` (name ->
    bytes: the tokenizer of the folder it was loaded from, empty if none), which :meth:`save_pretrained` writes.
    """

    def __init__(self, config: PretrainedConfig, pooling: str = "first", head: bool = True,
                 normalize: bool = False):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        config = self.config = copy.deepcopy(config)  # settings are recorded on it, not on the caller's object
        self.pooling = pooling
        self.head = bool(head)
        self.normalize = bool(normalize)
        backbone = _build_backbone(config)
        self.backbone_prefix: str = backbone.base_model_prefix
        setattr(self, self.backbone_prefix, backbone)
        hidden = config.hidden_size
        self._output_dim = (getattr(config, "output_embedding_size", None) or hidden) if self.head else hidden
        if self.head:
            self.embeddingHead = torch.nn.Linear(hidden, self._output_dim)
            self.norm = torch.nn.LayerNorm(self._output_dim, eps=HEAD_LAYER_NORM_EPS)
            std = getattr(config, "initializer_range", 0.02)
            torch.nn.init.normal_(self.embeddingHead.weight, mean=0.0, std=std)
            torch.nn.init.zeros_(self.embeddingHead.bias)
        self.tokenizer_files: dict[str, bytes] = {}
        self._record_settings()

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: PretrainedConfig, pooling: str = "first", head: bool = True,
                    normalize: bool = False) -> "DenseEncoder":
        """A randomly initialised encoder (HF init for the backbone, normal(0, initializer_range) for the head)."""
        return cls(config, pooling=pooling, head=head, normalize=normalize)

    @classmethod
    def from_pretrained(cls, path: PathLike, pooling: Optional[str] = None, head: Optional[bool] = None,
                        normalize: Optional[bool] = None, allow_pickle: bool = False) -> "DenseEncoder":
        """Load ``config.json`` + ``model.safetensors`` (or ``pytorch_model.bin``) from a local folder.

        Encoding settings are resolved per setting: an explicit argument wins; else the config's ``dr_*`` key;
        else they are inferred — weights with ``embeddingHead.*`` are the faithful RoBERTa-dot (first token + head);
        a bare HF encoder gets no head, first-token pooling unless a sentence-transformers ``modules.json`` /
        ``1_Pooling/config.json`` (in the folder or its parent) says mean pooling, and L2 normalisation when a
        ``Normalize`` module is listed.  Backbone keys may carry the ``base_model_prefix`` or not.  Missing
        backbone keys raise :class:`InputError`, and so do missing head keys, except that an explicit
        ``head=True`` on a checkpoint without any head (e.g. plain ``roberta-base``) starts a fresh random head
        (logged).  Unexpected keys are logged as a warning.
        ``pytorch_model.bin`` is read with ``torch.load(weights_only=True)``; a pickle holding other objects
        needs ``allow_pickle=True`` (only for trusted files).
        """
        folder = Path(path)
        if not folder.is_dir():
            raise InputError("model folder not found", path=folder)
        config = _load_config(folder)
        weights_path, state = _load_weights(folder, allow_pickle)
        has_head = any(k.startswith("embeddingHead.") for k in state)
        undecided = any(arg is None and getattr(config, key, None) is None
                        for arg, key in ((pooling, "dr_pooling"), (normalize, "dr_normalize")))
        st_pooling, st_normalize = (_sentence_transformers_settings(folder) if undecided and not has_head
                                    else (None, False))
        fresh_head = head is True and not has_head
        head = _resolve(head, config, "dr_head", has_head)
        pooling = _resolve(pooling, config, "dr_pooling", "first" if has_head else (st_pooling or "first"))
        normalize = _resolve(normalize, config, "dr_normalize", st_normalize)
        if pooling not in POOLINGS:
            raise InputError(f"pooling must be one of {POOLINGS}", path=folder / "config.json", value=pooling)
        model = cls(config, pooling=pooling, head=bool(head), normalize=bool(normalize))
        model._load_state(state, weights_path, fresh_head)
        model.tokenizer_files = read_tokenizer_files(folder)
        return model

    def _load_state(self, state: Mapping[str, torch.Tensor], weights_path: Path, fresh_head: bool) -> None:
        """Copy a checkpoint state dict into the model; backbone keys may lack the backbone prefix.

        With ``fresh_head`` the head keeps its random initialisation instead of requiring checkpoint keys.
        """
        own = set(self.state_dict())
        prefix = self.backbone_prefix + "."
        buffers = {name for name, _ in self.named_buffers()} - own
        found, unexpected = {}, []
        for key, value in state.items():
            name = key if key in own or key in buffers else prefix + key
            if name in own:
                found.setdefault(name, value)
            elif name not in buffers:  # non-persistent buffers (e.g. old position_ids) are dropped silently
                unexpected.append(key)
        required = {k for k in own if not k.startswith(HEAD_PREFIXES)} if fresh_head else own
        missing = sorted(required - set(found))
        if missing:
            raise InputError(f"checkpoint lacks {len(missing)} weight(s) of the model, e.g. {missing[:5]}",
                             path=weights_path)
        if fresh_head:
            logger.warning("%s: no embeddingHead/norm weights; the head starts from random init", weights_path)
        unexpected = [k for k in unexpected if "pooler" not in k.split(".")]  # the backbone is built without one
        if unexpected:
            logger.warning("%s: ignoring %d checkpoint key(s) the model does not use, e.g. %s",
                           weights_path, len(unexpected), unexpected[:5])
        try:
            self.load_state_dict(found, strict=not fresh_head)
        except RuntimeError as e:  # shape mismatch: the config does not describe these weights
            problems = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [str(e)]
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise InputError(f"weights do not fit the config: {problems[0]}{more}", path=weights_path) from None

    # -- encoding -----------------------------------------------------------------------------------------
    @property
    def output_dim(self) -> int:
        """Size of the returned embeddings."""
        return self._output_dim

    @property
    def pad_token_id(self) -> int:
        """The id batches are padded with: the config's ``pad_token_id``, else RoBERTa's 1 (with a warning)."""
        pad = getattr(self.config, "pad_token_id", None)
        if pad is None:
            logger.warning("the model config has no pad_token_id; padding with 1 (RoBERTa's)")
            return 1
        return int(pad)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embeddings ``float32 [B, output_dim]`` of right-padded token ids (fp32 even under autocast)."""
        backbone = getattr(self, self.backbone_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "first":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(torch.float32)
            pooled = (hidden.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if self.head:
            pooled = self.norm(self.embeddingHead(pooled))
        pooled = pooled.float()
        return F.normalize(pooled, p=2, dim=-1) if self.normalize else pooled

    def gradient_checkpointing_enable(self, checkpoint_kwargs: Optional[dict[str, Any]] = None) -> None:
        """Turn on activation checkpointing in the backbone (non-reentrant by default)."""
        backbone = getattr(self, self.backbone_prefix)
        kwargs = {"use_reentrant": False} if checkpoint_kwargs is None else checkpoint_kwargs
        if hasattr(backbone, "activation_checkpointing_enable"):  # transformers >= 5
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # -- saving -------------------------------------------------------------------------------------------
    def _record_settings(self) -> None:
        self.config.dr_pooling = self.pooling
        self.config.dr_head = self.head
        self.config.dr_normalize = self.normalize
        self.config.output_embedding_size = self._output_dim

    def save_pretrained(self, path: PathLike) -> None:
        """Write ``config.json`` (with the ``dr_*`` keys), ``model.safetensors`` and the ``tokenizer_files`` into
        ``path``, so that ``AutoTokenizer.from_pretrained(path)`` gives the model's tokenizer.

        Each file is written to a temporary name and renamed into place; the weights go first, so a crash
        leaves either the old pair or new weights next to an old config, never a truncated file.
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self._record_settings()
        for name, content in sorted(self.tokenizer_files.items()):
            with atomic_output(folder / name) as tmp:
                tmp.write_bytes(content)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        with atomic_output(folder / SAFETENSORS_NAME) as tmp:
            save_safetensors(state, str(tmp), metadata={"format": "pt"})
        atomic_write_text(folder / "config.json", self.config.to_json_string(use_diff=False))


def read_tokenizer_files(folder: Path) -> dict[str, bytes]:
    """The tokenizer files (:data:`TOKENIZER_FILES`) in ``folder``, name -> bytes; empty when it holds no
    vocabulary file (``tokenizer.json``, ``vocab.json``, ``vocab.txt`` or a sentencepiece model)."""
    present = {name: folder / name for name in TOKENIZER_FILES if (folder / name).is_file()}
    if not _VOCABULARY_FILES & set(present):
        return {}
    return {name: path.read_bytes() for name, path in present.items()}


def _build_backbone(config: PretrainedConfig) -> torch.nn.Module:
    """``AutoModel.from_config`` without a pooling layer (where the class has one), always in float32."""
    model_class = MODEL_MAPPING.get(type(config), None)
    kwargs = {}
    if model_class is not None and "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
        kwargs["add_pooling_layer"] = False
    return AutoModel.from_config(config, **kwargs).float()


def _resolve(explicit: Any, config: PretrainedConfig, key: str, inferred: Any) -> Any:
    if explicit is not None:
        return explicit
    stored = getattr(config, key, None)
    return inferred if stored is None else stored


def _load_config(folder: Path) -> PretrainedConfig:
    """The folder's HF config; a config without ``model_type`` (old checkpoints) is typed from ``architectures``."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InputError("config.json not found in the model folder", path=folder)
    raw = read_json(config_path, "config.json")
    if raw.get("model_type"):
        try:
            return AutoConfig.from_pretrained(str(folder))
        except (ValueError, KeyError) as e:
            raise InputError(f"cannot read the config: {e}", path=config_path) from None
    model_type = _model_type_from_architectures(raw.get("architectures") or [])
    if model_type is None:
        raise InputError("config.json has no model_type and no recognisable architectures", path=config_path)
    return CONFIG_MAPPING[model_type].from_dict(raw)


def _model_type_from_architectures(architectures: list[str]) -> Optional[str]:
    """Longest known model type that starts an architecture name (``RobertaDot`` → ``roberta``)."""
    found = [mt for mt in CONFIG_MAPPING.keys() for arch in architectures
             if arch.lower().startswith(mt.replace("-", "").replace("_", ""))]
    return max(found, key=len) if found else None


def _load_weights(folder: Path, allow_pickle: bool) -> tuple[Path, dict[str, torch.Tensor]]:
    """``(file, state dict)`` from ``model.safetensors`` or else ``pytorch_model.bin``; non-tensors dropped."""
    st_path, bin_path = folder / SAFETENSORS_NAME, folder / PICKLE_NAME
    if st_path.is_file():
        try:
            return st_path, load_safetensors(str(st_path))
        except (SafetensorError, OSError) as e:
            raise InputError(f"cannot read safetensors weights: {e}", path=st_path) from None
    if not bin_path.is_file():
        raise InputError(f"no {SAFETENSORS_NAME} or {PICKLE_NAME} in the model folder", path=folder)
    try:
        obj = torch.load(bin_path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        if allow_pickle:
            raise InputError(f"cannot unpickle the weights: {e}", path=bin_path) from None
        raise InputError("the pickle holds objects other than tensors; if the file is trusted, pass "
                         "allow_pickle=True (--allow_pickle)", path=bin_path) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise InputError(f"cannot read the weights: {e}", path=bin_path) from None
    if not isinstance(obj, Mapping):
        raise InputError("weights file does not hold a state dict", path=bin_path, value=type(obj).__name__)
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if len(state) < len(obj):
        logger.warning("%s: ignoring %d entries that are not tensors", bin_path, len(obj) - len(state))
    return bin_path, state


def _sentence_transformers_settings(folder: Path) -> tuple[Optional[str], bool]:
    """``(pooling, normalize)`` declared by a sentence-transformers layout, or ``(None, False)``.

    Looks for ``modules.json`` in the folder (modules relative to it) or in its parent when the parent lists
    this folder as a module (the older ``0_Transformer/`` layout); without ``modules.json`` a bare
    ``1_Pooling/config.json`` in the folder is used.  Pooling modes other than mean / CLS raise InputError.
    """
    for root in (folder, folder.parent):
        modules_path = root / "modules.json"
        if not modules_path.is_file():
            continue
        modules = read_json(modules_path, "modules.json", expect=list)
        if not all(isinstance(m, dict) for m in modules):
            raise InputError("modules.json is not a list of module objects", path=modules_path)
        paths = [str(m.get("path", "")) for m in modules]
        types = [str(m.get("type", "")) for m in modules]
        if root != folder and folder.name not in paths:
            continue
        normalize = any(t.endswith("Normalize") for t in types)
        pooling_dirs = [p for p, t in zip(paths, types) if t.endswith("Pooling")]
        return (_st_pooling(root / pooling_dirs[0] / "config.json") if pooling_dirs else None), normalize
    pooling_config = folder / "1_Pooling" / "config.json"
    return (_st_pooling(pooling_config) if pooling_config.is_file() else None), False


def _st_pooling(path: Path) -> str:
    """Map a sentence-transformers Pooling config onto "mean" / "first"."""
    cfg = read_json(path, "pooling config listed in modules.json")
    modes = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode") and v is True)
    if modes == ["pooling_mode_mean_tokens"]:
        return "mean"
    if modes == ["pooling_mode_cls_token"]:
        return "first"
    raise InputError("unsupported sentence-transformers pooling (only mean or CLS)", path=path, value=modes)


def model_identity(path: PathLike, model: Optional[DenseEncoder] = None) -> str:
    """Fingerprint of a saved model: ``"sha256:<hex>"`` over ``config.json`` and the weights file contents.

    It changes whenever any weight or config value changes and is the same for byte-identical copies (no
    mtimes involved).  Cost: one sequential read of the weights (about 1 s for roberta-base's 500 MB).  Pass
    the loaded ``model`` when settings were overridden at load time, so that its pooling/head/normalise
    choices (which decide the embeddings) are part of the fingerprint.
    """
    folder = Path(path)
    weights = [p for p in (folder / SAFETENSORS_NAME, folder / PICKLE_NAME) if p.is_file()]
    if not weights:
        raise InputError(f"no {SAFETENSORS_NAME} or {PICKLE_NAME} in the model folder", path=folder)
    digest = hashlib.sha256()
    for file in (require_file(folder / "config.json", "model config"), weights[0]):
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    if model is not None:
        digest.update(f"\0{model.pooling}\0{model.head}\0{model.normalize}".encode())
    return "sha256:" + digest.hexdigest()


__all__ = ["DenseEncoder", "model_identity", "read_tokenizer_files", "POOLINGS", "TOKENIZER_FILES"]
