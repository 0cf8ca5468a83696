"""The README's main job, shortened: every stage of ``reproduce.sh sample`` with a few steps per training (environment
knobs), then every artifact is checked to exist and parse; a rerun skips every finished stage.  The numbers are not
checked (a few steps learn nothing): the full-size sample's quality is reported by the README, not tested here."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dataset import load_hardneg, load_rank, load_rel
from model import DenseEncoder

TRAINERS = ("inbatch", "rand", "star")
TABLE = ("Inbatch-Neg", "Rand-Neg", "STAR", "ADORE(Inbatch-Neg)", "ADORE(Rand-Neg)", "ADORE(STAR)")
KNOBS = dict(STEPS="4", WARMUP_TRAIN_STEPS="4", BATCH="16", SAVE_STEPS="2", LR_WARMUP="1", TOPK="5",
             ADORE_STEPS="3", ADORE_SAVE_STEPS="2", ADORE_WARMUP="1", ADORE_BATCH="16", THREADS="1", DEVICE="cpu")
STAGES = 17  # stages with a .done marker (the evaluation always reruns)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, repo_dir):
    data = tmp_path_factory.mktemp("pipeline")
    env = dict(os.environ, DATA=str(data), PYTHON=sys.executable, **KNOBS)
    first = subprocess.run(["bash", "reproduce.sh", "sample"], cwd=repo_dir, env=env, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return {"root": data / "sample" / "passage", "env": env, "stdout": first.stdout}


def _checkpoints(folder: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*"))


@pytest.mark.slow
def test_every_stage_ran_with_a_banner_and_wall_time(pipeline):
    out = pipeline["stdout"]
    for stage in ("sample", "preprocess", "warmup", "inbatch", "rand", "mine", "star", "encode-warmup",
                  *(f"encode-{m}" for m in TRAINERS), *(f"adore-{m}" for m in TRAINERS),
                  *(f"adore-inference-{m}" for m in TRAINERS)):
        assert f"] {stage}: finished in " in out, stage
    assert len(list((pipeline["root"] / ".done").iterdir())) == STAGES
    assert "all stages done in" in out


@pytest.mark.slow
def test_models_checkpoints_and_hard_negatives(pipeline):
    root = pipeline["root"]
    for folder in (root / "warmup", *(root / "train" / m for m in TRAINERS)):
        assert DenseEncoder.from_pretrained(folder).output_dim == 64
    for m in TRAINERS:
        assert _checkpoints(root / "train" / m) == [2, 4]
        assert _checkpoints(root / "adore_train" / m) == [2, 3]
        for step in (2, 4):
            DenseEncoder.from_pretrained(root / "train" / m / f"checkpoint-{step}")
        DenseEncoder.from_pretrained(root / "adore_train" / m / "checkpoint-3")
    qoffsets, negs = load_hardneg(root / "warmup_retrieve" / "hard.npy")
    rel = load_rel(root / "preprocess" / "train-qrel.tsv")
    assert negs.shape == (len(rel), 5) and sorted(qoffsets.tolist()) == sorted(rel)
    assert all(not set(row) & set(rel[q]) and len(set(row)) == 5 for q, row in zip(qoffsets.tolist(), negs.tolist()))


@pytest.mark.slow
def test_rank_files_and_embeddings(pipeline):
    root = pipeline["root"]
    n_docs = json.loads((root / "preprocess" / "passages_meta").read_text())["total_number"]
    n_queries = {s: len(np.load(root / "preprocess" / f"{s}-query_ids.npy")) for s in ("dev", "test")}
    for folder in ("warmup_retrieve", *(f"evaluate/{m}" for m in TRAINERS),
                   *(f"evaluate/adore-{m}" for m in TRAINERS)):
        for split in ("dev", "test"):
            ranking = load_rank(root / folder / f"{split}.rank.tsv")
            assert len(ranking) == n_queries[split], (folder, split)
            assert all(len(docs) == 100 and len(set(docs)) == 100 and 0 <= min(docs) and max(docs) < n_docs
                       for docs in ranking.values())
    for m in TRAINERS:
        embeddings = np.memmap(root / "evaluate" / m / "passages.memmap", dtype=np.float32, mode="r")
        assert embeddings.size == n_docs * 64 and np.isfinite(embeddings).all()


@pytest.mark.slow
def test_results_table_json_curves_and_plot(pipeline):
    results = pipeline["root"] / "results"
    table = (results / "results.md").read_text()
    for name in ("Warm-up", *TABLE):
        assert f"| {name} |" in table and f"| {name} |" in pipeline["stdout"]
    report = json.loads((results / "results.json").read_text())
    assert list(report["metrics"]) == ["Warm-up", *TABLE]
    for row in report["metrics"].values():
        assert set(row) == {"dev_mrr", "dev_r100", "test_ndcg10"} and all(0.0 <= v <= 1.0 for v in row.values())
    assert [(c["model"], c["reference"]) for c in report["comparisons"]] == [
        ("ADORE(Inbatch-Neg)", "Inbatch-Neg"), ("ADORE(Rand-Neg)", "Rand-Neg"), ("ADORE(STAR)", "STAR"),
        ("STAR", "Inbatch-Neg")]
    curves = report["dev_mrr_curves"]
    for name in ("Inbatch-Neg", "Rand-Neg", "STAR"):
        assert list(curves[name]) == ["0", "2", "4"]  # step 0 = the warm-up they start from
        assert curves[name]["0"] == report["metrics"]["Warm-up"]["dev_mrr"]
        assert curves[name]["4"] == pytest.approx(report["metrics"][name]["dev_mrr"])  # the final model
    for base in ("Inbatch-Neg", "Rand-Neg", "STAR"):
        adore = curves[f"ADORE({base})"]
        assert list(adore) == ["0", "2", "3"] and adore["0"] == report["metrics"][base]["dev_mrr"]
        assert adore["3"] == pytest.approx(report["metrics"][f"ADORE({base})"]["dev_mrr"])
    losses = report["loss_curves"]
    assert [step for step, _ in losses["STAR"]] == [4] and len(losses["ADORE(STAR)"]) == 1
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert report["plot"] is None
    else:
        assert (results / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_star_keeps_the_100_epoch_schedule_and_stops_at_steps(pipeline):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(pipeline["root"] / "train" / "star" / "log"))
    events.Reload()
    (last,) = [e for e in events.Scalars("learning_rate") if e.step == 4]
    assert 0.99e-3 < last.value <= 1e-3  # linear decay over 100 epochs barely started at step 4
    args = json.loads((pipeline["root"] / "train" / "star" / "training_args.json").read_text())
    assert args["stop_after_steps"] == 4 and args["num_train_epochs"] == 100


@pytest.mark.slow
def test_rerun_skips_every_finished_stage(pipeline, repo_dir):
    again = subprocess.run(["bash", "reproduce.sh", "sample"], cwd=repo_dir, env=pipeline["env"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done earlier, skipped") == STAGES
    assert "curves:" not in again.stdout  # checkpoints already scored (curves.json cache)
    assert "| ADORE(STAR) |" in again.stdout


@pytest.mark.parametrize("task, missing", [("passage", "passage/dataset/collection.tsv"),
                                           ("doc", "doc/dataset/msmarco-docs.tsv")])
def test_real_task_without_data_says_what_to_download(tmp_path, repo_dir, task, missing):
    done = subprocess.run(["bash", "reproduce.sh", task], cwd=repo_dir, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, DATA=str(tmp_path), PYTHON=sys.executable, DEVICE="cpu"))
    assert done.returncode != 0
    assert f"error: {tmp_path / missing} not found: run 'bash download_data.sh {task}" in done.stderr
    assert not (tmp_path / task / ".done").exists()


def test_unknown_task_is_a_usage_error(repo_dir):
    done = subprocess.run(["bash", "reproduce.sh", "passages"], cwd=repo_dir, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("usage: bash reproduce.sh")
