"""The README's main job, shortened: every stage of reproduce.sh on the bundled sample with 2 steps per training;
checks that every artifact exists and parses."""
import json
import os
import subprocess
import sys

import numpy as np

from dataset import load_hardneg, load_rank
from model import DenseEncoder

MODELS = ("inbatch", "rand", "star", "adore-inbatch", "adore-rand", "adore-star")


def test_shortened_sample_pipeline_writes_every_artifact(tmp_path, repo_dir):
    root = tmp_path / "sample"
    env = dict(os.environ, ROOT=str(root), MAX_STEPS="2", EPOCHS="1", ADORE_EPOCHS="1", PYTHON=sys.executable,
               OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", "reproduce.sh", "sample"], cwd=repo_dir, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    passage = root / "passage"
    negs_qids, negs = load_hardneg(passage / "runs" / "warmup_retrieve" / "hard.npy")
    assert negs.shape[0] == len(negs_qids) > 0
    for name in ("warmup", "inbatch", "rand", "star"):
        assert DenseEncoder.from_pretrained(passage / "runs" / name).output_dim > 0
    n_passages = json.loads((passage / "preprocess" / "passages_meta").read_text())["total_number"]
    for name in MODELS:
        for mode in ("dev", "test"):
            ranking = load_rank(passage / "evaluate" / name / f"{mode}.rank.tsv")
            assert ranking and all(0 <= p < n_passages for ps in ranking.values() for p in ps)
    embeddings = np.memmap(passage / "evaluate" / "star" / "passages.memmap", dtype=np.float32, mode="r")
    assert embeddings.size % n_passages == 0 and np.isfinite(embeddings).all()
    results = json.loads((passage / "evaluate" / "results.json").read_text())
    assert set(results) == {"Inbatch-Neg", "Rand-Neg", "STAR", "ADORE(Inbatch-Neg)", "ADORE(Rand-Neg)", "ADORE(STAR)"}
    assert all(0.0 <= v <= 1.0 for row in results.values() for v in row.values())
    assert "| ADORE(STAR) |" in done.stdout
    rerun = subprocess.run(["bash", "reproduce.sh", "sample"], cwd=repo_dir, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0 and rerun.stdout.count("done, skipped") == 13
