"""Shared test fixtures.  Tests run offline: no hub look-ups (HF_HUB_OFFLINE=1)."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ../shared folder beside the checkout (real data); skip where a user's clone lacks it."""
    if not (SHARED / "data").is_dir():
        if os.environ.get("CI"):
            pytest.fail("../shared is required in CI but is missing")
        pytest.skip("../shared is not beside this checkout")
    return SHARED


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO
