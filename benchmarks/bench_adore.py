"""Time per ADORE training step, split into encode / retrieve / loss+backward, and how retrieval scales with the corpus.

Each measurement runs adore/train.py's own pieces on synthetic data, per index backend:

* ``encode``: the query encoder's forward in train mode (batch of random full-length queries);
* ``retrieve``: ``retrieve_candidates`` — one exact top-K search of the detached batch, labels, appended positives;
* ``loss/backward``: ``candidate_scores`` (gather the K embeddings, fp32 scores) + ``adore_batch_loss`` + backward
  + gradient clipping + the AdamW/schedule step.

Backends: ``faiss`` (IndexFlatIP: CPU, or GPU with --device cuda when faiss has GPU support) and ``tensor``
(chunked fp32 matmul + top-k on the model's device).  (A bf16 "fast" scan with an fp32 certificate was measured
on an H200 at MS MARCO scale and removed, issue #12: 32.1 ms per step against 23.8 ms for the fp32 tensor scan,
with 17 % of the queries searched again in fp32.)

    python benchmarks/bench_adore.py                      # CPU: tiny encoder, 5k and 200k x 768 docs, B 32, K 200
    python benchmarks/bench_adore.py --device cuda        # roberta-base-size encoder, 1M x 768 docs
    python benchmarks/bench_adore.py --device cuda --rows 8841823     # MS MARCO passage size (27 GB)

Projection: an exact scan of MS MARCO passages reads 8.84M x 768 x 4 B = 27.2 GB per step;
at --bandwidth_gbs (default 3000, an H100-class GPU) that is the floor of the retrieval time per step.  It is
compared with the encode + loss/backward time measured for the roberta-base-size encoder (--device cuda; a CPU-only
run uses a FLOP estimate at --gpu_tflops) and with the original's README figure (one epoch of 15,717 steps in
about an hour).

Prints a table and writes ``benchmarks/results/adore.json`` (under the key ``cpu`` or ``cuda``; the other key is
kept).  Timings are medians over --steps steps after --warmup steps.  On a busy small CPU use --threads 1 (the
default here): spinning OpenMP threads make multi-threaded timings erratic.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from infra.exact_search import faiss_gpu_count
from infra.training_index import TrainingIndex, build_training_index
from infra.optim import build_optimizer, linear_schedule, make_grad_scaler, optimizer_step, param_groups
from adore.train import candidate_scores, retrieve_candidates
from infra.io import atomic_write_json, run_cli
from model import adore_batch_loss
from model import DenseEncoder

CPU_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)
BASE_MODEL = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
MSMARCO_PASSAGES = 8_841_823
ORIGINAL_STEPS_PER_HOUR = 15_717  # README: one epoch (502,939 queries / 32) "only costs 1 hour"
DIM = 768
ROBERTA_BASE_NON_EMBEDDING_PARAMS = 85_000_000  # 12 layers x 7.1M (+ the 0.6M head)


def build_model(size: dict[str, int], device: torch.device) -> DenseEncoder:
    from transformers import RobertaConfig

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, output_embedding_size=DIM, **size)
    return DenseEncoder.from_config(config).to(device).train()


def random_embeddings(rows: int, seed: int) -> np.ndarray:
    """Standard-normal float32 [rows, 768] (norms ≈ 27.7, like the LayerNorm-headed query embeddings)."""
    out = np.empty((rows, DIM), np.float32)
    rng = np.random.default_rng(seed)
    for start in range(0, rows, 1 << 18):
        out[start:start + (1 << 18)] = rng.standard_normal((min(1 << 18, rows - start), DIM), dtype=np.float32)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: DenseEncoder, index: TrainingIndex, device: torch.device, batch: int, q_len: int, k: int,
            steps: int, warmup: int) -> dict[str, float]:
    """Median milliseconds of the three parts of a step over ``steps`` steps (after ``warmup``)."""
    g = torch.Generator().manual_seed(0)
    optimizer = build_optimizer("adamw", param_groups(model, 0.01), 5e-6)
    scheduler = linear_schedule(optimizer, 2000, 100000)
    scaler = make_grad_scaler(device, False)
    parameters = list(model.parameters())
    parts: dict[str, list[float]] = {"encode": [], "retrieve": [], "loss_backward": []}
    for step in range(warmup + steps):
        ids = torch.randint(4, 50265, (batch, q_len), generator=g)
        ids[:, 0], ids[:, -1] = 0, 2
        positives = [[int(p)] for p in torch.randint(0, index.ntotal, (batch,), generator=g)]
        _sync(device)
        t0 = time.perf_counter()
        q = model(ids.to(device), torch.ones_like(ids).to(device))
        _sync(device)
        t1 = time.perf_counter()
        candidates = retrieve_candidates(index, q, positives, k, "none_retrieved")
        _sync(device)
        t2 = time.perf_counter()
        scores = candidate_scores(index, q, candidates)
        loss = adore_batch_loss(scores, torch.from_numpy(candidates.labels).to(device), 200, float(batch),
                                torch.from_numpy(candidates.lengths).to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer_step(parameters, optimizer, scheduler, scaler, 0.0)
        _sync(device)
        t3 = time.perf_counter()
        if step >= warmup:
            for name, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                parts[name].append(seconds * 1000)
    out = {f"{name}_ms": statistics.median(values) for name, values in parts.items()}
    out["step_ms"] = sum(out.values())
    out["retrieval_share"] = out["retrieve_ms"] / out["step_ms"]
    return out


def backends(device: torch.device) -> list[str]:
    """The index backends to run."""
    return (["faiss"] if device.type == "cpu" or faiss_gpu_count() > 0 else []) + ["tensor"]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    size, label = (BASE_MODEL, "roberta-base size") if args.device == "cuda" else (CPU_MODEL, "hidden 64, 2 layers")
    model = build_model(size, device)
    rows_out = []
    for rows in args.rows:
        docs = random_embeddings(rows, seed=rows)
        for backend in backends(device):
            start = time.perf_counter()
            gpus = [device.index or 0] if backend == "faiss" and device.type == "cuda" else None
            index = build_training_index(docs, backend, gpus, device)
            build_s = time.perf_counter() - start
            try:
                figures = measure(model, index, device, args.batch, args.q_len, args.k, args.steps, args.warmup)
            except torch.OutOfMemoryError:
                figures = {"error": "out of memory"}
            rows_out.append({"rows": rows, "dim": DIM, "model": label, "batch": args.batch, "k": args.k,
                             "backend": backend, "build_s": build_s, **figures})
            del index
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows_out


def projection(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Scan time at MS MARCO scale from the memory bandwidth, and the retrieval share of a step.

    The encoder's time per step is the roberta-base-size measurement when this run has one (``--device cuda``),
    else an estimate: 6 · 85M non-embedding parameters · batch · q_len tokens FLOPs at --gpu_tflops (fp32
    training, no TF32)."""
    fp32_bytes = MSMARCO_PASSAGES * DIM * 4
    bandwidth = args.bandwidth_gbs * 1e9
    scan_ms = {"fp32": fp32_bytes / bandwidth * 1000}
    out: dict[str, Any] = {"passages": MSMARCO_PASSAGES, "fp32_gb_per_scan": fp32_bytes / 1e9,
                           "bandwidth_gbs": args.bandwidth_gbs, "scan_ms": scan_ms,
                           "original_step_ms_readme": 3600_000 / ORIGINAL_STEPS_PER_HOUR}
    base = [r for r in rows if r["model"] == "roberta-base size" and "error" not in r]
    if base:
        out["model_ms"] = statistics.median(r["encode_ms"] + r["loss_backward_ms"] for r in base)
        out["model_ms_source"] = "measured (roberta-base size, this run)"
    else:
        flops = 6 * ROBERTA_BASE_NON_EMBEDDING_PARAMS * args.batch * args.q_len
        out["model_ms"] = flops / (args.gpu_tflops * 1e12) * 1000
        out["model_ms_source"] = f"estimated: 6 x 85M params x {args.batch} x {args.q_len} tokens at " \
                                 f"{args.gpu_tflops:g} TFLOP/s"
    out["step_ms"] = {p: s + out["model_ms"] for p, s in scan_ms.items()}
    out["retrieval_share"] = {p: s / out["step_ms"][p] for p, s in scan_ms.items()}
    return out


def print_table(rows: list[dict[str, Any]], proj: dict[str, Any]) -> None:
    head = (f"{'docs':>9} {'backend':7} {'encode ms':>10} {'retrieve ms':>12} {'loss+bwd ms':>12} {'step ms':>9} "
            f"{'retr %':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        lead = f"{r['rows']:>9,} {r['backend']:7} "
        if "error" in r:
            print(lead + r["error"])
            continue
        print(lead + f"{r['encode_ms']:10.1f} {r['retrieve_ms']:12.1f} {r['loss_backward_ms']:12.1f} "
              f"{r['step_ms']:9.1f} {r['retrieval_share']:7.1%}")
    scan = proj["scan_ms"]
    print(f"\nprojection, MS MARCO passages ({proj['fp32_gb_per_scan']:.1f} GB fp32 per exact scan) at "
          f"{proj['bandwidth_gbs']:.0f} GB/s: scan >= {scan['fp32']:.1f} ms; "
          f"the original's README step: ~{proj['original_step_ms_readme']:.0f} ms")
    share, step = proj["retrieval_share"], proj["step_ms"]
    print(f"encode + loss/backward {proj['model_ms']:.1f} ms ({proj['model_ms_source']}) → step ~{step['fp32']:.1f} "
          f"ms ({share['fp32']:.0%} retrieval)")


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--rows", type=int, nargs="+", default=None,
                   help="corpus sizes (default: 5000 200000 on cpu, 1000000 on cuda)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--q_len", type=int, default=24, help="query tokens (ADORE truncates at 64)")
    p.add_argument("--k", type=int, default=200, help="documents retrieved per query (--neg_topk)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch/faiss threads (default: 1 on cpu)")
    p.add_argument("--bandwidth_gbs", type=float, default=3000.0, help="GPU memory bandwidth of the projection")
    p.add_argument("--gpu_tflops", type=float, default=30.0,
                   help="effective fp32 training TFLOP/s of the projection's encoder estimate (CPU-only runs)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "adore.json"))
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    args.rows = args.rows or ([5000, 200_000] if args.device == "cpu" else [1_000_000])
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        import faiss

        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
    rows = run(args)
    proj = projection(rows, args)
    print_table(rows, proj)
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "cpus": os.cpu_count(), "threads": threads or torch.get_num_threads(), "load_average": os.getloadavg()[0],
           "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None}
    out = Path(args.out)
    previous = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    previous[args.device] = {"environment": env, "results": rows, "projection": proj}
    atomic_write_json(out, previous)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
