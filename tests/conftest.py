"""Shared test fixtures and helpers: paths to the real development data, a GPU marker, the one
tiny BLT of the model tests, and mask_mods only tests use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from polybyte.models.blt import BLT, BLTConfig
from polybyte.models.transformer import TransformerConfig
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


# --- the tiny BLT of the model tests ----------------------------------------------------------
# Smaller than the shipped ``tiny`` preset: 32-wide local models whose short windows (5 and 7
# bytes) exercise the windowed masks within 40-byte test streams, in well under a second.
TINY_BLT_ENTROPY_MODEL = dict(dim=32, n_layers=1, n_heads=2, window=8, max_seq_len=64)


def tiny_blt_config(patcher: str | dict = "space", *, entropy_model=None, **overrides) -> BLTConfig:
    """The test suite's BLT config. ``patcher``: a kind (patch size 3, patches of at most 6
    bytes) or a whole patcher dict. Entropy kinds get the entropy model TINY_BLT_ENTROPY_MODEL
    with ``entropy_model``'s fields (a dict) over it, or ``entropy_model`` itself (a
    TransformerConfig). Any other BLTConfig field is overridden by ``overrides``."""
    if isinstance(patcher, str):
        patcher = dict(kind=patcher, patch_size=3, max_patch_len=6)
    if not patcher["kind"].startswith("entropy"):
        entropy_model = None
    elif not isinstance(entropy_model, TransformerConfig):
        entropy_model = TransformerConfig(**{**TINY_BLT_ENTROPY_MODEL, **(entropy_model or {})})
    fields = dict(
        max_seq_len=64,
        patcher=patcher,
        hash_ngrams=dict(table_size=97),
        encoder=dict(dim=32, n_layers=2, n_heads=2, window=5),
        latent=dict(dim=48, n_layers=2, n_heads=2),
        decoder=dict(dim=32, n_layers=2, n_heads=2, window=7),
        entropy_model=entropy_model,
    )
    return BLTConfig(**{**fields, **overrides})


def tiny_blt(patcher: str | dict = "space", **kwargs) -> BLT:
    """``BLT(tiny_blt_config(patcher, **kwargs))`` from seed 0, in eval mode."""
    torch.manual_seed(0)
    return BLT(tiny_blt_config(patcher, **kwargs)).eval()


# --- mask_mods only tests use -----------------------------------------------------------------
def causal_mask(q_offset: int = 0):
    def mask_mod(b, h, q_idx, kv_idx):
        return q_idx + q_offset >= kv_idx

    return mask_mod


def document_causal_mask(doc_ids: torch.Tensor, q_offset: int = 0):
    """Block-causal: causal, and a query sees only keys of its own document. doc_ids [B, T]."""

    def mask_mod(b, h, q_idx, kv_idx):
        q = q_idx + q_offset
        return (q >= kv_idx) & (doc_ids[b, q] == doc_ids[b, kv_idx])

    return mask_mod


def attn_and_input(T=11, D=32, H=4, Hkv=2, seed=0):
    """A small RoPE attention layer (grouped-query) and an input [2, T, D]."""
    from polybyte.models.layers import Attention, RoPE

    torch.manual_seed(seed)
    attn = Attention(D, H, Hkv, rope=RoPE(D // H))
    return attn, torch.randn(2, T, D)
