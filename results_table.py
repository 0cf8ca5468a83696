"""The results table of a reproduce.sh run, shaped like the paper's (README) table, and its training curves.

    python results_table.py --root data/sample/passage --task passage [--curves inbatch rand star adore-star ...]

Layout read under ``--root`` (what reproduce.sh writes; ``KEY`` is inbatch, rand or star)::

    preprocess/dev-qrel.tsv, test-qrel.tsv          offset qrels (test: graded, TREC DL 2019)
    preprocess/test2020-qrel.tsv                     graded TREC DL 2020 qrels (when preprocess wrote the split)
    evaluate/KEY/{dev,test,test2020}.rank.tsv        Inbatch-Neg, Rand-Neg, STAR (star/inference.py)
    evaluate/adore-KEY/{dev,test,test2020}.rank.tsv  ADORE(...) (adore/inference.py)
    warmup_retrieve/{dev,test}.rank.tsv              the warm-up model (an extra first row when present)
    train/KEY/checkpoint-<step>/, train/KEY/log/     STAR-type checkpoints and TensorBoard events (tag ``loss``)
    adore_train/KEY/checkpoint-<step>/, .../log/     ADORE checkpoints and events (tag ``train/all_loss``)
    evaluate/KEY/passages.memmap                     the frozen document embeddings ADORE(KEY) searches

Metrics (msmarco_eval, see its docstring): Dev MRR@10 (MRR@100 for documents) and R@100 on ``dev-qrel.tsv``;
Test NDCG@10 (``trec_eval -c`` on the graded ``test-qrel.tsv``); DL20 NDCG@10 likewise on ``test2020-qrel.tsv``, a
column (and a ``dl20_ndcg10`` field) only when some model has a ``test2020.rank.tsv``.  Outputs in ``--out_dir``
(default ``ROOT/results``): ``results.md`` (the table, printed too), ``results.json`` (every number, the
comparisons below and the curves), ``curves.png`` (skipped with a message when matplotlib is missing).

A BEIR-layout collection (``--task beir``, reproduce.sh's ``beir`` task): the first row is the initial model
zero-shot (its rank files in ``warmup_retrieve/``), and each split of ``dev`` and ``test`` that has qrels gets
nDCG@10, R@100 and MRR@10 (the BEIR figures); ``--curves`` then need the dev split.

Comparisons: for each ADORE row against the model it starts from, and STAR against Inbatch-Neg, whether each
metric is at least as good (``results.json["comparisons"]``, also listed under the table).

Curves (``--curves KEY ...``): the dev MRR of every saved ``checkpoint-<step>`` of the named models.  A STAR-type
checkpoint encodes the corpus and the dev queries (memmaps in ``out_dir/curves/``, deleted once scored); an
ADORE checkpoint encodes only the dev queries and searches its start model's frozen embeddings, so it is cheap
even on MS MARCO (a STAR-type point there costs a full corpus encode: reproduce.sh only asks for ADORE's on real
data).  Step 0 is the start model: the warm-up's dev ranking for Inbatch-Neg / Rand-Neg / STAR (when they start
from it), the start model's dev ranking for ADORE.  Scores are cached in ``out_dir/curves.json`` by checkpoint, so
a rerun only evaluates new checkpoints.  The plot shows the training loss (TensorBoard events) and these dev MRR
points against the step.
"""
from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from infra import cli_types as ct
from infra.checkpoint_paths import checkpoint_step, list_checkpoints
from infra.io import InputError, PathLike, atomic_write_json, atomic_write_text, run_cli
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


def gather(root: PathLike, task: str) -> dict[str, dict[str, Optional[float]]]:
    """``{key: scores}`` of the warm-up (when evaluated) and every table model that has rank files; the DL20
    field only when some model has a ``test2020.rank.tsv``."""
    root = Path(root)
    folders = {key: rank_dir(root, key) for key in ("warmup", *TABLE_KEYS)}
    ranked = {key: {split for split in ("dev", *NDCG_SPLITS) if (folder / f"{split}.rank.tsv").is_file()}
              for key, folder in folders.items()}
    if task == "beir":
        return {key: score_beir_rank_files(folder, root / "preprocess") for key, folder in folders.items()
                if ranked[key]}
    ndcg_splits = [split for split in NDCG_SPLITS if split == "test" or any(split in r for r in ranked.values())]
    return {key: score_rank_files(folder, root / "preprocess", mrr_depth(task), ndcg_splits)
            for key, folder in folders.items() if ranked[key]}


def compare(rows: dict[str, dict[str, Optional[float]]], task: str = "passage") -> list[dict[str, Any]]:
    """For each (model, reference) of :data:`COMPARISONS` (and :data:`BEIR_COMPARISONS` for ``beir``: every trained
    row against the zero-shot one, STAR against Rand-Neg) with both rows: is every metric at least as good?"""
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

    def __init__(self, root: Path, work: Path, task: str, query_length: int, adore_query_length: int,
                 doc_length: int, batch_size: int, no_cuda: bool):
        import retrieve_utils as ru

        self.ru, self.root, self.work, self.depth = ru, root, work, mrr_depth(task)
        self.query_length, self.adore_query_length, self.doc_length = query_length, adore_query_length, doc_length
        self.batch_size, self.device = batch_size, ru.inference_device(no_cuda)

    def __call__(self, key: str, checkpoint: Path) -> float:
        import numpy as np

        from infra.embedding_memmap import corpus_rows, open_embeddings
        from infra.exact_search import exact_search, write_rank_file

        ru, pre = self.ru, self.root / "preprocess"
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
    again."""
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="See the module docstring for the layout read and the outputs.")
    parser.add_argument("--root", required=True, help="task folder of reproduce.sh, e.g. data/sample/passage")
    parser.add_argument("--task", choices=("passage", "doc", "beir"), default="passage",
                        help="passage: Dev MRR@10; doc: Dev MRR@100; beir: nDCG@10, R@100 and MRR@10 of dev and "
                             "test (default %(default)s)")
    parser.add_argument("--title", default=None, help="first header cell of the table (default: the task)")
    parser.add_argument("--out_dir", default=None, help="output folder (default ROOT/results)")
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
    qrels = ("dev", "test") if args.task == "beir" else ("dev",)
    if not any((root / "preprocess" / f"{split}-qrel.tsv").is_file() for split in qrels):
        raise InputError(f"no preprocess/{' or '.join(f'{s}-qrel.tsv' for s in qrels)} under --root: not a "
                         "reproduce.sh task folder", path=root)
    out = Path(args.out_dir or root / "results")
    rows = gather(root, args.task)
    if not rows:
        raise InputError("no rank files found (evaluate/*/dev.rank.tsv)", path=root)
    comparisons = compare(rows, args.task)
    table = markdown_table(rows, args.task, args.title or args.task)
    text = table + ("\n" + comparison_lines(comparisons) if comparisons else "")

    make_scorer = functools.partial(CheckpointScorer, root, out / "curves", args.task, args.query_length,
                                    args.adore_query_length, args.doc_length, args.batch_size, args.no_cuda)
    curves = evaluate_curves(root, args.curves, rows, out / "curves.json", make_scorer)
    losses = {key: read_loss(training_folder(root, key) / "log") for key in TABLE_KEYS}
    plotted = plot_curves(losses, curves, mrr_depth(args.task), out / "curves.png")

    result = {"task": args.task, "metrics": {names(args.task)[k]: v for k, v in rows.items()},
              "comparisons": comparisons,
              "dev_mrr_curves": {NAMES[k]: v for k, v in curves.items()},
              "loss_curves": {NAMES[k]: v for k, v in losses.items() if v},
              "plot": str(out / "curves.png") if plotted else None}
    atomic_write_text(out / "results.md", text)
    atomic_write_json(out / "results.json", result)
    print(text, end="")
    print(f"written: {out / 'results.md'}, {out / 'results.json'}" + (f", {out / 'curves.png'}" if plotted else ""))
    return result


if __name__ == "__main__":
    run_cli(main)
