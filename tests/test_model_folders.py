"""Model folders others can load: trained folders (STAR final + checkpoints, ADORE epochs + checkpoints) carry the
init folder's tokenizer, and export_sentence_transformers writes a sentence-transformers folder whose embeddings
equal DenseEncoder's (compared with the real package when it is installed)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig

import export_sentence_transformers as est
from helpers import (adore_cli_args, assert_one_error, load_weights, make_adore_data, make_star_data, run_cli,
                     star_cli_args)
from model import TOKENIZER_FILES, DenseEncoder

TEXTS = ["hello world", "the cat sat on the mat", "dog", "a cat"]


def give_tokenizer(bert_dir: Path, folder: Path) -> None:
    for name in TOKENIZER_FILES:
        if (bert_dir / name).is_file():
            shutil.copy(bert_dir / name, folder / name)


def assert_same_tokenizer(folder: Path, reference: Path) -> None:
    ids = AutoTokenizer.from_pretrained(str(folder))(TEXTS).input_ids
    assert ids == AutoTokenizer.from_pretrained(str(reference))(TEXTS).input_ids
    for name in TOKENIZER_FILES:
        if (reference / name).is_file():
            assert (folder / name).read_bytes() == (reference / name).read_bytes(), name


def test_star_and_adore_folders_carry_the_init_tokenizer(tmp_path, bert_dir):
    from adore import train as adore_train
    from star import train as star_train

    data = make_star_data(tmp_path / "star")
    give_tokenizer(bert_dir, data["init"])
    out = tmp_path / "star_out"
    star_train.main(star_cli_args(data, out, "star", "--max_steps", "2", "--save_steps", "1"))
    for folder in (out, out / "checkpoint-1", out / "checkpoint-2"):
        assert_same_tokenizer(folder, bert_dir)

    adore = make_adore_data(tmp_path / "adore")
    give_tokenizer(bert_dir, adore.init)
    adore_out = tmp_path / "adore_out"
    adore_train.main(adore_cli_args(adore, adore_out, "--num_train_epochs", "1"))
    epochs = sorted(adore_out.glob("epoch-*"))
    checkpoints = sorted(adore_out.glob("checkpoint-*"))
    assert epochs and checkpoints
    for folder in (epochs[-1], checkpoints[-1]):
        assert_same_tokenizer(folder, bert_dir)


def test_an_init_folder_without_tokenizer_is_logged_and_saves_none(tmp_path, caplog):
    from star import train as star_train

    data = make_star_data(tmp_path)
    with caplog.at_level(logging.INFO):
        star_train.main(star_cli_args(data, tmp_path / "out", "star", "--max_steps", "1"))
    assert sum("holds no tokenizer files" in r.getMessage() for r in caplog.records) == 1
    assert not any((tmp_path / "out" / name).exists() for name in TOKENIZER_FILES)


def tiny_bert_model(folder: Path, bert_dir: Path, pooling: str, head: bool, normalize: bool) -> DenseEncoder:
    """A saved random 2-layer BERT DenseEncoder (vocabulary of ``bert_dir``) carrying that tokenizer."""
    torch.manual_seed(7)
    config = BertConfig(vocab_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, output_embedding_size=24,
                        initializer_range=0.2)
    model = DenseEncoder.from_config(config, pooling=pooling, head=head, normalize=normalize)
    with torch.no_grad():  # a non-trivial LayerNorm affine, so the exported weights are tested
        if head:
            model.norm.weight.uniform_(0.5, 1.5)
            model.norm.bias.uniform_(-0.5, 0.5)
    model.save_pretrained(folder)
    give_tokenizer(bert_dir, folder)
    return DenseEncoder.from_pretrained(folder).eval()


VARIANTS = {"head_cls": ("first", True, False), "mean_normalized": ("mean", False, True)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_writes_the_sentence_transformers_files(tmp_path, bert_dir, variant):
    pooling, head, normalize = VARIANTS[variant]
    model = tiny_bert_model(tmp_path / "model", bert_dir, pooling, head, normalize)
    out = est.main(["--model_dir", str(tmp_path / "model"), "--output_dir", str(tmp_path / "st"),
                    "--max_seq_length", "32"])
    modules = json.loads((out / "modules.json").read_text())
    kinds = [m["type"].rsplit(".", 1)[1] for m in modules]
    assert kinds == ["Transformer", "Pooling"] + ["Dense", "LayerNorm"] * head + ["Normalize"] * normalize
    assert [m["idx"] for m in modules] == list(range(len(modules))) and modules[0]["path"] == ""
    assert json.loads((out / "sentence_bert_config.json").read_text()) == {"max_seq_length": 32,
                                                                          "do_lower_case": True}
    pool = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pool["word_embedding_dimension"] == 32
    assert pool["pooling_mode_cls_token"] == (pooling == "first")
    assert pool["pooling_mode_mean_tokens"] == (pooling == "mean")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert" and not any(k.startswith("dr_") for k in config)
    ours = {k: v for k, v in load_weights(tmp_path / "model").items()}
    backbone = load_file(str(out / "model.safetensors"))
    assert set(backbone) == {k.removeprefix("bert.") for k in ours if k.startswith("bert.")}
    assert all(torch.equal(v, ours["bert." + k]) for k, v in backbone.items())
    assert_same_tokenizer(out, bert_dir)
    if head:
        dense = json.loads((out / "2_Dense" / "config.json").read_text())
        assert dense == {"in_features": 32, "out_features": 24, "bias": True,
                         "activation_function": "torch.nn.modules.linear.Identity"}
        assert json.loads((out / "3_LayerNorm" / "config.json").read_text()) == {"dimension": 24}
        linear, norm = load_file(str(out / "2_Dense" / "model.safetensors")), load_file(
            str(out / "3_LayerNorm" / "model.safetensors"))
        assert torch.equal(linear["linear.weight"], ours["embeddingHead.weight"])
        assert torch.equal(linear["linear.bias"], ours["embeddingHead.bias"])
        assert torch.equal(norm["norm.weight"], ours["norm.weight"]) and torch.equal(norm["norm.bias"],
                                                                                     ours["norm.bias"])
    else:  # without a head, model.py reads the export back (pooling and normalisation from modules.json)
        back = DenseEncoder.from_pretrained(out).eval()
        assert (back.pooling, back.head, back.normalize) == (pooling, head, normalize)
        ids = torch.tensor([[2, 5, 6, 3], [2, 8, 3, 0]])
        mask = (ids != 0).long()
        with torch.no_grad():
            assert torch.allclose(back(ids, mask), model(ids, mask), atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sentence_transformers_embeddings_equal_ours(tmp_path, bert_dir, variant):
    st = pytest.importorskip("sentence_transformers")
    model = tiny_bert_model(tmp_path / "model", bert_dir, *VARIANTS[variant])
    est.main(["--model_dir", str(tmp_path / "model"), "--output_dir", str(tmp_path / "st")])
    loaded = st.SentenceTransformer(str(tmp_path / "st"), device="cpu")
    theirs = torch.as_tensor(loaded.encode(TEXTS, convert_to_numpy=True))
    batch = AutoTokenizer.from_pretrained(str(tmp_path / "model"))(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["attention_mask"])
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() < 1e-5


@pytest.mark.slow
def test_export_refuses_a_model_without_tokenizer_and_explains_its_flags(tmp_path, bert_dir):
    tiny_bert_model(tmp_path / "model", bert_dir, "first", True, False)
    for name in TOKENIZER_FILES:
        (tmp_path / "model" / name).unlink(missing_ok=True)
    result = run_cli(["-m", "export_sentence_transformers", "--model_dir", tmp_path / "model",
                      "--output_dir", tmp_path / "st"])
    assert_one_error(result, "no tokenizer files", "--tokenizer_dir")
    assert not (tmp_path / "st").exists()
    est.main(["--model_dir", str(tmp_path / "model"), "--output_dir", str(tmp_path / "st"),
              "--tokenizer_dir", str(bert_dir)])
    assert_same_tokenizer(tmp_path / "st", bert_dir)
    assert_one_error(run_cli(["-m", "export_sentence_transformers", "--model_dir", tmp_path / "model",
                              "--output_dir", tmp_path / "st"]), "already exists", "--overwrite")
    help_text = run_cli(["-m", "export_sentence_transformers", "--help"]).stdout
    assert all(flag in help_text for flag in ("--model_dir", "--output_dir", "--tokenizer_dir", "--overwrite"))


def test_export_reads_a_tokenizer_folder_whose_files_name_no_tokenizer_class(tmp_path, shared_dir):
    """roberta-base's tokenizer files (vocab.json, merges.txt, a tokenizer_config.json naming no class): the export
    loads them beside the model's config.json, which names the model type."""
    from transformers import RobertaConfig

    config = RobertaConfig(vocab_size=50265, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=40, pad_token_id=1)
    DenseEncoder.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer = shared_dir / "data" / "roberta-base-tokenizer"
    out = est.export(tmp_path / "model", tmp_path / "st", 32, tokenizer_dir=tokenizer)
    assert json.loads((out / "sentence_bert_config.json").read_text())["do_lower_case"]  # as 2.8's preprocessing
    assert AutoTokenizer.from_pretrained(str(out))(TEXTS).input_ids == \
        AutoTokenizer.from_pretrained(str(tokenizer), use_fast=True)(TEXTS).input_ids
