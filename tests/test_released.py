"""The released models without network (issue #20): a stand-in ``gdown`` on PATH serves a fake Google Drive of tiny
RoBERTa folders saved the way the released ones are (a ``pytorch_model.bin`` state dict, a config.json typed only
by its ``architectures``).  ``download_data.sh warmup / models / runs`` land and check them, skip what is complete
and resume what was interrupted; ``--published`` is the original README's table; ``reproduce.sh released-passage``
ranks the bundled sample with them (ADORE against its start model's document embeddings) and sets our figures
beside the published ones; results_table's published comparison flags rows more than 0.002 away."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import RobertaConfig

import results_table
from dataset import load_rank
from infra.io import InputError
from model import DenseEncoder
from msmarco_eval import evaluate_files

KEYS = ("inbatch", "rand", "star", "adore-inbatch", "adore-rand", "adore-star")
NAMES = ("Inbatch-Neg", "Rand-Neg", "STAR", "ADORE(Inbatch-Neg)", "ADORE(Rand-Neg)", "ADORE(STAR)")
WARMUP_ID = "1URYU1gxNgcuC81jPAev1ksZjMKgQQFoD"

# A stand-in for gdown's CLI (``gdown [--folder] URL -O OUT [--continue]``): serves FAKE_DRIVE/<id> (a folder or a
# file), logs what it does to FAKE_DRIVE_LOG; with --continue a complete file is skipped and a partial one is
# appended to; FAKE_GDOWN_INTERRUPT=<id> dies half-way through that item's last file, as a killed download does.
FAKE_GDOWN = '''#!{python}
import os, re, sys
from pathlib import Path

args = sys.argv[1:]
url = next(a for a in args if a.startswith("https://"))
out = Path(args[args.index("-O") + 1])
resume = "--continue" in args
item = re.search(r"(?:folders/|id=)([\\w-]+)", url).group(1)
source = Path(os.environ["FAKE_DRIVE"]) / item
log = open(os.environ["FAKE_DRIVE_LOG"], "a")
log.write(f"get {{item}}\\n")
if not source.exists() or source.is_dir() != ("--folder" in args):
    sys.exit(f"Failed to retrieve file url: {{url}}")
files = sorted(source.iterdir()) if source.is_dir() else [source]
targets = [out / f.name for f in files] if source.is_dir() else [out]
for index, (src, dest) in enumerate(zip(files, targets)):
    data = src.read_bytes()
    have = dest.stat().st_size if resume and dest.exists() else 0
    if have == len(data):
        log.write(f"skip {{src.name}}\\n")
        continue
    if have:
        log.write(f"resume {{src.name}} at {{have}}\\n")
    dying = os.environ.get("FAKE_GDOWN_INTERRUPT") == item and index == len(files) - 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "ab" if have else "wb") as f:
        f.write(data[have:len(data) // 2 if dying else len(data)])
    if dying:
        sys.exit("killed")
'''


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: the sample, the fake Drive, the stand-in gdown
# ---------------------------------------------------------------------------------------------------------------

def published_rows(repo_dir: Path) -> list[dict[str, str]]:
    """``bash download_data.sh --published`` as a list of rows (header -> cell)."""
    text = subprocess.run(["bash", "download_data.sh", "--published"], cwd=repo_dir, capture_output=True, text=True,
                          check=True).stdout
    header, *lines = [line.split("\t") for line in text.splitlines()]
    return [dict(zip(header, cells)) for cells in lines]


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    """The generated sample (no model), with its test split copied as a TREC DL 2020 split."""
    import sample_data

    out = tmp_path_factory.mktemp("sample")
    sample_data.generate(out, with_model=False)
    dataset = out / "passage" / "dataset"
    shutil.copy(dataset / "msmarco-test2019-queries.tsv", dataset / "msmarco-test2020-queries.tsv")
    shutil.copy(dataset / "2019qrels-pass.txt", dataset / "2020qrels-pass.txt")
    return out


def fake_run(qids: list[str], seed: int, trec: bool) -> str:
    """A released-style rank file in official ids: 100 random passages per query, ``qid pid rank`` or TREC."""
    rng = np.random.default_rng(seed)
    lines = []
    for qid in qids:
        for rank, pid in enumerate(rng.choice(3000, 100, replace=False).tolist(), 1):
            lines.append(f"{qid} Q0 {pid} {rank} {1 / rank:.4f} released" if trec else f"{qid}\t{pid}\t{rank}")
    return "\n".join(lines) + "\n"


def save_released_style(folder: Path, seed: int, vocab_size: int, positions: int) -> None:
    """A tiny random RoBERTa DenseEncoder saved as the released folders are: ``torch.save`` of the state dict and
    a config.json without ``model_type`` (transformers 2.x), typed by ``architectures``."""
    config = RobertaConfig(vocab_size=vocab_size, max_position_embeddings=positions, hidden_size=32,
                           num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, type_vocab_size=1,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = DenseEncoder.from_config(config)
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    raw = config.to_dict()
    raw.pop("model_type")
    raw["architectures"] = ["RobertaDot_NLL_LN"]
    (folder / "config.json").write_text(json.dumps(raw))


@pytest.fixture(scope="module")
def drive(tmp_path_factory, sample, repo_dir) -> dict:
    """A fake Drive: the six passage model folders and the rank files under their published ids, the warm-up zip
    (the model nested in a folder, as an archive may hold it); and a PATH whose ``gdown`` serves it."""
    root = tmp_path_factory.mktemp("drive")
    info = json.loads((sample / "sample_info.json").read_text())
    rows = [r for r in published_rows(repo_dir) if r["task"] == "passage"]
    dataset = sample / "passage" / "dataset"
    qids = {"train": [line.split("\t")[0] for line in (dataset / "queries.train.tsv").read_text().splitlines()[:3]],
            "dev": [line.split("\t")[0] for line in (dataset / "queries.dev.small.tsv").read_text().splitlines()[:5]],
            "test": sorted({line.split()[0] for line in (dataset / "2019qrels-pass.txt").read_text().splitlines()})[:3]}
    for seed, row in enumerate(rows):
        save_released_style(root / row["folder_id"], seed, info["vocab_size"], info["max_position_embeddings"])
        for split in ("train", "dev", "test"):
            if row[f"{split}_run"] != "-":
                (root / row[f"{split}_run"]).write_text(fake_run(qids[split], seed, trec=split == "test"))
    save_released_style(root / "warmup-src" / "ance-warmup", 99, info["vocab_size"], info["max_position_embeddings"])
    with zipfile.ZipFile(root / WARMUP_ID, "w") as archive:
        for path in sorted((root / "warmup-src").rglob("*")):
            archive.write(path, path.relative_to(root / "warmup-src"))
    bin_dir = tmp_path_factory.mktemp("bin")
    (bin_dir / "gdown").write_text(FAKE_GDOWN.format(python=sys.executable))
    (bin_dir / "gdown").chmod(0o755)
    return {"root": root, "rows": rows, "path": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def download(repo_dir: Path, drive: dict, out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    log = out.parent / "gdown.log"
    return subprocess.run(["bash", "download_data.sh", *args, "--dir", str(out)], cwd=repo_dir, capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, PATH=drive["path"], FAKE_DRIVE=str(drive["root"]),
                                   FAKE_DRIVE_LOG=str(log), PYTHON=sys.executable, OMP_NUM_THREADS="1", **env))


def gdown_log(out: Path) -> list[str]:
    log = out.parent / "gdown.log"
    lines = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return lines


def same_weights(folder: Path, source: Path) -> bool:
    ours, theirs = (torch.load(f / "pytorch_model.bin", weights_only=True) for f in (folder, source))
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


# ---------------------------------------------------------------------------------------------------------------
# download_data.sh
# ---------------------------------------------------------------------------------------------------------------

def test_published_table_is_the_original_readme_one(repo_dir, shared_dir):
    """Every id and figure of --published against the spec's transcription of the original README."""
    spec = (shared_dir / "spec" / "drhard-released.md").read_text()
    expected = []
    for task, section in re.findall(r"^## (passage|doc)\n(.*?)(?=^## |\Z)", spec, flags=re.M | re.S):
        for line in section.splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) == 6 and re.fullmatch(r"[\d.]+", cells[1]):
                runs = re.findall(r"`([\w-]+)`", cells[5]) or ["-"] * 3
                expected.append([task, cells[0].replace(" ", ""), *cells[1:4], cells[4].strip("`"), *runs])
    got = [[r["task"], r["name"], r["dev_mrr"], r["dev_r100"], r["test_ndcg10"], r["folder_id"], r["train_run"],
            r["dev_run"], r["test_run"]] for r in published_rows(repo_dir)]
    assert len(expected) == 12 and got == expected
    assert [r["key"] for r in published_rows(repo_dir)] == list(KEYS) * 2
    assert WARMUP_ID in spec


def test_the_docs_tables_are_the_published_figures(repo_dir):
    doc = (repo_dir / "docs" / "released-models.md").read_text(encoding="utf-8")
    shown = re.findall(r"^\| ([\w()-]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", doc, flags=re.M)
    assert shown == [(r["name"], r["dev_mrr"], r["dev_r100"], r["test_ndcg10"]) for r in published_rows(repo_dir)]


def test_models_land_checked_and_a_rerun_skips_them(repo_dir, drive, tmp_path):
    out = tmp_path / "data"
    done = download(repo_dir, drive, out, "models", "passage")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(": loads with DenseEncoder (32-d embeddings, head: True)") == 6
    for row in drive["rows"]:
        folder = out / "passage" / "released" / row["key"]
        assert (folder.parent / f"{row['key']}.done").is_file() and sorted(p.name for p in folder.iterdir()) == [
            "config.json", "pytorch_model.bin"]
        assert same_weights(folder, drive["root"] / row["folder_id"])
        DenseEncoder.from_pretrained(folder)
    assert not (out / "doc").exists() and not list(out.rglob("*.part"))
    assert gdown_log(out) == [f"get {row['folder_id']}" for row in drive["rows"]]
    again = download(repo_dir, drive, out, "models", "passage")
    assert again.returncode == 0 and again.stdout.count("ok (already complete)") == 6
    assert gdown_log(out) == []


@pytest.mark.slow
def test_interrupted_folder_download_resumes(repo_dir, drive, tmp_path):
    out, star = tmp_path / "data", drive["rows"][2]
    assert star["key"] == "star"
    cut = download(repo_dir, drive, out, "models", "passage", FAKE_GDOWN_INTERRUPT=star["folder_id"])
    assert cut.returncode == 1 and "STAR (passage model)" in cut.stderr.split("item(s) failed", 1)[1]
    partial = out / "passage" / "released" / "star.part"
    assert (partial / "config.json").is_file() and not (out / "passage" / "released" / "star").exists()
    gdown_log(out)
    done = download(repo_dir, drive, out, "models", "passage")
    assert done.returncode == 0, done.stderr
    weights = (drive["root"] / star["folder_id"] / "pytorch_model.bin").stat().st_size
    assert gdown_log(out) == [f"get {star['folder_id']}", "skip config.json",
                              f"resume pytorch_model.bin at {weights // 2}"]
    assert same_weights(out / "passage" / "released" / "star", drive["root"] / star["folder_id"])
    assert not partial.exists()


def test_a_folder_that_does_not_load_is_removed_and_reported(repo_dir, drive, tmp_path):
    broken = tmp_path / "drive"
    shutil.copytree(drive["root"], broken)
    rand = drive["rows"][1]
    (broken / rand["folder_id"] / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    done = download(repo_dir, dict(drive, root=broken), tmp_path / "data", "models", "passage")
    assert done.returncode == 1
    assert "rand.part does not load with DenseEncoder" in done.stderr
    assert "(removed: rerun to download it again)" in done.stderr
    assert "Rand-Neg (passage model)" in done.stderr.split("item(s) failed", 1)[1]
    released = tmp_path / "data" / "passage" / "released"
    assert not (released / "rand").exists() and not (released / "rand.part").exists()
    assert (released / "star.done").is_file()


def test_warmup_zip_extracted_checked_and_resumed(repo_dir, drive, tmp_path):
    out = tmp_path / "data"
    cut = download(repo_dir, drive, out, "warmup", FAKE_GDOWN_INTERRUPT=WARMUP_ID)
    assert cut.returncode == 1 and (out / "passage" / "warmup.zip.part").is_file()
    gdown_log(out)
    done = download(repo_dir, drive, out, "warmup")
    assert done.returncode == 0, done.stderr
    size = (drive["root"] / WARMUP_ID).stat().st_size
    assert gdown_log(out) == [f"get {WARMUP_ID}", f"resume {WARMUP_ID} at {size // 2}"]
    warmup = out / "passage" / "warmup"
    assert same_weights(warmup, drive["root"] / "warmup-src" / "ance-warmup")  # the nested folder, moved up
    assert (out / "passage" / "warmup.done").is_file()
    assert sorted(p.name for p in (out / "passage").iterdir()) == ["warmup", "warmup.done"]  # zip removed


def test_rank_files_land_by_split(repo_dir, drive, tmp_path):
    out = tmp_path / "data"
    done = download(repo_dir, drive, out, "runs", "passage")
    assert done.returncode == 0, done.stderr
    runs = out / "passage" / "released" / "runs"
    assert sorted(str(p.relative_to(runs)) for p in runs.rglob("*.tsv")) == [
        f"{key}/{split}.rank.tsv" for key in ("adore-star", "star") for split in ("dev", "test", "train")]
    star = drive["rows"][2]
    for split in ("train", "dev", "test"):
        assert (runs / "star" / f"{split}.rank.tsv").read_bytes() == (drive["root"] / star[f"{split}_run"]).read_bytes()


def test_a_foreign_folder_is_kept(repo_dir, drive, tmp_path):
    mine = tmp_path / "data" / "passage" / "warmup"
    mine.mkdir(parents=True)
    (mine / "config.json").write_text("{}")
    done = download(repo_dir, drive, tmp_path / "data", "warmup")
    assert done.returncode == 1 and "was not downloaded by this script" in done.stderr
    assert (mine / "config.json").read_text() == "{}" and gdown_log(tmp_path / "data") == []


def test_without_gdown_one_line_says_how_to_install_it(repo_dir, tmp_path):
    bin_dir = tmp_path / "bin"   # bash and the coreutils, no gdown
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "awk"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    done = subprocess.run([shutil.which("bash"), "download_data.sh", "models", "--dir", str(tmp_path)],
                          cwd=repo_dir, capture_output=True, text=True, env={"PATH": str(bin_dir)})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "gdown is not installed" in done.stderr and "pip install" in done.stderr


# ---------------------------------------------------------------------------------------------------------------
# results_table --published
# ---------------------------------------------------------------------------------------------------------------

def write_published(path: Path, *rows: str) -> Path:
    path.write_text("task\tkey\tname\tdev_mrr\tdev_r100\ttest_ndcg10\tfolder_id\n" + "".join(r + "\n" for r in rows))
    return path


def test_published_comparison_flags_beyond_the_tolerance(tmp_path):
    published = results_table.read_published(write_published(
        tmp_path / "p.tsv", "passage\tstar\tSTAR\t0.340\t0.867\t0.642\tx", "doc\tstar\tSTAR\t0.390\t0.867\t0.605\ty",
        "passage\tadore-star\tADORE(STAR)\t0.347\t0.876\t0.683\tz"), "passage")
    assert published == {"star": {"dev_mrr": 0.34, "dev_r100": 0.867, "test_ndcg10": 0.642},
                         "adore-star": {"dev_mrr": 0.347, "dev_r100": 0.876, "test_ndcg10": 0.683}}
    rows = {"star": {"dev_mrr": 0.342, "dev_r100": 0.865, "test_ndcg10": 0.642, "dl20_ndcg10": 0.6},
            "adore-star": {"dev_mrr": 0.3491, "dev_r100": 0.876, "test_ndcg10": None, "dl20_ndcg10": None},
            "rand": {"dev_mrr": 0.1, "dev_r100": 0.2, "test_ndcg10": 0.3, "dl20_ndcg10": None}}
    compared = results_table.compare_published(rows, published)
    assert list(compared) == ["star", "adore-star"]  # Rand-Neg has no published row here
    assert compared["star"]["diff"] == pytest.approx({"dev_mrr": 0.002, "dev_r100": -0.002, "test_ndcg10": 0.0})
    assert not compared["star"]["flagged"]  # exactly 0.002 away is within
    assert compared["adore-star"]["flagged"] and compared["adore-star"]["diff"]["test_ndcg10"] is None
    table = results_table.published_table(rows, compared, "passage", "released-passage").splitlines()
    assert table[0] == ("| released-passage | Dev MRR@10 | paper | Δ | Dev R@100 | paper | Δ | DL19 NDCG@10 | paper | Δ "
                        "| DL20 NDCG@10 | check |")
    assert table[2] == "| STAR | 0.342 | 0.340 | +0.002 | 0.865 | 0.867 | -0.002 | 0.642 | 0.642 | +0.000 | 0.600 | ok |"
    assert table[3].endswith("| – | 0.683 | – | – | **off by > 0.002** |")


def test_released_rank_file_overlap_in_official_ids(tmp_path):
    """Doc ids: ours (offsets) mapped through the id maps; theirs with their D; an unreadable file is reported."""
    pre, root, runs = tmp_path / "pre", tmp_path / "root", tmp_path / "runs"
    pre.mkdir()
    np.save(pre / "passages_ids.npy", np.array([50, 51, 52, 53], dtype=np.int64))
    np.save(pre / "dev-query_ids.npy", np.array([900, 901], dtype=np.int64))
    np.save(pre / "test-query_ids.npy", np.array([7], dtype=np.int64))
    for key, split, text in (("star", "dev", "0\t0\t1\n0\t1\t2\n1\t3\t1\n"), ("star", "test", "0\t2\t1\n")):
        (root / "evaluate" / key).mkdir(parents=True, exist_ok=True)
        (root / "evaluate" / key / f"{split}.rank.tsv").write_text(text)
    (runs / "star").mkdir(parents=True)
    # query 900: ours D50 D51, theirs D51 D52 -> 1 shared; query 901: ours D53, theirs D53 -> 1; query 5 not ours
    (runs / "star" / "dev.rank.tsv").write_text("900 Q0 D52 2 0.5 r\n900 Q0 D51 1 1.0 r\n901 Q0 D53 1 1.0 r\n"
                                                "5 Q0 D50 1 1.0 r\n")
    (runs / "star" / "test.rank.tsv").write_text("7\t52\t1\n")  # no D: not this task's ids
    overlaps = results_table.compare_released_runs(root, runs, pre, "doc")
    assert overlaps["star"]["dev"] == {"queries": 2, "top10": pytest.approx(2 / 20), "top100": pytest.approx(2 / 200)}
    assert "star/test.rank.tsv:1" in overlaps["star"]["test"]["error"]
    lines = results_table.overlap_lines(overlaps).splitlines()
    assert lines[1] == "- STAR dev: 2 queries, top-10 0.100, top-100 0.010"
    assert lines[2].startswith("- STAR test: not compared: ")


@pytest.mark.parametrize("row, message", [("passage\tstarr\tSTAR\t0.3\t0.8\t0.6\tx", "unknown model key"),
                                          ("passage\tstar\tSTAR\tn/a\t0.8\t0.6\tx", "expected a figure")])
def test_a_bad_published_row_names_its_line(tmp_path, row, message):
    path = write_published(tmp_path / "p.tsv", "doc\tstar\tSTAR\t0.39\t0.86\t0.60\ty", row)
    with pytest.raises(InputError, match=rf"p\.tsv:3: {message}"):
        results_table.read_published(path, "passage")


# ---------------------------------------------------------------------------------------------------------------
# reproduce.sh released-passage / released-doc
# ---------------------------------------------------------------------------------------------------------------

def reproduce(repo_dir: Path, task: str, data: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "reproduce.sh", task], cwd=repo_dir, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, DATA=str(data), PYTHON=sys.executable, DEVICE="cpu", THREADS="1",
                                   **env))


@pytest.fixture(scope="module")
def released_run(tmp_path_factory, repo_dir, sample, drive) -> dict:
    """From an empty folder: the sample's passage data as DATA/passage/dataset, the models downloaded with the
    stand-in gdown, then ``reproduce.sh released-passage``."""
    data = tmp_path_factory.mktemp("released") / "data"
    shutil.copytree(sample / "passage" / "dataset", data / "passage" / "dataset")
    for target in ("models", "runs"):
        fetched = download(repo_dir, drive, data, target, "passage")
        assert fetched.returncode == 0, fetched.stderr
    env = {"TOKENIZER": str(sample / "tokenizer")}
    done = reproduce(repo_dir, "released-passage", data, **env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"data": data, "root": data / "passage", "stdout": done.stdout, "env": env}


def exact_top(docs: np.ndarray, query: np.ndarray, ranked: list[int]) -> bool:
    """Whether ``ranked`` are the exact top-len(ranked) of ``docs`` by inner product with ``query``, in order."""
    scores = docs @ query
    listed = scores[ranked]
    rest = np.delete(scores, ranked)
    return bool(np.all(np.diff(listed) <= 1e-5) and listed[-1] >= rest.max() - 1e-5)


@pytest.mark.slow
def test_released_passage_ranks_the_sample_and_sets_the_paper_beside(released_run, repo_dir):
    root, out = released_run["root"], released_run["stdout"]
    evaluate = root / "released_eval" / "evaluate"
    pre = root / "preprocess"
    header = ("| released-passage | Dev MRR@10 | paper | Δ | Dev R@100 | paper | Δ | DL19 NDCG@10 | paper | Δ "
              "| DL20 NDCG@10 | check |")
    assert header in out and "results in" in out
    result = json.loads((root / "released_eval" / "results" / "results.json").read_text())
    published = {r["key"]: r for r in published_rows(repo_dir) if r["task"] == "passage"}
    for key, name in zip(KEYS, NAMES):
        row = result["published"][name]
        dev = evaluate_files(pre / "dev-qrel.tsv", evaluate / key / "dev.rank.tsv", metrics=("MRR@10", "R@100"))
        test = evaluate_files(pre / "test-qrel.tsv", evaluate / key / "test.rank.tsv", metrics=("nDCG@10",))
        assert row["ours"] == pytest.approx({"dev_mrr": dev["MRR@10"], "dev_r100": dev["R@100"],
                                             "test_ndcg10": test["nDCG@10"]})
        assert row["published"] == {f: float(published[key][f]) for f in ("dev_mrr", "dev_r100", "test_ndcg10")}
        assert row["diff"] == pytest.approx({f: row["ours"][f] - row["published"][f] for f in row["diff"]})
        assert row["flagged"]  # random tiny models are far from the paper
        assert re.search(rf"^\| {re.escape(name)} \| {row['ours']['dev_mrr']:.3f} \| {row['published']['dev_mrr']:.3f}"
                         rf" \| {row['diff']['dev_mrr']:+.3f} \|.*\*\*off by > 0\.002\*\* \|$", out, flags=re.M)
        assert (evaluate / key / "test2020.rank.tsv").is_file()
        assert result["metrics"][name]["dl20_ndcg10"] is not None
    # the corpus is encoded once per document encoder; each ADORE model ranks with its start model's embeddings
    assert sorted(p.parent.name for p in evaluate.glob("*/passages.memmap")) == ["inbatch", "rand", "star"]
    n_docs = json.loads((pre / "passages_meta").read_text())["total_number"]
    for key in ("inbatch", "rand", "star"):
        docs = np.memmap(evaluate / key / "passages.memmap", dtype=np.float32, mode="r").reshape(n_docs, -1)
        queries = np.memmap(evaluate / f"adore-{key}" / "dev.qembed.memmap", dtype=np.float32, mode="r")
        queries = queries.reshape(-1, docs.shape[1])
        ranking = load_rank(evaluate / f"adore-{key}" / "dev.rank.tsv")
        assert len(ranking) == len(queries) == 200
        assert all(exact_top(docs, queries[q], ranked) for q, ranked in ranking.items())
        other = "star" if key != "star" else "rand"  # not the ranking of another model's embeddings
        others = np.memmap(evaluate / other / "passages.memmap", dtype=np.float32, mode="r").reshape(n_docs, -1)
        assert not all(exact_top(others, queries[q], ranked) for q, ranked in ranking.items())


def overlap_by_hand(ours: Path, theirs: Path, pre: Path, split: str) -> dict:
    """The top-10 / top-100 overlap of our offset rank file with a released one in official ids, by hand."""
    qids, pids = np.load(pre / f"{split}-query_ids.npy"), np.load(pre / "passages_ids.npy")
    mine = {int(qids[q]): [int(pids[p]) for p in docs] for q, docs in load_rank(ours).items()}
    released: dict[int, list[int]] = {}
    for line in theirs.read_text().splitlines():   # written in rank order
        fields = line.split()
        released.setdefault(int(fields[0]), []).append(int(fields[2] if len(fields) == 6 else fields[1]))
    return {"queries": len(released),
            **{f"top{k}": np.mean([len(set(mine[q][:k]) & set(d[:k])) / k for q, d in released.items()])
               for k in (10, 100)}}


@pytest.mark.slow
def test_released_rank_files_are_compared_by_top_k_overlap(released_run):
    root = released_run["root"]
    runs, evaluate = root / "released" / "runs", root / "released_eval" / "evaluate"
    result = json.loads((root / "released_eval" / "results" / "results.json").read_text())
    assert set(result["released_runs"]) == {"STAR", "ADORE(STAR)"}
    for key, name in (("star", "STAR"), ("adore-star", "ADORE(STAR)")):
        for split in ("dev", "test"):
            expected = overlap_by_hand(evaluate / key / f"{split}.rank.tsv", runs / key / f"{split}.rank.tsv",
                                       root / "preprocess", split)
            assert result["released_runs"][name][split] == pytest.approx(expected)
            assert (f"- {name} {split}: {expected['queries']} queries, top-10 {expected['top10']:.3f}, "
                    f"top-100 {expected['top100']:.3f}") in released_run["stdout"]


@pytest.mark.slow
def test_released_rerun_skips_every_stage_and_missing_models_are_named(released_run, repo_dir, tmp_path):
    again = reproduce(repo_dir, "released-passage", released_run["data"], **released_run["env"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done earlier, skipped") == 7  # preprocess + 3 encodes + 3 ADORE rankings
    assert "| ADORE(STAR) |" in again.stdout
    only_adore = tmp_path / "released"
    shutil.copytree(released_run["data"] / "passage" / "released" / "adore-star", only_adore / "adore-star")
    alone = reproduce(repo_dir, "released-passage", released_run["data"], RELEASED_DIR=str(only_adore),
                      **released_run["env"])
    assert alone.returncode == 1
    assert f"skipped star: no model in {only_adore}/star (bash download_data.sh models passage" in alone.stdout
    assert "error: no released model in" in alone.stderr


@pytest.mark.parametrize("task, missing", [("released-passage", "passage/dataset/collection.tsv"),
                                           ("released-doc", "doc/dataset/msmarco-docs.tsv")])
def test_released_task_without_data_says_what_to_download(repo_dir, tmp_path, task, missing):
    done = reproduce(repo_dir, task, tmp_path)
    assert done.returncode != 0
    assert f"error: {tmp_path / missing} not found: run 'bash download_data.sh {task[9:]}" in done.stderr


def test_released_tasks_are_in_the_help(repo_dir):
    for script in ("reproduce.sh", "download_data.sh"):
        text = subprocess.run(["bash", script, "--help"], cwd=repo_dir, capture_output=True, text=True,
                              check=True).stdout
        words = ("released-passage", "released-doc") if script == "reproduce.sh" else ("warmup", "models", "runs")
        assert all(w in text for w in words), script
