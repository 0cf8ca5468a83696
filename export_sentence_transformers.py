"""Export a trained encoder folder (STAR / ADORE / checkpoint) as a sentence-transformers model folder.

    python -m export_sentence_transformers --model_dir data/passage/trained_models/star --output_dir star-st

``SentenceTransformer(output_dir).encode(texts)`` then gives ``DenseEncoder`` embeddings of the same token ids;
the files are written by hand (the sentence-transformers package is not needed): :func:`export` lists them.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file as save_safetensors

from infra import cli_types as ct
from infra.io import InputError, atomic_directory, configure_logging, refuse_existing, run_cli
from model import DenseEncoder, read_tokenizer_files
from preprocess import Faithful28Tokenizer, load_tokenizer

ST_MODULES = "sentence_transformers.models."
POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens",
                 "lasttoken")
DR_KEYS = ("dr_pooling", "dr_head", "dr_normalize", "output_embedding_size")


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _write_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(path),
                     metadata={"format": "pt"})


def pooling_config(model: DenseEncoder, dimension: int) -> dict[str, Any]:
    """``1_Pooling/config.json``: CLS for ``dr_pooling`` "first", else masked mean."""
    chosen = "cls_token" if model.pooling == "first" else "mean_tokens"
    return {"word_embedding_dimension": dimension,
            **{f"pooling_mode_{mode}": mode == chosen for mode in POOLING_MODES}, "include_prompt": True}


def write_backbone(model: DenseEncoder, folder: Path) -> None:
    """``config.json`` (without the ``dr_*`` keys) and ``model.safetensors`` of the backbone alone."""
    backbone = getattr(model, model.backbone_prefix)
    config = copy.deepcopy(model.config)
    for key in DR_KEYS:
        if hasattr(config, key):
            delattr(config, key)
    config.architectures = [type(backbone).__name__]
    folder.joinpath("config.json").write_text(config.to_json_string(use_diff=False), encoding="utf-8")
    _write_weights(folder / "model.safetensors", backbone.state_dict())


def export(model_dir: Path, output_dir: Path, max_seq_length: int, tokenizer_dir: Optional[Path] = None) -> Path:
    """Write the sentence-transformers folder of the encoder in ``model_dir`` to ``output_dir`` (atomically).

    The folder written (the sentence-transformers layout, files written by hand: the package is not needed)::

        modules.json                      the module list below, in order
        sentence_bert_config.json         {"max_seq_length": L, "do_lower_case": D}
        config_sentence_transformers.json {"similarity_fn_name": "dot" | "cosine" (with Normalize)}
        config.json, model.safetensors    0: Transformer — the backbone alone (weights without the backbone prefix)
        tokenizer files                   the model folder's (or --tokenizer_dir's) tokenizer, byte for byte
        1_Pooling/config.json             CLS (``dr_pooling`` "first") or masked mean ("mean")
        2_Dense/config.json + weights     the ``embeddingHead`` Linear, identity activation (only with a head)
        3_LayerNorm/config.json + weights the head's ``norm`` (LayerNorm, eps 1e-5; only with a head)
        N_Normalize/                      L2 normalisation (only when ``dr_normalize``)

    ``SentenceTransformer(output_dir).encode(texts)`` then gives ``DenseEncoder`` embeddings of the same token ids.
    ``D`` (the Transformer's ``do_lower_case``) follows preprocess.py: true for the faithful RoBERTa emulation
    (2.8's ``do_lower_case=True``) and for a tokenizer that lower-cases itself.  Note that preprocess.py's 2.8
    emulation also prefixes a space to every RoBERTa text, which a modern RoBERTa tokenizer does not.
    """
    model = DenseEncoder.from_pretrained(model_dir)
    tokenizer_files = read_tokenizer_files(tokenizer_dir or model_dir)
    if not tokenizer_files:
        raise InputError("no tokenizer files (tokenizer.json, vocab.json + merges.txt, vocab.txt…): pass "
                         "--tokenizer_dir the folder of the model's tokenizer", path=tokenizer_dir or model_dir)
    with atomic_directory(output_dir) as tmp:
        for name, content in sorted(tokenizer_files.items()):
            (tmp / name).write_bytes(content)
        write_backbone(model, tmp)  # its config.json names the tokenizer's model type (roberta-base's files don't)
        lower_case = Faithful28Tokenizer(load_tokenizer(tmp)).lower_case
        _write_json(tmp / "sentence_bert_config.json", {"max_seq_length": max_seq_length,
                                                        "do_lower_case": lower_case})
        _write_json(tmp / "config_sentence_transformers.json",
                    {"similarity_fn_name": "cosine" if model.normalize else "dot"})
        modules = [("", "Transformer"), ("1_Pooling", "Pooling")]
        _write_json(tmp / "1_Pooling" / "config.json", pooling_config(model, model.config.hidden_size))
        if model.head:
            head = model.embeddingHead
            modules += [("2_Dense", "Dense"), ("3_LayerNorm", "LayerNorm")]
            _write_json(tmp / "2_Dense" / "config.json",
                        {"in_features": head.in_features, "out_features": head.out_features, "bias": True,
                         "activation_function": "torch.nn.modules.linear.Identity"})
            _write_weights(tmp / "2_Dense" / "model.safetensors",
                           {"linear.weight": head.weight, "linear.bias": head.bias})
            _write_json(tmp / "3_LayerNorm" / "config.json", {"dimension": model.output_dim})
            _write_weights(tmp / "3_LayerNorm" / "model.safetensors",
                           {"norm.weight": model.norm.weight, "norm.bias": model.norm.bias})
        if model.normalize:
            modules.append((f"{len(modules)}_Normalize", "Normalize"))
            (tmp / modules[-1][0]).mkdir()
        _write_json(tmp / "modules.json", [{"idx": i, "name": str(i), "path": path, "type": ST_MODULES + kind}
                                           for i, (path, kind) in enumerate(modules)])
    return output_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export_sentence_transformers",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="the encoder folder (config.json + model.safetensors)")
    parser.add_argument("--output_dir", required=True, help="the sentence-transformers folder to write")
    parser.add_argument("--tokenizer_dir", help="tokenizer folder, when the model folder carries no tokenizer")
    parser.add_argument("--max_seq_length", type=ct.token_length, default=512,
                        help="the Transformer module's max_seq_length (tokens, cls and sep included)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    return parser


def main(argv: Optional[list[str]] = None) -> Path:
    args = build_parser().parse_args(argv)
    configure_logging()
    refuse_existing(args.output_dir, args.overwrite)
    tokenizer_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else None
    return export(Path(args.model_dir), Path(args.output_dir), args.max_seq_length, tokenizer_dir)


if __name__ == "__main__":
    run_cli(main)
