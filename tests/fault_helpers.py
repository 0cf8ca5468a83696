"""Shared tiny inputs and subprocess helpers (test_faults.py, test_determinism.py, test_sample_learning.py)."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from test_retrieve_utils import tiny_encoder, write_token_memmap

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
N_DOCS, N_QUERIES, DOC_LEN, QUERY_LEN = 600, 12, 16, 8


def tree_hash(folder: Path, skip_tmp: bool = True) -> dict:
    """{relative name: sha256} of every file below ``folder`` (temporary ``*.tmp-PID`` files left out)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not (skip_tmp and ".tmp-" in p.name)}


def run(args: list, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def make_encoder_inputs(root: Path, n_docs: int = N_DOCS) -> dict:
    """A tiny preprocess dir (``n_docs`` passages, train/dev queries + qrels) and a tiny saved encoder."""
    rng = np.random.default_rng(11)
    pre = root / "preprocess"
    write_token_memmap(pre, "passages", rng.integers(4, DOC_LEN + 1, n_docs).tolist(), width=DOC_LEN, seed=1)
    for split in ("train", "dev"):
        write_token_memmap(pre, f"{split}-query", rng.integers(3, QUERY_LEN + 1, N_QUERIES).tolist(),
                           width=QUERY_LEN, seed=2)
        qrels = [f"{q}\t0\t{p}\t1" for q in range(N_QUERIES) for p in rng.choice(n_docs, 2, replace=False)]
        (pre / f"{split}-qrel.tsv").write_text("\n".join(qrels) + "\n")
    tiny_encoder(0, out_dim=16).save_pretrained(root / "model")
    return {"pre": pre, "model": root / "model"}


def star_inference_args(inputs: dict, out: Path) -> list:
    return ["-m", "star.inference", "--data_type", "passage", "--mode", "dev", "--model_dir", inputs["model"],
            "--preprocess_dir", inputs["pre"], "--output_dir", out, "--max_doc_length", DOC_LEN,
            "--max_query_length", QUERY_LEN, "--eval_batch_size", 8, "--no_cuda", "--topk", 10, "--with_scores"]


def hardneg_args(inputs: dict, out: Path) -> list:
    return ["-m", "star.prepare_hardneg", "--data_type", "passage", "--mode", "train", "--model_dir",
            inputs["model"], "--preprocess_dir", inputs["pre"], "--output_dir", out, "--max_doc_length", DOC_LEN,
            "--max_query_length", QUERY_LEN, "--eval_batch_size", 8, "--not_faiss_cuda", "--no_cuda", "--topk", 5]
