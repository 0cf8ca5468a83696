"""dataset.py: token memmaps, truncation, qrel/rank/hard-negative loading, samplers, collators and masks."""
import json
import pickle

import numpy as np
import pytest
import torch

from dataset import (HardNegatives, QueryCollator, SequenceCollator, SequenceDataset, TokenIdsCache, TrainCollator,
                     TrainInbatchDataset, TrainInbatchWithHardDataset, TrainInbatchWithRandDataset,
                     TrainQueryDataset, load_hardneg, load_rank, load_rel, load_rel_graded, pack_tensor_2D,
                     truncate_keep_end)
from helpers import write_token_rows
from infra.io import InputError

CLS, SEP = 0, 2


def make_seqs(rng, n, min_len, max_len, vocab=50):
    return [[CLS] + rng.integers(5, vocab, size=int(rng.integers(min_len, max_len + 1)) - 2).tolist() + [SEP]
            for _ in range(n)]


@pytest.fixture
def corpus(tmp_path):
    """20 docs (3..16 tokens, stored width 16) and 6 queries (3..8 tokens, width 8)."""
    rng = np.random.default_rng(0)
    docs, queries = make_seqs(rng, 20, 3, 16), make_seqs(rng, 6, 3, 8)
    write_token_rows(tmp_path, "passages", docs, 16)
    write_token_rows(tmp_path, "train-query", queries, 8)
    return tmp_path, docs, queries


# ----------------------------------------------------------------------------------------------- token cache

def test_cache_reads_back_rows_and_stays_memmap(corpus):
    folder, docs, _ = corpus
    cache = TokenIdsCache(folder, "passages")
    assert len(cache) == 20 and cache.max_length == 16
    assert isinstance(cache.ids, np.memmap) and cache.ids.mode == "r"
    assert cache.lengths.tolist() == [len(d) for d in docs]
    for i, d in enumerate(docs):
        row = cache[i]
        assert row.dtype == np.int32 and not isinstance(row, np.memmap)
        assert row.tolist() == d
    assert cache[-1].tolist() == docs[-1]
    with pytest.raises(IndexError):
        cache[20]


def test_cache_pickles_without_copying_the_matrix(tmp_path):
    seqs = make_seqs(np.random.default_rng(1), 400, 3, 64)
    write_token_rows(tmp_path, "passages", seqs, 64)
    cache = TokenIdsCache(tmp_path, "passages")
    blob = pickle.dumps(cache)
    assert len(blob) < cache.ids.nbytes / 10  # 100 KiB of tokens are re-opened, not copied
    clone = pickle.loads(blob)
    assert isinstance(clone.ids, np.memmap)
    assert clone[7].tolist() == seqs[7]


def test_cache_size_mismatch_names_the_file(corpus):
    folder, _, _ = corpus
    path = folder / "passages.memmap"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(InputError) as e:
        TokenIdsCache(folder, "passages")
    assert "passages.memmap" in str(e.value) and e.value.path == str(path)


@pytest.mark.parametrize("missing", ["passages_meta", "passages.memmap", "passages_length.npy"])
def test_cache_missing_file(corpus, missing):
    folder, _, _ = corpus
    (folder / missing).unlink()
    with pytest.raises(InputError, match=missing.replace(".", r"\.")):
        TokenIdsCache(folder, "passages")


def test_cache_lengths_beyond_width_rejected(corpus):
    folder, _, _ = corpus
    np.save(folder / "passages_length.npy", np.full(20, 17, dtype=np.int32))
    with pytest.raises(InputError, match="lengths"):
        TokenIdsCache(folder, "passages")


def test_cache_falls_back_to_memmap_subfolder(tmp_path):
    write_token_rows(tmp_path / "memmap", "dev-query", [[CLS, 7, SEP]], 4)
    assert TokenIdsCache(tmp_path, "dev-query")[0].tolist() == [CLS, 7, SEP]


# ------------------------------------------------------------------------------------ truncation / sequences

def test_truncate_keep_end():
    ids = np.array([0, 11, 12, 13, 2])
    assert truncate_keep_end(ids, 6).tolist() == ids.tolist()
    assert truncate_keep_end(ids, 5).tolist() == ids.tolist()
    assert truncate_keep_end(ids, 4).tolist() == [0, 11, 12, 2]
    assert truncate_keep_end(ids, 1).tolist() == [2]


def test_sequence_dataset_truncates_at_batch_time(tmp_path):
    seqs = [[CLS, 5, SEP], [CLS, 5, 6, 7, SEP], [CLS, 5, 6, 7, 8, 9, SEP]]  # shorter, equal, longer than 5
    write_token_rows(tmp_path, "passages", seqs, 8)
    ds = SequenceDataset(TokenIdsCache(tmp_path, "passages"), max_seq_length=5)
    assert [ds[i]["input_ids"] for i in range(3)] == [[CLS, 5, SEP], [CLS, 5, 6, 7, SEP], [CLS, 5, 6, 7, SEP]]
    assert [ds[i]["id"] for i in range(3)] == [0, 1, 2]
    assert ds.lengths.tolist() == [3, 5, 5]
    sub = SequenceDataset(TokenIdsCache(tmp_path, "passages"), 4, offsets=[2, 0])
    assert len(sub) == 2 and sub[0] == {"input_ids": [CLS, 5, 6, SEP], "id": 2} and sub[1]["id"] == 0
    with pytest.raises(InputError, match="offset out of range"):
        SequenceDataset(TokenIdsCache(tmp_path, "passages"), 4, offsets=[3])


# ---------------------------------------------------------------------------------------------- collation

def test_pack_tensor_2D():
    t = pack_tensor_2D([[1, 2, 3], [4]], default=-1, dtype=torch.int64)
    assert t.dtype == torch.int64 and t.tolist() == [[1, 2, 3], [4, -1, -1]]
    assert pack_tensor_2D([[1], []], 0, torch.float32, length=3).tolist() == [[1, 0, 0], [0, 0, 0]]
    with pytest.raises(ValueError):
        pack_tensor_2D([[1, 2, 3]], 0, torch.int64, length=2)


def test_sequence_collator_full_padding_then_batch_max():
    collate = SequenceCollator(max_len=9, pad_token_id=1)
    batch = [{"input_ids": [0, 5, 6, 2], "id": 3}, {"input_ids": [0, 7, 2], "id": 8}]
    for n in range(11):
        tensors, ids = collate(batch)
        assert ids == [3, 8]
        width = tensors["input_ids"].shape[1]
        assert width == (9 if n < 10 else 4), n
    assert tensors["input_ids"].tolist() == [[0, 5, 6, 2], [0, 7, 2, 1]]
    assert tensors["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    first = SequenceCollator(max_len=6)(batch)[0]
    assert first["input_ids"][1].tolist() == [0, 7, 2, 1, 1, 1]
    assert first["attention_mask"].sum(1).tolist() == [4, 3]
    always = SequenceCollator(max_len=6, padding=True, full_pad_batches=0)
    assert all(always(batch)[0]["input_ids"].shape == (2, 6) for _ in range(3))


# ------------------------------------------------------------------------------------ qrels / rank / hardneg

def test_load_rel_counts_every_line_and_graded_keeps_grade(tmp_path):
    path = tmp_path / "test-qrel.tsv"
    path.write_text("3\t0\t10\t2\n3\t0\t11\t0\n\n5 0 12 1\r\n")
    assert load_rel(path) == {3: [10, 11], 5: [12]}
    assert load_rel_graded(path) == {3: {10: 2, 11: 0}, 5: {12: 1}}


@pytest.mark.parametrize("line, fragment", [("3\t0\t10", "4 whitespace-separated columns"),
                                            ("3\t0\tx10\t1", "passage offset is not an integer"),
                                            ("q3\t0\t10\t1", "query offset is not an integer")])
def test_load_rel_bad_line(tmp_path, line, fragment):
    path = tmp_path / "train-qrel.tsv"
    path.write_text("1\t0\t2\t1\n" + line + "\n")
    with pytest.raises(InputError, match=fragment) as e:
        load_rel(path)
    assert e.value.line == 2 and str(path) in str(e.value)


def test_load_rank_file_order_and_errors(tmp_path):
    path = tmp_path / "dev.rank.tsv"
    path.write_text("4\t9\t1\n4\t2\t2\n1\t7\t1\n")
    assert load_rank(path) == {4: [9, 2], 1: [7]}
    path.write_text("4\t9\t1\t0.5\n4\t2\t2\t-1\n1\t7\t1\t3.5\n")
    assert load_rank(path) == {4: [9, 2], 1: [7]}
    path.write_text("4\t9\t1\n4\t2\t2\n1\t7\t1\t3.5\n")  # one rule for every run file: no mixed formats
    with pytest.raises(InputError, match="expected 3 fields like the first line") as e:
        load_rank(path)
    assert e.value.line == 3
    path.write_text("4\t9\t1\n4\t2\n")
    with pytest.raises(InputError, match="expected 3 fields like the first line") as e:
        load_rank(path)
    assert e.value.line == 2
    path.write_text("4 Q0 9 1 2.5 run\n")
    with pytest.raises(InputError, match="found a TREC run") as e:
        load_rank(path)
    assert e.value.line == 1
    path.write_text("4\t9\t0\n")
    with pytest.raises(InputError, match="rank"):
        load_rank(path)
    path.write_text("4\t9\tfirst\n")
    with pytest.raises(InputError, match="rank is not an integer"):
        load_rank(path)
    path.write_text("4\t9\t1\tbig\n")
    with pytest.raises(InputError, match="score"):
        load_rank(path)


def write_hardneg(folder, table):
    """Write the same table as hard.npy + hard_qids.npy and as the original hard.json."""
    np.save(folder / "hard.npy", np.array(list(table.values()), dtype=np.int32))
    np.save(folder / "hard_qids.npy", np.array(list(table), dtype=np.int64))
    (folder / "hard.json").write_text(json.dumps({str(q): v for q, v in table.items()}))


def test_load_hardneg_npy_and_json_agree(tmp_path):
    table = {4: [9, 3, 7], 0: [1, 2, 5], 2: [8, 6, 4]}
    write_hardneg(tmp_path, table)
    q1, n1 = load_hardneg(tmp_path / "hard.npy")
    q2, n2 = load_hardneg(tmp_path / "hard.json")
    assert q1.dtype == q2.dtype == np.int64 and n1.dtype == n2.dtype == np.int32
    assert q1.tolist() == q2.tolist() == [4, 0, 2]
    assert np.array_equal(n1, n2) and n1.tolist() == list(table.values())
    hn = HardNegatives.load(tmp_path / "hard.json")
    assert hn.k == 3 and len(hn) == 3 and 2 in hn and 1 not in hn
    assert hn[2].tolist() == [8, 6, 4]


def test_load_hardneg_errors(tmp_path):
    (tmp_path / "hard.json").write_text(json.dumps({"1": [3, 4], "2": [5]}))
    with pytest.raises(InputError, match="same number of negatives"):
        load_hardneg(tmp_path / "hard.json")
    (tmp_path / "hard.json").write_text(json.dumps({"x": [3, 4]}))
    with pytest.raises(InputError, match="query offset is not an integer"):
        load_hardneg(tmp_path / "hard.json")
    (tmp_path / "hard.json").write_text(json.dumps({"1": [3, 4.5]}))
    with pytest.raises(InputError, match="integers"):
        load_hardneg(tmp_path / "hard.json")
    np.save(tmp_path / "hard.npy", np.zeros((2, 3), dtype=np.int32))
    with pytest.raises(InputError, match="hard_qids.npy"):
        load_hardneg(tmp_path / "hard.npy")
    np.save(tmp_path / "hard_qids.npy", np.array([1, 1]))
    with pytest.raises(InputError, match="more than once"):
        load_hardneg(tmp_path / "hard.npy")


# ------------------------------------------------------------------------------------- training datasets

REL = {0: [1, 2, 3], 1: [4], 2: [5, 6], 4: [4], 5: [7]}  # query 3 has no qrels; 1 and 4 share positive 4


def caches(folder):
    return TokenIdsCache(folder, "train-query"), TokenIdsCache(folder, "passages")


def hard_table(k=6):
    """k negatives for each training query, never one of its positives."""
    return {q: [d for d in range(19, -1, -1) if d not in REL[q]][:k] for q in sorted(REL)}


def test_inbatch_items(corpus):
    folder, docs, queries = corpus
    qc, dc = caches(folder)
    ds = TrainInbatchDataset(REL, qc, dc, max_query_length=5, max_doc_length=6)
    assert len(ds) == 5 and [ds[i]["qid"] for i in range(5)] == [0, 1, 2, 4, 5]
    for i in range(5):
        item = ds[i]
        assert item["pos_id"] in REL[item["qid"]]
        assert item["query_ids"] == truncate_keep_end(queries[item["qid"]], 5).tolist()
        assert item["doc_ids"] == truncate_keep_end(docs[item["pos_id"]], 6).tolist()
        assert item["extra_ids"] == [] and item["extra_doc_ids"] == []
    drawn = set()
    for epoch in range(40):
        ds.set_epoch(epoch)
        drawn.add(ds[0]["pos_id"])
    assert drawn == {1, 2, 3}  # the positive is re-drawn each epoch, uniformly over all positives


def test_hard_sampling_without_replacement_and_deterministic(corpus):
    folder, docs, _ = corpus
    table = hard_table(k=6)
    qc, dc = caches(folder)
    hardneg = (np.array(list(table)), np.array(list(table.values())))
    ds = TrainInbatchWithHardDataset(REL, qc, dc, 5, 6, seed=7, hardneg=hardneg, hard_num=4)
    twin = TrainInbatchWithHardDataset(REL, qc, dc, 5, 6, seed=7, hardneg=HardNegatives(*hardneg), hard_num=4)
    full = TrainInbatchWithHardDataset(REL, qc, dc, 5, 6, seed=7, hardneg=hardneg, hard_num=6)
    for i in range(len(ds)):
        item = ds[i]
        assert len(item["extra_ids"]) == 4 == len(set(item["extra_ids"]))
        assert set(item["extra_ids"]) <= set(table[item["qid"]])
        assert item["extra_doc_ids"] == [truncate_keep_end(docs[e], 6).tolist() for e in item["extra_ids"]]
        assert sorted(full[i]["extra_ids"]) == sorted(table[item["qid"]])
    samples = [[twin[i]["extra_ids"] for i in range(5)]]
    assert samples[0] == [ds[i]["extra_ids"] for i in range(5)]  # same (seed, epoch, index) → same sample
    for epoch in (1, 2):
        twin.set_epoch(epoch)
        samples.append([twin[i]["extra_ids"] for i in range(5)])
    ds.set_epoch(2)
    assert [ds[i] for i in range(5)] == [twin[i] for i in range(5)]
    assert samples[0] != samples[1] and samples[1] != samples[2]
    other_seed = TrainInbatchWithHardDataset(REL, qc, dc, 5, 6, seed=8, hardneg=hardneg, hard_num=4)
    assert [other_seed[i]["extra_ids"] for i in range(5)] != samples[0]


def test_hard_missing_query_row_is_a_clear_error(corpus):
    folder, _, _ = corpus
    table = hard_table()
    del table[2]
    qc, dc = caches(folder)
    with pytest.raises(InputError, match=r"query offset 2.*--mode train"):
        TrainInbatchWithHardDataset(REL, qc, dc, 5, 6, hardneg=(np.array(list(table)),
                                                                np.array(list(table.values()))))
    with pytest.raises(InputError, match="hard_num"):
        TrainInbatchWithHardDataset(REL, qc, dc, 5, 6, hardneg=(np.array([0]), np.array([[3]])), hard_num=2)


def test_rand_dataset(corpus):
    folder, _, _ = corpus
    qc, dc = caches(folder)
    ds = TrainInbatchWithRandDataset(REL, qc, dc, 5, 6, seed=1, rand_num=7)
    items = [ds[i] for i in range(len(ds))]
    ids = [e for it in items for e in it["extra_ids"]]
    assert all(len(it["extra_ids"]) == 7 for it in items) and all(0 <= e < 20 for e in ids)
    assert len(set(ids)) > 7
    assert [ds[i] for i in range(len(ds))] == items
    ds.set_epoch(1)
    assert [ds[i]["extra_ids"] for i in range(len(ds))] != [it["extra_ids"] for it in items]


def test_offsets_beyond_corpus_rejected(corpus):
    folder, _, _ = corpus
    qc, dc = caches(folder)
    with pytest.raises(InputError, match="positive passage offset"):
        TrainInbatchDataset({0: [25]}, qc, dc, 5, 6)
    with pytest.raises(InputError, match="query offset"):
        TrainInbatchDataset({9: [1]}, qc, dc, 5, 6)


# ----------------------------------------------------------------------------------- collator and masks

def reference_mask(qids, docs, rel):
    return [[0.0 if d in rel.get(q, []) else 1.0 for d in docs] for q in qids]


def item(qid, pos, extras=()):
    return {"qid": qid, "query_ids": [0, 10 + qid, 2], "pos_id": pos, "doc_ids": [0, 30 + pos, 31, 2],
            "extra_ids": list(extras), "extra_doc_ids": [[0, 50 + e, 2] for e in extras]}


def test_train_collator_masks_duplicate_positives_and_relevant_extras():
    # queries 1 and 4 share positive 4; query 0's extra doc 5 is a positive of query 2 and
    # query 2's extra doc 1 is a positive of query 0.
    batch = [item(0, 1, [5]), item(1, 4, [9]), item(2, 6, [1]), item(4, 4, [12])]
    out = TrainCollator(6, 8, REL)(batch)
    assert out["rel_pair_mask"].dtype == torch.float32
    assert out["rel_pair_mask"].tolist() == reference_mask([0, 1, 2, 4], [1, 4, 6, 4], REL)
    assert out["rel_pair_mask"].diagonal().tolist() == [0, 0, 0, 0]
    assert out["rel_pair_mask"][1, 3] == 0 and out["rel_pair_mask"][3, 1] == 0
    assert out["other_pair_mask"].shape == (4, 4)
    assert out["other_pair_mask"].tolist() == reference_mask([0, 1, 2, 4], [5, 9, 1, 12], REL)
    assert out["other_pair_mask"][2, 0] == 0 and out["other_pair_mask"][0, 2] == 0
    assert out["other_pair_mask"].sum() == 14
    assert out["other_doc_input_ids"][:, 1].tolist() == [55, 59, 51, 62]  # flattened in item order
    assert out["qids"] == [0, 1, 2, 4] and out["pos_ids"] == [1, 4, 6, 4] and out["other_ids"] == [5, 9, 1, 12]


def test_train_collator_without_extras_and_padding_rule():
    collate = TrainCollator(6, 8, REL, pad_token_id=1)
    batch = [item(0, 2), item(5, 7)]
    for n in range(11):
        out = collate(batch)
        assert "other_doc_input_ids" not in out and "other_pair_mask" not in out
        full = n < 10
        assert out["query_input_ids"].shape == (2, 6 if full else 3)
        assert out["doc_input_ids"].shape == (2, 8 if full else 4)
    assert out["rel_pair_mask"].tolist() == [[0, 1], [1, 0]]
    extras = TrainCollator(6, 8, REL)([item(0, 2, [8, 9]), item(5, 7, [10, 11])])
    assert extras["other_doc_input_ids"].shape == (4, 8)  # first batch: full doc width
    assert extras["other_doc_attention_mask"].sum(1).tolist() == [3, 3, 3, 3]
    assert extras["other_doc_input_ids"][0, 3:].tolist() == [1] * 5
    assert extras["other_pair_mask"].shape == (2, 4)


def test_dataset_to_collator_end_to_end(corpus):
    folder, _, _ = corpus
    qc, dc = caches(folder)
    table = hard_table(k=3)
    ds = TrainInbatchWithHardDataset(REL, qc, dc, 5, 6, hardneg=(np.array(list(table)),
                                                                 np.array(list(table.values()))))
    loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=TrainCollator(5, 6, REL))
    out = next(iter(loader))
    assert out["query_input_ids"].shape == (5, 5) and out["doc_input_ids"].shape == (5, 6)
    assert out["other_doc_input_ids"].shape == (5, 6) and out["other_pair_mask"].shape == (5, 5)
    assert out["rel_pair_mask"].tolist() == reference_mask(out["qids"], out["pos_ids"], REL)
    assert out["other_pair_mask"].tolist() == reference_mask(out["qids"], out["other_ids"], REL)
    assert (out["query_input_ids"][out["query_attention_mask"] == 0] == 1).all()


def test_train_query_dataset_and_query_collator(corpus):
    folder, _, queries = corpus
    qc, _ = caches(folder)
    ds = TrainQueryDataset(REL, qc, max_query_length=4)
    assert [ds[i]["qid"] for i in range(len(ds))] == [0, 1, 2, 4, 5]
    assert ds[2] == {"query_ids": truncate_keep_end(queries[2], 4).tolist(), "qid": 2, "rel_ids": [5, 6]}
    tensors, rels = QueryCollator(4, pad_token_id=1)([ds[0], ds[2]])
    assert rels == [[1, 2, 3], [5, 6]]
    assert tensors["input_ids"].shape == (2, 4)
    assert tensors["attention_mask"].sum(1).tolist() == [len(ds[0]["query_ids"]), len(ds[2]["query_ids"])]


@pytest.mark.parametrize("meta, field", [
    ({"type": "float32", "total_number": 3, "embedding_size": 4}, "integer type"),
    ({"total_number": 3, "embedding_size": 4}, "integer type"),
    ({"type": "int32", "total_number": "3", "embedding_size": 4}, "total_number >= 0"),
    ({"type": "int32", "total_number": -1, "embedding_size": 4}, "total_number >= 0"),
    ({"type": "int32", "total_number": 3, "embedding_size": 0}, "embedding_size >= 1"),
    ({"type": "int32", "total_number": 3}, "embedding_size >= 1"),
])
def test_token_meta_fields_are_checked_and_named(tmp_path, meta, field):
    """preprocess.read_token_meta: the one reader of the {prefix}_meta files (token memmaps, corpus_rows)."""
    write_token_rows(tmp_path, "passages", [[0, 5, 2]] * 3, 4)
    (tmp_path / "passages_meta").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=f"token meta file lacks an? {field}") as e:
        TokenIdsCache(tmp_path, "passages")
    assert e.value.path == str(tmp_path / "passages_meta")


@pytest.mark.parametrize("max_len", [3, 6, 50])
def test_padded_batch_equals_collating_the_items_one_by_one(tmp_path, max_len):
    rng = np.random.default_rng(3)
    rows = [rng.integers(4, 99, int(n)).tolist() + [2] for n in rng.integers(1, 9, 30)]
    write_token_rows(tmp_path, "passages", rows, width=9)
    dataset = SequenceDataset(TokenIdsCache(tmp_path, "passages"), max_len, offsets=[5, 2, 29, 2, 7, 11, 0])
    indices = np.array([3, 0, 6, 1, 4, 2])  # any order, an offset twice
    collator = SequenceCollator(max_len, pad_token_id=1, padding=False, full_pad_batches=0)
    expected, expected_ids = collator([dataset[i] for i in indices])
    batch, ids = dataset.padded_batch(indices, pad_token_id=1)
    assert ids.tolist() == expected_ids
    for key in ("input_ids", "attention_mask"):
        assert batch[key].dtype == expected[key].dtype and torch.equal(batch[key], expected[key])
    assert (batch["input_ids"][:, -1] != 1).any()  # the longest row reaches the last column
