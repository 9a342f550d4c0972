"""BLT's hashed n-gram embeddings (Pagnoni et al. 2024, §3.2.1): byte embedding plus one table
per n-gram size and hash function, indexed by a rolling polynomial hash of the n bytes ending at
each position.

``style = "transformers"`` computes transformers' BltForCausalLM ids instead (its primes, its
polynomial, its vocabulary) and sums without dividing: ``models/blt_hf.py``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .blt_hf import TRANSFORMERS_PRIMES, transformers_hash_ids

HASH_MODULUS = 2**31 - 1  # Mersenne prime: residues < 2^31, so a residue times an id fits in int64
# One multiplier per hash function (primes < HASH_MODULUS, the first as in the paper's code).
HASH_MULTIPLIERS = (
    1_000_000_007,
    1_500_450_271,
    1_100_000_009,
    1_200_000_041,
    1_300_000_003,
    1_400_000_023,
    1_600_000_009,
    1_700_000_009,
)


@dataclasses.dataclass
class HashNgramConfig:
    """Hashed n-gram embeddings added to the byte embeddings (BLT §3.2.1)."""

    sizes: tuple[int, ...] = (3, 4, 5, 6, 7, 8)  # n-gram lengths; the paper's best: 3..8
    # Rows per table (one table per n and hash function). The paper uses 500K and reports gains
    # growing with the table; it costs table_size·D_E parameters per table (no FLOPs), so the
    # default and the presets use less to stay near their parameter budgets.
    table_size: int = 16_384
    num_functions: int = 1  # hash functions per n, each with its own table (released BLT: 1)
    # "polybyte": our rolling hash (below), embeddings summed and divided by K+1; "transformers":
    # transformers' BLT ids and a plain sum (models/blt_hf.py), for its imported weights.
    style: str = "polybyte"

    def __post_init__(self) -> None:
        self.sizes = tuple(self.sizes)
        if self.style not in ("polybyte", "transformers"):
            raise ValueError(f"hash n-gram style must be 'polybyte' or 'transformers', got {self.style!r}")
        primes = HASH_MULTIPLIERS if self.style == "polybyte" else TRANSFORMERS_PRIMES
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"hash n-gram sizes must be positive integers, got {self.sizes}")
        if self.table_size < 1 or not 1 <= self.num_functions <= len(primes):
            raise ValueError(
                f"need table_size >= 1 and 1 <= num_functions <= {len(primes)}, "
                f"got {self.table_size}, {self.num_functions}"
            )

    @property
    def num_tables(self) -> int:
        return len(self.sizes) * self.num_functions


def hash_ngram_ids(
    ids: torch.Tensor, sizes: tuple[int, ...], table_size: int, num_functions: int = 1, fill: int = -1
) -> torch.Tensor:
    """Row indices of the n-grams ending at every position: ids [B, T] -> [B, T, num_functions·len(sizes)].

    Entry ``[b, t, f·len(sizes) + s]`` is ``RollPolyHash(ids[b, t-n+1 .. t]) mod table_size`` with
    ``n = sizes[s]`` and hash function ``f``: ``Σ_j ids[t-j]·a_f^j mod (2^31 - 1)``. Positions
    before the row's start read as ``fill`` (-1, i.e. 2^31 - 2 mod the modulus: no real id), so
    an n-gram never looks past position t and short prefixes hash consistently. Computed by
    extending the (n-1)-gram hash by one older byte: max(sizes) vectorised steps in all.
    """
    B, T = ids.shape
    n_max = max(sizes)
    padded = torch.cat([ids.new_full((B, n_max - 1), fill), ids.long()], dim=1)  # [B, n_max-1+T]
    # padded[:, n_max-1-j : n_max-1-j+T] holds ids[:, t-j] at column t
    older = [padded[:, n_max - 1 - j : n_max - 1 - j + T] % HASH_MODULUS for j in range(n_max)]
    out = []
    for f in range(num_functions):
        a = HASH_MULTIPLIERS[f]
        h = older[0]
        by_size = {}
        for j in range(n_max):
            if j:
                h = (h + older[j] * pow(a, j, HASH_MODULUS)) % HASH_MODULUS
            by_size[j + 1] = h
        out.extend(by_size[n] % table_size for n in sizes)
    return torch.stack(out, dim=-1)


class HashNgramEmbedding(nn.Module):
    """Byte embedding plus hashed n-gram embeddings, summed and divided by the number of terms
    (the paper normalises the sum by the number of n-gram sizes plus one; style "transformers"
    does not divide)."""

    def __init__(self, vocab_size: int, dim: int, config: HashNgramConfig) -> None:
        super().__init__()
        self.config = config
        self.byte_embed = nn.Embedding(vocab_size, dim)
        # All tables stacked in one nn.Embedding: one fused gather-and-sum (embedding_bag).
        self.hash_embed = nn.Embedding(config.num_tables * config.table_size, dim)
        offsets = torch.arange(config.num_tables) * config.table_size
        self.register_buffer("offsets", offsets, persistent=False)

    def forward(self, inputs: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """inputs [B, n] -> [B, n, D]. ``history`` [B, h]: inputs just before (incremental use)."""
        c = self.config
        full = inputs if history is None else torch.cat([history, inputs], dim=1)
        ids_of = hash_ngram_ids if c.style == "polybyte" else transformers_hash_ids
        rows = ids_of(full, c.sizes, c.table_size, c.num_functions)[:, -inputs.shape[1] :]
        B, n, K = rows.shape
        bags = (rows + self.offsets).reshape(B * n, K)  # [B, n, K] -> [B*n, K]
        hashed = F.embedding_bag(bags, self.hash_embed.weight, mode="sum").view(B, n, -1)
        if c.style == "transformers":
            return self.byte_embed(inputs) + hashed
        return (self.byte_embed(inputs) + hashed) / (K + 1)
