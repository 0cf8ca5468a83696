"""benchmarks/gpu_suite.sh (issue #12's GPU benchmark suite) in its CPU ``--smoke`` mode, so that it never rots:
every stage runs on a tiny model and tiny data built from ../shared, every row has a positive rate, the table is
printed, the JSON written and the end-to-end rank files parse.  The full suite needs a CUDA GPU."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from dataset import load_rank
from helpers import ENV, REPO

SMOKE_TIMEOUT = 600  # about a minute on an idle 2-core machine


def run_suite(*args: str, timeout: int = SMOKE_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "benchmarks/gpu_suite.sh", *args], cwd=REPO, env=dict(ENV, PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_smoke_runs_every_stage_with_positive_rates_and_parsable_rank_files(tmp_path, shared_dir):
    out = tmp_path / "out"
    done = run_suite("--smoke", "--out", str(out), "--shared", str(shared_dir))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_suite.json").read_text())
    assert report["mode"] == "smoke" and report["device"] == "cpu" and report["failed"] == []
    rows = report["rows"]
    assert all(r["rate"] > 0 and r["seconds"] > 0 for r in rows), rows
    by_group = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r["name"])
        assert r["name"] in done.stdout  # the one table
    have_st = importlib.util.find_spec("sentence_transformers") is not None
    assert by_group["star"] == ["STAR step, fp16 + checkpointing, batch 8", "STAR step, bf16, batch 8"]
    assert len(by_group["parts"]) == 4 and any("multi-tensor" in n for n in by_group["parts"])
    assert len(by_group["encode"]) == 3 + have_st
    assert [n.split(":")[1].split()[0] for n in by_group["e2e"]] == [
        "star.inference", "star.prepare_hardneg", "star.train", "adore.train", "adore.inference"]
    assert {n.split(", ")[2] for n in by_group["adore"]} >= {"tensor index"}
    assert [s["name"] for s in report["skipped"]] == ([] if have_st else ["encode: sentence-transformers"])
    assert set(report["environment"]["host_reads_per_star_step"]) == {"fp32", "bf16", "fp16"}

    n_passages = report["environment"]["data"]["passages"]
    n_dev = report["environment"]["e2e"]["dev_queries"]
    for name in ("star-dev.rank.tsv", "adore-dev.rank.tsv"):
        ranking = load_rank(out / "e2e" / name)
        assert len(ranking) == n_dev > 0
        assert all(len(docs) == 100 and len(set(docs)) == 100 and 0 <= min(docs) and max(docs) < n_passages
                   for docs in ranking.values())
    assert (out / "logs" / "star.train.log").is_file()
    assert not any(p.name.startswith("gpu_suite_work") for p in out.iterdir())  # data and models stay out of OUT


def test_without_cuda_or_shared_data_it_refuses_with_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the full suite would run")
    done = run_suite("--out", str(tmp_path / "out"), timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == (
        "error: CUDA is not available: run with --smoke (CPU) or --device cpu")
    done = run_suite("--smoke", "--shared", str(tmp_path), "--out", str(tmp_path / "out"), timeout=120)
    assert done.returncode == 2 and "no shared/ folder" in done.stderr and "--shared DIR" in done.stderr
    assert not (tmp_path / "out").exists()


def test_script_documents_its_usage():
    head = (REPO / "benchmarks" / "gpu_suite.sh").read_text().splitlines()[:25]
    assert any("bash benchmarks/gpu_suite.sh [--smoke] [--out DIR]" in line for line in head)
    assert os.access(REPO / "benchmarks" / "gpu_suite.sh", os.X_OK)
