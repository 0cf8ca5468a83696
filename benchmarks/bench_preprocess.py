"""Throughput and memory of preprocess.py on real MS MARCO passages.

Builds ``collection.tsv`` files of the 4,103 real passages of ../shared/data/msmarco-passage-dl19-judged-subset
repeated (fresh pids) to each corpus size, then measures

* end to end: ``preprocess.main`` (read, validate, tokenize, write the memmaps) in a child process per size,
  with its peak RSS (``resource.getrusage``) to show memory stays flat as the corpus grows;
* the bare fast tokenizer on the same texts held in memory, in batches of the same size: the Rust core
  (``encode_batch_fast`` with truncation) and the transformers call ``tok(batch, truncation=True)``;
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
    """Run preprocess end to end in this (fresh) process; print seconds, tokens and peak RSS as JSON."""
    import numpy as np

    import preprocess

    start = time.perf_counter()
    preprocess.main(["--data_type", "1", "--model_name_or_path", str(TOKENIZER), "--data_dir", data_dir,
                     "--out_dir", out_dir, "--threads", str(threads)])
    seconds = time.perf_counter() - start
    tokens = int(np.load(Path(out_dir) / "passages_length.npy").sum())
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "tokens": tokens, "peak_rss_mb": rss_mb}))


def run_child(data_dir: Path, out_dir: Path, threads: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, __file__, "--child", str(data_dir), str(out_dir), str(threads)],
                         check=True, capture_output=True, text=True, env=env, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bare_tokenizer(tok, texts: list[str], batch: int, repeats: int) -> dict:
    """Seconds of the Rust core and of the transformers call on in-memory texts, in batches."""
    import tokenizers

    core = tokenizers.Tokenizer.from_str(tok.backend_tokenizer.to_str())
    core.enable_truncation(512)
    chunks = [texts[i:i + batch] for i in range(0, len(texts), batch)]
    rust = best_of(repeats, lambda: [core.encode_batch_fast(c) for c in chunks])
    hf = best_of(repeats, lambda: [tok(c, truncation=True, max_length=512) for c in chunks])
    return {"rust_encode_batch_fast_s": rust, "transformers_call_s": hf}


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
    with_cut.stats.update(prefix=0, fallback=0)
    t_cut = best_of(repeats, lambda: with_cut.encode(docs, 512))
    t_full = best_of(repeats, lambda: full.encode(docs, 512))
    return {"docs": n_docs, "chars_per_doc": sum(map(len, docs)) / n_docs, "prefix_s": t_cut, "full_text_s": t_full,
            "speedup": t_full / t_cut, "identical_ids": True,
            "prefix_hits_per_run": with_cut.stats["prefix"] / repeats,
            "fallbacks_per_run": with_cut.stats["fallback"] / repeats}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[50000, 100000], help="corpus sizes (passages)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="tokenizer threads")
    p.add_argument("--repeats", type=int, default=2, help="repeats per timing (best kept)")
    p.add_argument("--loop_texts", type=int, default=4000, help="texts for the one-at-a-time loop")
    p.add_argument("--docs", type=int, default=600, help="documents for the prefix-shortcut timing")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "preprocess.json"))
    p.add_argument("--child", nargs=3, metavar=("DATA", "OUT", "THREADS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return 0

    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="true", RAYON_NUM_THREADS=str(args.threads))
    import preprocess

    tok = preprocess.load_tokenizer(TOKENIZER)
    passages = load_passages()
    results: dict = {"threads": args.threads, "cpu_count": os.cpu_count(), "batch_size": preprocess.BATCH_SIZE,
                     "end_to_end": [], "source": str(SUBSET)}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            data = write_collection(Path(tmp) / f"data{size}", passages, size)
            runs = [run_child(data, Path(tmp) / f"out{size}-{r}", args.threads) for r in range(args.repeats)]
            best = min(runs, key=lambda r: r["seconds"])
            results["end_to_end"].append({"passages": size, **best, "passages_per_s": size / best["seconds"],
                                          "tokens_per_s": best["tokens"] / best["seconds"],
                                          "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)})
    first = results["end_to_end"][0]
    n = first["passages"]
    texts = [passages[i % len(passages)].rstrip()[:10000] for i in range(n)]
    bare = bare_tokenizer(tok, texts, preprocess.BATCH_SIZE, args.repeats)
    loop_texts = texts[:args.loop_texts]
    loop_s = best_of(1, lambda: [tok.encode(t, truncation=True, max_length=512) for t in loop_texts])
    results["bare_tokenizer"] = {"passages": n, **bare,
                                 "rust_passages_per_s": n / bare["rust_encode_batch_fast_s"],
                                 "transformers_passages_per_s": n / bare["transformers_call_s"]}
    results["one_at_a_time_loop"] = {"passages": len(loop_texts), "seconds": loop_s,
                                     "passages_per_s": len(loop_texts) / loop_s}
    results["ratio_vs_rust_core"] = first["passages_per_s"] / results["bare_tokenizer"]["rust_passages_per_s"]
    results["ratio_vs_transformers_call"] = (first["passages_per_s"]
                                             / results["bare_tokenizer"]["transformers_passages_per_s"])
    results["speedup_vs_loop"] = first["passages_per_s"] / results["one_at_a_time_loop"]["passages_per_s"]
    results["doc_prefix_shortcut"] = doc_shortcut(tok, passages, args.docs, args.repeats)
    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


def print_table(r: dict) -> None:
    print(f"\npreprocess benchmark — {r['threads']} tokenizer threads, {r['cpu_count']} CPUs, "
          f"batches of {r['batch_size']}")
    print(f"{'what':<46}{'passages':>10}{'passages/s':>12}{'tokens/s':>12}{'peak RSS MB':>13}")
    for e in r["end_to_end"]:
        print(f"{'preprocess.py end to end (read+tokenize+write)':<46}{e['passages']:>10}{e['passages_per_s']:>12.0f}"
              f"{e['tokens_per_s']:>12.0f}{e['peak_rss_mb']:>13.0f}")
    b = r["bare_tokenizer"]
    print(f"{'bare Rust encode_batch_fast (in memory)':<46}{b['passages']:>10}{b['rust_passages_per_s']:>12.0f}")
    print(f"{'bare transformers tok(batch) (in memory)':<46}{b['passages']:>10}{b['transformers_passages_per_s']:>12.0f}")
    lp = r["one_at_a_time_loop"]
    print(f"{'loop: tok.encode one text at a time':<46}{lp['passages']:>10}{lp['passages_per_s']:>12.0f}")
    print(f"ours / Rust core = {r['ratio_vs_rust_core']:.2f}x, ours / transformers call = "
          f"{r['ratio_vs_transformers_call']:.2f}x, ours / one-at-a-time loop = {r['speedup_vs_loop']:.1f}x")
    d = r["doc_prefix_shortcut"]
    print(f"doc prefix shortcut: {d['docs']} docs of {d['chars_per_doc']:.0f} chars at 512 tokens: full text "
          f"{d['full_text_s']:.2f}s, prefix {d['prefix_s']:.2f}s -> {d['speedup']:.2f}x, identical ids, "
          f"{d['fallbacks_per_run']:.0f} fallbacks")


if __name__ == "__main__":
    raise SystemExit(main())
