"""Streamed exact search over an embedding memmap several times larger than its memory budget, against faiss
``IndexFlatIP`` holding the same embeddings in RAM.

Writes a random float32 memmap (default 2M x 128 = 1 GiB) and random queries, then runs each path in a fresh
child process (so its peak RSS, ``VmHWM``, is its own):

* ``in_ram``: ``FlatIPIndex`` (faiss ``IndexFlatIP``, embeddings copied into RAM) then ``.search``;
* ``streamed``: ``streamed_search`` with ``mem_gb`` = the budget (default 0.25 GiB: 128 MiB corpus blocks read
  from the file into one reused buffer).

Reports search seconds, queries/s, peak RSS and checks that both return the same ids.  Goals: streamed peak RSS
<= 2 GB, streamed throughput >= 0.9 x in-RAM search.

    python benchmarks/bench_search.py [--rows 2000000 --dim 128 --queries 5000 --budget_gb 0.25 --repeats 2]
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


def peak_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def child(mode: str, emb_path: str, rows: int, dim: int, query_path: str, k: int, budget_gb: float,
          out_ids: str) -> None:
    """Run one search path in this process; print timings and peak RSS as JSON."""
    from infra.exact_search import FlatIPIndex, streamed_search

    embeddings = np.memmap(emb_path, dtype=np.float32, mode="r", shape=(rows, dim))
    queries = np.load(query_path)
    build = 0.0
    start = time.perf_counter()
    if mode == "in_ram":
        index = FlatIPIndex(embeddings)
        build = time.perf_counter() - start
        start = time.perf_counter()
        _, ids = index.search(queries, k, desc=None)
    else:
        _, ids = streamed_search(embeddings, queries, k, mem_gb=budget_gb, desc=None)
    seconds = time.perf_counter() - start
    np.save(out_ids, ids)
    print(json.dumps({"mode": mode, "build_seconds": build, "search_seconds": seconds,
                      "queries_per_second": len(queries) / seconds, "peak_rss_mb": peak_rss_mb()}))


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True,
                         cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_embeddings(path: Path, rows: int, dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        for start in range(0, rows, 1 << 18):
            rng.standard_normal((min(1 << 18, rows - start), dim), dtype=np.float32).tofile(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--budget_gb", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=2, help="runs per path; the fastest is reported")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "search.json"))
    parser.add_argument("--child", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, emb, rows, dim, queries, k, budget, out_ids = args.child
        child(mode, emb, int(rows), int(dim), queries, int(k), float(budget), out_ids)
        return

    with tempfile.TemporaryDirectory() as tmp:
        emb = Path(tmp) / "emb.memmap"
        write_embeddings(emb, args.rows, args.dim, seed=0)
        queries = Path(tmp) / "queries.npy"
        np.save(queries, np.random.default_rng(1).standard_normal((args.queries, args.dim), dtype=np.float32))
        results, ids = {}, {}
        for mode in ("in_ram", "streamed"):
            runs = [run_child(mode, str(emb), str(args.rows), str(args.dim), str(queries), str(args.k),
                              str(args.budget_gb), str(Path(tmp) / f"{mode}.npy")) for _ in range(args.repeats)]
            results[mode] = min(runs, key=lambda r: r["search_seconds"])
            ids[mode] = np.load(Path(tmp) / f"{mode}.npy")
        same = bool(np.array_equal(ids["in_ram"], ids["streamed"]))

    file_gb = args.rows * args.dim * 4 / 1e9
    ratio = results["streamed"]["queries_per_second"] / results["in_ram"]["queries_per_second"]
    print(f"{args.rows:,} x {args.dim} float32 = {file_gb:.2f} GB, {args.queries:,} queries, k={args.k}, "
          f"streamed budget {args.budget_gb} GiB, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"{'path':<10} {'build s':>8} {'search s':>9} {'queries/s':>10} {'peak RSS MB':>12}")
    for mode, r in results.items():
        print(f"{mode:<10} {r['build_seconds']:>8.2f} {r['search_seconds']:>9.2f} {r['queries_per_second']:>10.1f} "
              f"{r['peak_rss_mb']:>12.0f}")
    print(f"streamed / in-RAM throughput: {ratio:.2f}x (goal >= 0.9); streamed peak RSS "
          f"{results['streamed']['peak_rss_mb']:.0f} MB (goal <= 2000); same ids: {same}")
    report = {"rows": args.rows, "dim": args.dim, "queries": args.queries, "k": args.k,
              "budget_gb": args.budget_gb, "file_gb": file_gb, "cpus": os.cpu_count(),
              "load_average": os.getloadavg()[0], "results": results, "throughput_ratio": ratio,
              "same_ids": same}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
