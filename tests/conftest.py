"""Shared test fixtures: paths to the real development data and a GPU marker."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from polybyte.pipelines.demo import ensure_demo_shards

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"development data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shakespeare(shared_data) -> bytes:
    return (shared_data / "text" / "tinyshakespeare.txt").read_bytes()


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """The demo shards, built once per session into a temporary cache (never ~/.cache)."""
    cache = tmp_path_factory.getbasetemp() / "polybyte-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POLYBYTE_CACHE", str(cache))
        yield ensure_demo_shards(quiet=True)


@pytest.fixture
def one_thread():
    """Run on one intra-op thread. The test models are tiny: a second OpenMP thread barely helps,
    and when the other core is busy every op waits for it (byte-by-byte sampling ran ~50x
    slower on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
