"""Throughput and memory of preprocess.py on real MS MARCO passages.

Builds ``collection.tsv`` files of the 4,103 real passages of ../shared/data/msmarco-passage-dl19-judged-subset
repeated (fresh pids) to each corpus size, then measures

* end to end: ``preprocess.main`` (load the tokenizer, read and validate, tokenize, write the memmaps) in a child
  process per size and thread count (the one-off transformers import is excluded), with its peak RSS
  (``resource.getrusage``) to show memory stays flat as the corpus grows;
* the bare fast tokenizer on the same (lower-cased, space-prefixed) texts held in memory, in batches of the same
  size: the Rust core (``encode_batch_fast`` with truncation; also with the ids pulled out into Python lists, as
  any consumer must) and the transformers call ``tok(batch)``;
* a plain loop calling ``tok.encode`` one text at a time;
* the document prefix shortcut: ~10,000-character documents (real passages concatenated) encoded from a prefix
  vs from the full text (ids checked identical).

    python benchmarks/bench_preprocess.py [--sizes 50000 100000] [--out benchmarks/results/preprocess.json]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SUBSET = SHARED / "msmarco-passage-dl19-judged-subset" / "collection.tsv.gz"
TOKENIZER = SHARED / "roberta-base-tokenizer"


def load_passages() -> list[str]:
    with gzip.open(SUBSET, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t", 1)[1] for line in f]


def write_collection(folder: Path, passages: list[str], size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "collection.tsv", "w", encoding="utf-8", newline="\n") as f:
        for pid in range(size):
            f.write(f"{pid}\t{passages[pid % len(passages)]}\n")
    return folder


def child(data_dir: str, out_dir: str, threads: int) -> None:
    """Run preprocess end to end in this (fresh) process; print wall and CPU seconds, tokens and peak RSS.
    Importing transformers (~2 CPU-seconds, once per process) is timed apart as ``startup_s``."""
    start = time.perf_counter()
    import numpy as np
    import transformers  # noqa: F401  (what load_tokenizer imports)

    import preprocess

    startup = time.perf_counter() - start
    wall, cpu = time.perf_counter(), time.process_time()
    preprocess.main(["--data_type", "1", "--model_name_or_path", str(TOKENIZER), "--data_dir", data_dir,
                     "--out_dir", out_dir, "--threads", str(threads)])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tokens = int(np.load(Path(out_dir) / "passages_length.npy").sum())
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": wall, "cpu_seconds": cpu, "tokens": tokens, "peak_rss_mb": rss_mb,
                      "startup_s": startup}))


def run_child(data_dir: Path, out_dir: Path, threads: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, __file__, "--child", str(data_dir), str(out_dir), str(threads)],
                         check=True, capture_output=True, text=True, env=env, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed(repeats: int, fn) -> dict:
    """Best wall seconds over ``repeats`` runs, with the CPU seconds of that run (all threads)."""
    runs = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        runs.append({"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu})
    return min(runs, key=lambda r: r["seconds"])


def rate(n: int, run: dict, **extra) -> dict:
    return {"passages": n, **run, "passages_per_s": n / run["seconds"], **extra}


def end_to_end(passages: list[str], sizes: list[int], threads: list[int], repeats: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            data = write_collection(Path(tmp) / f"data{size}", passages, size)
            for t in threads if size == sizes[0] else threads[-1:]:  # larger sizes: all threads, one run
                runs = [run_child(data, Path(tmp) / f"out{size}-{t}-{r}", t)
                        for r in range(repeats if size == sizes[0] else 1)]
                best = min(runs, key=lambda r: r["seconds"])
                rows.append(rate(size, best, threads=t, tokens_per_s=best["tokens"] / best["seconds"],
                                 peak_rss_mb=max(r["peak_rss_mb"] for r in runs)))
    return rows


def bare_tokenizer(tok, texts: list[str], batch: int, threads: list[int], repeats: int) -> list[dict]:
    """The Rust core (``encode_batch_fast`` with truncation) and the transformers call on in-memory texts, in
    batches; one thread = TOKENIZERS_PARALLELISM=false.  ``texts`` are already lower-cased and space-prefixed,
    so the bare tokenizer does the same BPE work as preprocess.py (lower-cased text tokenizes faster)."""
    import tokenizers

    core = tokenizers.Tokenizer.from_str(tok.backend_tokenizer.to_str())
    core.enable_truncation(512)
    chunks = [texts[i:i + batch] for i in range(0, len(texts), batch)]

    def each_chunk(fn):
        return lambda: all(fn(c) is not None for c in chunks)  # results dropped batch by batch, as ours are

    rows = []
    for t in threads:
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if t > 1 else "false"
        rows.append(rate(len(texts), timed(repeats, each_chunk(core.encode_batch_fast)),
                         threads=t, what="Rust encode_batch_fast"))
    with_ids = each_chunk(lambda c: [e.ids for e in core.encode_batch_fast(c)])
    rows.append(rate(len(texts), timed(repeats, with_ids), threads=threads[-1], what="Rust encode_batch_fast + .ids"))
    hf = each_chunk(lambda c: tok(c, truncation=True, max_length=512))
    rows.append(rate(len(texts), timed(repeats, hf), threads=threads[-1], what="transformers tok(batch)"))
    return rows


def doc_shortcut(tok, passages: list[str], n_docs: int, repeats: int) -> dict:
    """Encode ~10,000-character documents at 512 tokens with and without the prefix shortcut."""
    import preprocess

    docs, i = [], 0
    for _ in range(n_docs):
        parts = []
        while sum(map(len, parts)) < 10000:
            parts.append(passages[i % len(passages)])
            i += 1
        docs.append(f"http://example.org/{len(docs)}<sep>{parts[0][:60]}<sep>{' '.join(parts)}"[:10000])
    with_cut = preprocess.Faithful28Tokenizer(tok)
    full = preprocess.Faithful28Tokenizer(tok, chars_per_token=None)
    assert with_cut.encode(docs, 512) == full.encode(docs, 512), "prefix shortcut changed the ids"
    t_cut = timed(repeats, lambda: with_cut.encode_content(docs, 512))
    t_full = timed(repeats, lambda: full.encode_content(docs, 512))
    return {"docs": n_docs, "chars_per_doc": sum(map(len, docs)) / n_docs, "prefix": t_cut, "full_text": t_full,
            "speedup": t_full["seconds"] / t_cut["seconds"], "identical_ids": True,
            "fallbacks": with_cut.stats["fallback"], "prefix_hits": with_cut.stats["prefix"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[50000, 100000], help="corpus sizes (passages)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="tokenizer threads")
    p.add_argument("--repeats", type=int, default=2, help="repeats per timing (best kept)")
    p.add_argument("--loop_texts", type=int, default=3000, help="texts for the one-at-a-time loop")
    p.add_argument("--docs", type=int, default=400, help="documents for the prefix-shortcut timing")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "preprocess.json"))
    p.add_argument("--child", nargs=3, metavar=("DATA", "OUT", "THREADS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return 0

    os.environ.update(HF_HUB_OFFLINE="1", RAYON_NUM_THREADS=str(args.threads))
    import preprocess

    tok = preprocess.load_tokenizer(TOKENIZER)
    passages = load_passages()
    threads = sorted({1, args.threads})
    n = args.sizes[0]
    texts = [" " + passages[i % len(passages)].rstrip()[:10000].lower() for i in range(n)]
    loop_texts = texts[:args.loop_texts]
    results = {
        "cpu_count": os.cpu_count(), "threads": threads, "batch_size": preprocess.BATCH_SIZE, "source": str(SUBSET),
        "load_average_before": os.getloadavg(),
        "end_to_end": end_to_end(passages, args.sizes, threads, args.repeats),
        "bare_tokenizer": bare_tokenizer(tok, texts, preprocess.BATCH_SIZE, threads, args.repeats),
        "one_at_a_time_loop": rate(len(loop_texts), timed(1, lambda: [tok.encode(t, truncation=True, max_length=512)
                                                                      for t in loop_texts])),
        "doc_prefix_shortcut": doc_shortcut(tok, passages, args.docs, args.repeats),
        "load_average_after": os.getloadavg(),
    }
    bare = {(r["what"], r["threads"]): r for r in results["bare_tokenizer"]}
    results["ratios"] = []
    for e in (e for e in results["end_to_end"] if e["passages"] == n):
        for what in ("Rust encode_batch_fast", "Rust encode_batch_fast + .ids"):
            if (what, e["threads"]) in bare:
                ref = bare[what, e["threads"]]
                results["ratios"].append({"threads": e["threads"], "vs": what,
                                          "wall": e["passages_per_s"] / ref["passages_per_s"],
                                          "cpu_efficiency": ref["cpu_seconds"] / e["cpu_seconds"]})
    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


def print_table(r: dict) -> None:
    print(f"\npreprocess benchmark: {r['cpu_count']} CPUs, batches of {r['batch_size']}, load average "
          f"{r['load_average_before'][0]:.1f} before / {r['load_average_after'][0]:.1f} after (a shared machine "
          "inflates wall times; CPU seconds are steadier)")
    print(f"{'what':<44}{'threads':>8}{'passages':>10}{'passages/s':>12}{'tokens/s':>11}{'CPU s':>8}"
          f"{'peak RSS MB':>13}")

    def line(what, e, tokens="", rss=""):
        print(f"{what:<44}{e.get('threads', 1):>8}{e['passages']:>10}{e['passages_per_s']:>12.0f}{tokens:>11}"
              f"{e['cpu_seconds']:>8.1f}{rss:>13}")

    for e in r["end_to_end"]:
        line("preprocess.py end to end (read+tok+write)", e, f"{e['tokens_per_s']:.0f}", f"{e['peak_rss_mb']:.0f}")
    for b in r["bare_tokenizer"]:
        line(f"bare {b['what']}", b)
    line("loop: tok.encode one text at a time", r["one_at_a_time_loop"])
    for q in r["ratios"]:
        print(f"ours / bare {q['vs']} at {q['threads']} thread(s): wall {q['wall']:.2f}x, "
              f"CPU efficiency {q['cpu_efficiency']:.2f}x")
    loop_rate = r["one_at_a_time_loop"]["passages_per_s"]
    best = max(e["passages_per_s"] for e in r["end_to_end"])
    print(f"ours (best) / one-at-a-time loop: {best / loop_rate:.1f}x")
    d = r["doc_prefix_shortcut"]
    print(f"doc prefix shortcut: {d['docs']} docs of {d['chars_per_doc']:.0f} chars at 512 tokens: full text "
          f"{d['full_text']['seconds']:.2f}s, prefix {d['prefix']['seconds']:.2f}s -> {d['speedup']:.2f}x, "
          f"identical ids, {d['fallbacks']} fallbacks")


if __name__ == "__main__":
    raise SystemExit(main())
