"""Damaged or mismatched files refused with one clear error (issue #15, classes 2 and 3).

* Embedding files held against their manifest and the corpus they claim to cover (``embedding_memmap``): a
  float64 file, fewer rows than the manifest says, a manifest of another dim or dtype, rows that are not the
  preprocessed corpus's passages; in-process, through the reuse check of ``corpus_encoding``, and through the
  adore CLIs (an existing rank file / output folder left byte-identical).
* ``--resume`` from a damaged or foreign ``checkpoint-*`` folder (star/train.py and adore/train.py): truncated or
  missing weights or trainer state, a trainer state of another format, weights of another model shape, an optimizer
  state that does not fit: one error naming the folder, and the output folder byte-identical.
"""
import json
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

import retrieve_utils as ru
from infra.embedding_memmap import MANIFEST_FORMAT, corpus_rows, manifest_path, open_embeddings
from helpers import (ADORE_DIM, ADORE_DOCS, adore_cli_args, assert_one_error, make_adore_data, make_encoder_inputs,
                     make_star_data, run_cli, star_cli_args, tiny_encoder, tiny_training_config, tree_hash,
                     write_token_memmap)
from infra.io import InputError
from infra.io import run_cli as run_main
from model import DenseEncoder

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def run_in_process(main: Callable, argv: list, capsys: pytest.CaptureFixture) -> subprocess.CompletedProcess:
    """``main(argv)`` wrapped in :func:`infra.io.run_cli` as the CLIs are, as a completed process with the stderr
    ``capsys`` captured (for :func:`helpers.assert_one_error`)."""
    capsys.readouterr()
    code = 0
    try:
        run_main(main, [str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return subprocess.CompletedProcess(argv, code, "", capsys.readouterr().err)


# -- class 2: embedding files against their manifest and corpus ---------------------------------------------

ROWS, DIM = 50, 8


def _write_embeddings(path: Path, rows: int, dtype=np.float32, manifest: dict = None) -> Path:
    """``rows`` x DIM random values of ``dtype`` at ``path``; with ``manifest`` (fields over a complete float32
    ROWS x DIM manifest) a manifest beside it."""
    np.random.default_rng(0).standard_normal((rows, DIM)).astype(dtype).tofile(path)
    if manifest is not None:
        fields = {"format": MANIFEST_FORMAT, "n_rows": ROWS, "dim": DIM, "dtype": "float32", "block_rows": 4096,
                  "completed_rows": ROWS, "complete": True, **manifest}
        manifest_path(path).write_text(json.dumps(fields))
    return path


def _corpus(folder: Path, count: int) -> Path:
    """A preprocess folder whose ``passages_meta`` says ``count`` passages."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "passages_meta").write_text(json.dumps({"type": "int32", "total_number": count, "embedding_size": 4}))
    return folder


# name: (rows in the file, its dtype, manifest fields (None: no manifest), corpus passages, open dim, needles)
EMBEDDING_CASES = {
    "float64 file beside a float32 manifest": (ROWS, np.float64, {}, ROWS, None,
                                               ["2x the float32 size", "float64", str(ROWS * DIM * 8),
                                                str(ROWS * DIM * 4)]),
    "fewer rows than the manifest": (ROWS - 10, np.float32, {}, None, None,
                                     [f"holds {ROWS - 10} rows but its manifest says {ROWS}"]),
    "manifest dtype float64": (ROWS, np.float32, {"dtype": "float64"}, None, None,
                               ["float64 according to its manifest"]),
    "manifest dim other than the file's": (ROWS, np.float32, {"dim": 6}, None, None,
                                           [f"is {ROWS * DIM * 4} bytes", f"{ROWS} x 6 x 4 = {ROWS * 6 * 4}"]),
    "manifest dim other than the model's": (ROWS, np.float32, {}, None, 16,
                                            [f"dim {DIM} (manifest)", "the model's is 16"]),
    "rows other than the corpus's (manifest)": (ROWS, np.float32, {}, ROWS + 10, None,
                                                [f"covers {ROWS} passages", f"has {ROWS + 10}", "passages_meta"]),
    "rows other than the corpus's (no manifest)": (ROWS, np.float32, None, ROWS - 1, DIM,
                                                   [f"covers {ROWS} passages", f"has {ROWS - 1}", "passages_meta"]),
    "float64 file without a manifest": (ROWS, np.float64, None, ROWS, DIM,
                                        [f"covers {2 * ROWS} passages (a float64 file?)", f"has {ROWS}"]),
}


@pytest.mark.parametrize("case", list(EMBEDDING_CASES))
def test_open_embeddings_holds_the_file_against_manifest_and_corpus(tmp_path, case):
    rows, dtype, manifest, corpus, dim, needles = EMBEDDING_CASES[case]
    path = _write_embeddings(tmp_path / "passages.memmap", rows, dtype, manifest)
    n_rows = None if corpus is None else corpus_rows(_corpus(tmp_path / "preprocess", corpus))
    with pytest.raises(InputError) as e:
        open_embeddings(path, dim=dim, n_rows=n_rows)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_matching_embeddings_open_and_corpus_rows(tmp_path):
    path = _write_embeddings(tmp_path / "passages.memmap", ROWS, manifest={})
    assert corpus_rows(tmp_path) is None  # no passages_meta: nothing to check against
    rows = corpus_rows(_corpus(tmp_path / "preprocess", ROWS))
    assert rows == (ROWS, tmp_path / "preprocess" / "passages_meta")
    assert open_embeddings(path, dim=DIM, n_rows=rows).shape == (ROWS, DIM)
    assert open_embeddings(path, n_rows=ROWS).shape == (ROWS, DIM)
    with pytest.raises(InputError, match=f"covers {ROWS} passages but expected: {ROWS + 1}"):
        open_embeddings(path, n_rows=ROWS + 1)
    (tmp_path / "preprocess" / "passages_meta").write_text('{"type": "int32", "total_number": "many"}')
    with pytest.raises(InputError, match="passages_meta: token meta file lacks a total_number"):
        corpus_rows(tmp_path / "preprocess")


def _replace_with_float64(path: Path) -> list[str]:
    np.fromfile(path, np.float32).astype(np.float64).tofile(path)
    return ["the file is 2x the float32 size", "float64"]


def _truncate_rows(path: Path) -> list[str]:
    path.write_bytes(path.read_bytes()[: 15 * 16 * 4])
    return ["the file holds 15 rows but its manifest says 20"]


@pytest.mark.parametrize("damage", [_replace_with_float64, _truncate_rows], ids=["float64", "truncated"])
def test_encoding_reuse_refuses_a_replaced_file(tmp_path, damage):
    """star/inference.py and star/prepare_hardneg.py reuse a memmap whose manifest matches: a file replaced or cut
    since is refused (re-encoded only with --overwrite)."""
    write_token_memmap(tmp_path / "preprocess", "passages", [5, 9, 4, 7] * 5, width=10, seed=0)
    model = tiny_encoder(0, out_dim=16)
    out = tmp_path / "passages.memmap"

    def encode(overwrite: bool = False) -> np.memmap:
        return ru.encode_split(model, "test-model", tmp_path / "preprocess", "passages", 10, out, batch_size=8,
                               device="cpu", pad_token_id=1, overwrite=overwrite)

    reference = np.array(encode())
    needles = damage(out)
    with pytest.raises(InputError, match="existing embeddings cannot be reused") as e:
        encode()
    assert all(n in str(e.value) for n in needles), str(e.value)
    np.testing.assert_array_equal(encode(overwrite=True), reference)
    manifest_path(out).write_text("{not json")  # an unreadable manifest: named, and replaced by --overwrite
    with pytest.raises(InputError, match="embedding manifest is not valid JSON") as e:
        encode()
    assert e.value.path == str(manifest_path(out))
    np.testing.assert_array_equal(encode(overwrite=True), reference)


@pytest.fixture(scope="module")
def encoder_inputs(tmp_path_factory) -> dict:
    """helpers.make_encoder_inputs: 600 passages, train/dev queries, a 16-dim encoder."""
    return make_encoder_inputs(tmp_path_factory.mktemp("encoder_inputs"))


def _adore_inference_args(inputs: dict, out: Path, docs: Path) -> list:
    return ["-m", "adore.inference", "--model_dir", inputs["model"], "--output_dir", out, "--preprocess_dir",
            inputs["pre"], "--mode", "dev", "--dmemmap_path", docs, "--max_seq_length", "8", "--no_cuda", "--topk",
            "5", "--overwrite"]


N_PASSAGES = 600  # make_encoder_inputs


@pytest.mark.parametrize("rows, dtype, manifest, needles", [
    (N_PASSAGES - 100, np.float32, None, ["covers 500 passages but the corpus in", "passages_meta has 600"]),
    (N_PASSAGES, np.float64, {"n_rows": N_PASSAGES, "dim": 16}, ["2x the float32 size its manifest describes"]),
], ids=["fewer rows than the corpus", "float64 beside a float32 manifest"])
@pytest.mark.slow
def test_adore_inference_refuses_mismatched_embeddings_and_keeps_the_rank_file(tmp_path, encoder_inputs, rows,
                                                                                dtype, manifest, needles):
    docs = tmp_path / "docs.memmap"
    np.random.default_rng(0).standard_normal((rows, 16)).astype(dtype).tofile(docs)
    if manifest is not None:
        manifest_path(docs).write_text(json.dumps({"format": MANIFEST_FORMAT, "block_rows": 4096,
                                                      "completed_rows": rows, "complete": True, **manifest}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "dev.rank.tsv").write_text("0\t1\t1\n")  # a previous run's rank file, replaced only by a good run
    before = tree_hash(tmp_path, skip_tmp=False)
    assert_one_error(run_cli(_adore_inference_args(encoder_inputs, out, docs)), str(docs), *needles)
    assert tree_hash(tmp_path, skip_tmp=False) == before


@pytest.mark.slow
def test_adore_train_refuses_embeddings_shorter_than_their_manifest_before_touching_the_output(tmp_path):
    data = make_adore_data(tmp_path / "data")
    manifest_path(data.emb).write_text(json.dumps({
        "format": MANIFEST_FORMAT, "n_rows": ADORE_DOCS + 5, "dim": ADORE_DIM, "dtype": "float32",
        "block_rows": 4096, "completed_rows": ADORE_DOCS + 5, "complete": True}))
    out = tmp_path / "out"
    for folder in ("epoch-1", "checkpoint-3"):  # a previous run's, removed by --overwrite_output_dir only if it runs
        (out / folder).mkdir(parents=True)
        (out / folder / "trainer_state.pt").write_bytes(b"previous run")
    before = tree_hash(tmp_path, skip_tmp=False)
    result = run_cli(["-m", "adore.train", *adore_cli_args(data, out, "--overwrite_output_dir", "--max_steps", "1")])
    assert_one_error(result, str(data.emb), f"holds {ADORE_DOCS} rows but its manifest says {ADORE_DOCS + 5}")
    assert tree_hash(tmp_path, skip_tmp=False) == before


def test_adore_train_refuses_embeddings_of_another_corpus(tmp_path, capsys):
    from adore import train as adore_train

    data = make_adore_data(tmp_path / "data")
    _corpus(data.pre, ADORE_DOCS + 1)  # the preprocessed corpus has one passage more than the embeddings
    out = tmp_path / "out"
    result = run_in_process(adore_train.main, adore_cli_args(data, out, "--max_steps", "1"), capsys)
    assert_one_error(result, str(data.emb), f"covers {ADORE_DOCS} passages but the corpus in",
                     f"has {ADORE_DOCS + 1}")
    assert not out.exists()


# -- class 3: damaged or foreign checkpoints ------------------------------------------------------------------

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _truncated_weights(folder: Path) -> list[str]:
    _truncate(folder / "model.safetensors")
    return ["model.safetensors cannot be read"]


def _missing_weights(folder: Path) -> list[str]:
    (folder / "model.safetensors").unlink()
    return ["model.safetensors is missing"]


def _truncated_state(folder: Path) -> list[str]:
    _truncate(folder / "trainer_state.pt")
    return ["trainer_state.pt cannot be read (truncated"]


def _missing_state(folder: Path) -> list[str]:
    (folder / "trainer_state.pt").unlink()
    return ["trainer_state.pt is missing"]


def _state_of_another_format(folder: Path) -> list[str]:
    torch.save({"weight": torch.zeros(2)}, folder / "trainer_state.pt")  # e.g. a weights file under its name
    return ["trainer_state.pt is not a trainer state of format 1"]


def _foreign_shape(folder: Path) -> list[str]:
    """The weights (and config) of a run with another output dim."""
    torch.manual_seed(1)
    DenseEncoder.from_config(tiny_training_config(0.1, pad_token_id=1, output_embedding_size=8)).save_pretrained(folder)
    return ["model.safetensors has embeddingHead.weight of shape [8, 32], this model's is"]


def _optimizer_of_another_model(folder: Path) -> list[str]:
    state = torch.load(folder / "trainer_state.pt", weights_only=True)
    first = next(iter(state["optimizer"]["state"]))
    state["optimizer"]["state"][first]["exp_avg"] = torch.zeros(3, 3)
    torch.save(state, folder / "trainer_state.pt")
    return [f"the optimizer state in trainer_state.pt does not fit this model (parameter {first})"]


DAMAGES = [_truncated_weights, _missing_weights, _truncated_state, _missing_state, _state_of_another_format,
           _foreign_shape, _optimizer_of_another_model]


class Trainer:
    """One trainer's CLI over its tiny data: ``args(out, *extra)``, ``main`` and its module name."""

    def __init__(self, name: str, root: Path):
        from adore import train as adore_train
        from star import train as star_train

        self.module = f"{name}.train"
        if name == "star":
            data = make_star_data(root)
            self.main, self.args = star_train.main, lambda out, *extra: star_cli_args(data, out, "star", *extra)
        else:
            data = make_adore_data(root)
            self.main, self.args = adore_train.main, lambda out, *extra: adore_cli_args(data, out, *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """``{trainer name: (Trainer, output folder of a 2-step run with checkpoint-1 and checkpoint-2)}``, filled on
    first use by :func:`trained_run` (which runs under the one_thread fixture)."""
    return {"root": tmp_path_factory.mktemp("trained")}


def trained_run(trained: dict, name: str) -> tuple[Trainer, Path]:
    if name not in trained:
        root = trained["root"] / name
        trainer = Trainer(name, root / "data")
        trainer.main(trainer.args(root / "out", "--max_steps", "2", "--save_steps", "1"))
        assert sorted(p.name for p in (root / "out").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
        trained[name] = trainer, root / "out"
    return trained[name]


def _damaged_copy(trained: dict, name: str, damage: Callable, tmp_path: Path) -> tuple[Trainer, Path, Path, list]:
    """A copy of the trained run's output folder whose latest checkpoint ``damage`` changed."""
    trainer, source = trained_run(trained, name)
    out = tmp_path / "out"
    shutil.copytree(source, out)
    checkpoint = out / "checkpoint-2"
    return trainer, out, checkpoint, damage(checkpoint)


@pytest.mark.parametrize("name", ["star", "adore"])
@pytest.mark.parametrize("damage", DAMAGES, ids=[d.__name__.strip("_") for d in DAMAGES])
def test_resume_refuses_a_damaged_checkpoint_and_leaves_the_output(tmp_path, capsys, trained, name, damage):
    trainer, out, checkpoint, needles = _damaged_copy(trained, name, damage, tmp_path)
    stale = out / "checkpoint-9.tmp-999999999"  # a dead run's temporary: the one thing the resume may remove
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    before = tree_hash(out, skip_tmp=False)
    result = run_in_process(trainer.main, trainer.args(out, "--max_steps", "3", "--resume"), capsys)
    assert_one_error(result, f"{checkpoint}: ", *needles, "delete this folder", "--overwrite_output_dir")
    after = tree_hash(out, skip_tmp=False)
    assert after == {k: v for k, v in before.items() if not k.startswith("checkpoint-9.tmp-")}


@pytest.mark.parametrize("name", ["star", "adore"])
@pytest.mark.slow
def test_resume_cli_refuses_truncated_weights(tmp_path, trained, name):
    trainer, out, checkpoint, needles = _damaged_copy(trained, name, _truncated_weights, tmp_path)
    before = tree_hash(out, skip_tmp=False)
    result = run_cli(["-m", trainer.module, *trainer.args(out, "--max_steps", "3", "--resume")])
    assert_one_error(result, str(checkpoint), *needles, "delete this folder")
    assert tree_hash(out, skip_tmp=False) == before


def test_truncated_init_model_is_refused_clearly(tmp_path, capsys):
    trainer = Trainer("star", tmp_path / "data")
    init = tmp_path / "init"
    DenseEncoder.from_config(tiny_training_config(0.1)).save_pretrained(init)
    _truncate(init / "model.safetensors")
    argv = trainer.args(tmp_path / "out", "--max_steps", "1")
    argv[argv.index("--init_path") + 1] = str(init)
    assert_one_error(run_in_process(trainer.main, argv, capsys), str(init / "model.safetensors"),
                     "cannot read safetensors weights")


def test_init_model_of_another_shape_is_one_line_naming_the_weights(tmp_path, capsys):
    trainer = Trainer("star", tmp_path / "data")
    init = tmp_path / "init"
    DenseEncoder.from_config(tiny_training_config(0.1)).save_pretrained(init)
    config = json.loads((init / "config.json").read_text())
    (init / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))  # 2 layers x 3 tensors
    argv = trainer.args(tmp_path / "out", "--max_steps", "1")
    argv[argv.index("--init_path") + 1] = str(init)
    assert_one_error(run_in_process(trainer.main, argv, capsys), str(init / "model.safetensors"),
                     "weights do not fit the config: size mismatch for", "(and 5 more)")


def test_star_overwrite_keeps_the_previous_run_when_the_inputs_are_bad(tmp_path, capsys):
    """--overwrite_output_dir deletes the previous run's checkpoints only once the inputs were read and checked."""
    from star import train as star_train

    data = make_star_data(tmp_path / "data")
    (data["pre"] / "train-qrel.tsv").write_text("")
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "trainer_state.pt").write_bytes(b"previous run")
    before = tree_hash(out, skip_tmp=False)
    result = run_in_process(star_train.main, star_cli_args(data, out, "star", "--overwrite_output_dir", "--max_steps",
                                                           "1"), capsys)
    assert_one_error(result, str(data["pre"] / "train-qrel.tsv"), "no training query has a positive")
    assert tree_hash(out, skip_tmp=False) == before
