"""Helpers shared by the test modules (fixtures live in conftest.py): tiny generated inputs, subprocess runs of the
CLIs, file-tree hashes."""
import hashlib
import json
import os
import resource
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from transformers import RobertaConfig

from dataset import truncate_keep_end
from model import DenseEncoder

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
N_DOCS, N_QUERIES, DOC_LEN, QUERY_LEN = 600, 12, 16, 8
VOCAB = 60  # of the random token sequences and of tiny_encoder


def tree_hash(folder: Path, skip_tmp: bool = True) -> dict:
    """{relative name: sha256} of every file below ``folder`` (temporary ``*.tmp-PID`` files left out)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not (skip_tmp and ".tmp-" in p.name)}


def run_cli(args: list, timeout: int = 120, fsize: Optional[int] = None,
            env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """``python ARGS`` from the repository root with one thread and no hub access, plus the variables ``env`` (a
    file-size limit of ``fsize`` bytes if given); the completed process, whatever its status."""
    preexec = None
    if fsize is not None:
        preexec = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))  # noqa: E731
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, preexec_fn=preexec)


def assert_one_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """A CLI's refusal: exit status 2, no traceback, exactly one ``error:`` line, holding every needle; returns it."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def run(args: list, timeout: int = 300) -> subprocess.CompletedProcess:
    """:func:`run_cli` that must succeed."""
    result = run_cli(args, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# -- tiny MS MARCO-format files for preprocess.py, tokenized by a tiny BERT WordPiece vocabulary ---------------

BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "the", "cat", "sat", "on", "mat",
              "dog", "a"]
BERT_IDS = {w: i for i, w in enumerate(BERT_VOCAB)}

TINY = {
    "collection.tsv": b"7\tHello world\r\n3\tThe cat sat on the mat  \r\n10\t   \n0\tdog cat dog cat dog\n",
    "queries.train.tsv": b"1\thello\n2\tthe cat\n3\tnot judged\n5\tdog \n",
    "qrels.train.tsv": b"2\t0\t3\t1\n1\t0\t7\t0\n5\t0\t0\t2\n2\t0\t10\t0\n",
    "queries.dev.small.tsv": b"9\tmat\r\n",
    "qrels.dev.small.tsv": b"9 Q0 3 1\r\n",
    "queries.eval.small.tsv": b"4\ta cat\n6\tdog\n",
}


def write_files(folder: Path, files: dict) -> Path:
    """Write ``{name: bytes}`` into ``folder`` (created, with the sub-folders the names hold); returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return folder


# -- preprocessed token files and tiny encoders ------------------------------------------------------------------

def write_token_rows(folder: Path, prefix: str, rows: list, width: Optional[int] = None) -> None:
    """Write token sequences as preprocess.py does: ``{prefix}.memmap`` int32 ``[N, width]`` right-padded with 0,
    ``{prefix}_length.npy`` and ``{prefix}_meta``.  ``width`` defaults to the longest row; a longer row is cut to
    ``width`` keeping its end token (2, ``</s>``), as preprocess does."""
    width = max(len(r) for r in rows) if width is None else width
    ids = np.zeros((len(rows), width), np.int32)
    lengths = np.zeros(len(rows), np.int32)
    for i, row in enumerate(rows):
        row = list(row[:width - 1]) + [2] if len(row) > width else list(row)
        ids[i, :len(row)], lengths[i] = row, len(row)
    folder.mkdir(parents=True, exist_ok=True)
    ids.tofile(folder / f"{prefix}.memmap")
    np.save(folder / f"{prefix}_length.npy", lengths)
    (folder / f"{prefix}_meta").write_text(json.dumps(
        {"type": "int32", "total_number": len(rows), "embedding_size": width}))


def write_token_memmap(folder: Path, prefix: str, lengths: list[int], width: int, seed: int) -> list[np.ndarray]:
    """Random sequences ``<s>=0 … </s>=2`` of the given lengths (tokens 4..VOCAB-1) written with
    :func:`write_token_rows`; returns the stored sequences."""
    rng = np.random.default_rng(seed)
    rows = [np.array([0, *rng.integers(4, VOCAB, size=length - 2), 2], np.int32) for length in lengths]
    write_token_rows(folder, prefix, rows, width)
    return rows


def tiny_encoder(seed: int, out_dim: int = 16) -> DenseEncoder:
    """A random 2-layer, 32-wide RoBERTa dual encoder (eval mode) over VOCAB tokens."""
    torch.manual_seed(seed)
    config = RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           vocab_size=VOCAB, max_position_embeddings=70, pad_token_id=1,
                           output_embedding_size=out_dim, initializer_range=0.2)  # 0.02 gives near-equal vectors
    return DenseEncoder.from_config(config).eval()


def encode_one_by_one(model: DenseEncoder, seqs: list[np.ndarray], max_len: int) -> np.ndarray:
    """Reference embeddings: every sequence alone, no padding."""
    with torch.inference_mode():
        rows = []
        for seq in seqs:
            x = torch.as_tensor(truncate_keep_end(seq, max_len), dtype=torch.int64)[None]
            rows.append(model(x, torch.ones_like(x))[0].numpy())
    return np.stack(rows)


def brute_force(docs: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference top-k: numpy scores, stable argsort (ties by lower id)."""
    scores = queries @ docs.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


def make_encoder_inputs(root: Path, n_docs: int = N_DOCS) -> dict:
    """A tiny preprocess dir (``n_docs`` passages, train/dev queries + qrels) and a tiny saved encoder."""
    rng = np.random.default_rng(11)
    pre = root / "preprocess"
    write_token_memmap(pre, "passages", rng.integers(4, DOC_LEN + 1, n_docs).tolist(), width=DOC_LEN, seed=1)
    for split in ("train", "dev"):
        write_token_memmap(pre, f"{split}-query", rng.integers(3, QUERY_LEN + 1, N_QUERIES).tolist(),
                           width=QUERY_LEN, seed=2)
        qrels = [f"{q}\t0\t{p}\t1" for q in range(N_QUERIES) for p in rng.choice(n_docs, 2, replace=False)]
        (pre / f"{split}-qrel.tsv").write_text("\n".join(qrels) + "\n")
    tiny_encoder(0, out_dim=16).save_pretrained(root / "model")
    return {"pre": pre, "model": root / "model"}


def star_inference_args(inputs: dict, out: Path) -> list:
    return ["-m", "star.inference", "--data_type", "passage", "--mode", "dev", "--model_dir", inputs["model"],
            "--preprocess_dir", inputs["pre"], "--output_dir", out, "--max_doc_length", DOC_LEN,
            "--max_query_length", QUERY_LEN, "--eval_batch_size", 8, "--no_cuda", "--topk", 10, "--with_scores"]


def hardneg_args(inputs: dict, out: Path) -> list:
    return ["-m", "star.prepare_hardneg", "--data_type", "passage", "--mode", "train", "--model_dir",
            inputs["model"], "--preprocess_dir", inputs["pre"], "--output_dir", out, "--max_doc_length", DOC_LEN,
            "--max_query_length", QUERY_LEN, "--eval_batch_size", 8, "--not_faiss_cuda", "--no_cuda", "--topk", 5]


# -- training runs: tiny data, CLI arguments, what a run leaves ----------------------------------------------------

TRAIN_VOCAB = 50            # vocabulary of the training fixtures' token ids and models
STAR_DOCS, STAR_QUERIES = 40, 12
ADORE_DOCS, ADORE_QUERIES, ADORE_DIM = 60, 12, 16


def tiny_training_config(dropout: float, **extra) -> RobertaConfig:
    """A 2-layer, 32-wide RoBERTa config with the given dropout (diverse embeddings: initializer_range 0.2)."""
    return RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         vocab_size=TRAIN_VOCAB, max_position_embeddings=40, hidden_dropout_prob=dropout,
                         attention_probs_dropout_prob=dropout, initializer_range=0.2, **extra)


def _training_qrels(folder: Path, duplicate: str) -> None:
    """``train-qrel.tsv``: query q has positive 3q (and 3q+1 for even q), plus one ``duplicate`` line."""
    lines = [f"{q}\t0\t{3 * q}\t1" for q in range(STAR_QUERIES)] + [f"{q}\t0\t{3 * q + 1}\t1"
                                                                    for q in range(0, STAR_QUERIES, 2)]
    (folder / "train-qrel.tsv").write_text("\n".join(lines + [duplicate]) + "\n")


def make_star_data(root: Path, dropout: float = 0.1) -> dict:
    """A preprocess folder, hard negatives and an init model folder for star/train.py; returns their paths.
    Query 5 also has query 4's positive 12 (in-batch masks must drop it)."""
    rng = np.random.default_rng(3)
    pre = root / "preprocess"
    pre.mkdir(parents=True)

    def seq(lo: int, hi: int) -> list[int]:
        return [0] + rng.integers(4, TRAIN_VOCAB, size=rng.integers(lo, hi)).tolist() + [2]   # <s> ... </s>

    write_token_rows(pre, "passages", [seq(3, 14) for _ in range(STAR_DOCS)])
    write_token_rows(pre, "train-query", [seq(2, 6) for _ in range(STAR_QUERIES)])
    _training_qrels(pre, "5\t0\t12\t1")
    negs = np.array([[(3 * q + 2 + 5 * j) % STAR_DOCS for j in range(4)] for q in range(STAR_QUERIES)],
                    dtype=np.int32)
    np.save(root / "hard.npy", negs)
    np.save(root / "hard_qids.npy", np.arange(STAR_QUERIES, dtype=np.int64))
    torch.manual_seed(0)
    DenseEncoder.from_config(tiny_training_config(dropout)).save_pretrained(root / "init")
    return {"pre": pre, "hard": root / "hard.npy", "init": root / "init"}


def star_cli_args(data: dict, out: Path, mode: str = "star", *extra: str, batch: int = 4) -> list:
    """star/train.py arguments over :func:`make_star_data` (1e-3, tiny lengths, logging every step, CPU)."""
    args = ["--init_path", str(data["init"]), "--preprocess_dir", str(data["pre"]), "--output_dir", str(out),
            "--negative_mode", mode, "--per_device_train_batch_size", str(batch), "--max_query_length", "6",
            "--max_doc_length", "10", "--logging_steps", "1", "--learning_rate", "1e-3", "--no_cuda"]
    if mode == "star":
        args += ["--hardneg_path", str(data["hard"]), "--hard_num", "2"]
    if mode == "rand":
        args += ["--rand_num", "2"]
    return args + list(extra)


@dataclass(frozen=True)
class AdoreData:
    pre: Path
    emb: Path
    init: Path


def make_adore_data(root: Path, dropout: float = 0.1) -> AdoreData:
    """Train queries + qrels, frozen random document embeddings (float32 [ADORE_DOCS, ADORE_DIM], no manifest) and
    an init model for adore/train.py.  Query 5's positive is listed twice."""
    rng = np.random.default_rng(11)
    pre = root / "preprocess"
    pre.mkdir(parents=True)
    write_token_rows(pre, "train-query", [[0, *rng.integers(4, TRAIN_VOCAB, size=rng.integers(1, 7)).tolist(), 2]
                                          for _ in range(ADORE_QUERIES)])
    _training_qrels(pre, "5\t0\t15\t1")
    emb = root / "passages.memmap"
    rng.standard_normal((ADORE_DOCS, ADORE_DIM), dtype=np.float32).tofile(emb)
    torch.manual_seed(0)
    config = tiny_training_config(dropout, pad_token_id=1, output_embedding_size=ADORE_DIM)
    DenseEncoder.from_config(config).save_pretrained(root / "init")
    return AdoreData(pre, emb, root / "init")


def adore_cli_args(d: AdoreData, out: Path, *extra: str, batch: int = 4) -> list[str]:
    """adore/train.py arguments over :func:`make_adore_data` (K 8, metric cut 5, 1e-3, CPU faiss, 1 thread)."""
    return ["--init_path", str(d.init), "--pembed_path", str(d.emb), "--preprocess_dir", str(d.pre),
            "--model_save_dir", str(out), "--metric_cut", "5", "--neg_topk", "8", "--per_gpu_batch_size",
            str(batch), "--max_seq_length", "8", "--logging_steps", "1", "--learning_rate", "1e-3",
            "--warmup_steps", "100", "--no_cuda", "--faiss_omp_num_threads", "1", *extra]


def load_weights(folder: Path) -> dict:
    """The ``model.safetensors`` tensors of a model folder."""
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def read_scalars(log_dir: Path) -> dict:
    """``{tag: [(step, value), ...]}`` of the TensorBoard events in ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_spawned_worker(queue) -> None:
    """End a spawned DDP test worker whose results are in ``queue``: flush the queue, then leave with status 0
    without interpreter finalization, where gloo threads still holding tensors can abort the process
    ("terminate called without an active exception", SIGABRT; a known torch teardown race, pytorch PR #179291).
    Call it after ``cleanup_distributed``, on success only: an exception still ends the worker with an error."""
    queue.close()
    queue.join_thread()
    os._exit(0)


# -- the CACM collection (../shared/data/cacm) in the BEIR layout and in the MS MARCO passage layout --------------

def cacm_documents(cacm: Path) -> list[tuple[str, str, str]]:
    """(docid ``CACM-nnnn``, title, text) of every ``cacm.tar.gz`` file: the title is the first paragraph of its
    ``<pre>`` block, the text the rest; whitespace runs become one space (the MS MARCO layout has one line each)."""
    import tarfile

    docs = []
    with tarfile.open(cacm / "cacm.tar.gz") as tar:
        for member in sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name):
            body = tar.extractfile(member).read().decode("utf-8")
            body = body.split("<pre>", 1)[1].split("</pre>", 1)[0]
            title, _, text = body.strip().partition("\n\n")
            docs.append((Path(member.name).stem, " ".join(title.split()), " ".join(text.split())))
    return docs


def cacm_topics(cacm: Path) -> dict[str, str]:
    """{topic number: text, whitespace runs made one space} of ``topics.cacm.txt`` (SGML ``<DOC>`` blocks)."""
    import re

    text = (cacm / "topics.cacm.txt").read_text(encoding="utf-8")
    return {m[1]: " ".join(m[2].split()) for m in re.finditer(r"<DOCNO>\s*(\S+)\s*</DOCNO>(.*?)</DOC>", text, re.S)}


def cacm_qrels(cacm: Path) -> dict[str, list[str]]:
    """{topic: judged relevant docids} of ``qrels.cacm.txt`` (``qid Q0 CACM-n 1``), file order.  The file writes
    documents below 1000 unpadded (``CACM-756``) while their files, hence the docids, are ``CACM-0756``: the ids are
    given the files' four digits (as written they would name no document, and preprocessing refuses such qrels)."""
    qrels: dict[str, list[str]] = {}
    for line in (cacm / "qrels.cacm.txt").read_text(encoding="utf-8").splitlines():
        qid, _, docid, _ = line.split()
        qrels.setdefault(qid, []).append(f"CACM-{int(docid[5:]):04d}")
    return qrels


def write_cacm_layouts(cacm: Path, beir: Path, msmarco: Path, test_every: int = 4) -> dict[str, dict]:
    """CACM as a BEIR folder (string ids) and as an MS MARCO passage folder (ids = the numbers, text =
    ``(title + " " + text).strip()``, preprocess's join of BEIR fields): every ``test_every``-th judged topic is in the test split,
    the others in train.  Returns {split: {qid: relevant docids}}."""
    docs, topics, qrels = cacm_documents(cacm), cacm_topics(cacm), cacm_qrels(cacm)
    judged = sorted(qrels, key=int)
    splits = {"train": {}, "test": {}}
    for i, qid in enumerate(judged):
        splits["test" if i % test_every == test_every - 1 else "train"][qid] = qrels[qid]
    (beir / "qrels").mkdir(parents=True)
    msmarco.mkdir(parents=True)
    beir_lines = [json.dumps({"_id": d, "title": t, "text": x}) for d, t, x in docs]
    (beir / "corpus.jsonl").write_text("\n".join(beir_lines) + "\n", encoding="utf-8")
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in topics.items()),
                                        encoding="utf-8")
    (msmarco / "collection.tsv").write_text("".join(f"{int(d[5:])}\t{(t + ' ' + x).strip()}\n" for d, t, x in docs),
                                            encoding="utf-8")
    files = {"train": ("queries.train.tsv", "qrels.train.tsv"),
             "test": ("msmarco-test2019-queries.tsv", "2019qrels-pass.txt")}
    for split, judged_split in splits.items():
        rows = [(q, d) for q, ds in judged_split.items() for d in ds]
        (beir / "qrels" / f"{split}.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, d in rows), encoding="utf-8")
        queries, qrels_file = files[split]
        (msmarco / queries).write_text("".join(f"{q}\t{t}\n" for q, t in topics.items()), encoding="utf-8")
        (msmarco / qrels_file).write_text("".join(f"{q} Q0 {int(d[5:])} 1\n" for q, d in rows), encoding="utf-8")
    return splits


def reference_metrics(docs: np.ndarray, queries: np.ndarray, qids: list[str], doc_ids: np.ndarray,
                      relevant: dict[str, list[str]], k: int) -> dict[str, float]:
    """MRR@k and nDCG@k (binary grades) of an exact inner-product search, straight from the embeddings."""
    top = np.argsort(-(queries @ docs.T), axis=1, kind="stable")[:, :k]
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    mrr, ndcg = [], []
    for qid, row in zip(qids, top):
        hits = np.isin(doc_ids[row], relevant[qid])
        mrr.append(1.0 / (1 + np.argmax(hits)) if hits.any() else 0.0)
        ndcg.append(float(hits @ discount) / discount[:min(k, len(relevant[qid]))].sum())
    return {f"MRR@{k}": float(np.mean(mrr)), f"nDCG@{k}": float(np.mean(ndcg))}


def make_adore_sized_data(root: Path, n_queries: int, n_docs: int, dropout: float = 0.0,
                          duplicates: tuple = ()) -> AdoreData:
    """:func:`make_adore_data` with other sizes: ``n_queries`` train queries (query q's positive is 3q mod
    ``n_docs``, plus 3q + 1 for even q), ``n_docs`` random document embeddings in which each ``(src, dst)`` pair of
    ``duplicates`` copies row src onto row dst (equal scores: ties at any rank), and an init model with
    ``dropout``."""
    rng = np.random.default_rng(13)
    pre = root / "preprocess"
    pre.mkdir(parents=True)
    write_token_rows(pre, "train-query", [[0, *rng.integers(4, TRAIN_VOCAB, size=rng.integers(1, 7)).tolist(), 2]
                                          for _ in range(n_queries)])
    lines = [f"{q}\t0\t{3 * q % n_docs}\t1" for q in range(n_queries)]
    lines += [f"{q}\t0\t{(3 * q + 1) % n_docs}\t1" for q in range(0, n_queries, 2)]
    (pre / "train-qrel.tsv").write_text("\n".join(lines) + "\n")
    docs = rng.standard_normal((n_docs, ADORE_DIM), dtype=np.float32)
    for src, dst in duplicates:
        docs[dst] = docs[src]
    emb = root / "passages.memmap"
    docs.tofile(emb)
    torch.manual_seed(0)
    config = tiny_training_config(dropout, pad_token_id=1, output_embedding_size=ADORE_DIM)
    DenseEncoder.from_config(config).save_pretrained(root / "init")
    return AdoreData(pre, emb, root / "init")


def torchrun_args(nproc: int, *command) -> list:
    """``python -m torch.distributed.run`` arguments starting ``nproc`` local processes of ``command`` (``"-m",
    MODULE, args...`` or ``SCRIPT, args...``), ``--standalone`` (torchrun binds a free port itself: no race with
    other tests for a port chosen beforehand): pass them to :func:`run_cli`, which runs them from the repository
    root."""
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *map(str, command)]


KILL_RANK_AFTER_CHECKPOINT = r"""
import os, signal, sys
sys.path.insert(0, os.getcwd())  # the repository root (a script's own folder is on the path, not the cwd)
from infra import training_loop
from infra.io import run_cli
from PACKAGE import train as trainer
step, real_save = int(sys.argv[1]), training_loop.TrainingRun.save
def save(self):
    path = real_save(self)  # every rank has passed the checkpoint's barrier: it is complete on disk
    if os.environ["RANK"] == "1" and self.progress.global_step == step:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
training_loop.TrainingRun.save = save
run_cli(trainer.main, sys.argv[2:], torchrun=True)
"""


def kill_rank_script(folder: Path, package: str) -> Path:
    """A script ``STEP ARGS...`` that runs ``PACKAGE.train`` (star or adore) under torchrun and SIGKILLs rank 1
    right after checkpoint-STEP is complete on disk."""
    script = folder / f"kill_rank_{package}.py"
    script.write_text(KILL_RANK_AFTER_CHECKPOINT.replace("PACKAGE", package))
    return script
