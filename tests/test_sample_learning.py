"""Training learns on the bundled sample (issues #4 and #5): a short STAR run from a warm-up of the sample's model
improves dev MRR@10 over that initialisation, and a short ADORE run from the STAR model it produced improves dev
MRR@10 over the STAR model.  Every step is the real CLI, as ``reproduce.sh`` runs it, at small sizes (1 thread,
CPU)."""
from pathlib import Path

import pytest

import sample_data
from helpers import run
from msmarco_eval import evaluate_files

pytestmark = pytest.mark.slow  # every test here shares an expensive module fixture

LENGTHS = ["--max_query_length", "24", "--max_doc_length", "64"]  # the sample's passages fit in 64 tokens


def cli(module: str, *args: object) -> None:
    run(["-m", module, *args], timeout=600)


def dev_mrr(pre: Path, rank_dir: Path) -> float:
    return evaluate_files(pre / "dev-qrel.tsv", rank_dir / "dev.rank.tsv", metrics=("MRR@10",))["MRR@10"]


def star_dev_mrr(model: Path, pre: Path, out: Path) -> float:
    """Encode the corpus and the dev queries with ``model``, search, score the dev rank file."""
    cli("star.inference", "--data_type", "passage", "--mode", "dev", "--model_dir", model, "--preprocess_dir", pre,
        "--output_dir", out, "--no_cuda", *LENGTHS)
    return dev_mrr(pre, out)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("learning")
    sample_data.generate(root / "sample", seed=sample_data.DEFAULT_SEED)
    pre = root / "preprocess"
    cli("preprocess", "--data_type", 1, "--model_name_or_path", root / "sample" / "tokenizer",
        "--data_dir", root / "sample" / "passage" / "dataset", "--out_dir", pre, "--max_seq_length", 64,
        "--max_query_length", 24)
    return {"root": root, "pre": pre, "init": root / "sample" / "init_model"}


def train(out: Path, init: Path, pre: Path, mode: str, *args: object) -> Path:
    cli("star.train", "--negative_mode", mode, "--init_path", init, "--preprocess_dir", pre, "--output_dir", out,
        "--per_device_train_batch_size", 64, "--warmup_steps", 10, "--no_cuda", *LENGTHS, *args)
    return out


@pytest.fixture(scope="module")
def star_run(sample) -> dict:
    """As reproduce.sh: a warm-up (one in-batch epoch from the initial model, AdamW), its top-20 as hard negatives,
    then 60 STAR steps (Lamb) from the warm-up."""
    root, pre = sample["root"], sample["pre"]
    warmup = train(root / "warmup", sample["init"], pre, "inbatch", "--optimizer_str", "adamw", "--learning_rate",
                   "1e-3", "--num_train_epochs", 1)
    cli("star.prepare_hardneg", "--data_type", "passage", "--mode", "train", "--model_dir", warmup,
        "--preprocess_dir", pre, "--output_dir", root / "mined", "--topk", 20, "--no_cuda", *LENGTHS)
    star = train(root / "star", warmup, pre, "star", "--hardneg_path", root / "mined" / "hard.npy",
                 "--optimizer_str", "lamb", "--learning_rate", "1e-3", "--max_steps", 60)
    return {"warmup_mrr": star_dev_mrr(warmup, pre, root / "eval-warmup"), "model": star,
            "mrr": star_dev_mrr(star, pre, root / "eval-star"), "passages": root / "eval-star" / "passages.memmap"}


def test_short_star_run_improves_dev_mrr_over_its_initialisation(star_run):
    assert star_run["mrr"] > star_run["warmup_mrr"] + 0.02, star_run


def test_short_adore_run_improves_dev_mrr_over_its_star_start(sample, star_run):
    root, pre = sample["root"], sample["pre"]
    adore = root / "adore"
    cli("adore.train", "--init_path", star_run["model"], "--pembed_path", star_run["passages"],
        "--preprocess_dir", pre, "--data_type", "passage", "--model_save_dir", adore, "--metric_cut", 200,
        "--learning_rate", "1e-4", "--warmup_steps", 10, "--num_train_epochs", 1, "--per_gpu_batch_size", 32,
        "--max_seq_length", 24, "--no_cuda")
    cli("adore.inference", "--model_dir", adore / "epoch-1", "--dmemmap_path", star_run["passages"],
        "--preprocess_dir", pre, "--mode", "dev", "--output_dir", root / "eval-adore", "--max_seq_length", 24,
        "--no_cuda")
    assert dev_mrr(pre, root / "eval-adore") > star_run["mrr"] + 0.01, star_run
