"""The BEIR layout (issue #14 items 1 and 5): ``preprocess.py --input_format beir`` with string ids, its bad inputs,
and the CACM collection end to end (preprocess → star.inference → cvt_back → msmarco_eval) with a tiny model."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
from transformers import RobertaConfig

import cvt_back
import msmarco_eval
import preprocess
from helpers import reference_metrics, run, write_cacm_layouts, write_files
from infra.io import InputError
from infra.preprocess_meta import META_NAME
from model import DenseEncoder
from infra.run_file import load_id_map

DOC_LEN, QUERY_LEN = 96, 32


def jsonl(*records: dict) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


GOOD = {
    "corpus.jsonl": jsonl({"_id": "d-a", "title": "Hello", "text": "the cat"},
                          {"_id": "d-b", "title": "", "text": "dog  "}),
    "queries.jsonl": jsonl({"_id": "q1", "text": "hello"}, {"_id": "q2", "text": "a dog"}),
    "qrels/test.tsv": b"query-id\tcorpus-id\tscore\nq2\td-b\t1\nq1\td-a\t2\n",
}
HEADER = b"query-id\tcorpus-id\tscore\n"


@pytest.fixture
def bert(bert_dir):
    return preprocess.load_tokenizer(bert_dir)


def beir_folder(root: Path, files: dict) -> Path:
    folder = root / "beir"
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    return write_files(folder, files)


def test_beir_writes_string_id_maps_and_offset_qrels(tmp_path, bert):
    out = tmp_path / "out"
    counts = preprocess.preprocess(beir_folder(tmp_path, GOOD), out, preprocess.PASSAGE, bert, max_seq_length=8,
                                   max_query_length=6, input_format="beir")
    assert counts == {"passages": 2, "test": 2}
    assert load_id_map(out / "passages_ids.npy").tolist() == ["d-a", "d-b"]
    assert load_id_map(out / "test-query_ids.npy").tolist() == ["q1", "q2"]    # queries.jsonl order
    assert (out / "test-qrel.tsv").read_text() == "1\t0\t1\t1\n0\t0\t0\t2\n"
    assert not list(out.glob("*.pickle"))
    assert sorted(p.name for p in out.iterdir()) == sorted(preprocess.output_names([("test", True)], pickles=False))


@pytest.mark.parametrize("name, content, message, line, value", [
    ("corpus.jsonl", GOOD["corpus.jsonl"] + jsonl({"_id": "d-a", "title": "", "text": "x"}),
     "duplicate _id (first on line 1)", 3, "d-a"),
    ("queries.jsonl", GOOD["queries.jsonl"] + jsonl({"_id": "q1", "text": "x"}),
     "duplicate _id (first on line 1)", 3, "q1"),
    ("qrels/test.tsv", HEADER + b"q1\td-a\t1\nq1\td-zz\t1\n", "document id is not in corpus.jsonl", 3, "d-zz"),
    ("qrels/test.tsv", HEADER + b"q9\td-a\t1\n", "query id is not in queries.jsonl", 2, "q9"),
    ("corpus.jsonl", GOOD["corpus.jsonl"] + b'{"_id": "d-c", "title": "t", "text": \n', "not a JSON object", 3,
     '{"_id": "d-c", "title": "t", "text": '),
    ("queries.jsonl", jsonl({"_id": "q1"}), "missing field 'text'", 1, '{"_id": "q1"}'),
    ("corpus.jsonl", jsonl({"_id": "d-a", "title": "x"}), "missing field 'text'", 1, '{"_id": "d-a", "title": "x"}'),
    ("corpus.jsonl", jsonl({"_id": 7, "title": "", "text": "x"}), "field '_id' is not a string", 1, 7),
    ("corpus.jsonl", jsonl({"_id": "d a", "title": "", "text": "x"}), "hold no whitespace", 1, "d a"),
    ("qrels/test.tsv", b"q1\td-a\t1\n", "expected the header line", 1, "q1\td-a\t1"),
    ("qrels/test.tsv", HEADER + b"q1\td-a\tyes\n", "score", 2, "yes"),
])
def test_beir_bad_input_names_file_line_value_and_writes_nothing(tmp_path, bert, name, content, message, line,
                                                                  value):
    folder = beir_folder(tmp_path, {**GOOD, name: content})
    out = tmp_path / "out"
    with pytest.raises(InputError, match=re.escape(message)) as info:
        preprocess.preprocess(folder, out, preprocess.PASSAGE, bert, max_seq_length=8, max_query_length=6,
                              input_format="beir")
    assert (info.value.path, info.value.line, info.value.value) == (str(folder / name), line, value)
    assert not out.exists() or not any(out.iterdir())


def test_beir_documents_are_joined_as_beir_encodes_them(tmp_path, bert):
    """(title + " " + text).strip(), the text alone when the title is missing or empty (BEIR, sentence-transformers,
    MTEB): the token rows equal the HF tokenizer's ids of that string, computed here directly."""
    records = [{"_id": "t", "title": " Hello ", "text": "the cat "}, {"_id": "e", "title": "", "text": " dog a "},
               {"_id": "m", "text": "sat on the mat"}, {"_id": "w", "title": "world", "text": ""}]
    files = {**GOOD, "corpus.jsonl": jsonl(*records), "qrels/test.tsv": HEADER + b"q1\tt\t1\n"}
    out = tmp_path / "out"
    preprocess.preprocess(beir_folder(tmp_path, files), out, preprocess.PASSAGE, bert, max_seq_length=16,
                          max_query_length=6, input_format="beir")
    direct = [(r.get("title", "") + " " + r["text"]).strip() for r in records]
    assert direct == ["Hello  the cat", "dog a", "sat on the mat", "world"]
    rows = np.fromfile(out / "passages.memmap", dtype=np.int32).reshape(len(records), 16)
    lengths = np.load(out / "passages_length.npy")
    assert [row[:n].tolist() for row, n in zip(rows, lengths)] == bert(direct)["input_ids"]


def test_beir_without_qrels_is_refused(tmp_path, bert):
    files = {k: v for k, v in GOOD.items() if not k.startswith("qrels")}
    with pytest.raises(InputError, match="no qrels file"):
        preprocess.preprocess(beir_folder(tmp_path, files), tmp_path / "out", preprocess.PASSAGE, bert,
                              input_format="beir")


def test_msmarco_eval_reads_beir_qrels(tmp_path):
    qrels = write_files(tmp_path, {"q.tsv": HEADER + b"q1\tCACM-1\t1\nq1\tCACM-2\t0\nq2\tCACM-3\t2\n"})
    assert msmarco_eval.load_reference(qrels / "q.tsv", "str") == {"q1": {"CACM-1": 1, "CACM-2": 0},
                                                                   "q2": {"CACM-3": 2}}
    (tmp_path / "bad.tsv").write_bytes(HEADER + b"q1 Q0 CACM-1 1\n")
    with pytest.raises(InputError, match=r"expected 3 fields \(qid docid grade\), found 4") as info:
        msmarco_eval.load_reference(tmp_path / "bad.tsv", "str")
    assert info.value.line == 2


# -- CACM end to end ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cacm_end_to_end(tmp_path, shared_dir, one_thread):
    cacm, tokenizer_dir = shared_dir / "data" / "cacm", shared_dir / "data" / "roberta-base-tokenizer"
    splits = write_cacm_layouts(cacm, tmp_path / "beir", tmp_path / "msmarco")
    assert {s: len(q) for s, q in splits.items()} == {"train": 39, "test": 13}
    tokenizer = preprocess.load_tokenizer(tokenizer_dir)
    pre, pre_msmarco = tmp_path / "pre", tmp_path / "pre-msmarco"
    lengths = {"max_seq_length": DOC_LEN, "max_query_length": QUERY_LEN}
    counts = preprocess.preprocess(tmp_path / "beir", pre, preprocess.PASSAGE, tokenizer, input_format="beir",
                                   **lengths)
    assert counts == {"passages": 3204, "train": 39, "test": 13}
    assert preprocess.preprocess(tmp_path / "msmarco", pre_msmarco, preprocess.PASSAGE, tokenizer, **lengths) == counts

    # the BEIR outputs equal the MS MARCO-format preprocessing of the same texts, but for the ids they keep
    for name in preprocess.output_names([("train", True), ("test", True)], pickles=False):
        if not name.endswith("_ids.npy") and name != META_NAME:
            assert (pre / name).read_bytes() == (pre_msmarco / name).read_bytes(), name
    metas = [json.loads((folder / META_NAME).read_text()) for folder in (pre, pre_msmarco)]
    assert [m.pop("input_format") for m in metas] == ["beir", "msmarco"] and metas[0] == metas[1]
    doc_ids = load_id_map(pre / "passages_ids.npy")
    numbers = np.load(pre_msmarco / "passages_ids.npy").tolist()
    assert doc_ids[0] == "CACM-0001" and [int(d[5:]) for d in doc_ids] == numbers
    test_qids = load_id_map(pre / "test-query_ids.npy").tolist()
    assert test_qids == list(splits["test"])

    model = tmp_path / "model"
    config = RobertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           vocab_size=len(tokenizer), max_position_embeddings=DOC_LEN + 2, pad_token_id=1,
                           output_embedding_size=16, initializer_range=0.2)
    DenseEncoder.from_config(config).eval().save_pretrained(model)
    out = tmp_path / "eval"
    run(["-m", "star.inference", "--data_type", "passage", "--mode", "test", "--model_dir", model,
         "--preprocess_dir", pre, "--output_dir", out, "--max_doc_length", DOC_LEN, "--max_query_length", QUERY_LEN,
         "--no_cuda", "--topk", 100, "--with_scores"])

    official = tmp_path / "official"
    for trec in ([], ["--trec"]):
        cvt_back.main(["--input_dir", str(out), "--preprocess_dir", str(pre), "--mode", "test", "--output_dir",
                       str(official), "--dataset", "passage", *trec])
    lines = (official / "test.rank.tsv").read_text().splitlines()
    first = lines[0].split("\t")
    assert len(lines) == 13 * 100 and (first[0], first[2]) == (test_qids[0], "1")
    assert all(line.split("\t")[1].startswith("CACM-") for line in lines)
    assert {line.split()[2] for line in (official / "test.trec").read_text().splitlines()} == \
        {line.split("\t")[1] for line in lines}

    qrels = tmp_path / "beir" / "qrels" / "test.tsv"
    docs = np.fromfile(out / "passages.memmap", np.float32).reshape(3204, -1)
    queries = np.fromfile(out / "test-query.memmap", np.float32).reshape(13, -1)
    for k in (10, 100):
        want = reference_metrics(docs, queries, test_qids, doc_ids, splits["test"], k)
        print("CACM test split, tiny random model:", want)
        for run_path in (official / "test.rank.tsv", official / "test.trec"):
            got = msmarco_eval.evaluate_files(qrels, run_path, tuple(want), ids="str")
            assert {name: got[name] for name in want} == pytest.approx(want, abs=1e-9), run_path
    assert want["nDCG@100"] > 0 and want["MRR@100"] > 0   # the comparison is not of zeros
