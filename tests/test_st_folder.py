"""A sentence-transformers model folder used as its authors use it (issue #21, part A): lengths default to its
``max_seq_length``, its prompts are prepended before tokenisation and recorded in ``preprocess_meta.json``, and a
later stage whose model folder expects other prompts (refused) or another vocabulary (warned) is told so."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertTokenizer, BertTokenizerFast

import export_sentence_transformers as est
import preprocess
from dataset import TokenIdsCache
from helpers import write_files
from infra.io import InputError
from infra.model_folder import length_or_folder_default, read_folder_settings
from infra.preprocess_meta import META_NAME, check_model_matches, read_preprocess_meta
from model import DenseEncoder

WORDS = ["query", ":", "passage", "the", "cat", "sat", "on", "mat", "dog", "a", "hello", "world", "red", "big"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
PROMPTS = {"query": "query: ", "passage": "passage: "}
ST_LENGTH = 7  # the folder's max_seq_length: short enough to truncate prompt + text
CORPUS = [{"_id": "d1", "title": "", "text": "the cat sat on the mat"},
          {"_id": "d2", "title": "", "text": "Dog"},
          {"_id": "d3", "title": "", "text": "a big red dog sat on a red mat"}]
QUERIES = [{"_id": "q1", "text": "hello world"}, {"_id": "q2", "text": "the big red cat sat on the mat"}]


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def tokenizer_folder(folder: Path) -> Path:
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(str(folder))
    return folder


def st_folder(root: Path, prompts: dict, max_seq_length: int = ST_LENGTH) -> Path:
    """A tiny BERT (mean pooling) exported as a sentence-transformers folder, with ``prompts`` in its
    ``config_sentence_transformers.json``."""
    torch.manual_seed(3)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    source = tokenizer_folder(root / "source")
    DenseEncoder.from_config(config, pooling="mean", head=False).save_pretrained(source)
    folder = est.export(source, root / "st", max_seq_length)
    st_config = folder / "config_sentence_transformers.json"
    st_config.write_text(json.dumps({**json.loads(st_config.read_text()), "prompts": prompts}))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("st")
    beir = write_files(root / "beir", {"corpus.jsonl": jsonl(CORPUS), "queries.jsonl": jsonl(QUERIES),
                                       "qrels/train.tsv": b"query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td3\t1\n"})
    return {"st": st_folder(root, PROMPTS), "plain": tokenizer_folder(root / "plain"), "beir": beir,
            "msmarco": write_files(root / "msmarco", {
                "collection.tsv": "".join(f"{i}\t{d['text']}\n" for i, d in enumerate(CORPUS)).encode(),
                "queries.train.tsv": "".join(f"{i}\t{q['text']}\n" for i, q in enumerate(QUERIES)).encode(),
                "qrels.train.tsv": b"0\t0\t0\t1\n1\t0\t2\t1\n"})}


def run_preprocess(folders: dict, out: Path, tokenizer: str = "st", beir: bool = True, *extra: str) -> Path:
    layout = ["--input_format", "beir", "--data_dir", str(folders["beir"])] if beir else [
        "--data_dir", str(folders["msmarco"])]
    assert preprocess.main([*layout, "--model_name_or_path", str(folders[tokenizer]), "--out_dir", str(out),
                            "--threads", "1", *extra]) == 0
    return out


def rows(folder: Path, prefix: str) -> list[list[int]]:
    cache = TokenIdsCache(folder, prefix)
    return [cache[i].tolist() for i in range(len(cache))]


def direct_ids(folder: Path, texts: list[str], prompt: str, max_length: int) -> list[list[int]]:
    """The folder's own tokenizer on ``prompt + text``, truncated as sentence-transformers does."""
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return tokenizer([prompt + t for t in texts], truncation=True, max_length=max_length).input_ids


@pytest.mark.parametrize("beir", [True, False], ids=["beir", "msmarco"])
def test_prompts_and_length_come_from_the_folder(tmp_path, folders, beir):
    out = run_preprocess(folders, tmp_path / "pre", "st", beir)
    docs = [d["text"] for d in CORPUS]
    if not beir:  # BEIR documents are joined with their (empty) title by beir_input; MS MARCO passages are not
        assert rows(out, "passages") == direct_ids(folders["st"], docs, "passage: ", ST_LENGTH)
    assert rows(out, "train-query") == direct_ids(folders["st"], [q["text"] for q in QUERIES], "query: ", ST_LENGTH)
    assert [TokenIdsCache(out, p).max_length for p in ("passages", "train-query")] == [ST_LENGTH, ST_LENGTH]
    meta = read_preprocess_meta(out)
    assert (meta["query_prefix"], meta["doc_prefix"], meta["prefix_given"]) == ("query: ", "passage: ",
                                                                                 {"query": False, "doc": False})
    assert (meta["max_seq_length"], meta["max_query_length"]) == (ST_LENGTH, ST_LENGTH)
    assert meta["tokenizer"]["name_or_path"] == str(folders["st"]) and meta["tokenizer"]["vocab_size"] == len(VOCAB)


def test_flags_replace_the_prompts_and_lengths(tmp_path, folders):
    prompted = run_preprocess(folders, tmp_path / "prompted", "st", True, "--max_seq_length", "12")
    bare = run_preprocess(folders, tmp_path / "bare", "st", True, "--query_prefix", "", "--doc_prefix", "",
                          "--max_seq_length", "12", "--max_query_length", "9")
    prompt_ids = direct_ids(folders["st"], [""], "passage:", 12)[0][1:-1]
    for with_prompt, without in zip(rows(prompted, "passages"), rows(bare, "passages")):
        assert with_prompt == [without[0], *(prompt_ids + without[1:-1])[:10], without[-1]]
    assert rows(bare, "train-query") == direct_ids(folders["st"], [q["text"] for q in QUERIES], "", 9)
    meta = read_preprocess_meta(bare)
    assert (meta["query_prefix"], meta["doc_prefix"], meta["prefix_given"]) == ("", "", {"query": True, "doc": True})
    assert (meta["max_seq_length"], meta["max_query_length"]) == (12, 9)


def test_a_folder_without_settings_keeps_the_original_defaults(tmp_path, folders):
    out = run_preprocess(folders, tmp_path / "pre", "plain", False)
    meta = read_preprocess_meta(out)
    assert (meta["max_seq_length"], meta["max_query_length"], meta["query_prefix"], meta["doc_prefix"]) == \
        (preprocess.MAX_SEQ_LENGTH, preprocess.MAX_QUERY_LENGTH, "", "")
    assert rows(out, "passages") == direct_ids(folders["plain"], [d["text"] for d in CORPUS], "", 512)
    assert length_or_folder_default(None, folders["plain"], 32, "--max_query_length") == 32
    assert length_or_folder_default(None, folders["st"], 32, "--max_query_length") == ST_LENGTH
    assert length_or_folder_default(5, folders["st"], 32, "--max_query_length") == 5


def test_folder_settings_follow_sentence_transformers(tmp_path):
    def settings(files: dict, sub: str = ""):
        root = write_files(tmp_path / str(len(list(tmp_path.iterdir()))), {
            "modules.json": json.dumps([{"path": sub, "type": "sentence_transformers.models.Transformer"}]).encode(),
            **{k: json.dumps(v).encode() for k, v in files.items()}})
        return read_folder_settings(root / sub)

    got = settings({"config_sentence_transformers.json": {"prompts": {"query": "q: ", "corpus": "c: ",
                                                                      "passage": "p: ", "document": "d: "}}})
    assert (got.query_prompt, got.doc_prompt, got.max_seq_length, got.declares_prompts) == ("q: ", "d: ", None, True)
    got = settings({"config_sentence_transformers.json": {"prompts": {"query": "q: ", "corpus": "c: "}}})
    assert got.doc_prompt == "c: "
    got = settings({"config_sentence_transformers.json": {"prompts": {"query": "q: ", "all": "x: "},
                                                          "default_prompt_name": "all"}})
    assert (got.query_prompt, got.doc_prompt) == ("q: ", "x: ")
    # the older layout: the Transformer in 0_Transformer/ beside its sentence_bert_config.json
    got = settings({"0_Transformer/sentence_bert_config.json": {"max_seq_length": 128},
                    "config_sentence_transformers.json": {"prompts": {"query": "Represent: "}}}, "0_Transformer")
    assert (got.max_seq_length, got.query_prompt, got.doc_prompt) == (128, "Represent: ", "")
    assert not read_folder_settings(tmp_path).declares_prompts  # no modules.json: no prompts declared
    with pytest.raises(InputError, match="default_prompt_name names no prompt"):
        settings({"config_sentence_transformers.json": {"prompts": {}, "default_prompt_name": "query"}})


STAGES = {
    "star.inference": lambda f, pre: ["--data_type", "passage", "--mode", "train", "--model_dir", f,
                                      "--preprocess_dir", pre, "--output_dir", pre.parent / "out", "--no_cuda"],
    "star.prepare_hardneg": lambda f, pre: ["--data_type", "passage", "--model_dir", f, "--preprocess_dir", pre,
                                            "--output_dir", pre.parent / "out", "--no_cuda", "--topk", "1"],
    "star.train": lambda f, pre: ["--init_path", f, "--preprocess_dir", pre, "--output_dir", pre.parent / "out",
                                  "--negative_mode", "inbatch", "--no_cuda"],
    "adore.train": lambda f, pre: ["--init_path", f, "--preprocess_dir", pre, "--model_save_dir", pre.parent / "out",
                                   "--pembed_path", pre / "none.memmap", "--metric_cut", "5", "--no_cuda"],
    "adore.inference": lambda f, pre: ["--model_dir", f, "--preprocess_dir", pre, "--output_dir", pre.parent / "out",
                                       "--mode", "train", "--dmemmap_path", pre / "none.memmap", "--no_cuda"],
}


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_whose_model_expects_other_prompts_is_refused(tmp_path, folders, stage):
    import importlib

    pre = run_preprocess(folders, tmp_path / "pre", "plain", False)   # the same vocabulary, no prompts
    argv = [str(a) for a in STAGES[stage](folders["st"], pre)]
    with pytest.raises(InputError) as refused:
        importlib.import_module(stage).main(argv)
    message = str(refused.value)
    assert message.startswith(str(pre / META_NAME) + ": ") and str(folders["st"]) in message
    assert "prefix ''" in message and "'query: '" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_prompts_set_by_flags_are_only_warned_and_plain_model_folders_are_not_checked(tmp_path, folders, caplog):
    pre = run_preprocess(folders, tmp_path / "pre", "st", False, "--query_prefix", "", "--doc_prefix", "")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_model_matches(pre, folders["st"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all(w.startswith(str(pre / META_NAME)) and "--" in w for w in warnings)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_model_matches(pre, folders["plain"])        # no modules.json: declares no prompts
        check_model_matches(tmp_path, folders["st"])      # no preprocess_meta.json: an older folder
    assert not caplog.records


def test_another_vocabulary_is_warned_and_a_copy_in_other_files_is_not(tmp_path, folders, bert_dir, caplog):
    pre = run_preprocess(folders, tmp_path / "pre", "plain", False)
    fast_copy = tmp_path / "fast-copy"  # tokenizer.json only, no vocab.txt: the same vocabulary
    BertTokenizerFast.from_pretrained(str(folders["plain"])).save_pretrained(str(fast_copy))
    (fast_copy / "vocab.txt").unlink(missing_ok=True)
    assert sorted(p.name for p in fast_copy.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_model_matches(pre, fast_copy)
    assert not caplog.records
    other = tmp_path / "other"
    shutil.copytree(bert_dir, other)
    with caplog.at_level(logging.WARNING):
        check_model_matches(pre, other)
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith(str(pre / META_NAME)) and str(other) in warning and "vocabulary differs" in warning


def test_inference_encodes_at_the_folders_length(tmp_path, folders):
    from adore import inference as adore_inference
    from star import inference

    pre = run_preprocess(folders, tmp_path / "pre", "st", False, "--max_seq_length", "12")
    out = tmp_path / "out"
    inference.main(["--data_type", "passage", "--mode", "train", "--model_dir", str(folders["st"]),
                    "--preprocess_dir", str(pre), "--output_dir", str(out), "--no_cuda", "--topk", "2"])
    manifests = {p: json.loads((out / f"{p}.memmap.manifest.json").read_text()) for p in ("passages", "train-query")}
    assert {p: m["max_length"] for p, m in manifests.items()} == {"passages": ST_LENGTH, "train-query": ST_LENGTH}
    model = DenseEncoder.from_pretrained(folders["st"]).eval()
    ids = [r[:ST_LENGTH - 1] + [r[-1]] if len(r) > ST_LENGTH else r for r in rows(pre, "passages")]
    with torch.no_grad():
        expected = torch.cat([model(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)) for r in ids])
    got = np.memmap(out / "passages.memmap", np.float32, "r").reshape(len(ids), -1)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)

    adore_inference.main(["--model_dir", str(folders["st"]), "--preprocess_dir", str(pre), "--mode", "train",
                          "--dmemmap_path", str(out / "passages.memmap"), "--output_dir", str(tmp_path / "adore"),
                          "--no_cuda", "--topk", "2"])
    manifest = json.loads((tmp_path / "adore" / "train.qembed.memmap.manifest.json").read_text())
    assert manifest["max_length"] == ST_LENGTH


@pytest.mark.parametrize("init, expected", [("st", ST_LENGTH), ("plain", 64)])
def test_adore_train_query_length_defaults_to_the_init_folders(tmp_path, folders, init, expected):
    from adore import train as adore_train

    pre = run_preprocess(folders, tmp_path / "pre", "st", False, "--max_query_length", "100")
    args = adore_train.build_parser().parse_args([
        "--init_path", str(folders[init]), "--preprocess_dir", str(pre), "--pembed_path", str(tmp_path / "none"),
        "--model_save_dir", str(tmp_path / "out"), "--metric_cut", "5", "--no_cuda"])
    adore_train.validate_args(args)
    assert args.max_seq_length == expected
