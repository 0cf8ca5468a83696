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
from numbers import Integral, Real
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from transformers import CONFIG_MAPPING, MODEL_MAPPING, AutoConfig, AutoModel, PretrainedConfig

from infra.checkpoint_paths import SAFETENSORS_NAME
from infra.io import InputError, PathLike, atomic_output, atomic_write_text, read_json, require_file
from infra.model_folder import VOCABULARY_FILES, FolderSettings, read_folder_settings

logger = logging.getLogger(__name__)

POOLINGS = ("first", "mean")
HEAD_PREFIXES = ("embeddingHead.", "norm.")
PICKLE_NAME = "pytorch_model.bin"
HEAD_LAYER_NORM_EPS = 1e-5
#: The files of a Hugging Face tokenizer that a model folder may carry (copied byte for byte on save).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


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
        declared = read_folder_settings(folder) if undecided and not has_head else FolderSettings()
        st_pooling, st_normalize = declared.pooling, declared.normalize
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
    if not set(VOCABULARY_FILES) & set(present):
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


def load_init_model(init_path: PathLike, **kwargs: Any) -> DenseEncoder:
    """``DenseEncoder.from_pretrained(init_path, **kwargs)``; every model the run saves carries the init folder's
    tokenizer files, and a folder without any is logged once (the saved folders then have no tokenizer)."""
    model = DenseEncoder.from_pretrained(init_path, **kwargs)
    if not model.tokenizer_files:
        logger.info("%s holds no tokenizer files: the saved models will carry none", init_path)
    return model


# ----------------------------------------------------------------------------------------------------------
# Training losses
# ----------------------------------------------------------------------------------------------------------
# Training losses of Inbatch-Neg, Rand-Neg, STAR and ADORE (as the original star/train.py and adore/train.py compute
# them) as pure functions of embeddings and masks.
#
# Every loss casts its inputs to float32 (the original computes scores and losses outside autocast) and uses
# ``softplus(x) = log(1 + e^x)`` in its numerically stable form (``torch.nn.functional.softplus``), so large
# score gaps give no inf/NaN.  Notation: ``s_ij = q_i · d_j`` (raw dot product).
#
# ``score_scale`` (τ⁻¹, a temperature's inverse) multiplies every score gap inside the softplus: ``softplus(γ·(s_neg
# − s_pos))``.  The paper's losses are γ = 1 (the default, bitwise the unscaled loss): RoBERTa with a LayerNorm head
# gives inner products spanning tens of units.  An encoder that L2-normalises (a sentence-transformers folder) has
# cosine scores in [−1, 1], where γ = 1 leaves the softplus nearly linear (every negative weighs alike); γ = 20 is
# sentence-transformers' MultipleNegativesRankingLoss scale (docs/own-collection.md has the measurements).
#
# A loss whose masks leave no valid pair is 0 (still attached to the graph), where the original divides 0 by 0.

Tensor = torch.Tensor


def _check_scale(score_scale: float) -> float:
    if isinstance(score_scale, bool) or not isinstance(score_scale, Real) or not 0 < score_scale < float("inf"):
        raise ValueError(f"score_scale must be a positive finite number, got {score_scale!r}")
    return float(score_scale)


def _pooled_mean(terms: Sequence[tuple[Tensor, Tensor]], score_scale: float) -> Tensor:
    """``Σ_blocks Σ mask·softplus(γ·diff) / Σ_blocks Σ mask`` over ``(diff, mask)`` blocks (γ = ``score_scale``);
    0 without pairs."""
    scale = _check_scale(score_scale)
    total = sum((mask * F.softplus(scale * diff)).sum() for diff, mask in terms)
    count = sum(mask.sum() for _, mask in terms)
    return total / count.clamp(min=1.0)


def _mask(mask: Tensor, rows: int, cols: int, name: str) -> Tensor:
    if tuple(mask.shape) != (rows, cols):
        raise ValueError(f"{name} must have shape [{rows}, {cols}], got {list(mask.shape)}")
    return mask.float()


def _positive_scores(q: Tensor, d: Tensor) -> Tensor:
    """``s_ii = q_i · d_i`` as a float32 column ``[B, 1]``."""
    if q.shape != d.shape or q.dim() != 2:
        raise ValueError(f"q and d must both be [B, D], got {list(q.shape)} and {list(d.shape)}")
    return (q.float() * d.float()).sum(dim=1, keepdim=True)


def inbatch_loss(q: Tensor, d: Tensor, rel_pair_mask: Tensor, score_scale: float = 1.0) -> Tensor:
    """Inbatch-Neg: pairwise logistic loss of each query against the other queries' positives.

    Inputs: ``q`` [B, D] query embeddings, ``d`` [B, D] their positive docs (row i is q_i's positive),
    ``rel_pair_mask`` [B, B] with M_ij = 1 when d_j is NOT relevant to q_i (so M_ii = 0); γ = ``score_scale``::

        L = Σ_ij M_ij · softplus(γ·(s_ij − s_ii)) / Σ_ij M_ij
    """
    scores = q.float() @ d.float().T
    mask = _mask(rel_pair_mask, q.shape[0], d.shape[0], "rel_pair_mask")
    return _pooled_mean([(scores - _positive_scores(q, d), mask)], score_scale)


def randneg_loss(q: Tensor, d: Tensor, rand_docs: Tensor, rand_pair_mask: Tensor, score_scale: float = 1.0) -> Tensor:
    """Rand-Neg: each query against ALL random docs of the batch (in-batch positives not used).

    Inputs: ``q``, ``d`` [B, D] as in :func:`inbatch_loss`; ``rand_docs`` [B·R, D] random docs r_k;
    ``rand_pair_mask`` [B, B·R] with N_ik = 1 when r_k is NOT relevant to q_i. With t_ik = q_i · r_k::

        L = Σ_ik N_ik · softplus(γ·(t_ik − s_ii)) / Σ_ik N_ik
    """
    scores = q.float() @ rand_docs.float().T
    mask = _mask(rand_pair_mask, q.shape[0], rand_docs.shape[0], "rand_pair_mask")
    return _pooled_mean([(scores - _positive_scores(q, d), mask)], score_scale)


def star_loss(q: Tensor, d: Tensor, hard_docs: Tensor, rel_pair_mask: Tensor, hard_pair_mask: Tensor,
              score_scale: float = 1.0) -> Tensor:
    """STAR: in-batch negatives plus ALL static hard negatives of the batch, one pooled mean, no α.

    Inputs: ``q``, ``d``, ``rel_pair_mask`` as in :func:`inbatch_loss`; ``hard_docs`` [B·H, D] hard negatives
    h_k; ``hard_pair_mask`` [B, B·H] with N_ik = 1 when h_k is NOT relevant to q_i. With u_ik = q_i · h_k::

        L = [Σ_ij M_ij·softplus(γ·(s_ij − s_ii)) + Σ_ik N_ik·softplus(γ·(u_ik − s_ii))] / [Σ M + Σ N]
    """
    positive = _positive_scores(q, d)
    inbatch = q.float() @ d.float().T
    hard = q.float() @ hard_docs.float().T
    return _pooled_mean([
        (inbatch - positive, _mask(rel_pair_mask, q.shape[0], d.shape[0], "rel_pair_mask")),
        (hard - positive, _mask(hard_pair_mask, q.shape[0], hard_docs.shape[0], "hard_pair_mask")),
    ], score_scale)


# -- ADORE ------------------------------------------------------------------------------------------

def _check_cut(metric_cut: int) -> int:
    if isinstance(metric_cut, bool) or not isinstance(metric_cut, Integral) or metric_cut <= 0:
        raise ValueError(f"metric_cut must be a positive int (the original's None trains on zero loss), "
                         f"got {metric_cut!r}")
    return int(metric_cut)


def adore_gains(n_items: int, metric_cut: int, device: Union[str, torch.device, None] = None) -> Tensor:
    """``a_r = 1/r`` for 1-based positions ``r ≤ metric_cut``, else 0; float32 ``[n_items]``."""
    cut = _check_cut(metric_cut)
    positions = torch.arange(1, n_items + 1, dtype=torch.float32, device=device)
    return torch.where(positions <= cut, 1.0 / positions, torch.zeros_like(positions))


def adore_pair_weights(n_items: int, metric_cut: int, device: Union[str, torch.device, None] = None) -> Tensor:
    """ΔRR pair weights ``w_rs = |a_r − a_s|`` for positions r, s (rows, columns); float32 ``[n, n]``.

    ``w_rs`` is the change of reciprocal rank (cut at ``metric_cut``) when the items at r and s swap.
    """
    gains = adore_gains(n_items, metric_cut, device)
    return (gains[:, None] - gains[None, :]).abs()


def adore_query_loss(scores: Tensor, labels: Tensor, metric_cut: int, score_scale: float = 1.0) -> Tensor:
    """ADORE loss of one query, positions = list order (1-based; appended positives come last).

    Inputs: ``scores`` [n] f_r = q · e(p_r) for the retrieved list (plus any appended positives),
    ``labels`` [n] bool y_r (True = relevant); γ = ``score_scale``::

        loss_q = Σ_{r: y_r=1} Σ_{s: y_s=0} |a_r − a_s| · softplus(γ·(f_s − f_r)) / #{(r, s): y_r=1, y_s=0}

    with a_r = 1/r for r ≤ metric_cut else 0.  0 when the list has no (positive, negative) pair.
    """
    scores = scores.float()
    labels = labels.bool()
    if scores.dim() != 1 or labels.shape != scores.shape:
        raise ValueError(f"scores and labels must both be [n], got {list(scores.shape)} and {list(labels.shape)}")
    weights = adore_pair_weights(scores.shape[0], metric_cut, scores.device)[labels][:, ~labels]  # [P, N]
    pairs = scores[labels][:, None], scores[~labels][None, :]
    terms = weights * F.softplus(_check_scale(score_scale) * (pairs[1] - pairs[0]))
    return terms.sum() / max(terms.numel(), 1)


def _pad(rows: Union[Tensor, Sequence[Tensor]], fill: float | bool) -> tuple[Tensor, Tensor]:
    """``(padded [B, n_max], valid [B, n_max])`` from a list of 1-D tensors or a padded 2-D tensor."""
    if isinstance(rows, Tensor):
        if rows.dim() != 2:
            raise ValueError(f"padded inputs must be [B, n], got {list(rows.shape)}")
        return rows, torch.ones(rows.shape, dtype=torch.bool, device=rows.device)
    if len(rows) == 0:
        raise ValueError("the batch has no queries")
    padded = torch.nn.utils.rnn.pad_sequence(list(rows), batch_first=True, padding_value=fill)
    lengths = torch.tensor([len(r) for r in rows], device=padded.device)
    return padded, torch.arange(padded.shape[1], device=padded.device)[None, :] < lengths[:, None]


def adore_batch_loss(scores: Union[Tensor, Sequence[Tensor]], labels: Union[Tensor, Sequence[Tensor]],
                     metric_cut: int, divisor: float, lengths: Tensor | None = None,
                     score_scale: float = 1.0) -> Tensor:
    """ADORE batch loss: ``Σ_q loss_q / divisor`` (``loss_q`` as in :func:`adore_query_loss`, γ = ``score_scale``).

    ``scores``/``labels``: a list of per-query 1-D tensors (any lengths), or left-aligned padded tensors
    [B, n] with optional ``lengths`` [B] (entries at column ≥ length are ignored; default: all valid).
    ``divisor``: the nominal batch size × gradient-accumulation steps (faithful: also for a short last
    batch).  Vectorised over the batch as a [B, P_max, n] matrix of (positive, any item) pairs.
    """
    if isinstance(divisor, bool) or not isinstance(divisor, Real) or divisor <= 0:
        raise ValueError(f"divisor must be a positive number, got {divisor!r}")
    _check_cut(metric_cut)
    scale = _check_scale(score_scale)
    f, valid = _pad(scores, 0.0)
    y, _ = _pad(labels, False)
    f, y = f.float(), y.bool()
    if y.shape != f.shape:
        raise ValueError(f"scores and labels differ in shape: {list(f.shape)} vs {list(y.shape)}")
    if lengths is not None:
        valid = valid & (torch.arange(f.shape[1], device=f.device)[None, :] < lengths.to(f.device)[:, None])
    positive, negative = y & valid, ~y & valid
    n_pos = int(positive.sum(dim=1).max()) if f.numel() else 0
    if n_pos == 0:
        return f.sum() * 0.0
    # positions of each query's positives, padded to n_pos (padding slots are masked out by pos_valid)
    pos_index = torch.sort(positive.int(), dim=1, descending=True, stable=True).indices[:, :n_pos]
    pos_valid = torch.gather(positive, 1, pos_index)
    gains = adore_gains(f.shape[1], metric_cut, f.device)
    weights = (gains[pos_index][:, :, None] - gains[None, None, :]).abs()          # [B, P, n]
    diff = f[:, None, :] - torch.gather(f, 1, pos_index)[:, :, None]               # f_s − f_r
    pair_mask = pos_valid[:, :, None] & negative[:, None, :]
    terms = weights * F.softplus(scale * diff) * pair_mask
    per_query = terms.sum(dim=(1, 2)) / pair_mask.sum(dim=(1, 2)).clamp(min=1)
    return per_query.sum() / divisor


__all__ = ["inbatch_loss", "randneg_loss", "star_loss", "adore_gains", "adore_pair_weights",
           "adore_query_loss", "adore_batch_loss"]
