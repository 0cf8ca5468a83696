"""The GPU benchmark suite of issue #12 in one command (``benchmarks/gpu_suite.sh`` runs this file).

On one GPU, with no network, it builds its own data from ``shared/`` — the 4,103 real MS MARCO passages of the DL19
judged subset, repeated (``--repeat``), one pseudo-query per distinct passage as training data (its first words;
the passage is its positive), the 43 DL19 queries and judgments as the dev split — preprocessed with the real
roberta-base tokenizer, and a randomly initialised roberta-base-size ``DenseEncoder`` (config from
``shared/data/roberta-base-tokenizer``), then runs, in this order:

* ``star``: the STAR training step (``bench_train.py``: roberta-base size, batch 256, q 24 / d 120, one hard
  negative) in fp16 + gradient checkpointing and in bf16;
* ``parts``: the step's non-model parts (``bench_train.py --parts``: collation, Lamb per parameter vs
  multi-tensor, clipping, host reads per step);
* ``encode``: corpus encoding (``bench_encode.py``, ``--encode_passages`` real passages at 256 tokens): the
  defaults of ``star.inference`` on the device (fp32, ``--eval_batch_size`` 32, its token budget on CUDA), the
  best settings (``--best_amp``, ``--best_tokens``), the original's way (offset order, every batch padded to 256,
  fp32, batch 32) and sentence-transformers (the same model exported by ``export_sentence_transformers``, fp32,
  batch 32; only when the package is installed);
* ``e2e``: ``star.inference`` (dev) → ``star.prepare_hardneg`` (train, top 200) → ``star.train`` (STAR, fp16 +
  checkpointing on CUDA) → ``adore.train`` → ``adore.inference`` (dev) on the generated data, each timed; the two
  dev rank files are copied to ``OUT/e2e/``;
* ``adore``: an ADORE step against ``--adore_rows`` (8,841,823: MS MARCO passages) random document embeddings
  (``bench_adore.py --device cuda --rows N``; its JSON is taken as it is).

Every row has a rate (passages/s, queries/s or steps/s) and the seconds it measured; the suite prints one table and
writes ``OUT/gpu_suite.json`` (rewritten after every stage, so an interrupted run keeps what it measured) and each
stage's output in ``OUT/logs/``.  Stages needing faiss (``e2e``, ``adore``: the search modules import it) are
skipped with the reason when it is not importable; a stage that fails is recorded and the stages depending on it
are skipped.  The data, models and checkpoints live in a work folder outside ``OUT`` (deleted at the end unless
``--keep_work``).  ``--budget_s`` (480 s; 300 s with ``--smoke``) skips the stages that would start after it or
with less than their usual time left (``MIN_STAGE_S``), and bounds every command by the time left.

``--smoke``: CPU, a tiny model (hidden 32, 2 layers) and tiny data (200 passages x 2, batch 8, 2 steps): every
stage and every code path of the suite in about a minute (``tests/test_gpu_suite.py`` runs it).
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
SUBSET = Path("data/msmarco-passage-dl19-judged-subset")
TOKENIZER = Path("data/roberta-base-tokenizer")
CUDA_BATCH_TOKENS = 131072   # star.inference's default token budget per batch on CUDA (inference_pipeline)
TINY_MODEL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
LOG_TAIL = 20_000            # characters of a stage's output kept in OUT/logs
PSEUDO_QUERY_WORDS = 8


@dataclass(frozen=True)
class Profile:
    """The sizes of a run."""
    device: str
    model: str                  # "base" (roberta-base size) or "tiny"
    first_passages: int         # distinct real passages taken from the subset (at most its 4,103)
    repeat: int                 # copies of each in the corpus
    encode_passages: int
    star_batch: int
    star_q_len: int
    star_d_len: int
    star_steps: int
    star_warmup: int
    parts_batch: int
    e2e_train_batch: int
    e2e_train_steps: int
    e2e_topk: int               # mined negatives per train query
    adore_batch: int
    adore_steps: int
    adore_topk: int
    adore_metric_cut: int
    adore_rows: int
    budget_s: float
    threads: Optional[int]      # torch threads of every stage (None: torch's default)


FULL = Profile(device="cuda", model="base", first_passages=4103, repeat=10, encode_passages=16384, star_batch=256,
               star_q_len=24, star_d_len=120, star_steps=5, star_warmup=2, parts_batch=256, e2e_train_batch=256,
               e2e_train_steps=10, e2e_topk=200, adore_batch=32, adore_steps=10, adore_topk=200,
               adore_metric_cut=200, adore_rows=8_841_823, budget_s=480, threads=None)
SMOKE = Profile(device="cpu", model="tiny", first_passages=200, repeat=2, encode_passages=200, star_batch=8,
                star_q_len=8, star_d_len=16, star_steps=1, star_warmup=1, parts_batch=16, e2e_train_batch=8,
                e2e_train_steps=2, e2e_topk=20, adore_batch=8, adore_steps=2, adore_topk=20, adore_metric_cut=10,
                adore_rows=2000, budget_s=300, threads=1)
STAGES = ("star", "parts", "encode", "e2e", "adore")
# seconds a full-size stage needs at least (guesses before the first GPU run): one starting later is skipped
MIN_STAGE_S = {"star": 60, "parts": 30, "encode": 45, "e2e": 120, "adore": 90}


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------

def read_subset(shared: Path, first: int) -> tuple[list[tuple[int, str]], list[tuple[int, str]], list[str]]:
    """(passages [(pid, text)], DL19 queries [(qid, text)], qrels lines ``qid 0 pid grade``) of the judged subset:
    the first ``first`` passages, the queries judged on them and those judgments."""
    folder = shared / SUBSET
    with gzip.open(folder / "collection.tsv.gz", "rt", encoding="utf-8") as f:
        passages = [(int(pid), text) for pid, text in (line.rstrip("\n").split("\t", 1) for line in f)][:first]
    kept = {pid for pid, _ in passages}
    qrels = [line.split() for line in (folder / "qrels.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    qrels = [q for q in qrels if int(q[2]) in kept]
    judged = {int(q[0]) for q in qrels}
    queries = [(int(qid), text) for qid, text in (line.split("\t", 1) for line in
                                                 (folder / "queries.tsv").read_text(encoding="utf-8").splitlines()
                                                 if line.strip()) if int(qid) in judged]
    return passages, queries, [f"{q}\t0\t{p}\t{g}" for q, _, p, g in qrels]


def write_dataset(folder: Path, passages: list[tuple[int, str]], queries: list[tuple[int, str]],
                  qrels: list[str], repeat: int) -> dict[str, int]:
    """MS MARCO passage files (``preprocess --data_type 1``): the passages ``repeat`` times (copy r of pid p has
    id ``p + r * 10**7``), one pseudo-query per distinct passage (its first words) as the train split, the DL19
    queries and judgments as the dev split (judging copy 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "collection.tsv", "w", encoding="utf-8") as f:
        for r in range(repeat):
            for pid, text in passages:
                f.write(f"{pid + r * 10**7}\t{text}\n")
    train = [(i + 1, " ".join(text.split()[:PSEUDO_QUERY_WORDS]), pid) for i, (pid, text) in enumerate(passages)]
    (folder / "queries.train.tsv").write_text("".join(f"{q}\t{t}\n" for q, t, _ in train), encoding="utf-8")
    (folder / "qrels.train.tsv").write_text("".join(f"{q}\t0\t{p}\t1\n" for q, _, p in train), encoding="utf-8")
    (folder / "queries.dev.small.tsv").write_text("".join(f"{q}\t{t}\n" for q, t in queries), encoding="utf-8")
    (folder / "qrels.dev.small.tsv").write_text("".join(line + "\n" for line in qrels), encoding="utf-8")
    return {"passages": len(passages) * repeat, "distinct_passages": len(passages), "train_queries": len(train),
            "dev_queries": len(queries)}


def build_model(folder: Path, shared: Path, kind: str) -> str:
    """A randomly initialised ``DenseEncoder`` (roberta-base size from the shared config, or tiny) with the
    roberta-base tokenizer files, saved to ``folder``; returns its description."""
    import torch
    from transformers import RobertaConfig

    from model import DenseEncoder, read_tokenizer_files

    torch.manual_seed(0)
    if kind == "base":
        config = RobertaConfig.from_pretrained(shared / TOKENIZER)
    else:
        config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, pad_token_id=1, bos_token_id=0,
                               eos_token_id=2, type_vocab_size=1, layer_norm_eps=1e-5, **TINY_MODEL)
    model = DenseEncoder.from_config(config)
    model.tokenizer_files = read_tokenizer_files(shared / TOKENIZER)
    model.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    return f"random {'roberta-base size' if kind == 'base' else 'tiny RoBERTa (hidden 32, 2 layers)'}, " \
           f"{params / 1e6:.1f}M parameters"


# ----------------------------------------------------------------------------------------------------------
# Running stages
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Suite:
    args: argparse.Namespace
    profile: Profile
    out: Path
    work: Path
    shared: Path
    start: float = field(default_factory=time.perf_counter)
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    # -- bookkeeping -------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return self.profile.budget_s - self.elapsed()

    def row(self, group: str, name: str, rate: float, unit: str, seconds: float, **detail: Any) -> None:
        self.rows.append({"group": group, "name": name, "rate": rate, "unit": unit, "seconds": seconds,
                          "detail": detail})
        self.write()

    def skip(self, what: str, reason: str) -> None:
        self.skipped.append({"name": what, "reason": reason})
        print(f"[skip] {what}: {reason}", flush=True)
        self.write()

    def fail(self, what: str, reason: str) -> None:
        self.failed.append({"name": what, "reason": reason})
        print(f"[FAILED] {what}: {reason}", flush=True)
        self.write()

    def write(self) -> None:
        report = {"mode": "smoke" if self.args.smoke else "full", "device": self.profile.device,
                  "environment": self.info, "elapsed_s": self.elapsed(), "rows": self.rows,
                  "skipped": self.skipped, "failed": self.failed}
        tmp = self.out / "gpu_suite.json.tmp"
        tmp.write_text(json.dumps(report, indent=2), encoding="utf-8")
        tmp.replace(self.out / "gpu_suite.json")

    # -- subprocesses --------------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
        if self.profile.threads:
            env.update(OMP_NUM_THREADS=str(self.profile.threads), MKL_NUM_THREADS=str(self.profile.threads))
        return env

    def run(self, name: str, args: list[Any]) -> tuple[bool, float]:
        """``python ARGS`` from the repository root, its output in ``OUT/logs/NAME.log``; (succeeded, seconds).
        Runs at most the remaining budget (at least 30 s)."""
        cmd = [sys.executable, *map(str, args)]
        print(f"[run] {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=REPO, env=self.env(), capture_output=True, text=True,
                                  timeout=max(30.0, self.remaining()))
            output, ok = done.stdout + done.stderr, done.returncode == 0
            reason = f"exit status {done.returncode}"
        except subprocess.TimeoutExpired as timeout:
            output = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part
                             for part in (timeout.stdout or b"", timeout.stderr or b""))
            ok, reason = False, f"timed out after {timeout.timeout:.0f} s"
        seconds = time.perf_counter() - start
        (self.out / "logs" / f"{name}.log").write_text(" ".join(cmd) + "\n\n" + output[-LOG_TAIL:], encoding="utf-8")
        if not ok:
            lines = [line for line in output.strip().splitlines() if line.strip()]
            self.fail(name, f"{reason}: {lines[-1] if lines else 'no output'} (OUT/logs/{name}.log)")
        return ok, seconds

    def device_flags(self) -> list[str]:
        return ["--no_cuda"] if self.profile.device == "cpu" else []

    def threads_flags(self) -> list[str]:
        return ["--threads", str(self.profile.threads)] if self.profile.threads else []


# ----------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------

def stage_data(s: Suite) -> bool:
    p = s.profile
    passages, queries, qrels = read_subset(s.shared, p.first_passages)
    counts = write_dataset(s.work / "dataset", passages, queries, qrels, p.repeat)
    ok, seconds = s.run("preprocess", ["-m", "preprocess", "--data_type", "1", "--model_name_or_path",
                                       s.shared / TOKENIZER, "--data_dir", s.work / "dataset", "--out_dir",
                                       s.work / "preprocess", "--max_seq_length", 256, "--max_query_length", 64])
    if not ok:
        return False
    start = time.perf_counter()
    s.info["model"] = build_model(s.work / "model", s.shared, p.model)
    s.info["data"] = {**counts, "preprocess_s": seconds, "model_s": time.perf_counter() - start}
    if s.info["sentence_transformers"]:
        s.run("export_st", ["-m", "export_sentence_transformers", "--model_dir", s.work / "model", "--output_dir",
                            s.work / "model-st", "--max_seq_length", 256])
    s.write()
    return True


def stage_star(s: Suite) -> None:
    p = s.profile
    out = s.out / "bench_train.json"
    ok, _ = s.run("star", [BENCH / "bench_train.py", "--device", p.device, "--modes", "star", "--variants",
                           "fp16+ckpt", "bf16", "--model", p.model, "--batch", p.star_batch, "--q_len",
                           p.star_q_len, "--d_len", p.star_d_len, "--steps", p.star_steps, "--warmup",
                           p.star_warmup, "--out", out, *s.threads_flags()])
    if not ok:
        return
    for r in json.loads(out.read_text(encoding="utf-8"))[p.device]["results"]:
        name = f"STAR step, {r['precision']}{' + checkpointing' if r['checkpointing'] else ''}, batch {r['batch']}"
        if "error" in r:
            s.fail(name, r["error"])
            continue
        s.row("star", name, r["queries_per_s"], "queries/s", r["step_s"], step_s=r["step_s"],
              peak_mem_mb=r["peak_mem_mb"], model=r["model"], q_len=r["q_len"], d_len=r["d_len"])


def stage_parts(s: Suite) -> None:
    p = s.profile
    out = s.out / "bench_train_parts.json"
    smoke = ["--parts_full_steps", "1", "--parts_step_ms", "20"] if s.args.smoke else []
    ok, _ = s.run("parts", [BENCH / "bench_train.py", "--parts", "--device", p.device, "--parts_batch", p.parts_batch,
                            "--parts_model", p.model, "--out", out, *smoke, *s.threads_flags()])
    if not ok:
        return
    parts = json.loads(out.read_text(encoding="utf-8"))[f"{p.device}_parts"]
    c, o = parts["collation"], parts["optimizer"]
    s.row("parts", f"collation on the main process ({c['sequences_per_step']} sequences)",
          1e3 / c["main_process_ms"], "batches/s", c["main_process_ms"] / 1e3, **c)
    for name, label in (("lamb_per_parameter", "Lamb step, per parameter"),
                        ("lamb_multi_tensor", "Lamb step, multi-tensor"), ("clip_grad_norm", "gradient clipping")):
        ms = o[f"full_{name}_ms"]
        s.row("parts", f"{label} ({o['model']}, {p.device})", 1e3 / ms, "steps/s", ms / 1e3,
              host_ms=o[f"host_{name}_ms"], parameters=o["parameters"], elements=o["elements"])
    s.info["host_reads_per_star_step"] = {r["precision"]: {"reads": r["host_reads"], "sites": r["sites"],
                                                           "cuda_sync_warnings": r["cuda_sync_warnings"]}
                                          for r in parts["host_reads"]}


def stage_encode(s: Suite) -> None:
    p = s.profile
    common = [BENCH / "bench_encode.py", "--device", p.device, "--model", s.work / "model", "--passages",
              p.encode_passages, "--max_length", 256, "--shared", s.shared, *s.threads_flags()]
    cuda = p.device == "cuda"
    default_tokens = ["--batch_tokens", CUDA_BATCH_TOKENS] if cuda else []
    best_tokens = ["--batch_tokens", s.args.best_tokens if cuda else 2048]
    best_amp = s.args.best_amp if cuda else "fp32"          # autocast is CUDA only
    st = ["st", "--st_model", s.work / "model-st"] if (s.work / "model-st" / "modules.json").is_file() else []
    if not st:
        s.skip("encode: sentence-transformers", "the sentence_transformers package is not installed"
               if not s.info["sentence_transformers"] else "export_sentence_transformers failed")
    runs = [("encode_defaults", ["--methods", "ours", "padmax", *st, "--batch", 32, *default_tokens],
             {"ours": f"encode: star.inference defaults (fp32, batch 32"
                      f"{', ' + str(CUDA_BATCH_TOKENS) + ' tokens' if cuda else ''})",
              "padmax": "encode: the original's way (offset order, pad to 256, fp32, batch 32)",
              "st": "encode: sentence-transformers (fp32, batch 32)"}),
            ("encode_best", ["--methods", "ours", "--amp", best_amp, *best_tokens],
             {"ours": f"encode: best ({best_amp}, {best_tokens[1]} tokens per batch)"})]
    for name, flags, labels in runs:
        out = s.out / f"bench_{name}.json"
        ok, _ = s.run(name, [*common, *flags, "--out", out])
        if not ok:
            continue
        report = json.loads(out.read_text(encoding="utf-8"))
        for r in report["rows"]:
            s.row("encode", labels[r["key"]], r["passages_per_second"], "passages/s", r["seconds"],
                  padding_efficiency=r["padding_efficiency"], max_abs_diff=r["max_abs_diff"],
                  passages=report["passages"], amp=report["amp"])


def latest_checkpoint(folder: Path) -> Optional[Path]:
    from infra import checkpoint_paths

    return checkpoint_paths.latest_checkpoint(folder)


def stage_e2e(s: Suite) -> None:
    p = s.profile
    pre, model, e2e = s.work / "preprocess", s.work / "model", s.work / "e2e"
    n_passages, n_train = s.info["data"]["passages"], s.info["data"]["train_queries"]
    n_dev = s.info["data"]["dev_queries"]
    dev = s.device_flags()
    cuda = p.device == "cuda"
    steps: list[tuple[str, Callable[[], list[Any]], Callable[[float], tuple[float, str]]]] = [
        ("star.inference", lambda: ["-m", "star.inference", "--data_type", "passage", "--mode", "dev", "--model_dir",
                                    model, "--preprocess_dir", pre, "--output_dir", e2e / "star", "--max_query_length",
                                    32, "--max_doc_length", 256, *dev],
         lambda sec: (n_passages / sec, "passages/s")),
        ("star.prepare_hardneg", lambda: ["-m", "star.prepare_hardneg", "--data_type", "passage", "--mode", "train",
                                          "--model_dir", model, "--preprocess_dir", pre, "--output_dir", e2e / "mined",
                                          "--max_query_length", 32, "--max_doc_length", 256, "--topk", p.e2e_topk,
                                          *dev],
         lambda sec: (n_passages / sec, "passages/s")),
        ("star.train", lambda: ["-m", "star.train", "--negative_mode", "star", "--init_path", model,
                                "--preprocess_dir", pre, "--hardneg_path", e2e / "mined" / "hard.npy", "--output_dir",
                                e2e / "star_train", "--max_query_length", 24, "--max_doc_length", 120,
                                "--per_device_train_batch_size", p.e2e_train_batch, "--optimizer_str", "lamb",
                                "--learning_rate", "1e-4", "--warmup_steps", 2, "--num_train_epochs", 100,
                                "--stop_after_steps", p.e2e_train_steps, "--logging_steps", p.e2e_train_steps,
                                "--save_total_limit", 1,
                                *(["--fp16", "--gradient_checkpointing"] if cuda else []), *dev],
         lambda sec: (p.e2e_train_steps / sec, "steps/s")),
        ("adore.train", lambda: ["-m", "adore.train", "--init_path", e2e / "star_train", "--pembed_path",
                                 e2e / "star" / "passages.memmap", "--preprocess_dir", pre, "--data_type", "passage",
                                 "--metric_cut", p.adore_metric_cut, "--neg_topk", p.adore_topk, "--model_save_dir",
                                 e2e / "adore_train", "--learning_rate", "5e-6", "--per_gpu_batch_size",
                                 p.adore_batch, "--warmup_steps", 2, "--max_steps", p.adore_steps, "--logging_steps",
                                 p.adore_steps, *dev],
         lambda sec: (p.adore_steps / sec, "steps/s")),
        ("adore.inference", lambda: ["-m", "adore.inference", "--model_dir", latest_checkpoint(e2e / "adore_train"),
                                     "--output_dir", e2e / "adore", "--preprocess_dir", pre, "--mode", "dev",
                                     "--dmemmap_path", e2e / "star" / "passages.memmap", *dev],
         lambda sec: (n_dev / sec, "queries/s")),
    ]
    for i, (name, command, rate) in enumerate(steps):
        if s.remaining() <= 0:
            for later, _, _ in steps[i:]:
                s.skip(f"e2e: {later}", "time budget spent")
            return
        ok, seconds = s.run(name, command())
        if not ok:
            for later, _, _ in steps[i + 1:]:
                s.skip(f"e2e: {later}", f"{name} failed")
            return
        value, unit = rate(seconds)
        s.row("e2e", f"e2e: {name} (whole command)", value, unit, seconds)
    copies = s.out / "e2e"
    copies.mkdir(exist_ok=True)
    shutil.copyfile(e2e / "star" / "dev.rank.tsv", copies / "star-dev.rank.tsv")
    shutil.copyfile(e2e / "adore" / "dev.rank.tsv", copies / "adore-dev.rank.tsv")
    s.info["e2e"] = {"passages": n_passages, "train_queries": n_train, "dev_queries": n_dev,
                     "rank_files": ["e2e/star-dev.rank.tsv", "e2e/adore-dev.rank.tsv"]}


def stage_adore(s: Suite) -> None:
    p = s.profile
    out = s.out / "bench_adore.json"
    smoke = ["--batch", p.adore_batch, "--k", p.adore_topk, "--steps", 1, "--warmup", 1] if s.args.smoke else []
    ok, _ = s.run("adore", [BENCH / "bench_adore.py", "--device", p.device, "--rows", p.adore_rows, "--out", out,
                            *smoke, *s.threads_flags()])
    if not ok:
        return
    result = json.loads(out.read_text(encoding="utf-8"))[p.device]
    s.info["adore_projection"] = result.get("projection")
    for r in result["results"]:
        name = f"ADORE step, {r['rows']:,} docs, {r['backend']} index, batch {r['batch']}, K {r['k']}"
        if "error" in r:
            s.fail(name, r["error"])
            continue
        s.row("adore", name, 1e3 / r["step_ms"], "steps/s", r["step_ms"] / 1e3,
              **{k: v for k, v in r.items() if k.endswith("_ms") or k in ("build_s", "retrieval_share", "model")})


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------

def print_table(s: Suite) -> None:
    head = f"{'group':7} {'row':78} {'rate':>11} {'unit':11} {'seconds':>8}"
    print("\n" + head)
    print("-" * len(head))
    for r in s.rows:
        print(f"{r['group']:7} {r['name'][:78]:78} {r['rate']:11.2f} {r['unit']:11} {r['seconds']:8.3f}")
    for r in s.skipped:
        print(f"{'skipped':7} {r['name'][:78]:78} {r['reason']}")
    for r in s.failed:
        print(f"{'FAILED':7} {r['name'][:78]:78} {r['reason']}")
    reads = s.info.get("host_reads_per_star_step")
    if reads:
        print("host reads of tensor values per STAR step: " + ", ".join(
            f"{k} {v['reads']}" + (f" ({v['cuda_sync_warnings']} CUDA sync warnings)"
                                   if v["cuda_sync_warnings"] is not None else "") for k, v in reads.items()))
    print(f"{s.profile.device}, {s.info.get('gpu') or platform.processor() or platform.machine()}; "
          f"{s.elapsed():.0f} s in all; wrote {s.out / 'gpu_suite.json'}")


def default_out() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_suite"
    return Path(tempfile.gettempdir()) / f"gpu_suite-{time.strftime('%Y%m%d-%H%M%S')}"


def find_shared(given: Optional[str]) -> Optional[Path]:
    candidates = [Path(given)] if given else [REPO / "shared", REPO.parent / "shared"]
    return next((c.resolve() for c in candidates if (c / SUBSET / "collection.tsv.gz").is_file()), None)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model and data (about a minute)")
    parser.add_argument("--out", default=None, help="results folder (default $OUT/gpu_suite, else "
                                                    "/tmp/gpu_suite-DATE)")
    parser.add_argument("--shared", default=None, help="the shared/ folder (default ./shared, else ../shared)")
    parser.add_argument("--device", default=None, help="cuda (default) or cpu (--smoke: cpu)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run")
    parser.add_argument("--repeat", type=int, default=None, help="copies of each real passage in the corpus")
    parser.add_argument("--encode_passages", type=int, default=None, help="passages of the encoding rows")
    parser.add_argument("--adore_rows", type=int, default=None, help="document embeddings of the ADORE row")
    parser.add_argument("--best_amp", choices=("fp16", "bf16"), default="fp16", help="the best encoding row's amp")
    parser.add_argument("--best_tokens", type=int, default=CUDA_BATCH_TOKENS,
                        help="the best encoding row's padded tokens per batch")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="skip the stages that would start later (default 480; --smoke 300)")
    parser.add_argument("--work", default=None, help="work folder (default: a temporary folder)")
    parser.add_argument("--keep_work", action="store_true", help="keep the work folder (data, models, checkpoints)")
    args = parser.parse_args(argv)

    profile = SMOKE if args.smoke else FULL
    overrides = {k: v for k, v in (("device", args.device), ("repeat", args.repeat),
                                   ("encode_passages", args.encode_passages), ("adore_rows", args.adore_rows),
                                   ("budget_s", args.budget_s)) if v is not None}
    profile = Profile(**{**profile.__dict__, **overrides})
    shared = find_shared(args.shared)
    if shared is None:
        print(f"error: no shared/ folder with {SUBSET}: pass --shared DIR", file=sys.stderr)
        return 2
    import torch

    if profile.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: CUDA is not available: run with --smoke (CPU) or --device cpu", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else default_out()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_suite_work-"))
    work.mkdir(parents=True, exist_ok=True)
    s = Suite(args, profile, out, work, shared)
    s.info.update({"torch": torch.__version__, "python": platform.python_version(),
                   "gpu": torch.cuda.get_device_name(0) if profile.device.startswith("cuda") else None,
                   "cpus": os.cpu_count(), "shared": str(shared), "work": str(work),
                   "faiss": importlib.util.find_spec("faiss") is not None,
                   "sentence_transformers": importlib.util.find_spec("sentence_transformers") is not None,
                   "profile": profile.__dict__})
    print(f"gpu suite ({'smoke' if args.smoke else 'full'}) on {profile.device}: out {out}, work {work}", flush=True)
    try:
        if not stage_data(s):
            for stage in args.stages:
                s.skip(stage, "building the data failed")
        else:
            stages = {"star": stage_star, "parts": stage_parts, "encode": stage_encode, "e2e": stage_e2e,
                      "adore": stage_adore}
            for stage in args.stages:
                if stage in ("e2e", "adore") and not s.info["faiss"]:
                    s.skip(stage, "faiss is not importable (exact_search and training_index import it): install "
                                  "faiss-cpu or put a faiss package on PYTHONPATH")
                elif s.remaining() < (0 if args.smoke else MIN_STAGE_S[stage]):
                    s.skip(stage, f"{s.remaining():.0f} s left of the {profile.budget_s:.0f} s budget "
                                  f"(needs about {MIN_STAGE_S[stage]} s)")
                else:
                    stages[stage](s)
    finally:
        s.write()
        if not args.keep_work and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print_table(s)
    return 1 if s.failed else 0


if __name__ == "__main__":
    sys.exit(main())
