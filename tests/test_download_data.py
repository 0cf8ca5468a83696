"""download_data.sh against a local fake mirror (file:// URLs): the files land where preprocess reads them,
archives are extracted / gunzipped (the doc leaderboard queries included), checksums are verified, complete
files are skipped, interrupted downloads resume, and failures are listed with exit status 1."""
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

PASSAGE_TAR = {"collection.tsv": "0\tfirst passage\n1\tsecond passage\n",
               "queries.train.tsv": "7\tq seven\n", "qrels.train.tsv": "7\t0\t1\t1\n",
               "queries.dev.small.tsv": "8\tq eight\n", "qrels.dev.small.tsv": "8\t0\t0\t1\n",
               "queries.eval.small.tsv": "9\tq nine\n"}
DOC_GZ = {"msmarco-docs.tsv": "D11\thttp://a\tTitle\tbody text\n" * 2000,
          "msmarco-doctrain-queries.tsv": "5\tdoc q\n", "msmarco-doctrain-qrels.tsv": "5 0 D11 1\n",
          "msmarco-test2019-queries.tsv": "19\tdl19 q\n", "msmarco-test2020-queries.tsv": "20\tdl20 q\n",
          "msmarco-docdev-queries.tsv": "6\tdev q\n",
          "msmarco-docdev-qrels.tsv": "6\t0\tD11\t1\n", "docleaderboard-queries.tsv": "4\tlead q\n",
          "msmarco-doctrain-top100": "5 Q0 D11 1 9.5 IndriQueryLikelihood\n"}
TREC = {"2019qrels-pass.txt": "19 Q0 0 3\n", "2019qrels-docs.txt": "19 Q0 D11 2\n",
        "2020qrels-pass.txt": "20 0 1 2\n", "2020qrels-docs.txt": "20 0 D11 1\n"}
TOKENIZER = ("vocab.json", "merges.txt")


def _tar_gz(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture()
def mirror(tmp_path: Path, shared_dir: Path) -> dict:
    """A fake MS MARCO / TREC / Hugging Face mirror; returns the environment pointing the script at it."""
    ms, trec, hf = tmp_path / "mirror" / "msmarcoranking", tmp_path / "mirror" / "trec", tmp_path / "mirror" / "hf"
    for folder in (ms, trec, hf):
        folder.mkdir(parents=True)
    archive = _tar_gz(PASSAGE_TAR)
    (ms / "collectionandqueries.tar.gz").write_bytes(archive)
    for name, text in DOC_GZ.items():
        (ms / f"{name}.gz").write_bytes(gzip.compress(text.encode()))
    for name, text in TREC.items():
        (trec / name).write_text(text)
    for name in TOKENIZER:
        shutil.copy(shared_dir / "data" / "roberta-base-tokenizer" / name, hf / name)
    env = dict(os.environ, MSMARCO_BASE_URL=ms.as_uri(), TREC_BASE_URL=trec.as_uri(), ROBERTA_BASE_URL=hf.as_uri(),
               PASSAGE_ARCHIVE_MD5=hashlib.md5(archive).hexdigest())
    return {"env": env, "ms": ms, "trec": trec, "hf": hf, "out": tmp_path / "data"}


def _run(repo_dir: Path, mirror: dict, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "download_data.sh", *args, "--dir", str(mirror["out"])], cwd=repo_dir,
                          env={**mirror["env"], **env}, capture_output=True, text=True, timeout=120)


def _check_complete(out: Path) -> None:
    passage, doc = out / "passage" / "dataset", out / "doc" / "dataset"
    for name, text in PASSAGE_TAR.items():
        assert (passage / name).read_text() == text
    for year in (2019, 2020):  # TREC DL 2019 and 2020: the queries beside their qrels
        queries = f"msmarco-test{year}-queries.tsv"
        assert (passage / queries).read_bytes() == (doc / queries).read_bytes() == DOC_GZ[queries].encode()
        assert (passage / f"{year}qrels-pass.txt").read_text() == TREC[f"{year}qrels-pass.txt"]
        assert (doc / f"{year}qrels-docs.txt").read_text() == TREC[f"{year}qrels-docs.txt"]
    for name, text in DOC_GZ.items():  # every archive gunzipped, the leaderboard queries included
        assert (doc / name).read_text() == text
        assert not (doc / f"{name}.gz").exists()
    assert not (passage / "collectionandqueries.tar.gz").exists()
    assert not list(out.rglob("*.part")) and not list(out.rglob("*.tmp"))


def test_all_files_land_extracted_and_a_rerun_skips_them(repo_dir, mirror):
    done = _run(repo_dir, mirror, "all")
    assert done.returncode == 0, done.stderr
    out = mirror["out"]
    _check_complete(out)
    for name in TOKENIZER:
        assert (out / "roberta-base" / name).read_bytes() == (mirror["hf"] / name).read_bytes()
    # complete files are not fetched again: a changed mirror file does not replace them
    (mirror["ms"] / "msmarco-docdev-queries.tsv.gz").write_bytes(gzip.compress(b"99\tchanged\n"))
    again = _run(repo_dir, mirror, "doc")
    assert again.returncode == 0, again.stderr
    assert "downloading" not in again.stdout
    assert (out / "doc" / "dataset" / "msmarco-docdev-queries.tsv").read_text() == DOC_GZ["msmarco-docdev-queries.tsv"]


def test_interrupted_download_resumes(repo_dir, mirror):
    target = mirror["out"] / "doc" / "dataset" / "msmarco-docs.tsv.gz"
    full = (mirror["ms"] / "msmarco-docs.tsv.gz").read_bytes()
    target.parent.mkdir(parents=True)
    target.with_name(target.name + ".part").write_bytes(full[: len(full) // 2])  # what a killed curl leaves
    done = _run(repo_dir, mirror, "doc")
    assert done.returncode == 0, done.stderr
    assert "Resuming transfer from byte position" in done.stderr
    assert (target.parent / "msmarco-docs.tsv").read_text() == DOC_GZ["msmarco-docs.tsv"]


def test_checksum_mismatch_and_missing_files_are_reported_and_the_rest_completes(repo_dir, mirror, shared_dir):
    (mirror["trec"] / "2019qrels-docs.txt").unlink()
    (mirror["hf"] / "merges.txt").write_text("#version: 0.2\nnot the real merges\n")
    done = _run(repo_dir, mirror, "all", PASSAGE_ARCHIVE_MD5="31644046b18952c1386cd4564ba2ae69")  # the real md5
    assert done.returncode == 1
    assert "md5 mismatch" in done.stderr and "sha256 mismatch" in done.stderr
    failed = done.stderr.split("item(s) failed", 1)[1]
    assert "collectionandqueries.tar.gz" in failed and "2019qrels-docs.txt" in failed
    assert "roberta-base merges.txt" in failed and "vocab.json" not in failed
    out = mirror["out"]
    assert not (out / "passage" / "dataset" / "collection.tsv").exists()
    assert not list(out.rglob("*.part"))  # a file failing its checksum is not kept for resuming
    assert (out / "doc" / "dataset" / "docleaderboard-queries.tsv").read_text() == DOC_GZ["docleaderboard-queries.tsv"]
    # once the mirror is fixed, a rerun completes what failed
    shutil.copy(shared_dir / "data" / "roberta-base-tokenizer" / "merges.txt", mirror["hf"] / "merges.txt")
    done = _run(repo_dir, mirror, "passage")
    assert done.returncode == 0, done.stderr
    assert (out / "passage" / "dataset" / "collection.tsv").read_text() == PASSAGE_TAR["collection.tsv"]


def test_corrupt_archive_is_removed_and_reported(repo_dir, mirror):
    (mirror["ms"] / "docleaderboard-queries.tsv.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    done = _run(repo_dir, mirror, "doc")
    assert done.returncode == 1
    assert "corrupt archive" in done.stderr and "docleaderboard-queries.tsv" in done.stderr.split("failed", 1)[1]
    dataset = mirror["out"] / "doc" / "dataset"
    assert not (dataset / "docleaderboard-queries.tsv.gz").exists()
    assert not (dataset / "docleaderboard-queries.tsv").exists()


def test_usage_errors(repo_dir, mirror):
    bad = _run(repo_dir, mirror, "everything")
    assert bad.returncode == 2 and "usage" in bad.stderr
