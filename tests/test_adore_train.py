"""adore/train.py and the training-time index of retrieve_utils on CPU: labels and appended positives on hand-built
embeddings, the loss against ADORE's formula (the original adore/train.py) written with loops, the tensor index
against faiss (bitwise, ties included), --metric_cut resolution, CLI runs (epoch folder, TensorBoard, frozen
embeddings) and exact resume."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from infra.embedding_memmap import open_embeddings
from infra.exact_search import FlatIPIndex
from infra.training_index import TensorIPIndex, TrainingIndex, build_training_index
from adore import train as adore_train
from infra.io import InputError, run_cli
from helpers import ADORE_DIM as DIM, AdoreData, adore_cli_args, load_weights, make_adore_data
from helpers import read_scalars
from model import adore_batch_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: a preprocess folder (train queries + qrels), frozen document embeddings, a tiny init model
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> AdoreData:
    return make_adore_data(tmp_path_factory.mktemp("adore"))


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Labels, appended positives, scores and loss of one micro-batch
# ---------------------------------------------------------------------------------------------------------------

def test_label_candidates_appends_positives_per_mode():
    retrieved = np.array([[5, 3, 9, 1], [7, 8, 2, 4], [0, 6, -1, -1]])
    positives = [[3, 11], [10, 12, 10], [6, 6, 13]]
    c = adore_train.label_candidates(retrieved, positives, "none_retrieved")
    # a positive retrieved: nothing appended; none retrieved: all positives as listed (duplicates kept)
    assert c.lengths.tolist() == [4, 7, 2] and c.n_retrieved.tolist() == [4, 4, 2]
    assert c.ids[0].tolist()[:4] == [5, 3, 9, 1] and c.labels[0].tolist()[:4] == [False, True, False, False]
    assert c.ids[1].tolist() == [7, 8, 2, 4, 10, 12, 10] and c.labels[1].tolist() == [False] * 4 + [True] * 3
    assert c.ids[2, :2].tolist() == [0, 6] and c.labels[2, :2].tolist() == [False, True]
    assert not c.labels[0, 4:].any() and not c.labels[2, 2:].any()
    assert c.mrr10.tolist() == [0.5, 0.0, 0.5] and c.hit10.tolist() == [1.0, 0.0, 1.0]

    a = adore_train.label_candidates(retrieved, positives, "always")
    # only the missing positives, each once, for every query
    assert a.lengths.tolist() == [5, 6, 3]
    assert a.ids[0].tolist()[:5] == [5, 3, 9, 1, 11] and a.labels[0].tolist()[:5] == [False, True, False, False,
                                                                                      True]
    assert a.ids[1].tolist()[:6] == [7, 8, 2, 4, 10, 12]
    assert a.ids[2].tolist()[:3] == [0, 6, 13] and a.labels[2].tolist()[:3] == [False, True, True]


def hand_built_index(backend: str) -> TrainingIndex:
    """6 documents, document j = (6 − j)·e_j: a query of ones ranks them 0, 1, …, 5 with scores 6, 5, …, 1."""
    docs = np.diag(np.arange(6, 0, -1)).astype(np.float32)
    return build_training_index(docs, backend=backend)


@pytest.mark.parametrize("backend", ["faiss", "tensor"])
def test_retrieve_label_score_and_loss_on_hand_built_embeddings(backend):
    index = hand_built_index(backend)
    q = torch.tensor([[1.0] * 6, [1.0, 2, 1, 1, 1, 1]], requires_grad=True)   # second: doc 1 first (score 10)
    positives = [[4], [0, 5]]
    c = adore_train.retrieve_candidates(index, q, positives, k=3, append="none_retrieved")
    assert c.ids[0].tolist() == [0, 1, 2, 4] and c.labels[0].tolist() == [False, False, False, True]
    assert c.ids[1, :3].tolist() == [1, 0, 2] and c.lengths.tolist() == [4, 3]
    scores = adore_train.candidate_scores(index, q, c)
    assert scores[0].tolist() == [6, 5, 4, 2] and scores[1, :3].tolist() == [10, 6, 4]

    settings = adore_train.LossSettings(k=3, append="none_retrieved", metric_cut=2, divisor=8.0)
    loss = adore_batch_loss(scores, torch.from_numpy(c.labels), settings.metric_cut, settings.divisor,
                            torch.from_numpy(c.lengths))
    # ADORE's loss with loops: a_r = 1/r for r <= 2 else 0; per query mean over (pos, neg) pairs; sum / divisor
    expected = 0.0
    for row in range(2):
        f, y = scores[row, : c.lengths[row]].tolist(), c.labels[row, : c.lengths[row]].tolist()
        a = [1 / r if r <= 2 else 0.0 for r in range(1, len(f) + 1)]
        pairs = [(r, s) for r in range(len(f)) for s in range(len(f)) if y[r] and not y[s]]
        expected += sum(abs(a[r] - a[s]) * np.logaddexp(0, f[s] - f[r]) for r, s in pairs) / len(pairs)
    assert loss.item() == pytest.approx(expected / 8, rel=1e-6)
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_micro_batch_loss_uses_the_train_mode_embeddings_for_retrieval(data):
    """Dropout on: the retrieval must use the very embeddings the loss differentiates (same forward)."""
    from dataset import QueryCollator, TokenIdsCache, TrainQueryDataset, load_rel
    from model import DenseEncoder

    model = DenseEncoder.from_pretrained(data.init).train()
    docs = open_embeddings(data.emb, dim=DIM)
    index = build_training_index(docs)
    rel = load_rel(data.pre / "train-qrel.tsv")
    ds = TrainQueryDataset(rel, TokenIdsCache(data.pre, "train-query"), 8)
    inputs, positives = QueryCollator(8)([ds[i] for i in range(4)])
    settings = adore_train.LossSettings(8, "none_retrieved", 5, 4.0)
    torch.manual_seed(5)
    loss, cands = adore_train.micro_batch_loss(model, index, inputs, positives, settings, torch.device("cpu"))
    torch.manual_seed(5)
    q = model(inputs["input_ids"], inputs["attention_mask"]).detach()
    _, ids = FlatIPIndex(np.asarray(docs)).search(q.numpy(), 8, desc=None)
    np.testing.assert_array_equal(cands.ids[:, :8], ids)
    assert torch.isfinite(loss) and loss.item() > 0


# ---------------------------------------------------------------------------------------------------------------
# The tensor index
# ---------------------------------------------------------------------------------------------------------------

def tie_heavy_integers(n: int, nq: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer vectors in [-500, 500] (fp32 dot products of 8 of them are exact) with many duplicate documents and
    queries equal to a duplicated document: ties everywhere."""
    rng = np.random.default_rng(seed)
    docs = rng.integers(-500, 501, size=(n, 8)).astype(np.float32)
    docs[rng.integers(0, n, size=n // 3)] = docs[3]
    queries = rng.integers(-500, 501, size=(nq, 8)).astype(np.float32)
    queries[: nq // 4] = docs[3]
    return docs, queries


@pytest.mark.parametrize("k", [1, 10, 100, 599, 600, 650])
def test_tensor_index_equals_faiss_bitwise_with_ties(k):
    docs, queries = tie_heavy_integers(600, 30, seed=k)
    ref_scores, ref_ids = FlatIPIndex(docs).search(queries, k, desc=None)
    index = TensorIPIndex(docs, "cpu", chunk_bytes=5000)  # ~100-row chunks
    scores, ids = index.search(queries, k, batch_size=7)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(scores, ref_scores)


def test_training_index_backends_search_and_gather_alike(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "emb.memmap"
    rng.standard_normal((300, DIM), dtype=np.float32).tofile(path)
    docs = open_embeddings(path, dim=DIM)
    faiss_index = build_training_index(docs)
    assert isinstance(faiss_index.searcher, FlatIPIndex)
    tensor_index = build_training_index(docs, backend="tensor")
    assert isinstance(tensor_index.searcher, TensorIPIndex)
    q = torch.from_numpy(rng.standard_normal((5, DIM), dtype=np.float32))
    results = [i.search(q, 20) for i in (faiss_index, tensor_index)]
    for scores, ids in results[1:]:
        np.testing.assert_array_equal(ids, results[0][1])
        np.testing.assert_allclose(scores, results[0][0], rtol=1e-5, atol=1e-5)
    ids = results[0][1]
    for index in (faiss_index, tensor_index):
        gathered = index.gather(ids, "cpu")
        assert gathered.dtype == torch.float32 and gathered.shape == (5, 20, DIM)
        np.testing.assert_array_equal(gathered.numpy(), np.asarray(docs)[ids])


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------

def test_metric_cut_resolution():
    assert adore_train.resolve_metric_cut(None, "passage") == 200
    assert adore_train.resolve_metric_cut(10, "doc") == 10
    assert adore_train.resolve_metric_cut(7, None) == 7
    with pytest.raises(InputError, match="--metric_cut for --data_type doc"):
        adore_train.resolve_metric_cut(None, "doc")
    for cut, data_type in ((None, None), (0, "passage"), (-3, None)):
        with pytest.raises(InputError, match="--metric_cut"):
            adore_train.resolve_metric_cut(cut, data_type)


def test_cli_refuses_a_doc_run_without_metric_cut(data, tmp_path, capsys):
    args = [a for a in adore_cli_args(data, tmp_path / "out") if a not in ("--metric_cut", "5")]
    args += ["--data_type", "doc"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(adore_train.main, args)
    assert exit_info.value.code == 2 and "JPQ uses 10" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# CLI runs
# ---------------------------------------------------------------------------------------------------------------

def test_cli_run_writes_epoch_folder_and_tensorboard_and_keeps_embeddings(data, tmp_path):
    from model import DenseEncoder

    before = file_hash(data.emb)
    out = tmp_path / "out"
    adore_train.main(adore_cli_args(data, out, "--num_train_epochs", "1"))   # 12 queries / batch 4 = 3 steps
    assert file_hash(data.emb) == before
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "epoch-1", "log"]
    epoch = DenseEncoder.from_pretrained(out / "epoch-1")
    init = load_weights(data.init)
    assert any(not torch.equal(v, init[k]) for k, v in epoch.state_dict().items())
    assert json.loads((out / "epoch-1" / "training_args.json").read_text())["metric_cut"] == 5
    assert list((out / "log").glob("events.out.tfevents.*"))
    scalars = read_scalars(out / "log")
    assert sorted(scalars) == ["lr", "train/all_loss", "train/mrr_10", "train/recall_10"]
    assert [s for s, _ in scalars["train/all_loss"]] == [1, 2, 3]
    assert all(np.isfinite(v) and v > 0 for _, v in scalars["train/all_loss"])
    assert all(0 <= v <= 1 for _, v in scalars["train/mrr_10"] + scalars["train/recall_10"])
    assert [v for _, v in scalars["lr"]] == pytest.approx([1e-5, 2e-5, 3e-5])


def test_faiss_and_tensor_backends_train_identically(data, tmp_path):
    runs = {"faiss": (), "tensor": ("--index_on_model_device",)}
    weights = {}
    for name, extra in runs.items():
        adore_train.main(adore_cli_args(data, tmp_path / name, "--max_steps", "2", *extra))
        weights[name] = load_weights(tmp_path / name / "checkpoint-2")
    for key, value in weights["faiss"].items():
        assert torch.equal(value, weights["tensor"][key]), key


@pytest.mark.parametrize("batch,accum,stop,total", [(4, 1, 2, 5), (2, 2, 3, 4)])
def test_resume_equals_uninterrupted_run(data, tmp_path, batch, accum, stop, total):
    """``total`` steps straight vs ``stop`` steps then --resume; dropout is on, so the RNG restore matters.
    12 queries: batch 4 → 3 steps per epoch (stop mid-epoch 0); batch 2 × accumulation 2 → 3 steps per epoch
    (stop at the end of epoch 0).  warm-up 100 > total: the LR of a step does not depend on --max_steps."""
    before = file_hash(data.emb)
    common = ("--gradient_accumulation_steps", str(accum))
    adore_train.main(adore_cli_args(data, tmp_path / "straight", "--max_steps", str(total), *common, batch=batch))
    adore_train.main(adore_cli_args(data, tmp_path / "resumed", "--max_steps", str(stop), *common, batch=batch))
    adore_train.main(adore_cli_args(data, tmp_path / "resumed", "--max_steps", str(total), "--resume", *common,
                              batch=batch))
    straight = load_weights(tmp_path / "straight" / f"checkpoint-{total}")
    resumed = load_weights(tmp_path / "resumed" / f"checkpoint-{total}")
    interrupted = load_weights(tmp_path / "resumed" / f"checkpoint-{stop}")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert any(not torch.equal(straight[k], interrupted[k]) for k in straight)
    assert (tmp_path / "straight" / "epoch-1").is_dir() and (tmp_path / "resumed" / "epoch-1").is_dir()
    assert file_hash(data.emb) == before
