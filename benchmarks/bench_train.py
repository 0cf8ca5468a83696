"""Training-step throughput (queries/s) and peak memory of the three negative modes (star/train.py's step), and
the time of a step's non-model parts (``--parts``).

Each step measurement runs the trainer's own step — ``star.train.accumulate_gradients`` (encode queries, positives
and extra docs, loss in fp32, backward) + ``infra.optim.optimizer_step`` (clip, Lamb, schedule) — on synthetic
full-length batches (random token ids; the masks of distinct positives), after warm-up steps.  Data loading is
not included.  Every configuration runs in a fresh subprocess so that peak memory is its own.

    python benchmarks/bench_train.py                    # CPU: hidden 64, 2 layers, batch 32, q 24, d 120
    python benchmarks/bench_train.py --device cuda      # roberta-base size, batch 256, fp32/fp16/+checkpointing
    python benchmarks/bench_train.py --device cuda --modes star --variants fp16+ckpt bf16
    python benchmarks/bench_train.py --parts [--device cuda]     # the non-model parts of a STAR step

``--parts`` measures, per STAR step at batch ``--parts_batch`` (256: 768 sequences with one hard negative):

* ``collate``: the dataset items + ``TrainCollator`` on the main process (synthetic token files of MS MARCO-like
  lengths; the steady state after the 10 batches padded to full length), and how long the main thread still waits
  for its batch when ``star.train`` reads them in a background thread (``infra.batch_plan.BackgroundIterator``) while
  the step runs (simulated by a ``--parts_step_ms`` sleep, which releases the GIL as a device wait does);
* ``optimizer``: Lamb per parameter (``foreach=False``, the reference) against the multi-tensor default, and the
  gradient clipping, on roberta-base's 201 parameters (``--parts_model``): the host time (process CPU time, with
  16-element tensors of the same count and groups: what a GPU step pays to launch the kernels) and the full-size
  step on the device (CUDA: wall time; CPU: process CPU time, which a busy machine does not inflate);
* ``syncs``: host reads of tensor values (``Tensor.item/tolist/__bool__/__float__/__int__/cpu/numpy``) during one
  STAR step per precision, with their call sites (on CUDA also the synchronising calls
  ``torch.cuda.set_sync_debug_mode`` reports).

Prints a table and writes ``benchmarks/results/train.json`` (``--out``; under the key ``cpu`` or ``cuda`` —
``cpu_parts`` / ``cuda_parts`` for ``--parts`` —, the other keys are kept).  Peak memory: CPU = the process's
maximum resident set (includes the ~0.4 GB of the Python/torch runtime; ``rss_before_mb`` is the RSS after building
the model), CUDA = ``torch.cuda.max_memory_allocated``.  On a busy small CPU pass ``--threads 1``: OpenMP threads
spin-waiting for a descheduled sibling make multi-threaded timings erratic (the recorded CPU figures use one
thread).
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from infra.io import atomic_write_json, run_cli

MODES = ("star", "inbatch", "rand")
MODEL_SIZES = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "cpu": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
MODEL_NAMES = {"tiny": "hidden 32, 2 layers", "cpu": "hidden 64, 2 layers", "base": "roberta-base size"}
CPU_MODEL, BASE_MODEL = MODEL_SIZES["cpu"], MODEL_SIZES["base"]
VARIANTS = ("fp32", "fp16", "fp16+ckpt", "fp32+ckpt", "bf16", "bf16+ckpt")
CUDA_VARIANTS = ("fp32", "fp16", "fp16+ckpt", "fp32+ckpt", "bf16")
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


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


def build_encoder(model_size: dict, vocab: int = 50265):
    """A randomly initialised roberta-type ``DenseEncoder`` of ``model_size`` (no download)."""
    from transformers import RobertaConfig

    from model import DenseEncoder

    config = RobertaConfig(vocab_size=vocab, max_position_embeddings=514, **model_size)
    return DenseEncoder.from_config(config)


def make_step(mode: str, dev: torch.device, model_size: dict, batch: int, q_len: int, d_len: int, extra: int,
              precision: str, checkpointing: bool) -> tuple[Callable[[], None], Any]:
    """star/train.py's step (forward + backward + ``optimizer_step``) on one synthetic batch; (step, model)."""
    from infra.checkpoints import set_seed
    from infra.optim import build_optimizer, linear_schedule, make_grad_scaler, optimizer_step, param_groups
    from star.train import BatchEncoder, accumulate_gradients

    set_seed(0)
    model = build_encoder(model_size)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.to(dev).train()
    wrapped = BatchEncoder(model)
    optimizer = build_optimizer("lamb", param_groups(model, 0.01), 1e-4)
    scheduler = linear_schedule(optimizer, 1000, 100000)
    fp16, bf16 = precision == "fp16", precision == "bf16"
    scaler = make_grad_scaler(dev, fp16)
    data = synthetic_batch(mode, batch, q_len, d_len, extra, model.config.vocab_size)
    rel = {i: [i] for i in range(batch)}
    parameters = list(model.parameters())

    def step() -> None:
        accumulate_gradients(wrapped, [data], 1, mode, rel, dev, scaler, fp16, bf16)
        optimizer_step(parameters, optimizer, scheduler, scaler, 1.0)

    return step, model


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measure(mode: str, device: str, model_size: dict, batch: int, q_len: int, d_len: int, extra: int,
            precision: str, checkpointing: bool, steps: int, warmup: int) -> dict[str, Any]:
    """Run ``warmup`` + ``steps`` training steps in this process; return the timing and memory figures."""
    dev = torch.device(device)
    step, _ = make_step(mode, dev, model_size, batch, q_len, d_len, extra, precision, checkpointing)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        for _ in range(warmup):
            step()
        sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(dev)
        elapsed = time.perf_counter() - start
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"step_s": elapsed / steps, "queries_per_s": batch * steps / elapsed, "peak_mem_mb": peak,
            "rss_before_mb": rss_before if dev.type == "cpu" else None}


def parse_variant(variant: str) -> tuple[str, bool]:
    """``"fp16+ckpt"`` → ``("fp16", True)``."""
    precision, _, ckpt = variant.partition("+")
    return precision, ckpt == "ckpt"


def configurations(device: str, modes: list[str], batch: int, variants: list[str], model: str, q_len: int,
                   d_len: int, steps: int, warmup: int) -> list[dict[str, Any]]:
    return [dict(mode=m, device=device, model_size=MODEL_SIZES[model], model=MODEL_NAMES[model], batch=batch,
                 q_len=q_len, d_len=d_len, extra=1, precision=parse_variant(v)[0], checkpointing=parse_variant(v)[1],
                 steps=steps, warmup=warmup)
            for m in modes for v in variants]


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


# ----------------------------------------------------------------------------------------------------------
# --parts: the non-model parts of a STAR step
# ----------------------------------------------------------------------------------------------------------

def write_training_tokens(folder: Path, n_passages: int, n_queries: int, seed: int = 0) -> None:
    """Synthetic preprocess output for STAR: passages of 30–200 tokens (stored width 256), queries of 6–20 (width
    32), one positive per query, 200 hard negatives per query (``hard.npy`` + ``hard_qids.npy``)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n, lo, hi, width in (("passages", n_passages, 30, 200, 256), ("train-query", n_queries, 6, 20, 32)):
        lengths = rng.integers(lo, hi + 1, n).astype(np.int32)
        ids = rng.integers(4, 50000, (n, width), dtype=np.int32)
        ids[np.arange(width)[None, :] >= lengths[:, None]] = 0
        ids[:, 0], ids[np.arange(n), lengths - 1] = 0, 2
        ids.tofile(folder / f"{prefix}.memmap")
        np.save(folder / f"{prefix}_length.npy", lengths)
        (folder / f"{prefix}_meta").write_text(json.dumps({"type": "int32", "total_number": n,
                                                           "embedding_size": width}))
    (folder / "train-qrel.tsv").write_text("".join(f"{q}\t0\t{(q * 7) % n_passages}\t1\n" for q in range(n_queries)))
    np.save(folder / "hard.npy", rng.integers(0, n_passages, (n_queries, 200)).astype(np.int32))
    np.save(folder / "hard_qids.npy", np.arange(n_queries, dtype=np.int64))


def measure_collation(batch: int, step_ms: float, batches: int = 10) -> dict[str, Any]:
    """Main-process time per STAR step of the dataset items and the collator, and the main thread's wait for its
    batch when a :class:`infra.batch_plan.BackgroundIterator` reads them during a ``step_ms`` step."""
    from infra.batch_plan import BackgroundIterator
    from dataset import HardNegatives, TokenIdsCache, TrainCollator, TrainInbatchWithHardDataset, load_rel

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        n_queries = batch * (batches + 11)
        write_training_tokens(folder, max(3 * n_queries, min(50_000, 200 * batch)), n_queries)
        rel = load_rel(folder / "train-qrel.tsv")
        dataset = TrainInbatchWithHardDataset(rel, TokenIdsCache(folder, "train-query"),
                                              TokenIdsCache(folder, "passages"), 24, 120, 42,
                                              hardneg=HardNegatives.load(str(folder / "hard.npy")), hard_num=1)
        order = np.random.default_rng(1).permutation(len(dataset))
        index_batches = [order[b * batch:(b + 1) * batch].tolist() for b in range(batches + 10)]

        def collated(collator: TrainCollator, timings: Optional[dict] = None):
            for indices in index_batches:
                start = time.perf_counter()
                items = [dataset[i] for i in indices]
                middle = time.perf_counter()
                out = collator(items)
                if timings is not None:
                    timings["items"].append(middle - start)
                    timings["collate"].append(time.perf_counter() - middle)
                yield out

        def new_collator() -> TrainCollator:
            return TrainCollator(24, 120, rel, pad_token_id=1)

        timings: dict[str, list[float]] = {"items": [], "collate": []}
        plain = list(collated(new_collator(), timings))
        items_ms = 1e3 * statistics.median(timings["items"][10:])
        collate_ms = 1e3 * statistics.median(timings["collate"][10:])
        sequences = sum(plain[-1][k].shape[0] for k in ("query_input_ids", "doc_input_ids", "other_doc_input_ids"))
        waits, same = [], True
        background = BackgroundIterator(collated(new_collator()), depth=2)
        for reference in plain:
            start = time.perf_counter()
            got = next(background)
            waits.append(time.perf_counter() - start)
            same = same and all(torch.equal(got[k], v) if isinstance(v, torch.Tensor) else got[k] == v
                                for k, v in reference.items())
            time.sleep(step_ms / 1e3)
        background.close()
    return {"batch": batch, "sequences_per_step": int(sequences), "items_ms": items_ms, "collate_ms": collate_ms,
            "main_process_ms": items_ms + collate_ms, "simulated_step_ms": step_ms,
            "background_wait_ms": 1e3 * statistics.median(waits[10:]), "background_batches_equal": bool(same)}


def _parameter_groups(dev: torch.device, size: Optional[int], model_size: dict) -> list[dict[str, Any]]:
    """The parameters of a ``model_size`` encoder + head in ``param_groups``' two groups (decay 0.01 / none), with
    random gradients: full size when ``size`` is None, else tensors of ``size`` elements (the same count)."""
    from infra.optim import param_groups

    with torch.device("meta"):
        shapes = build_encoder(model_size)
    g = torch.Generator(device=dev).manual_seed(0)
    groups = []
    for group in param_groups(shapes, 0.01):
        params = []
        for p in group["params"]:
            shape = p.shape if size is None else (size,)
            q = torch.nn.Parameter(torch.randn(shape, generator=g, device=dev) * 0.02)
            q.grad = torch.randn(shape, generator=g, device=dev) * 1e-3
            params.append(q)
        groups.append({"params": params, "weight_decay": group["weight_decay"]})
    return groups


def measure_optimizer(device: str, full_steps: int, model_size: dict = BASE_MODEL) -> dict[str, Any]:
    """Lamb per parameter vs multi-tensor and the clipping: host time (16-element tensors, process CPU time) and the
    full-size step on ``device`` (median; CUDA: wall time, synchronised; CPU: process CPU time)."""
    out: dict[str, Any] = {}
    for size, key, repeats in ((16, "host", 30), (None, "full", full_steps)):
        dev = torch.device("cpu") if size is not None else torch.device(device)
        groups = _parameter_groups(dev, size, model_size)
        params = [p for g in groups for p in g["params"]]
        out["parameters"] = len(params)
        if size is None:
            out["elements"] = sum(p.numel() for p in params)
        for name in ("lamb_per_parameter", "lamb_multi_tensor", "clip_grad_norm"):
            out[f"{key}_{name}_ms"] = _time_update(name, groups, dev, repeats)
    return out


def _time_update(name: str, groups: list[dict[str, Any]], dev: torch.device, repeats: int) -> float:
    """Median milliseconds of one update ``name`` of ``groups`` (after one untimed); on the CPU process CPU time
    (immune to a busy machine), on CUDA synchronised wall time."""
    from infra.optim import Lamb

    if name == "clip_grad_norm":
        params = [p for g in groups for p in g["params"]]

        def step() -> None:
            torch.nn.utils.clip_grad_norm_(params, 1e9)
    else:
        step = Lamb(groups, lr=1e-4, eps=1e-8, foreach=name == "lamb_multi_tensor").step
    clock = time.process_time if dev.type == "cpu" else time.perf_counter
    step()
    sync(dev)
    times = []
    for _ in range(repeats):
        start = clock()
        step()
        sync(dev)
        times.append(clock() - start)
    return 1e3 * statistics.median(times)


def count_host_reads(device: str, precision: str, model_size: dict, batch: int = 8) -> dict[str, Any]:
    """Host reads of tensor values during one STAR step (after a warm-up step), by call site."""
    dev = torch.device(device)
    step, _ = make_step("star", dev, model_size, batch, 24, 40, 1, precision, False)
    step()
    sync(dev)
    sites: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name: str, original: Callable) -> Callable:
        def wrapper(self, *args, **kwargs):
            frame = traceback.extract_stack(limit=2)[0]
            where = frame.filename.split("site-packages/")[-1].replace(f"{Path(__file__).resolve().parents[1]}/", "")
            sites[f"{name} {where}:{frame.lineno}"] += 1
            return original(self, *args, **kwargs)
        return wrapper

    device_syncs = None
    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(name, original))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if dev.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
                sync(dev)
            finally:
                if dev.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        if dev.type == "cuda":
            device_syncs = sum("synchroniz" in str(w.message) for w in caught)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return {"precision": precision, "host_reads": sum(sites.values()), "sites": dict(sites),
            "cuda_sync_warnings": device_syncs}


def run_parts(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    model_size = MODEL_SIZES["tiny"]
    print(f"collation: batch {args.parts_batch} (queries + positives + 1 hard negative each) ...", flush=True)
    collation = measure_collation(args.parts_batch, args.parts_step_ms)
    print(f"optimizer: {MODEL_NAMES[args.parts_model]} parameter list ...", flush=True)
    optimizer = measure_optimizer(device, args.parts_full_steps, MODEL_SIZES[args.parts_model])
    syncs = [count_host_reads(device, p, model_size) for p in ("fp32", "bf16", "fp16")]
    c, o = collation, optimizer
    print(f"\ncollation, per step of {c['batch']} queries ({c['sequences_per_step']} sequences): items "
          f"{c['items_ms']:.1f} ms + collator {c['collate_ms']:.1f} ms = {c['main_process_ms']:.1f} ms on the main "
          f"process; read in a background thread during a {c['simulated_step_ms']:.0f} ms step the main thread waits "
          f"{c['background_wait_ms']:.2f} ms (batches equal: {c['background_batches_equal']})")
    print(f"optimizer, {o['parameters']} parameters ({o['elements']:,} elements), ms per step:")
    print(f"{'':28} {'host (16-element tensors)':>26} {'full size on ' + device:>22}")
    for name in ("lamb_per_parameter", "lamb_multi_tensor", "clip_grad_norm"):
        print(f"{name:28} {o['host_' + name + '_ms']:26.2f} {o['full_' + name + '_ms']:22.1f}")
    print("host reads of tensor values in one STAR step (tiny model):")
    for s in syncs:
        extra = "" if s["cuda_sync_warnings"] is None else f", CUDA sync warnings {s['cuda_sync_warnings']}"
        print(f"  {s['precision']}: {s['host_reads']}{extra}  {s['sites']}")
    return {"collation": collation, "optimizer": {"model": MODEL_NAMES[args.parts_model], **optimizer},
            "host_reads": syncs}


def environment(args: argparse.Namespace) -> dict[str, Any]:
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": args.threads or torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None}


def write_result(out: Path, key: str, value: dict[str, Any]) -> None:
    previous = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    previous[key] = value
    atomic_write_json(out, previous)
    print(f"wrote {out} [{key}]")


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                   help="precision[+ckpt] (gradient checkpointing); default: fp32 on cpu, "
                        f"{' '.join(CUDA_VARIANTS)} on cuda")
    p.add_argument("--model", choices=tuple(MODEL_SIZES), default=None,
                   help="random RoBERTa size (default: cpu on cpu, base on cuda)")
    p.add_argument("--batch", type=int, default=None, help="queries per step (default: --cpu_batch / 256 on cuda)")
    p.add_argument("--cpu_batch", type=int, default=32)
    p.add_argument("--q_len", type=int, default=24)
    p.add_argument("--d_len", type=int, default=120)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--parts", action="store_true", help="measure the non-model parts of a STAR step instead")
    p.add_argument("--parts_batch", type=int, default=256)
    p.add_argument("--parts_step_ms", type=float, default=200.0, help="simulated step while batches are read ahead")
    p.add_argument("--parts_full_steps", type=int, default=3, help="full-size optimizer steps timed per variant")
    p.add_argument("--parts_model", choices=tuple(MODEL_SIZES), default="base",
                   help="the encoder whose parameter list the optimizer rows step")
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
    if args.parts:
        write_result(Path(args.out), f"{args.device}_parts", {"environment": environment(args), **run_parts(args)})
        return
    cuda = args.device == "cuda"
    batch = args.batch or (256 if cuda else args.cpu_batch)
    variants = args.variants or (list(CUDA_VARIANTS) if cuda else ["fp32"])
    model = args.model or ("base" if cuda else "cpu")
    rows = []
    for config in configurations(args.device, args.modes, batch, variants, model, args.q_len, args.d_len,
                                 args.steps, args.warmup):
        result = run_isolated(config, args.threads)
        rows.append({k: v for k, v in config.items() if k != "model_size"} | result)
    print_table(rows)
    write_result(Path(args.out), args.device, {"environment": environment(args), "results": rows})


if __name__ == "__main__":
    run_cli(main)
