"""The results table of a reproduce.sh run, shaped like the paper's (README) table, and its training curves.

    python -m results_table --root data/sample/passage --task passage [--curves inbatch rand star adore-star ...]

Scores the rank files reproduce.sh writes under ``--root`` with msmarco_eval (Dev MRR@10 or, for documents,
MRR@100 and R@100; Test and DL20 NDCG@10) and writes ``results.md`` (printed too), ``results.json`` and
``curves.png`` to ``--out_dir``.  The layout read and the metrics: :func:`gather`; the comparisons:
:func:`compare`; the curves: :func:`evaluate_curves`.
``--published`` sets the released models' published figures beside ours (:func:`compare_published`);
``--released_runs`` the overlap with the released rank files.
``--task beir`` (reproduce.sh's ``beir`` task): a zero-shot first row, dev and test nDCG@10, R@100 and
MRR@10 (:func:`score_beir_rank_files`).
"""
from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from dataset import load_rank
from infra import cli_types as ct
from infra.checkpoint_paths import checkpoint_step, list_checkpoints
from infra.io import InputError, PathLike, atomic_write_json, atomic_write_text, require_file, run_cli
from infra.run_file import iter_run, load_id_map
from infra.run_lock import output_lock
from msmarco_eval import evaluate_files

TRAINERS = ("inbatch", "rand", "star")
NAMES = {"warmup": "Warm-up", "inbatch": "Inbatch-Neg", "rand": "Rand-Neg", "star": "STAR",
         "adore-inbatch": "ADORE(Inbatch-Neg)", "adore-rand": "ADORE(Rand-Neg)", "adore-star": "ADORE(STAR)"}
TABLE_KEYS = ("inbatch", "rand", "star", "adore-inbatch", "adore-rand", "adore-star")
COMPARISONS = (("adore-inbatch", "inbatch"), ("adore-rand", "rand"), ("adore-star", "star"), ("star", "inbatch"))
BEIR_COMPARISONS = (("inbatch", "warmup"), ("rand", "warmup"), ("star", "warmup"), ("star", "rand"))
BEIR_METRICS = {"nDCG@10": "ndcg10", "R@100": "r100", "MRR@10": "mrr"}   # metric -> field suffix, per split
LOSS_TAGS = ("loss", "train/all_loss")   # star/train.py, adore/train.py
SEARCH_DEPTH = 100
NDCG_SPLITS = {"test": "test_ndcg10", "test2020": "dl20_ndcg10"}  # NDCG@10 field of TREC DL 2019 (test) and DL 2020
COLUMNS = {"dev_mrr": "Dev MRR@{depth}", "dev_r100": "Dev R@100", "test_ndcg10": "Test NDCG@10",
           "dl20_ndcg10": "DL20 NDCG@10"}   # table header of each field present
PUBLISHED_FIELDS = ("dev_mrr", "dev_r100", "test_ndcg10")   # the metrics the original README publishes
PUBLISHED_COLUMNS = ("task", "key", "name", *PUBLISHED_FIELDS)
TOLERANCE = 0.002
OVERLAP_DEPTHS = (10, 100)
OVERLAP_SPLITS = ("dev", "test")   # the released Dev and TRECTest rank files
BEIR_COLUMNS = {f"{split}_{suffix}": f"{split.capitalize()} {metric}"
                for split in ("dev", "test") for metric, suffix in BEIR_METRICS.items()}


# ==============================================================================================================
# Table
# ==============================================================================================================

def names(task: str) -> dict[str, str]:
    """Row names: :data:`NAMES`, the first row being the zero-shot initial model for ``beir``."""
    return {**NAMES, "warmup": "Zero-shot"} if task == "beir" else NAMES


def columns(task: str) -> dict[str, str]:
    return BEIR_COLUMNS if task == "beir" else COLUMNS


def mrr_depth(task: str) -> int:
    """MRR@10 for passages, MRR@100 for documents (the paper's metrics)."""
    return 100 if task == "doc" else 10


def rank_dir(root: Path, key: str) -> Path:
    return root / "warmup_retrieve" if key == "warmup" else root / "evaluate" / key


def score_rank_files(folder: Path, preprocess_dir: Path, depth: int,
                     ndcg_splits: Sequence[str]) -> dict[str, Optional[float]]:
    """Dev MRR@depth and R@100 of ``folder/dev.rank.tsv`` and the NDCG@10 of ``folder/{split}.rank.tsv`` against
    ``{split}-qrel.tsv`` for each of ``ndcg_splits`` (fields :data:`NDCG_SPLITS`); None where a file is absent."""
    row: dict[str, Optional[float]] = {"dev_mrr": None, "dev_r100": None}
    dev = folder / "dev.rank.tsv"
    if dev.is_file():
        m = evaluate_files(preprocess_dir / "dev-qrel.tsv", dev, metrics=(f"MRR@{depth}", "R@100"))
        row["dev_mrr"], row["dev_r100"] = m[f"MRR@{depth}"], m["R@100"]
    for split in ndcg_splits:
        rank = folder / f"{split}.rank.tsv"
        row[NDCG_SPLITS[split]] = (evaluate_files(preprocess_dir / f"{split}-qrel.tsv", rank,
                                                  metrics=("nDCG@10",))["nDCG@10"] if rank.is_file() else None)
    return row


def score_beir_rank_files(folder: Path, preprocess_dir: Path) -> dict[str, Optional[float]]:
    """nDCG@10, R@100 and MRR@10 (fields ``{split}_{ndcg10,r100,mrr}``) of ``folder/{split}.rank.tsv`` for each
    of dev and test that has ``{split}-qrel.tsv``; None where the rank file is absent."""
    row: dict[str, Optional[float]] = {}
    for split in ("dev", "test"):
        if not (preprocess_dir / f"{split}-qrel.tsv").is_file():
            continue
        rank = folder / f"{split}.rank.tsv"
        scores = (evaluate_files(preprocess_dir / f"{split}-qrel.tsv", rank, metrics=tuple(BEIR_METRICS))
                  if rank.is_file() else {})
        row.update({f"{split}_{suffix}": scores.get(metric) for metric, suffix in BEIR_METRICS.items()})
    return row


def gather(root: PathLike, task: str, preprocess_dir: Optional[PathLike] = None
           ) -> dict[str, dict[str, Optional[float]]]:
    """``{key: scores}`` of the warm-up (when evaluated) and every table model that has rank files, scored on the
    qrels in ``preprocess_dir`` (default ``root/preprocess``); the DL20 field only when some model has a
    ``test2020.rank.tsv``.

    Layout read under ``--root`` (what reproduce.sh writes; ``KEY`` is inbatch, rand or star)::

        preprocess/dev-qrel.tsv, test-qrel.tsv          offset qrels (test: graded, TREC DL 2019)
        preprocess/test2020-qrel.tsv                     graded TREC DL 2020 qrels (when preprocess wrote the split)
        evaluate/KEY/{dev,test,test2020}.rank.tsv        Inbatch-Neg, Rand-Neg, STAR (star/inference.py)
        evaluate/adore-KEY/{dev,test,test2020}.rank.tsv  ADORE(...) (adore/inference.py)
        warmup_retrieve/{dev,test}.rank.tsv              the warm-up model (an extra first row when present)
        train/KEY/checkpoint-<step>/, train/KEY/log/     STAR-type checkpoints and TensorBoard events (tag ``loss``)
        adore_train/KEY/checkpoint-<step>/, .../log/     ADORE checkpoints and events (tag ``train/all_loss``)
        evaluate/KEY/passages.memmap                     the frozen document embeddings ADORE(KEY) searches

    Metrics (``msmarco_eval.compute_metrics``): Dev MRR@10 (MRR@100 for documents) and R@100 on ``dev-qrel.tsv``;
    Test NDCG@10 (``trec_eval -c`` on the graded ``test-qrel.tsv``); DL20 NDCG@10 likewise on ``test2020-qrel.tsv``, a
    column (and a ``dl20_ndcg10`` field) only when some model has a ``test2020.rank.tsv``.  Outputs in ``--out_dir``
    (default ``ROOT/results``): ``results.md`` (the table, printed too), ``results.json`` (every number, the
    comparisons below and the curves), ``curves.png`` (skipped with a message when matplotlib is missing).
    """
    root = Path(root)
    preprocess_dir = Path(preprocess_dir) if preprocess_dir is not None else root / "preprocess"
    folders = {key: rank_dir(root, key) for key in ("warmup", *TABLE_KEYS)}
    ranked = {key: {split for split in ("dev", *NDCG_SPLITS) if (folder / f"{split}.rank.tsv").is_file()}
              for key, folder in folders.items()}
    if task == "beir":
        return {key: score_beir_rank_files(folder, preprocess_dir) for key, folder in folders.items()
                if ranked[key]}
    ndcg_splits = [split for split in NDCG_SPLITS if split == "test" or any(split in r for r in ranked.values())]
    return {key: score_rank_files(folder, preprocess_dir, mrr_depth(task), ndcg_splits)
            for key, folder in folders.items() if ranked[key]}


def compare(rows: dict[str, dict[str, Optional[float]]], task: str = "passage") -> list[dict[str, Any]]:
    """For each (model, reference) of :data:`COMPARISONS` (and :data:`BEIR_COMPARISONS` for ``beir``: every trained
    row against the zero-shot one, STAR against Rand-Neg) with both rows: is every metric at least as good?

    Comparisons: for each ADORE row against the model it starts from, and STAR against Inbatch-Neg, whether each
    metric is at least as good (``results.json["comparisons"]``, also listed under the table).
    """
    out = []
    pairs = COMPARISONS + (BEIR_COMPARISONS if task == "beir" else ())
    for model, reference in pairs:
        if model in rows and reference in rows:
            metrics = {m: rows[model][m] >= rows[reference][m] for m in rows[model]
                       if rows[model][m] is not None and rows[reference][m] is not None}
            out.append({"model": names(task)[model], "reference": names(task)[reference],
                        "at_least_as_good": metrics})
    return out


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown_table(rows: dict[str, dict[str, Optional[float]]], task: str, title: str) -> str:
    """The README-shaped table, one line per model present, one column per field of :data:`COLUMNS` present."""
    heads = columns(task)
    fields = [field for field in heads if any(field in row for row in rows.values())]
    header = [title] + [heads[field].format(depth=mrr_depth(task)) for field in fields]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, row in rows.items():
        lines.append("| " + " | ".join([names(task)[key]] + [_fmt(row.get(field)) for field in fields]) + " |")
    return "\n".join(lines) + "\n"


def comparison_lines(comparisons: list[dict[str, Any]]) -> str:
    lines = []
    for c in comparisons:
        worse = [m for m, ok in c["at_least_as_good"].items() if not ok]
        verdict = "at least as good on every metric" if not worse else f"worse on {', '.join(worse)}"
        lines.append(f"- {c['model']} vs {c['reference']}: {verdict}")
    return "\n".join(lines) + ("\n" if lines else "")


# ==============================================================================================================
# Published figures (the released models)
# ==============================================================================================================

def read_published(path: PathLike, task: str) -> dict[str, dict[str, float]]:
    """``{key: {field: figure}}`` of ``task``'s rows in the released-models TSV (module docstring)."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t") if lines else []
    missing = [c for c in PUBLISHED_COLUMNS if c not in header]
    if missing:
        raise InputError(f"the header lacks the columns {missing}", path=path, line=1, value=lines[0] if lines else "")
    published: dict[str, dict[str, float]] = {}
    for number, line in enumerate(lines[1:], 2):
        cells = dict(zip(header, line.split("\t")))
        if cells.get("task") != task:
            continue
        if cells.get("key") not in TABLE_KEYS:
            raise InputError(f"unknown model key (expected one of {TABLE_KEYS})", path=path, line=number,
                             value=cells.get("key"))
        try:
            published[cells["key"]] = {field: float(cells[field]) for field in PUBLISHED_FIELDS}
        except (KeyError, ValueError):
            raise InputError("expected a figure in each of " + ", ".join(PUBLISHED_FIELDS), path=path,
                             line=number, value=line) from None
    if not published:
        raise InputError(f"no row for the task {task!r}", path=path)
    return published


def compare_published(rows: dict[str, dict[str, Optional[float]]], published: dict[str, dict[str, float]],
                      tolerance: float = TOLERANCE) -> dict[str, dict[str, Any]]:
    """For each model with both our row and a published one: ``ours``, ``published``, ``diff`` (ours - published,
    None where we have no figure) per field of :data:`PUBLISHED_FIELDS`, and ``flagged`` (some |diff| above
    ``tolerance``; |diff| is rounded to 6 decimals first, so that float noise does not flag a difference of
    exactly ``tolerance``)."""
    out = {}
    for key in TABLE_KEYS:
        if key not in rows or key not in published:
            continue
        diff = {f: None if rows[key][f] is None else rows[key][f] - published[key][f] for f in PUBLISHED_FIELDS}
        out[key] = {"ours": {f: rows[key][f] for f in PUBLISHED_FIELDS}, "published": published[key], "diff": diff,
                    "flagged": any(d is not None and round(abs(d), 6) > tolerance for d in diff.values())}
    return out


def _signed(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:+.3f}"


def published_table(rows: dict[str, dict[str, Optional[float]]], comparison: dict[str, dict[str, Any]], task: str,
                    title: str, tolerance: float = TOLERANCE) -> str:
    """Our figures, the published ones and the difference per metric of :data:`PUBLISHED_FIELDS` (then DL20,
    which has no published figure, when present), one line per compared model; ``off by > tolerance`` flags a
    row."""
    extra = [field for field in COLUMNS if field not in PUBLISHED_FIELDS and any(field in r for r in rows.values())]
    header = [title]
    for field in PUBLISHED_FIELDS:
        label = COLUMNS[field].format(depth=mrr_depth(task)).replace("Test", "DL19")
        header += [label, "paper", "Δ"]
    header += [COLUMNS[field] for field in extra] + ["check"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, c in comparison.items():
        cells = [NAMES[key]]
        for field in PUBLISHED_FIELDS:
            cells += [_fmt(c["ours"][field]), _fmt(c["published"][field]), _signed(c["diff"][field])]
        cells += [_fmt(rows[key][field]) for field in extra]
        cells.append(f"**off by > {tolerance:g}**" if c["flagged"] else "ok")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def official_ranking(rank_path: Path, preprocess_dir: Path, split: str) -> dict[int, list[int]]:
    """Our offset rank file in official ids (preprocess's id maps): ``{qid: [docid, ...]}`` in rank order."""
    query_ids = load_id_map(preprocess_dir / f"{split}-query_ids.npy")
    doc_ids = load_id_map(preprocess_dir / "passages_ids.npy")
    return {int(query_ids[q]): doc_ids[docs].tolist() for q, docs in load_rank(rank_path).items()}


def released_ranking(path: Path, task: str) -> dict[int, list[int]]:
    """A released rank file (official ids, ``qid pid rank`` or TREC) as ``{qid: [docid, ...]}`` by rank."""
    ranked: dict[int, list[tuple[int, int]]] = {}
    for _, qid, docid, rank, _ in iter_run(path, ids="doc" if task == "doc" else "int", trec_ranks=True):
        ranked.setdefault(qid, []).append((rank, docid))
    return {qid: [docid for _, docid in sorted(pairs)] for qid, pairs in ranked.items()}


def top_overlap(ours: dict[int, list[int]], theirs: dict[int, list[int]], path: Path) -> dict[str, float]:
    """``queries`` (those both rank) and the mean ``top{k}`` overlap |ours[:k] ∩ theirs[:k]| / k, for each k of
    :data:`OVERLAP_DEPTHS`."""
    common = sorted(ours.keys() & theirs.keys())
    if not common:
        raise InputError("no query in common with our rank file", path=path)
    out: dict[str, float] = {"queries": len(common)}
    for k in OVERLAP_DEPTHS:
        out[f"top{k}"] = sum(len(set(ours[q][:k]) & set(theirs[q][:k])) for q in common) / (k * len(common))
    return out


def compare_released_runs(root: Path, runs_dir: Path, preprocess_dir: Path, task: str) -> dict[str, dict[str, Any]]:
    """``{key: {split: top_overlap(...) or {"error": message}}}`` for each released rank file beside one of ours.

    For each ``runs_dir/KEY/{dev,test}.rank.tsv`` (what ``download_data.sh runs`` fetches) beside our rank file of
    the same split: the mean top-10 and top-100 overlap (|ours ∩ theirs| / k per query, over the queries both
    rank).  Theirs are read in official ids (``qid pid rank`` or a TREC run, doc ids with their ``D``); ours are
    mapped to official ids through the preprocess id maps; a file that cannot be read so is reported, not fatal."""
    out: dict[str, dict[str, Any]] = {}
    for key in TABLE_KEYS:
        for split in OVERLAP_SPLITS:
            theirs, ours = runs_dir / key / f"{split}.rank.tsv", rank_dir(root, key) / f"{split}.rank.tsv"
            if not (theirs.is_file() and ours.is_file()):
                continue
            try:
                figures = top_overlap(official_ranking(ours, preprocess_dir, split), released_ranking(theirs, task),
                                      theirs)
            except InputError as e:
                figures = {"error": str(e)}
            out.setdefault(key, {})[split] = figures
    return out


def overlap_lines(overlaps: dict[str, dict[str, Any]]) -> str:
    lines = ["Released rank files, top-k overlap with ours:"]
    for key, splits in overlaps.items():
        for split, f in splits.items():
            figures = (f"not compared: {f['error']}" if "error" in f else f"{f['queries']} queries, "
                       + ", ".join(f"top-{k} {f[f'top{k}']:.3f}" for k in OVERLAP_DEPTHS))
            lines.append(f"- {NAMES[key]} {split}: {figures}")
    return "\n".join(lines) + "\n"


# ==============================================================================================================
# Dev curves: every saved checkpoint on dev
# ==============================================================================================================

def training_folder(root: Path, key: str) -> Path:
    return root / "adore_train" / key[len("adore-"):] if key.startswith("adore-") else root / "train" / key


def start_model(root: Path, key: str) -> Optional[str]:
    """The table key of the model a run starts from (its curve's step 0): the start model for ADORE, the warm-up
    for a STAR-type run initialised from ``ROOT/warmup``; None when unknown."""
    if key.startswith("adore-"):
        return key[len("adore-"):]
    args_file = root / "train" / key / "training_args.json"
    init = json.loads(args_file.read_text()).get("init_path") if args_file.is_file() else None
    return "warmup" if init is not None and Path(init).resolve() == (root / "warmup").resolve() else None


class CheckpointScorer:
    """Dev MRR of one checkpoint: encode (retrieve_utils, torch imported only here), search, write the rank file
    into ``work`` and score it; the embedding memmaps are deleted afterwards."""

    def __init__(self, root: Path, preprocess_dir: Path, work: Path, task: str, query_length: int,
                 adore_query_length: int, doc_length: int, batch_size: int, no_cuda: bool):
        import retrieve_utils as ru

        self.ru, self.root, self.pre, self.work, self.depth = ru, root, preprocess_dir, work, mrr_depth(task)
        self.query_length, self.adore_query_length, self.doc_length = query_length, adore_query_length, doc_length
        self.batch_size, self.device = batch_size, ru.inference_device(no_cuda)

    def __call__(self, key: str, checkpoint: Path) -> float:
        import numpy as np

        from infra.embedding_memmap import corpus_rows, open_embeddings
        from infra.exact_search import exact_search, write_rank_file

        ru, pre = self.ru, self.pre
        out = self.work / key / checkpoint.name
        model, model_id, pad = ru.load_encoder(checkpoint)
        common = dict(batch_size=self.batch_size, device=self.device, pad_token_id=pad, overwrite=True)
        try:
            if key.startswith("adore-"):
                docs = open_embeddings(self.root / "evaluate" / key[len("adore-"):] / "passages.memmap",
                                          dim=model.output_dim, n_rows=corpus_rows(pre))
                queries = ru.encode_split(model, model_id, pre, "dev-query", self.adore_query_length,
                                          out / "dev-query.memmap", **common)
            else:
                queries = ru.encode_split(model, model_id, pre, "dev-query", self.query_length,
                                          out / "dev-query.memmap", **common)
                docs = ru.encode_split(model, model_id, pre, "passages", self.doc_length, out / "passages.memmap",
                                       **common)
            _, ids = exact_search(docs, queries, SEARCH_DEPTH)
            write_rank_file(out / "dev.rank.tsv", np.arange(len(queries)), ids)
        finally:
            for memmap in list(out.glob("*.memmap")) + list(out.glob("*.memmap.manifest.json")):
                memmap.unlink()
        return evaluate_files(pre / "dev-qrel.tsv", out / "dev.rank.tsv",
                              metrics=(f"MRR@{self.depth}",))[f"MRR@{self.depth}"]


def evaluate_curves(root: Path, keys: Sequence[str], rows: dict[str, dict[str, Optional[float]]], cache_path: Path,
                    make_scorer: Callable[[], Callable[[str, Path], float]]) -> dict[str, dict[int, float]]:
    """``{key: {step: dev MRR}}``: step 0 is the start model's dev MRR in ``rows`` (:func:`gather`,
    :func:`start_model`), then every checkpoint of each key, scored by the callable ``make_scorer()`` builds on
    first need; checkpoints already in ``cache_path`` (``{key: {checkpoint name: MRR}}``) are not evaluated
    again.

    Curves (``--curves KEY ...``): the dev MRR of every saved ``checkpoint-<step>`` of the named models.  A STAR-type
    checkpoint encodes the corpus and the dev queries (memmaps in ``out_dir/curves/``, deleted once scored); an
    ADORE checkpoint encodes only the dev queries and searches its start model's frozen embeddings, so it is cheap
    even on MS MARCO (a STAR-type point there costs a full corpus encode: reproduce.sh only asks for ADORE's on real
    data).  Step 0 is the start model: the warm-up's dev ranking for Inbatch-Neg / Rand-Neg / STAR (when they start
    from it), the start model's dev ranking for ADORE.  Scores are cached in ``out_dir/curves.json`` by checkpoint, so
    a rerun only evaluates new checkpoints.  The plot shows the training loss (TensorBoard events) and these dev MRR
    points against the step.
    """
    cache: dict[str, dict[str, float]] = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    scorer = None
    curves: dict[str, dict[int, float]] = {}
    for key in keys:
        points: dict[int, float] = {}
        start = rows.get(start_model(root, key) or "", {}).get("dev_mrr")
        if start is not None:
            points[0] = start
        for checkpoint in list_checkpoints(training_folder(root, key)):
            done = cache.setdefault(key, {})
            if checkpoint.name not in done:
                scorer = scorer or make_scorer()
                print(f"curves: {NAMES[key]} {checkpoint.name} on dev ...", flush=True)
                done[checkpoint.name] = scorer(key, checkpoint)
                atomic_write_json(cache_path, cache)
            points[checkpoint_step(checkpoint)] = done[checkpoint.name]
        curves[key] = dict(sorted(points.items()))
    return curves


# ==============================================================================================================
# Training loss from TensorBoard, plot
# ==============================================================================================================

def read_loss(log_dir: Path) -> list[tuple[int, float]]:
    """``[(step, loss)]`` from the TensorBoard events under ``log_dir`` (first of :data:`LOSS_TAGS` found); a
    step logged twice (a resumed run) keeps its last value."""
    if not log_dir.is_dir():
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags().get("scalars", [])
    for tag in LOSS_TAGS:
        if tag in tags:
            return sorted({e.step: e.value for e in events.Scalars(tag)}.items())
    return []


def plot_curves(losses: dict[str, list[tuple[int, float]]], curves: dict[str, dict[int, float]], depth: int,
                path: Path) -> bool:
    """Training loss (top) and dev MRR (bottom) against the step, STAR-type runs left, ADORE right; False (and a
    message) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no curves plot (pip install -e '.[plot]')")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex="col")
    for col, keys in enumerate((TRAINERS, tuple(f"adore-{k}" for k in TRAINERS))):
        for key in keys:
            if losses.get(key):
                steps, values = zip(*losses[key])
                axes[0, col].plot(steps, values, label=NAMES[key])
            if curves.get(key):
                steps, values = zip(*curves[key].items())
                axes[1, col].plot(steps, values, marker="o", label=NAMES[key])
        axes[0, col].set_title("ADORE" if col else "Inbatch-Neg / Rand-Neg / STAR")
        axes[0, col].set_ylabel("training loss")
        axes[1, col].set_ylabel(f"dev MRR@{depth}")
        axes[1, col].set_xlabel("optimizer step")
        for ax in axes[:, col]:
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
            ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True


# ==============================================================================================================
# Main
# ==============================================================================================================

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m results_table", description=__doc__.split("\n\n")[0],
                                     epilog="The layout read and the outputs: results_table.gather.")
    parser.add_argument("--root", required=True, help="task folder of reproduce.sh, e.g. data/sample/passage")
    parser.add_argument("--task", choices=("passage", "doc", "beir"), default="passage",
                        help="passage: Dev MRR@10; doc: Dev MRR@100; beir: nDCG@10, R@100 and MRR@10 of dev and "
                             "test (default %(default)s)")
    parser.add_argument("--title", default=None, help="first header cell of the table (default: the task)")
    parser.add_argument("--out_dir", default=None, help="output folder (default ROOT/results)")
    parser.add_argument("--preprocess_dir", default=None,
                        help="folder of the qrels (default ROOT/preprocess)")
    parser.add_argument("--published", default=None, metavar="TSV",
                        help="released-models table (bash download_data.sh --published): our figures beside the "
                             "published ones")
    parser.add_argument("--released_runs", default=None, metavar="DIR",
                        help="released rank files (DIR/KEY/{dev,test}.rank.tsv, download_data.sh runs): top-k "
                             "overlap with ours")
    parser.add_argument("--tolerance", type=ct.non_negative_float, default=TOLERANCE,
                        help="--published: flag a row more than this away (default %(default)s)")
    parser.add_argument("--curves", nargs="*", default=[], choices=TABLE_KEYS, metavar="KEY",
                        help="evaluate every checkpoint of these models on dev for the curves: "
                             f"{', '.join(TABLE_KEYS)}")
    parser.add_argument("--query_length", type=ct.positive_int, default=32,
                        help="STAR-type query length (default %(default)s)")
    parser.add_argument("--adore_query_length", type=ct.positive_int, default=64,
                        help="ADORE query length (default %(default)s)")
    parser.add_argument("--doc_length", type=ct.positive_int, default=256,
                        help="document length of the STAR-type curves (default %(default)s; 512 for documents)")
    parser.add_argument("--batch_size", type=ct.positive_int, default=64,
                        help="encoding batch size (default %(default)s)")
    parser.add_argument("--no_cuda", action="store_true", help="encode on the CPU even when CUDA is available")
    return parser


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    root = Path(args.root)
    with output_lock(args.out_dir or root / "results"):
        return tabulate(args, root)


def tabulate(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Gather the metrics, score the curves, write and print the table, as ``args`` say."""
    preprocess_dir = Path(args.preprocess_dir or root / "preprocess")
    qrels = ("dev", "test") if args.task == "beir" else ("dev",)
    if not any((preprocess_dir / f"{split}-qrel.tsv").is_file() for split in qrels):
        raise InputError(f"no {' or '.join(f'{s}-qrel.tsv' for s in qrels)} in the preprocess folder (--root: a "
                         "reproduce.sh task folder)", path=preprocess_dir)
    published = read_published(require_file(args.published, "--published table"), args.task) \
        if args.published else None
    out = Path(args.out_dir or root / "results")
    rows = gather(root, args.task, preprocess_dir)
    if not rows:
        raise InputError("no rank files found (evaluate/*/dev.rank.tsv)", path=root)
    comparisons = compare(rows, args.task)
    title = args.title or args.task
    against_paper = compare_published(rows, published, args.tolerance) if published is not None else None
    table = (markdown_table(rows, args.task, title) if against_paper is None
             else published_table(rows, against_paper, args.task, title, args.tolerance))
    text = table + ("\n" + comparison_lines(comparisons) if comparisons else "")
    overlaps = (compare_released_runs(root, Path(args.released_runs), preprocess_dir, args.task)
                if args.released_runs else {})
    if overlaps:
        text += "\n" + overlap_lines(overlaps)

    make_scorer = functools.partial(CheckpointScorer, root, preprocess_dir, out / "curves", args.task,
                                    args.query_length, args.adore_query_length, args.doc_length, args.batch_size,
                                    args.no_cuda)
    curves = evaluate_curves(root, args.curves, rows, out / "curves.json", make_scorer)
    losses = {key: read_loss(training_folder(root, key) / "log") for key in TABLE_KEYS}
    plotted = plot_curves(losses, curves, mrr_depth(args.task), out / "curves.png")

    result = {"task": args.task, "metrics": {names(args.task)[k]: v for k, v in rows.items()},
              "comparisons": comparisons,
              "dev_mrr_curves": {NAMES[k]: v for k, v in curves.items()},
              "loss_curves": {NAMES[k]: v for k, v in losses.items() if v},
              "plot": str(out / "curves.png") if plotted else None}
    if against_paper is not None:
        result["published"] = {NAMES[k]: v for k, v in against_paper.items()}
    if overlaps:
        result["released_runs"] = {NAMES[k]: v for k, v in overlaps.items()}
    atomic_write_text(out / "results.md", text)
    atomic_write_json(out / "results.json", result)
    print(text, end="")
    print(f"written: {out / 'results.md'}, {out / 'results.json'}" + (f", {out / 'curves.png'}" if plotted else ""))
    return result


if __name__ == "__main__":
    run_cli(main)
