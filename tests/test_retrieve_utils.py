"""retrieve_utils and the modules it re-exports: exact search (in RAM, streamed, GPU when present) against a
brute-force numpy reference, rank files, embedding-memmap validation, the resumable length-sorted encoder, and
the torch-free imports of the search and embedding-file modules."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

from infra import exact_search as search_module
from infra.corpus_encoding import EncodingSettings, encode_to_memmap
from infra.embedding_memmap import manifest_path, open_embeddings
from infra.exact_search import (FlatIPIndex, exact_search, faiss_gpu_count, memory_budget_bytes, resolve_faiss_gpus,
                                streamed_search, write_rank_file)
from dataset import SequenceDataset, TokenIdsCache
from helpers import brute_force, encode_one_by_one, tiny_encoder, write_token_memmap
from infra.io import InputError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class CountingModel(torch.nn.Module):
    """Wraps an encoder: records batch shapes and raises on forward call number ``fail_at`` (1-based)."""

    def __init__(self, inner: torch.nn.Module, fail_at: int = 0):
        super().__init__()
        self.inner, self.fail_at, self.calls, self.shapes = inner, fail_at, 0, []
        self.train(inner.training)

    @property
    def output_dim(self) -> int:
        return self.inner.output_dim

    def forward(self, input_ids, attention_mask):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated kill")
        self.shapes.append((tuple(input_ids.shape), attention_mask.sum(1).tolist()))
        return self.inner(input_ids, attention_mask)


# ---------------------------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------------------------

def tie_heavy_data(n: int, nq: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Small-integer vectors with many duplicates: every dot product is exact in float32 and ties abound."""
    rng = np.random.default_rng(seed)
    docs = rng.integers(-1, 2, size=(n, 6)).astype(np.float32)
    docs[rng.integers(0, n, size=n // 3)] = docs[0]  # duplicates of one vector spread over the ids
    return docs, rng.integers(-1, 2, size=(nq, 6)).astype(np.float32)


@pytest.mark.parametrize("k", [1, 5, 40, 97, 110])
def test_search_paths_equal_brute_force_with_ties(tmp_path, k):
    docs, queries = tie_heavy_data(97, 45, seed=k)
    path = tmp_path / "docs.memmap"
    docs.tofile(path)
    on_disk = np.memmap(path, dtype=np.float32, mode="r", shape=docs.shape)
    ref_scores, ref_ids = brute_force(docs, queries, k)
    kk = min(k, len(docs))
    results = {"in RAM": FlatIPIndex(docs).search(queries, k, batch_size=16),
               "index over a memmap": FlatIPIndex(on_disk).search(queries, k, desc=None),
               "exact_search": exact_search(on_disk, queries, k)}
    for block_rows in (1, 10, 33, 97, 500):
        results[f"streamed {block_rows}"] = streamed_search(on_disk, queries, k, block_rows=block_rows,
                                                               batch_size=16)
    results["streamed in-RAM array"] = streamed_search(docs, queries, k, block_rows=20)
    for name, (scores, ids) in results.items():
        assert scores.shape == ids.shape == (len(queries), kk), name  # k > N: the N rows, never padded
        assert scores.dtype == np.float32 and ids.dtype == np.int64, name
        np.testing.assert_array_equal(ids, ref_ids, err_msg=name)
        np.testing.assert_array_equal(scores, ref_scores, err_msg=name)


def test_ties_beyond_the_search_margin_keep_the_lowest_ids():
    """200 identical vectors: far more ties at the k-th place than the extra results asked from faiss."""
    docs = np.ones((200, 4), np.float32)
    docs[150] = 2.0  # one clear winner among the ties
    queries = np.ones((25, 4), np.float32)
    expected = np.array([150, *range(9)])
    for scores, ids in (FlatIPIndex(docs).search(queries, 10),
                        streamed_search(docs, queries, 10, block_rows=64)):
        assert (ids == expected).all()
        assert (scores[:, 0] == 8).all() and (scores[:, 1:] == 4).all()


def test_real_valued_search_matches_numpy(tmp_path):
    rng = np.random.default_rng(3)
    docs = rng.standard_normal((3000, 24)).astype(np.float32)
    queries = rng.standard_normal((70, 24)).astype(np.float32)
    ref_scores, ref_ids = brute_force(docs, queries, 50)
    for scores, ids in (FlatIPIndex(docs).search(queries, 50),
                        streamed_search(docs, queries, 50, block_rows=700)):
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_exact_search_streams_when_over_budget(tmp_path, monkeypatch):
    docs, queries = tie_heavy_data(300, 8, seed=1)
    path = tmp_path / "docs.memmap"
    docs.tofile(path)
    on_disk = np.memmap(path, dtype=np.float32, mode="r", shape=docs.shape)
    calls = []
    real = search_module.streamed_search
    monkeypatch.setattr(search_module, "streamed_search", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    tiny_budget_gb = 2000 / (1 << 30)  # 2,000 bytes < 300 x 6 x 4: streamed, blocks of 1,000 bytes
    streamed = exact_search(on_disk, queries, 7, mem_gb=tiny_budget_gb)
    assert len(calls) == 1
    in_ram = exact_search(on_disk, queries, 7, mem_gb=1.0)
    assert len(calls) == 1
    for scores, ids in (streamed, in_ram):
        np.testing.assert_array_equal(ids, brute_force(docs, queries, 7)[1])


def test_search_input_errors():
    docs = np.zeros((5, 4), np.float32)
    with pytest.raises(InputError, match="dim 3"):
        FlatIPIndex(docs).search(np.zeros((2, 3), np.float32), 2)
    with pytest.raises(InputError, match="empty"):
        streamed_search(np.zeros((0, 4), np.float32), np.zeros((2, 4), np.float32), 2)
    with pytest.raises(InputError, match="budget"):
        memory_budget_bytes(0)


@pytest.mark.skipif(faiss_gpu_count() > 0, reason="checks the fallback of a faiss build without GPUs")
def test_gpu_request_without_faiss_gpus_falls_back_to_cpu(caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_faiss_gpus([0, 1]) == []
    assert "searching on CPU" in caplog.text
    assert resolve_faiss_gpus(None) == []


class CappedIndex:
    """Stands in for a faiss GPU index: the same results, and k above GPU_MAX_K refused as faiss-GPU refuses it."""

    def __init__(self, index):
        self.index, self.ks = index, []

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k > search_module.GPU_MAX_K:
            raise RuntimeError(f"k = {k} > {search_module.GPU_MAX_K}: not supported on the GPU")
        self.ks.append(k)
        return self.index.search(x, k)


def test_topk_above_the_faiss_gpu_limit_is_searched_on_the_cpu(monkeypatch, caplog):
    """#12: faiss-GPU flat search caps k at 2048; a larger --topk must give the exact result, not a crash."""
    indexes = []
    monkeypatch.setattr(search_module, "resolve_faiss_gpus", lambda gpus: list(gpus or []))
    monkeypatch.setattr(search_module.FlatIPIndex, "_to_gpu",
                        lambda self, cpu_index: indexes.append(CappedIndex(cpu_index)) or indexes[-1])
    rng = np.random.default_rng(5)
    docs = rng.standard_normal((3000, 8)).astype(np.float32)
    queries = rng.standard_normal((4, 8)).astype(np.float32)
    for k in (50, 2100):
        indexes.clear()
        with caplog.at_level(logging.WARNING, logger="infra.exact_search"):
            scores, ids = exact_search(docs, queries, k, gpus=[0], desc=None)
        ref_scores, ref_ids = brute_force(docs, queries, k)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
        assert bool(indexes) == (k <= search_module.GPU_MAX_K)   # the (stand-in) GPU index only within its limit
    assert "the top 2100 are searched on the CPU" in caplog.text
    with pytest.raises(InputError, match="at most 2048 results per query on a GPU"):
        FlatIPIndex(docs, [0]).search(queries, 2100, desc=None)


@pytest.mark.skipif(faiss_gpu_count() == 0, reason="faiss has no GPU support here")
def test_gpu_single_and_sharded_match_cpu():
    docs, queries = tie_heavy_data(5000, 300, seed=7)
    ref_scores, ref_ids = brute_force(docs, queries, 100)
    layouts = [[0]] + ([[0, 1]] if faiss_gpu_count() > 1 else [])
    for gpus in layouts:
        scores, ids = FlatIPIndex(docs, gpus).search(queries, 100, desc=None)
        np.testing.assert_array_equal(ids, ref_ids, err_msg=str(gpus))
        np.testing.assert_array_equal(scores, ref_scores, err_msg=str(gpus))
    with pytest.raises(InputError):
        resolve_faiss_gpus([faiss_gpu_count()])


@pytest.mark.parametrize("module", ["infra.exact_search", "infra.embedding_memmap"])
def test_search_and_embedding_file_modules_do_not_import_torch(module, repo_dir):
    code = f"import {module}, sys; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=repo_dir, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------------------------------
# Rank files and embedding validation
# ---------------------------------------------------------------------------------------------------------------

def test_write_rank_file_skips_padding_and_round_trips_scores(tmp_path):
    ids = np.array([[4, 0, 2], [1, -1, -1]], np.int64)
    scores = np.array([[3.25, 1e-7, -2.5], [0.1, -np.inf, -np.inf]], np.float32)
    path = tmp_path / "run" / "dev.rank.tsv"
    assert write_rank_file(path, [7, 9], ids) == 4
    assert path.read_text() == "7\t4\t1\n7\t0\t2\n7\t2\t3\n9\t1\t1\n"
    assert write_rank_file(path, [7, 9], ids, scores) == 4
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    assert [r[:3] for r in rows] == [["7", "4", "1"], ["7", "0", "2"], ["7", "2", "3"], ["9", "1", "1"]]
    np.testing.assert_array_equal(np.array([r[3] for r in rows], dtype=np.float32), scores[ids >= 0])
    assert sorted(p.name for p in path.parent.iterdir()) == ["dev.rank.tsv"]  # no temporary left


def test_open_embeddings_validates_size_dim_and_values(tmp_path):
    path = tmp_path / "p.memmap"
    data = np.arange(24, dtype=np.float32).reshape(6, 4)
    data.tofile(path)
    assert open_embeddings(path, dim=4).shape == (6, 4)
    assert open_embeddings(path, dim=8, check_finite=True).shape == (3, 8)
    with pytest.raises(InputError, match=r"p\.memmap.*multiple of dim 5.*got 96"):
        open_embeddings(path, dim=5)
    with pytest.raises(InputError, match="no manifest"):
        open_embeddings(path)
    data[4, 1] = np.nan
    data.tofile(path)
    open_embeddings(path, dim=4)  # not scanned unless asked
    with pytest.raises(InputError, match="row 4 holds NaN"):
        open_embeddings(path, dim=4, check_finite=True)
    np.zeros(0, np.float32).tofile(path)
    with pytest.raises(InputError, match="multiple"):
        open_embeddings(path, dim=4)
    manifest_path(path).write_text('{"format": "star-adore-embeddings/1", "dim": 4}')
    with pytest.raises(InputError, match="manifest lacks"):
        open_embeddings(path)


# ---------------------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------------------

LENGTHS = [5, 12, 3, 20, 7, 7, 16, 2, 9, 20, 11, 4, 6, 18, 8, 13, 3, 10, 15, 5, 7, 19, 14, 6, 9]


@pytest.fixture
def corpus(tmp_path):
    seqs = write_token_memmap(tmp_path / "pre", "passages", LENGTHS, width=20, seed=0)
    return seqs, SequenceDataset(TokenIdsCache(tmp_path / "pre", "passages"), 14)


def encode(model, dataset, path, model_id="model-A", block_rows=6, amp=None, batch_tokens=None, **kw):
    settings = EncodingSettings(3, "cpu", 1, amp=amp, batch_tokens=batch_tokens, block_rows=block_rows)
    return encode_to_memmap(model, dataset, path, model_id, settings, **kw)


def test_encode_equals_per_sequence_model_and_pads_only_to_batch_max(tmp_path, corpus):
    seqs, dataset = corpus
    model = CountingModel(tiny_encoder(0))
    out = encode(model, dataset, tmp_path / "e.memmap")
    np.testing.assert_allclose(out, encode_one_by_one(model.inner, seqs, 14), atol=2e-5)
    widths = [shape[1] for shape, _ in model.shapes]
    assert all(shape[1] == max(lengths) for shape, lengths in model.shapes)  # dynamic padding
    assert widths == sorted(widths, reverse=True) and widths[0] == 14  # longest first, truncated to 14
    assert sum(len(lengths) for _, lengths in model.shapes) == len(LENGTHS)
    manifest = json.loads((tmp_path / "e.memmap.manifest.json").read_text())
    assert manifest["complete"] and manifest["completed_rows"] == len(LENGTHS)
    assert (manifest["n_rows"], manifest["dim"], manifest["max_length"]) == (len(LENGTHS), 16, 14)
    assert not model.inner.training


def test_resumed_encode_is_byte_identical(tmp_path, corpus):
    _, dataset = corpus
    encode(tiny_encoder(0), dataset, tmp_path / "full.memmap")
    killed = CountingModel(tiny_encoder(0), fail_at=6)  # blocks of 2 batches: 2 blocks done, 3rd interrupted
    with pytest.raises(KeyboardInterrupt):
        encode(killed, dataset, tmp_path / "part.memmap")
    manifest = json.loads((tmp_path / "part.memmap.manifest.json").read_text())
    assert manifest["completed_rows"] == 12 and not manifest["complete"]
    with pytest.raises(InputError, match="incomplete"):
        open_embeddings(tmp_path / "part.memmap")
    resumed = CountingModel(tiny_encoder(0))
    encode(resumed, dataset, tmp_path / "part.memmap", block_rows=999)  # the manifest's block size wins
    assert resumed.calls == 5  # 13 remaining rows in batches of 3 within blocks of 6: 3+3, 3+3, 1
    assert (tmp_path / "part.memmap").read_bytes() == (tmp_path / "full.memmap").read_bytes()
    assert open_embeddings(tmp_path / "part.memmap").shape == (len(LENGTHS), 16)


class NaNAfter(CountingModel):
    """An encoder whose output turns NaN from forward call ``nan_at`` on (an fp16 overflow, say)."""

    def __init__(self, inner: torch.nn.Module, nan_at: int):
        super().__init__(inner)
        self.nan_at = nan_at

    def forward(self, input_ids, attention_mask):
        out = super().forward(input_ids, attention_mask)
        return out * float("nan") if self.calls >= self.nan_at else out


def test_non_finite_embeddings_stop_the_encoding_and_keep_the_finished_blocks(tmp_path, corpus):
    _, dataset = corpus
    with pytest.raises(RuntimeError, match=r"e\.memmap: the encoder returned NaN/inf for offset \d+"):
        encode(NaNAfter(tiny_encoder(0), nan_at=5), dataset, tmp_path / "e.memmap")
    manifest = json.loads((tmp_path / "e.memmap.manifest.json").read_text())
    assert manifest["completed_rows"] == 12 and not manifest["complete"]  # blocks 1-2 kept, resumable


def test_complete_memmap_is_reused_without_encoding(tmp_path, corpus):
    _, dataset = corpus
    first = encode(tiny_encoder(0), dataset, tmp_path / "e.memmap")
    never = CountingModel(tiny_encoder(0), fail_at=1)
    again = encode(never, dataset, tmp_path / "e.memmap", amp="bf16")  # autocast is CUDA-only: still fp32
    assert never.calls == 0 and np.array_equal(first, again)


@pytest.mark.parametrize("change, field", [
    ({"model_id": "model-B"}, "model_id"),
    ({"max_length": 10}, "max_length"),
    ({"out_dim": 8}, "dim"),
    ({"resume": False}, "resuming was not requested"),
    ({"drop_manifest": True}, "no manifest"),
])
def test_stale_memmap_is_refused_then_overwritten(tmp_path, corpus, change, field):
    seqs, dataset = corpus
    path = tmp_path / "e.memmap"
    encode(tiny_encoder(0), dataset, path)
    if change.pop("drop_manifest", False):
        manifest_path(path).unlink()
    if "max_length" in change:
        dataset = SequenceDataset(dataset.cache, change.pop("max_length"))
    model = tiny_encoder(1, out_dim=change.pop("out_dim", 16))
    with pytest.raises(InputError, match=field):
        encode(model, dataset, path, **dict(change))
    out = encode(model, dataset, path, overwrite=True, **dict(change))
    np.testing.assert_allclose(out, encode_one_by_one(model, seqs, dataset.max_seq_length), atol=2e-5)
    assert json.loads(manifest_path(path).read_text())["complete"]


def test_row_shards_cut_at_faiss_blocks_give_the_scores_of_one_search():
    """Shards of real-valued rows, searched separately and merged, equal one search bit for bit: they start at
    faiss's BLAS blocks.  (Cut elsewhere, at this size — 2,000 queries, 384 dims — some scores round differently,
    by up to 4e-5 here.)"""
    rng = np.random.default_rng(4)
    docs = rng.standard_normal((5000, 384), dtype=np.float32)
    queries = rng.standard_normal((2000, 384), dtype=np.float32)
    one = exact_search(docs, queries, 30, desc=None)
    block = search_module.faiss_block_rows()
    for num_shards in (2, 3, 4):
        bounds = [search_module.shard_rows(len(docs), s, num_shards) for s in range(num_shards)]
        assert bounds[0][0] == 0 and bounds[-1][1] == len(docs)
        assert all(a[1] == b[0] and b[0] % block == 0 for a, b in zip(bounds, bounds[1:]))
        parts = []
        for start, end in bounds:
            scores, ids = exact_search(docs[start:end], queries, 30, desc=None)
            parts.append((scores, ids + start))
        merged = search_module.merge_topk(parts, 30)
        assert np.array_equal(merged[0], one[0]) and np.array_equal(merged[1], one[1])
    assert search_module.shard_rows(100, 2, 3) == (67, 100)  # fewer rows than shards x block: an even split
