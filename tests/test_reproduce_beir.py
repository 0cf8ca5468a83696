"""``reproduce.sh beir`` (issue #21 item 4): CACM in the BEIR layout from a tiny RoBERTa-shaped model that
L2-normalises (as a sentence-transformers folder does), every stage through the CLIs with a short schedule; the
table's rows and metrics, the zero-shot row against a direct search of the initial model's embeddings, a rerun that
skips every stage, and the one line for a collection without train qrels.  The numbers of a tiny random model are
not checked for quality (docs/own-collection.md reports the real table)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from transformers import RobertaConfig

from helpers import write_cacm_layouts
from model import DenseEncoder
from msmarco_eval import evaluate_files

DOC_LEN, QUERY_LEN = 32, 16
KNOBS = dict(EPOCHS="1", BATCH="32", LR="1e-4", TOPK="5", ADORE_EPOCHS="1", ADORE_BATCH="16", QUERY_LEN=str(QUERY_LEN),
             DOC_LEN=str(DOC_LEN), THREADS="1", DEVICE="cpu", CURVES="none")
STAGES = ("init", "preprocess", "encode-warmup", "mine", "inbatch", "rand", "star",
          *(f"encode-{m}" for m in ("inbatch", "rand", "star")), *(f"adore-{m}" for m in ("inbatch", "rand", "star")),
          *(f"adore-inference-{m}" for m in ("inbatch", "rand", "star")))
ROWS = ("Zero-shot", "Inbatch-Neg", "Rand-Neg", "STAR", "ADORE(Inbatch-Neg)", "ADORE(Rand-Neg)", "ADORE(STAR)")


def tiny_normalised_model(folder, tokenizer_dir) -> None:
    """A 1-layer RoBERTa-shaped encoder with mean pooling and L2 normalisation, carrying roberta-base's tokenizer."""
    config = RobertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           vocab_size=50265, max_position_embeddings=DOC_LEN + 2, pad_token_id=1)
    DenseEncoder.from_config(config, pooling="mean", head=False, normalize=True).eval().save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, folder / name)


@pytest.fixture(scope="module")
def beir_run(tmp_path_factory, shared_dir, repo_dir):
    root = tmp_path_factory.mktemp("reproduce_beir")
    write_cacm_layouts(shared_dir / "data" / "cacm", root / "cacm", root / "msmarco")
    tiny_normalised_model(root / "init", shared_dir / "data" / "roberta-base-tokenizer")
    env = dict(os.environ, DATA=str(root / "data"), PYTHON=sys.executable, BEIR_DIR=str(root / "cacm"),
               INIT=str(root / "init"), **KNOBS)
    first = subprocess.run(["bash", "reproduce.sh", "beir"], cwd=repo_dir, env=env, capture_output=True, text=True,
                           timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return {"root": root, "out": root / "data" / "beir" / "cacm", "env": env, "stdout": first.stdout}


@pytest.mark.slow
def test_every_stage_ran_and_the_table_has_every_row(beir_run):
    out = beir_run["out"]
    for stage in STAGES:
        assert f"] {stage}: finished in " in beir_run["stdout"], stage
    assert sorted(p.name for p in (out / ".done").iterdir()) == sorted(STAGES)
    result = json.loads((out / "results" / "results.json").read_text())
    assert result["task"] == "beir" and list(result["metrics"]) == list(ROWS)
    for row in result["metrics"].values():   # CACM here has train and test qrels only: test columns
        assert set(row) == {"test_ndcg10", "test_r100", "test_mrr"}
        assert all(0.0 <= v <= 1.0 for v in row.values())
    table = (out / "results" / "results.md").read_text()
    assert "| beir | Test nDCG@10 | Test R@100 | Test MRR@10 |" in table
    comparisons = {(c["model"], c["reference"]) for c in result["comparisons"]}
    assert ("STAR", "Zero-shot") in comparisons and ("ADORE(STAR)", "STAR") in comparisons
    args = json.loads((out / "train" / "star" / "training_args.json").read_text())
    assert args["score_scale"] == 20.0 and args["optimizer_str"] == "adamw" and args["max_doc_length"] == DOC_LEN


@pytest.mark.slow
def test_zero_shot_row_is_the_initial_models_exact_search(beir_run):
    """The zero-shot rank file equals a direct exact search of the initial model's embeddings (mining reused them:
    one corpus encoding of the initial model)."""
    out = beir_run["out"]
    mined = out / "warmup_retrieve"
    docs = np.fromfile(mined / "passages.memmap", dtype=np.float32).reshape(-1, 32)
    queries = np.fromfile(mined / "test-query.memmap", dtype=np.float32).reshape(-1, 32)
    assert np.allclose(np.linalg.norm(docs, axis=1), 1.0, atol=1e-5)   # the model L2-normalises
    top = np.argsort(-(queries @ docs.T), axis=1, kind="stable")[:, :10]
    ranked = [line.split("\t") for line in (mined / "test.rank.tsv").read_text().splitlines()]
    got = {}
    for q, p, _ in ranked:
        got.setdefault(int(q), []).append(int(p))
    agree = np.mean([len(set(got[q][:10]) & set(top[q].tolist())) / 10 for q in range(len(queries))])
    assert agree > 0.95   # ties among near-identical scores may order differently
    ndcg = evaluate_files(out / "preprocess" / "test-qrel.tsv", mined / "test.rank.tsv", metrics=("nDCG@10",))
    result = json.loads((out / "results" / "results.json").read_text())
    assert result["metrics"]["Zero-shot"]["test_ndcg10"] == pytest.approx(ndcg["nDCG@10"])


@pytest.mark.slow
def test_a_rerun_skips_every_stage(beir_run, repo_dir):
    again = subprocess.run(["bash", "reproduce.sh", "beir"], cwd=repo_dir, env=beir_run["env"], capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    for stage in STAGES:
        assert f"] {stage}: done earlier, skipped" in again.stdout, stage


def test_a_collection_without_train_qrels_gets_one_clear_line(tmp_path, repo_dir):
    folder = tmp_path / "no-train"
    (folder / "qrels").mkdir(parents=True)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        (folder / name).write_text("")
    env = dict(os.environ, DATA=str(tmp_path / "data"), PYTHON=sys.executable, BEIR_DIR=str(folder),
               INIT=str(tmp_path))
    done = subprocess.run(["bash", "reproduce.sh", "beir"], cwd=repo_dir, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"error: {folder} has no train qrels (qrels/train.tsv): Inbatch-Neg, "
                                        "Rand-Neg, STAR and ADORE learn from them"]
