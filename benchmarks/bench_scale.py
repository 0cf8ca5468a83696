"""Scale-out on one machine: corpus encoding and exact search with 1 process versus N torchrun processes (gloo on
the CPU), on the same data and the same cores.

Rows, each timed inside the processes (start-up and model loading excluded):

* ``encode``: ``retrieve_utils.encode_split`` of the passages — one process with all the cores' threads, or
  each rank its shard (balanced by tokens) with ``cores / N`` threads, then rank 0 assembles the shards;
* ``search``: ``retrieve_utils.rank_queries`` — one process over the whole corpus, or each rank its rows
  followed by rank 0's merge and the rank file.

Three configurations on the same cores: A = one process with every core's thread, B = one process with
``cores / N`` threads, C = N torchrun processes with ``cores / N`` threads each; A/C is the speed-up on the same
machine, B/C the speed-up per process.  C's files are compared with B's (the same threads per process: expected
byte-identical) and A's (other thread counts may round the matrix products differently).  The data: real MS MARCO passages
from ``../shared`` (the DL19 judged subset), tokenized with the roberta-base tokenizer and repeated up to
``--passages``, a randomly initialised MiniLM-sized BERT (6 x 384), and random query / document vectors for the
search (``--search_docs`` x 384, ``--queries`` queries, top ``--topk``).

    python benchmarks/bench_scale.py [--nproc 2 --passages 6000 --search_docs 400000 --queries 2000 --topk 100]

Prints one table and writes ``--json`` (default ``bench_scale.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DIM = 384  # bench_encode's random MiniLM-sized encoder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes to compare with one")
    parser.add_argument("--passages", type=int, default=6000, help="passages to encode")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="encoding batch (rows)")
    parser.add_argument("--search_docs", type=int, default=400000, help="document vectors to search")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--topk", type=int, default=100)
    parser.add_argument("--json", default="bench_scale.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a data folder: time one configuration there
    return parser


def prepare(folder: Path, args: argparse.Namespace) -> None:
    """Token memmaps of real passages, a random encoder, random search vectors (the data helpers of
    ``bench_encode.py``)."""
    from bench_encode import build_model, load_passages, write_token_dir

    model, tokenizer, _ = build_model(None)  # a random MiniLM-sized BERT with the roberta-base tokenizer
    texts = load_passages(args.passages)
    write_token_dir(folder / "preprocess", tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"],
                    args.max_length)
    model.save_pretrained(folder / "model")
    rng = np.random.default_rng(0)
    rng.standard_normal((args.search_docs, DIM), dtype=np.float32).tofile(folder / "docs.f32")
    rng.standard_normal((args.queries, DIM), dtype=np.float32).tofile(folder / "queries.f32")


def worker(folder: Path, out: Path, args: argparse.Namespace) -> None:
    """Time the encode and the search of one configuration (one process, or one torchrun rank)."""
    import faiss
    import torch

    import retrieve_utils as ip
    from infra.distributed import barrier, cleanup_distributed

    threads = int(os.environ["BENCH_THREADS"])
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    placement = ip.resolve_placement(argparse.Namespace(no_cuda=True, shard_id=None, num_shards=None))
    model, model_id, pad = ip.load_encoder(folder / "model")
    timings = {}
    barrier()
    start = time.perf_counter()
    ip.encode_split(model, model_id, folder / "preprocess", "passages", args.max_length, out / "passages.memmap",
                    batch_size=args.batch, device=placement.device, pad_token_id=pad, placement=placement)
    barrier()
    timings["encode"] = time.perf_counter() - start
    docs = np.memmap(folder / "docs.f32", np.float32, mode="r").reshape(-1, DIM)
    queries = np.fromfile(folder / "queries.f32", np.float32).reshape(-1, DIM)
    barrier()
    start = time.perf_counter()
    ip.rank_queries(docs, queries, args.topk, out / "dev.rank.tsv", placement, with_scores=True)
    barrier()
    timings["search"] = time.perf_counter() - start
    if placement.is_main:
        (out / "timings.json").write_text(json.dumps(timings))
    cleanup_distributed()


def run_configuration(folder: Path, out: Path, nproc: int, threads: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", str(folder), "--json", str(out), "--passages", str(args.passages),
               "--max_length", str(args.max_length), "--batch", str(args.batch), "--topk", str(args.topk)]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   *command[1:]]
    env = dict(os.environ, BENCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    return json.loads((out / "timings.json").read_text())


def compare_outputs(a: Path, b: Path) -> dict:
    """How the files of two runs differ: byte identity of each, and for the rank files the share of equal ids and
    the largest score difference."""
    same = {name: (a / name).read_bytes() == (b / name).read_bytes() for name in ("passages.memmap", "dev.rank.tsv")}
    runs = [np.loadtxt(folder / "dev.rank.tsv", dtype=np.float64, ndmin=2) for folder in (a, b)]
    return {"byte_identical": same, "rank_ids_equal": float((runs[0][:, 1] == runs[1][:, 1]).mean()),
            "max_score_difference": float(np.abs(runs[0][:, 3] - runs[1][:, 3]).max())}


def main() -> None:
    args = build_parser().parse_args()
    if args.worker:
        worker(Path(args.worker), Path(args.json), args)
        return
    cores = os.cpu_count() or 1
    per_process = max(1, cores // args.nproc)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepare(folder, args)
        runs = {"one": run_configuration(folder, folder / "one", 1, cores, args),
                "one_thin": run_configuration(folder, folder / "one_thin", 1, per_process, args),
                "many": run_configuration(folder, folder / "many", args.nproc, per_process, args)}
        versus_thin = compare_outputs(folder / "one_thin", folder / "many")
        versus_one = compare_outputs(folder / "one", folder / "many")
    rows = [{"stage": stage, "one_process_all_threads_s": runs["one"][stage],
             "one_process_s": runs["one_thin"][stage], "n_processes_s": runs["many"][stage],
             "speedup_same_cores": runs["one"][stage] / runs["many"][stage],
             "speedup_per_process": runs["one_thin"][stage] / runs["many"][stage]} for stage in ("encode", "search")]
    print(f"{cores} cores; A = 1 process x {cores} threads, B = 1 process x {per_process} threads, "
          f"C = {args.nproc} torchrun processes (gloo) x {per_process} threads")
    print(f"{'stage':<8} {'A (s)':>8} {'B (s)':>8} {'C (s)':>8} {'A/C':>7} {'B/C':>7}")
    for row in rows:
        print(f"{row['stage']:<8} {row['one_process_all_threads_s']:>8.2f} {row['one_process_s']:>8.2f} "
              f"{row['n_processes_s']:>8.2f} {row['speedup_same_cores']:>6.2f}x {row['speedup_per_process']:>6.2f}x")
    for name, versus in (("C vs B (same threads per process)", versus_thin), ("C vs A", versus_one)):
        print(f"{name}: byte-identical {versus['byte_identical']}, rank ids equal {versus['rank_ids_equal']:.4%}, "
              f"largest score difference {versus['max_score_difference']:.3g}")
    Path(args.json).write_text(json.dumps({"cores": cores, "nproc": args.nproc, "passages": args.passages,
                                           "search_docs": args.search_docs, "queries": args.queries,
                                           "topk": args.topk, "rows": rows, "c_vs_b": versus_thin,
                                           "c_vs_a": versus_one}, indent=1))


if __name__ == "__main__":
    main()
