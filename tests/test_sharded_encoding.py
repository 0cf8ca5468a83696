"""The encoding plan (batches by rows or by a token budget, shards balanced by tokens, resumable blocks) and sharded
encoding: shards encoded separately (``shard=(s, n)``, as ``--shard_id`` jobs or torchrun ranks do), killed and
resumed, then assembled, give the bytes of one process."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from infra import corpus_encoding as ce
from dataset import SequenceDataset, TokenIdsCache
from infra.encoding_plan import batch_bounds, flush_points, padded_tokens, shard_batches, shard_positions
from helpers import encode_one_by_one, tiny_encoder, write_token_memmap
from infra.io import InputError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

LENGTHS = [5, 12, 3, 20, 7, 7, 16, 2, 9, 20, 11, 4, 6, 18, 8, 13, 3, 10, 15, 5, 7, 19, 14, 6, 9, 2, 17]


def test_batches_by_rows_and_by_token_budget():
    lengths = np.array([10, 8, 8, 5, 4, 4, 2, 1])
    assert batch_bounds(lengths, 0, 3).tolist() == [[0, 3], [3, 6], [6, 8]]
    assert batch_bounds(lengths, 3, 3).tolist() == [[3, 6], [6, 8]]
    # budget 20: 10 → 2 rows (0,1); 8 → 2 rows (2,3); 4 → 5 rows (4..8)
    assert batch_bounds(lengths, 0, 99, batch_tokens=20).tolist() == [[0, 2], [2, 4], [4, 8]]
    assert batch_bounds(lengths, 0, 99, batch_tokens=7).tolist()[0] == [0, 1]  # always at least one row
    bounds = batch_bounds(lengths, 0, 99, batch_tokens=20)
    assert padded_tokens(bounds, lengths).tolist() == [20, 16, 16]
    for first, end in bounds.tolist():  # every later batch is the same when cut from a batch start
        assert batch_bounds(lengths, first, 99, batch_tokens=20).tolist() == bounds[bounds[:, 0] >= first].tolist()


def test_shards_are_balanced_by_padded_tokens_not_by_count():
    lengths = np.array([100, 100, 10, 10, 10, 10, 10, 10, 10, 10])
    bounds = batch_bounds(lengths, 0, 2)                      # tokens per batch: 200, 20, 20, 20, 20
    assert shard_batches(bounds, lengths, 2) == [(0, 1), (1, 5)]
    assert shard_positions(bounds, lengths, 0, 2) == (0, 2) and shard_positions(bounds, lengths, 1, 2) == (2, 10)
    few = batch_bounds(lengths[:2], 0, 2)                     # one batch, three shards: two are empty
    assert [shard_positions(few, lengths[:2], s, 3) for s in range(3)] == [(0, 2), (2, 2), (2, 2)]


def test_flush_points_end_blocks_at_batch_ends():
    bounds = np.array([[0, 3], [3, 6], [6, 7], [7, 12], [12, 13]])
    assert flush_points(bounds, 6).tolist() == [False, True, False, True, True]
    assert flush_points(bounds[2:], 6).tolist() == [False, True, True]


@pytest.fixture
def corpus(tmp_path):
    seqs = write_token_memmap(tmp_path / "pre", "passages", LENGTHS, width=20, seed=0)
    return seqs, SequenceDataset(TokenIdsCache(tmp_path / "pre", "passages"), 14)


def encode(dataset, path, model=None, block_rows=4, batch_tokens=None, **kw):
    settings = ce.EncodingSettings(3, "cpu", 1, batch_tokens=batch_tokens, block_rows=block_rows)
    return ce.encode_to_memmap(model or tiny_encoder(0), dataset, path, "model-A", settings, **kw)


@pytest.mark.parametrize("batch_tokens", [None, 40])
@pytest.mark.parametrize("num_shards", [2, 3])
def test_shards_assemble_into_the_bytes_of_one_process(tmp_path, corpus, num_shards, batch_tokens):
    seqs, dataset = corpus
    one = encode(dataset, tmp_path / "one.memmap", batch_tokens=batch_tokens)
    out = tmp_path / "sharded.memmap"
    for shard in reversed(range(num_shards)):  # any order, as independent jobs
        assert encode(dataset, out, shard=(shard, num_shards), batch_tokens=batch_tokens) is None
        assert ce.shard_path(out, shard, num_shards).is_file() and not out.exists()
    assembled = encode(dataset, out, model=ExplodingModel(), batch_tokens=batch_tokens)  # assembles, no encoding
    assert out.read_bytes() == (tmp_path / "one.memmap").read_bytes()
    assert np.array_equal(assembled, one)
    np.testing.assert_allclose(assembled, encode_one_by_one(tiny_encoder(0), seqs, 14), atol=2e-5)
    assert not list(tmp_path.glob("sharded.memmap.shard-*"))  # the shards are gone once assembled
    manifest = json.loads(ce.manifest_path(out).read_text())
    assert manifest["complete"] and manifest["n_rows"] == len(LENGTHS)


class ExplodingModel(torch.nn.Module):
    """A model that must not be called (the rows come from elsewhere)."""
    output_dim = 16

    def forward(self, *args):
        raise AssertionError("encoded although nothing was left to encode")


class KilledAfter(torch.nn.Module):
    """``tiny_encoder(0)`` that raises KeyboardInterrupt on its ``calls``-th forward call."""

    def __init__(self, calls: int):
        super().__init__()
        self.inner, self.left = tiny_encoder(0), calls
        self.output_dim = self.inner.output_dim

    def forward(self, input_ids, attention_mask):
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt("simulated kill")
        return self.inner(input_ids, attention_mask)


def test_a_killed_shard_resumes_its_share_and_the_result_is_unchanged(tmp_path, corpus):
    _, dataset = corpus
    encode(dataset, tmp_path / "one.memmap")
    out = tmp_path / "e.memmap"
    encode(dataset, out, shard=(0, 2))
    with pytest.raises(KeyboardInterrupt):
        encode(dataset, out, model=KilledAfter(4), shard=(1, 2))
    manifest = json.loads(ce.manifest_path(ce.shard_path(out, 1, 2)).read_text())
    assert 0 < manifest["completed_rows"] < manifest["n_rows"] and not manifest["complete"]
    with pytest.raises(InputError, match="shard 1 is incomplete"):
        encode(dataset, out)
    encode(dataset, out, shard=(1, 2))  # resumes after its last finished block
    encode(dataset, out, model=ExplodingModel())
    assert out.read_bytes() == (tmp_path / "one.memmap").read_bytes()


def test_shards_of_other_settings_or_missing_ones_are_refused(tmp_path, corpus):
    _, dataset = corpus
    out = tmp_path / "e.memmap"
    encode(dataset, out, shard=(0, 3))
    with pytest.raises(InputError, match="shard 1 is missing; shard 2 is missing"):
        encode(dataset, out)
    with pytest.raises(InputError, match="batching"):  # the shard's rows depend on how batches are cut
        encode(dataset, out, shard=(0, 3), batch_tokens=40)
    other = SequenceDataset(dataset.cache, 10)
    for shard in (1, 2):
        encode(other, out, shard=(shard, 3))
    with pytest.raises(InputError, match="shard 1 was encoded with other settings"):
        encode(dataset, out)
    encode(dataset, out, overwrite=True)  # one process, from scratch
    assert json.loads(ce.manifest_path(out).read_text())["complete"]


def test_a_complete_file_leaves_the_shards_nothing_to_do(tmp_path, corpus):
    _, dataset = corpus
    out = tmp_path / "e.memmap"
    encode(dataset, out)
    assert encode(dataset, out, model=ExplodingModel(), shard=(1, 2)) is None
    assert not ce.shard_path(out, 1, 2).exists()


def test_search_on_a_cuda_device_without_faiss_gpus_uses_the_torch_index(monkeypatch, tmp_path):
    """#12 item 4: on a GPU that faiss cannot use (faiss-cpu), the inference search runs the exact torch index on
    that GPU (simulated here: the index is built on the CPU, the device asked for is recorded)."""
    import retrieve_utils as ip
    from infra.exact_search import exact_search
    from infra.training_index import TensorIPIndex

    asked = []

    def tensor_index(docs, device):
        asked.append(torch.device(device))
        return TensorIPIndex(docs, "cpu")

    monkeypatch.setattr(ip, "faiss_gpu_count", lambda: 0)
    monkeypatch.setattr(ip, "TensorIPIndex", tensor_index)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 40, 1 << 40))
    rng = np.random.default_rng(0)
    docs = rng.integers(-2, 3, (300, 8)).astype(np.float32)  # small integers: exact scores, many ties
    queries = rng.integers(-2, 3, (20, 8)).astype(np.float32)
    scores, ids = ip.search_rows(docs, queries, 3000, torch.device("cuda", 0))  # k above faiss-GPU's 2048: fine
    assert asked == [torch.device("cuda", 0)]
    expected = exact_search(docs, queries, 3000)
    assert np.array_equal(ids, expected[1]) and np.array_equal(scores, expected[0])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (docs.nbytes, 1 << 40))  # does not fit
    on_cpu = ip.search_rows(docs, queries, 5, torch.device("cuda", 0))
    assert len(asked) == 1 and np.array_equal(on_cpu[1], exact_search(docs, queries, 5)[1])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 40, 1 << 40))
    ids = ip.rank_queries(docs, queries, 5, tmp_path / "dev.rank.tsv", ip.Placement(torch.device("cuda", 0)),
                          cpu_only=True)  # prepare_hardneg --not_faiss_cuda
    assert len(asked) == 1 and np.array_equal(ids, exact_search(docs, queries, 5)[1])


def test_a_stale_whole_file_is_refused_by_the_shards_unless_overwrite(tmp_path, corpus):
    _, dataset = corpus
    out = tmp_path / "e.memmap"
    ce.encode_to_memmap(tiny_encoder(1), dataset, out, "model-B", ce.EncodingSettings(3, "cpu", 1))
    before = out.read_bytes()
    with pytest.raises(InputError, match="model_id='model-B', this run has model_id='model-A'"):
        encode(dataset, out, shard=(0, 2))
    assert out.read_bytes() == before and not ce.shard_path(out, 0, 2).exists()
    for shard in range(2):
        encode(dataset, out, shard=(shard, 2), overwrite=True)
    encode(dataset, tmp_path / "one.memmap")
    encode(dataset, out, model=ExplodingModel())  # assembles over the stale file
    assert out.read_bytes() == (tmp_path / "one.memmap").read_bytes()
