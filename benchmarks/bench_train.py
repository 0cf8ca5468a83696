"""Training-step throughput (queries/s) and peak memory of the three negative modes (star/train.py's step).

Each measurement runs the trainer's own step — ``star.train.accumulate_gradients`` (encode queries, positives
and extra docs, loss in fp32, backward) + ``train_utils.optimizer_step`` (clip, Lamb, schedule) — on synthetic
full-length batches (random token ids; the masks of distinct positives), after warm-up steps.  Data loading is
not included.  Every configuration runs in a fresh subprocess so that peak memory is its own.

    python benchmarks/bench_train.py                    # CPU: hidden 64, 2 layers, batch 32, q 24, d 120
    python benchmarks/bench_train.py --device cuda      # roberta-base size, batch 256, fp32/fp16/+checkpointing

Prints a table and writes ``benchmarks/results/train.json`` (``--out``; under the key ``cpu`` or ``cuda``, the
other key is kept).  Peak memory: CPU = the process's maximum resident set (includes the ~0.4 GB of the
Python/torch runtime; ``rss_before_mb`` is the RSS after building the model), CUDA =
``torch.cuda.max_memory_allocated``.  On a busy small CPU pass ``--threads 1``: OpenMP threads spin-waiting for a
descheduled sibling make multi-threaded timings erratic (the recorded CPU figures use one thread).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from io_utils import atomic_write_json, run_cli

MODES = ("star", "inbatch", "rand")
CPU_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)
BASE_MODEL = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


def synthetic_batch(mode: str, batch: int, q_len: int, d_len: int, extra: int, vocab: int) -> dict[str, Any]:
    """A TrainCollator-shaped batch of full-length sequences; every query has its own distinct positive."""
    g = torch.Generator().manual_seed(0)

    def seqs(n: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(4, vocab, (n, length), generator=g)
        ids[:, 0], ids[:, -1] = 0, 2
        return ids, torch.ones_like(ids)

    out: dict[str, Any] = {}
    out["query_input_ids"], out["query_attention_mask"] = seqs(batch, q_len)
    out["doc_input_ids"], out["doc_attention_mask"] = seqs(batch, d_len)
    out["rel_pair_mask"] = 1.0 - torch.eye(batch)
    out["qids"], out["pos_ids"] = list(range(batch)), list(range(batch))
    if mode != "inbatch":
        out["other_doc_input_ids"], out["other_doc_attention_mask"] = seqs(batch * extra, d_len)
        out["other_pair_mask"] = torch.ones(batch, batch * extra)
        out["other_ids"] = list(range(batch, batch + batch * extra))
    return out


def measure(mode: str, device: str, model_size: dict, batch: int, q_len: int, d_len: int, extra: int,
            precision: str, checkpointing: bool, steps: int, warmup: int) -> dict[str, Any]:
    """Run ``warmup`` + ``steps`` training steps in this process; return the timing and memory figures."""
    from transformers import RobertaConfig

    import train_utils as tu
    from model import DenseEncoder
    from star.train import BatchEncoder, accumulate_gradients

    tu.set_seed(0)
    dev = torch.device(device)
    config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, **model_size)
    model = DenseEncoder.from_config(config)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.to(dev).train()
    wrapped = BatchEncoder(model)
    optimizer = tu.build_optimizer("lamb", tu.param_groups(model, 0.01), 1e-4)
    scheduler = tu.linear_schedule(optimizer, 1000, 100000)
    fp16, bf16 = precision == "fp16", precision == "bf16"
    scaler = tu.make_grad_scaler(dev, fp16)
    data = synthetic_batch(mode, batch, q_len, d_len, extra, config.vocab_size)
    rel = {i: [i] for i in range(batch)}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def step() -> None:
        accumulate_gradients(wrapped, [data], 1, mode, rel, dev, scaler, fp16, bf16)
        tu.optimizer_step(list(model.parameters()), optimizer, scheduler, scaler, 1.0)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    try:
        for _ in range(warmup):
            step()
        sync()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        elapsed = time.perf_counter() - start
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"step_s": elapsed / steps, "queries_per_s": batch * steps / elapsed, "peak_mem_mb": peak,
            "rss_before_mb": rss_before if dev.type == "cpu" else None}


def configurations(device: str, modes: list[str], cpu_batch: int) -> list[dict[str, Any]]:
    if device == "cpu":
        return [dict(mode=m, device="cpu", model_size=CPU_MODEL, model="hidden 64, 2 layers", batch=cpu_batch,
                     q_len=24, d_len=120, extra=1, precision="fp32", checkpointing=False, steps=5, warmup=2)
                for m in modes]
    variants = [("fp32", False), ("fp16", False), ("fp16", True), ("fp32", True), ("bf16", False)]
    return [dict(mode=m, device="cuda", model_size=BASE_MODEL, model="roberta-base size", batch=256, q_len=24,
                 d_len=120, extra=1, precision=p, checkpointing=c, steps=5, warmup=2)
            for m in modes for p, c in variants]


def run_isolated(config: dict[str, Any], threads: Optional[int]) -> dict[str, Any]:
    """Run one configuration in a fresh Python process (own peak memory); returns its figures."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_one", json.dumps(config)]
    if threads:
        cmd += ["--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'mode':8} {'model':20} {'batch':>5} {'prec':5} {'ckpt':5} {'step s':>8} {'queries/s':>10} {'peak MB':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:8} {r['model']:20} {r['batch']:>5} {r['precision']:5} {str(r['checkpointing']):5} "
                  f"{r['error']}")
            continue
        print(f"{r['mode']:8} {r['model']:20} {r['batch']:>5} {r['precision']:5} {str(r['checkpointing']):5} "
              f"{r['step_s']:8.3f} {r['queries_per_s']:10.1f} {r['peak_mem_mb']:9.0f}")


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--cpu_batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "train.json"))
    p.add_argument("--_one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._one:
        config = json.loads(args._one)
        keys = ("mode", "device", "model_size", "batch", "q_len", "d_len", "extra", "precision", "checkpointing",
                "steps", "warmup")
        print(json.dumps(measure(**{k: config[k] for k in keys})))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    rows = []
    for config in configurations(args.device, args.modes, args.cpu_batch):
        result = run_isolated(config, args.threads)
        rows.append({k: v for k, v in config.items() if k != "model_size"} | result)
    print_table(rows)
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "threads": args.threads or torch.get_num_threads(),
           "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None}
    out = Path(args.out)
    previous = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    previous[args.device] = {"environment": env, "results": rows}   # one entry per device kind
    atomic_write_json(out, previous)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
