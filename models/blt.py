"""BLT, the Byte Latent Transformer (Pagnoni et al. 2024, "Patches Scale Better Than Tokens").

Data flow for ids [B, T] (targets) and modality [B]::

    u = [tag, ids[:, :-1]]                          # input stream, as in the flat transformer
    x = (byte_emb(u) + Σ hash n-gram emb(u)) / (K+1)  # [B, T, D_E]; n-grams end at each input
    e = local encoder(x)                            # windowed causal self-attention over bytes
    patches over u: the tag is patch 0 (the modality's start patch), byte ids[p] sits at input
      position p+1 and belongs to patch patch_ids[p] + 1
    q = cross-attention pooling: k queries per patch, initialised by max-pooling the patch's
        byte states, attend only to that patch's bytes        # [B, P, k·D_E] -> [B, P, D_G]
    o = latent transformer over patches 0..P-1 (causal)       # [B, P, D_G]
    decoder: byte t starts from e[:, t] (which has seen ids[:, :t]), cross-attends to the k
      slots of o[:, patch_ids[t]] — the latent state after the patches *before* t's patch —
      then windowed causal self-attention; head -> logits [B, T, V]

So ``logits[:, t]`` depends on the tag and ``ids[:, :t]`` only: the patch boundaries come from
``models/patching.py``, whose rules decide whether byte p starts a patch from bytes < p alone.

Incremental decoding (the seam for ``models/generate.py``; ``new_cache`` makes the caches;
``test_stepping_the_stages_with_caches_matches_the_full_forward`` runs this recipe). To
predict byte t, with u_t = the tag (t = 0) or ids[t-1]:

1. entropy patching: ``entropy.step_entropies(model.entropy_model, u_t, cache.entropy)`` gives
   the entropy of byte t; whether t starts a patch is known now, before byte t exists
   (``patching.patch_starts`` on the prefix, any value at position t, read at position t);
2. local encoder, one input: ``embed(u_t, history=the last max(n)-1 inputs)`` then
   ``encode_bytes(x, positions=[t], caches=cache.encoder)``; keep every layer's state;
3. if t starts patch j: the inputs of patch j (the tag for j = 0, else those after the previous
   start up to t) are complete: ``encode_patches`` on their states (patch id 0, one patch),
   ``latent(..., positions=[j], caches=cache.latent)``, ``decoder_slots`` -> the k slots;
4. local decoder, one byte: ``decode(state of u_t, slots, patch id 0, positions=[t],
   caches=cache.decoder)`` -> logits of byte t.

Rows of a batch close patches at different steps. ``new_state`` / ``step`` / ``prefill`` /
``decode_block`` (for ``models/generate.py``) therefore run step 3 for every row at every byte,
each row at its own patch index (``RowKVCache``), and only the rows that close a patch keep
the result; every step then has the same kernels and shapes, with no host sync (the patch
decisions stay on the device), so one CUDA graph replays a block of steps. The pooling window
is a ring of the last encoder states, as many as the longest patch (``max_patch_len``, or the
stride for strided patching; all of them without a bound); the latent caches grow between blocks.
With 16 rows and patches of ~4 bytes, a row closes a patch at almost every byte anyway.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import patching
from .base import ByteLM, ByteLMConfig, _dataclass_from_dict, register_backbone
from .entropy import compute_entropies, step_entropies
from .flops import TRAIN_FACTOR, attention_flops, attention_pairs, linear_flops
from .layers import (
    init_residual_projections,
    Attention,
    AttentionMask,
    Block,
    DeviceWindowedKVCache,
    KVCache,
    RMSNorm,
    RoPE,
    WindowedKVCache,
    prepare_mask,
    sliding_window_mask,
)
from .patching import PatcherConfig
from .transformer import PRESETS as TRANSFORMER_PRESETS
from .transformer import Transformer, TransformerCache, TransformerConfig


HASH_MODULUS = 2**31 - 1  # Mersenne prime: residues < 2^31, so a residue times an id fits in int64
# Incremental decoding: bytes per decode_block call (one CUDA graph replay), the latent caches'
# first capacity in patches and the factor they grow by when a row may need more. Each growth
# costs an eager block and a new graph capture, and every slot is attended at every byte; for
# the base preset (16 x 12,288 bytes, 2.3-byte patches) 1.5 and 2 measured the same.
DECODE_BLOCK = 16
LATENT_MIN_CAPACITY = 128
LATENT_GROWTH = 1.5
# One multiplier per hash function (primes < HASH_MODULUS, the first as in the paper's code).
HASH_MULTIPLIERS = (1_000_000_007, 1_500_450_271, 1_100_000_009, 1_200_000_041,
                    1_300_000_003, 1_400_000_023, 1_600_000_009, 1_700_000_009)


# --- configuration ----------------------------------------------------------------------------
@dataclasses.dataclass
class HashNgramConfig:
    """Hashed n-gram embeddings added to the byte embeddings (BLT §3.2.1)."""

    sizes: tuple[int, ...] = (3, 4, 5, 6, 7, 8)  # n-gram lengths; the paper's best: 3..8
    # Rows per table (one table per n and hash function). The paper uses 500K and reports gains
    # growing with the table; it costs table_size·D_E parameters per table (no FLOPs), so the
    # default and the presets use less to stay near their parameter budgets.
    table_size: int = 16_384
    num_functions: int = 1  # hash functions per n, each with its own table (released BLT: 1)

    def __post_init__(self) -> None:
        self.sizes = tuple(self.sizes)
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"hash n-gram sizes must be positive integers, got {self.sizes}")
        if self.table_size < 1 or not 1 <= self.num_functions <= len(HASH_MULTIPLIERS):
            raise ValueError(
                f"need table_size >= 1 and 1 <= num_functions <= {len(HASH_MULTIPLIERS)}, "
                f"got {self.table_size}, {self.num_functions}"
            )

    @property
    def num_tables(self) -> int:
        return len(self.sizes) * self.num_functions


@dataclasses.dataclass
class LocalConfig:
    """A local (byte-level) model: the encoder or the decoder."""

    dim: int = 512  # width D_E / D_D
    n_layers: int = 1  # transformer blocks (the decoder adds a cross-attention before each)
    n_heads: int = 8  # self- and cross-attention heads; head_dim = dim / n_heads (even)
    window: int = 512  # sliding-window self-attention over bytes (the paper's local models: 512)
    mlp_hidden: int | None = None  # SwiGLU width; None = 8/3·dim rounded up to 64

    def __post_init__(self) -> None:
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into n_heads {self.n_heads} heads of even size")
        if self.window < 1 or self.n_layers < 1:
            raise ValueError(f"need window >= 1 and n_layers >= 1, got {self.window}, {self.n_layers}")


@dataclasses.dataclass
class LatentConfig:
    """The latent (global) transformer over patches."""

    dim: int = 768  # width D_G
    n_layers: int = 12  # transformer blocks
    n_heads: int = 12  # query heads; head_dim = dim / n_heads (even)
    n_kv_heads: int | None = None  # grouped-query key/value heads; None = n_heads
    mlp_hidden: int | None = None  # SwiGLU width; None = 8/3·dim rounded up to 64

    def __post_init__(self) -> None:
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into n_heads {self.n_heads} heads of even size")


@dataclasses.dataclass
class BLTConfig(ByteLMConfig):
    """BLT: patcher, hash n-grams, local encoder, latent transformer, local decoder, entropy model."""

    max_seq_len: int = 2048  # training window T in bytes: FLOP counting, default cache sizes
    # How bytes are grouped. Entropy patching is the paper's best; space patching needs no
    # entropy model and suits text; strided is the fixed-size (MEGABYTE-like) baseline.
    patcher: PatcherConfig = dataclasses.field(default_factory=lambda: PatcherConfig(kind="space"))
    hash_ngrams: HashNgramConfig = dataclasses.field(default_factory=HashNgramConfig)
    # Local encoder: the paper finds one layer enough once hash n-gram embeddings are used.
    encoder: LocalConfig = dataclasses.field(default_factory=lambda: LocalConfig(n_layers=1))
    latent: LatentConfig = dataclasses.field(default_factory=LatentConfig)
    # Local decoder: deeper than the encoder (the paper's 400M-8B models use 6-9 layers).
    decoder: LocalConfig = dataclasses.field(default_factory=lambda: LocalConfig(n_layers=6))
    cross_attn_k: int = 2  # queries per patch in the encoder / slots per patch in the decoder
    # Cross-attention after every encoder layer and before every decoder layer, rather than
    # only the last / first one (as the released BLT models do).
    cross_attn_all_layers: bool = True
    # Frozen entropy model (a windowed flat Transformer) for entropy patching; its weights are
    # loaded later into ``model.entropy_model``. None for strided / space patching.
    entropy_model: TransformerConfig | None = None
    rope_theta: float = 10000.0  # RoPE base of all self-attention (bytes and patches)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    init_std: float = 0.02  # normal init std; residual output projections get std/sqrt(2·layers)

    def __post_init__(self) -> None:
        # Accept plain dicts for the nested parts (YAML / config.json round trips).
        for name, cls in (("patcher", PatcherConfig), ("hash_ngrams", HashNgramConfig),
                          ("encoder", LocalConfig), ("latent", LatentConfig), ("decoder", LocalConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _dataclass_from_dict(cls, value))
        if isinstance(self.entropy_model, dict):
            self.entropy_model = _dataclass_from_dict(TransformerConfig, self.entropy_model)
        if self.patcher.needs_entropies and self.entropy_model is None:
            raise ValueError(
                f"{self.patcher.kind} patching needs an entropy model: set entropy_model to a "
                "TransformerConfig (e.g. entropy.entropy_model_config()) or use kind 'space' / 'strided'"
            )
        if self.patcher.pad_id != self.pad_id:
            raise ValueError(f"patcher.pad_id {self.patcher.pad_id} != pad_id {self.pad_id}")
        if self.cross_attn_k < 1 or self.max_seq_len < 1:
            raise ValueError(
                f"need cross_attn_k >= 1 and max_seq_len >= 1, got {self.cross_attn_k}, {self.max_seq_len}"
            )


# Shipped sizes (BLTConfig fields; nested parts as dicts). "params" excludes the frozen entropy
# model; "non-emb." also leaves out the byte and hash n-gram tables. Training FLOPs per byte at
# max_seq_len and mean patch length 4 (patch_size), the entropy model's forward included:
#   preset   params   non-emb.   entropy model   FLOPs/byte
#   tiny      1.58M     0.96M        -              3.6M     space patching; CI / CPU tests
#   small    29.54M    23.18M      3.35M           80.1M     entropy patching (8.4M of it entropy)
#   base    171.75M   146.45M     45.24M          497.6M     entropy patching (104.4M entropy); the
#                                                            paper's entropy-model shape, 1/4 of the
#                                                            model as at the paper's smallest scale
# The flat transformer presets of the same sizes need 230.9M (small) and 1.93G (base) FLOPs/byte.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        max_seq_len=256,
        patcher=dict(kind="space", patch_size=4, max_patch_len=16),
        hash_ngrams=dict(table_size=1024),
        encoder=dict(dim=96, n_layers=1, n_heads=4, window=64),
        latent=dict(dim=128, n_layers=2, n_heads=4),
        decoder=dict(dim=96, n_layers=2, n_heads=4, window=64),
    ),
    "small": dict(
        max_seq_len=2048,
        patcher=dict(kind="entropy", patch_size=4, max_patch_len=16),
        hash_ngrams=dict(table_size=4096),
        encoder=dict(dim=256, n_layers=1, n_heads=4, window=512),
        latent=dict(dim=512, n_layers=5, n_heads=8),
        decoder=dict(dim=256, n_layers=5, n_heads=4, window=512),
        entropy_model=dict(dim=256, n_layers=4, n_heads=4, window=512, max_seq_len=2048),
    ),
    "base": dict(
        max_seq_len=8192,
        patcher=dict(kind="entropy", patch_size=4, max_patch_len=16),
        hash_ngrams=dict(table_size=8192),
        encoder=dict(dim=512, n_layers=1, n_heads=8, window=512),
        latent=dict(dim=1024, n_layers=9, n_heads=16),
        decoder=dict(dim=512, n_layers=6, n_heads=8, window=512),
        entropy_model=dict(TRANSFORMER_PRESETS["entropy"], max_seq_len=8192),
    ),
}


def blt_preset(name: str, **overrides) -> BLTConfig:
    """A shipped size from PRESETS, with top-level fields overridden (nested parts as dicts or configs)."""
    if name not in PRESETS:
        raise ValueError(f"unknown BLT preset {name!r}; known: {sorted(PRESETS)}")
    return BLTConfig(**{**PRESETS[name], **overrides})


# --- hash n-gram embeddings -------------------------------------------------------------------
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
    (the paper normalises the sum by the number of n-gram sizes plus one)."""

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
        rows = hash_ngram_ids(full, c.sizes, c.table_size, c.num_functions)[:, -inputs.shape[1] :]
        B, n, K = rows.shape
        bags = (rows + self.offsets).reshape(B * n, K)  # [B, n, K] -> [B*n, K]
        hashed = F.embedding_bag(bags, self.hash_embed.weight, mode="sum").view(B, n, -1)
        return (self.byte_embed(inputs) + hashed) / (K + 1)


# --- building blocks --------------------------------------------------------------------------
class CrossAttention(nn.Module):
    """Pre-norm cross-attention with a residual on the queries (no MLP, no RoPE), as in BLT."""

    def __init__(self, dim: int, n_heads: int, norm_eps: float) -> None:
        super().__init__()
        self.q_norm = RMSNorm(dim, eps=norm_eps)
        self.kv_norm = RMSNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, n_heads)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        return x + self.attn(self.q_norm(x), self.kv_norm(kv), mask_mod=mask, causal=False)


def _local_mask(window: int, n: int, device) -> AttentionMask | None:
    """Windowed causal self-attention mask over n positions; None (plain causal) if window >= n."""
    return None if window >= n else prepare_mask(sliding_window_mask(window), None, n, n, device)


def _ring_caches(local: LocalConfig, B: int, device, dtype, kind: type) -> list:
    """One ring cache (``kind``: WindowedKVCache or DeviceWindowedKVCache) per layer of a local model."""
    hd = local.dim // local.n_heads
    return [kind(B, local.n_heads, local.window, hd, device, dtype) for _ in range(local.n_layers)]


def _patch_max_pool(h: torch.Tensor, patch_ids: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Max over each patch's positions: h [B, T, D], patch_ids [B, T] -> [B, P, D] (0 for empty
    patches; positions with patch id >= P are ignored)."""
    B, T, D = h.shape
    idx = patch_ids.clamp(max=num_patches)[..., None].expand(B, T, D)
    out = h.new_zeros(B, num_patches + 1, D)  # one extra row collects the ignored positions
    return out.scatter_reduce(1, idx, h, reduce="amax", include_self=False)[:, :num_patches]


@dataclasses.dataclass
class BLTCache:
    """Caches for incremental decoding of one batch (see the module docstring's recipe)."""

    encoder: list[WindowedKVCache]  # local encoder self-attention, one per layer
    latent: list[KVCache]  # latent transformer, one per layer (new_state: RowKVCaches, see there)
    decoder: list[WindowedKVCache]  # local decoder self-attention, one per layer
    entropy: TransformerCache | None  # the entropy model's (entropy patching only)


class RowKVCache:
    """KV cache of one latent layer whose rows hold different numbers of patches.

    In batched generation rows close patches at different bytes. The latent model therefore
    steps every row at every byte, row b at its own patch index ``next_slot[b]`` (a device
    tensor, ``BLTState.num_patches``): its key/value is written at that slot and the caller
    masks the keys after it. A row that closed no patch computed a throwaway step, whose slot
    its next real patch overwrites. ``update`` returns all ``capacity`` slots: the shapes stay
    fixed between ``grow`` calls, so a captured CUDA graph replays the step. ``Attention`` uses
    it through the ``KVCache`` protocol (``update``, ``length`` = capacity, ``window`` None), but
    callers must pass the RoPE positions (the patch indices) and the row mask themselves.
    """

    window = None
    static_shape = False  # the caller passes the row mask itself

    def __init__(self, next_slot: torch.Tensor, n_kv_heads: int, head_dim: int, capacity: int, dtype) -> None:
        B, dev = next_slot.shape[0], next_slot.device
        self.next_slot = next_slot  # [B] where each row writes (the caller advances it)
        self.k = torch.zeros(B, n_kv_heads, capacity, head_dim, device=dev, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.slots = torch.arange(capacity, device=dev)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    length = capacity  # keys returned by update

    def grow(self, capacity: int) -> None:
        """Reallocate to ``capacity`` slots, keeping the cached ones (new addresses)."""
        old = self.capacity
        for name in ("k", "v"):
            buf = getattr(self, name)
            new = buf.new_zeros(*buf.shape[:2], capacity, buf.shape[3])  # [B, Hkv, capacity, Dh]
            new[:, :, :old] = buf
            setattr(self, name, new)
        self.slots = torch.arange(capacity, device=self.k.device)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One new step per row, k/v [B, Hkv, 1, Dh] -> keys/values [B, Hkv, capacity, Dh], slots."""
        rows = torch.arange(k.shape[0], device=k.device)
        self.k[rows, :, self.next_slot] = k[:, :, 0]
        self.v[rows, :, self.next_slot] = v[:, :, 0]
        return self.k, self.v, self.slots


@dataclasses.dataclass
class BLTState:
    """Incremental-decoding state of a batch; create with ``BLT.new_state``.

    Every row sits at the same byte position ``pos`` (prompts of different lengths are
    teacher-forced by the caller); rows differ in their patches. Everything a step reads or
    writes is a device tensor updated in place (``t`` mirrors ``pos``), so one captured CUDA
    graph replays any number of steps; only the latent caches grow, between blocks of steps.
    """

    modality: torch.Tensor  # [B] modality tag ids
    max_len: int  # most positions this state can decode
    pos: int  # next position to emit logits for (host)
    t: torch.Tensor  # 0-dim long: pos, on the device
    cache: BLTCache  # Device* caches (encoder, decoder, entropy); ``latent`` holds RowKVCaches
    history: torch.Tensor  # [B, H] the last H inputs (tag, bytes), -1 before the stream starts
    enc_ring: list[torch.Tensor]  # per pooled encoder layer [B, R, D_E]: states of the last R inputs
    ring_pos: torch.Tensor  # [R] input position held by each ring slot (-1 = empty)
    num_patches: torch.Tensor  # [B] patches started so far (= the latent slot of the next one)
    open_start: torch.Tensor  # [B] first input of the input patch being filled
    content_start: torch.Tensor  # [B] last start before max-length cuts (patching._cut_long)
    entropy: torch.Tensor  # [B] fp32 entropy of the byte at pos - 1 (entropy_relative)
    slots: torch.Tensor  # [B, k, D_D] decoder slots of each row's current patch
    reserved_to: int = 0  # host: the latent caches hold every patch of the positions before it
    patch_bound: int = 0  # host: an upper bound of max(num_patches) at position reserved_to


# --- the model --------------------------------------------------------------------------------
@register_backbone("blt", BLTConfig)
class BLT(ByteLM):
    """Byte Latent Transformer (see module docstring)."""

    compilable_steps = ("decode_front", "decode_latent", "decode_back")
    growing_steps = ("decode_latent",)  # its shapes follow the latent caches' capacity

    def __init__(self, config: BLTConfig) -> None:
        super().__init__()
        self.config = c = config
        E, G, Dd, k = c.encoder, c.latent, c.decoder, c.cross_attn_k
        self.embed = HashNgramEmbedding(c.vocab_size, E.dim, c.hash_ngrams)
        enc_rope = RoPE(E.dim // E.n_heads, c.rope_theta)
        self.enc_blocks = nn.ModuleList(
            Block(E.dim, E.n_heads, None, enc_rope, E.mlp_hidden, c.norm_eps) for _ in range(E.n_layers)
        )
        n_enc_cross = E.n_layers if c.cross_attn_all_layers else 1
        self.pool_proj = nn.Linear(E.dim, k * E.dim, bias=False)  # max-pooled patch -> k queries
        self.enc_cross = nn.ModuleList(
            CrossAttention(E.dim, E.n_heads, c.norm_eps) for _ in range(n_enc_cross)
        )
        self.to_latent = nn.Linear(k * E.dim, G.dim, bias=False)
        lat_rope = RoPE(G.dim // G.n_heads, c.rope_theta)
        self.latent_blocks = nn.ModuleList(
            Block(G.dim, G.n_heads, G.n_kv_heads, lat_rope, G.mlp_hidden, c.norm_eps)
            for _ in range(G.n_layers)
        )
        self.latent_norm = RMSNorm(G.dim, eps=c.norm_eps)
        self.to_decoder = nn.Linear(G.dim, k * Dd.dim, bias=False)  # latent state -> k slots
        self.enc_to_dec = nn.Identity() if E.dim == Dd.dim else nn.Linear(E.dim, Dd.dim, bias=False)
        dec_rope = RoPE(Dd.dim // Dd.n_heads, c.rope_theta)
        n_dec_cross = Dd.n_layers if c.cross_attn_all_layers else 1
        self.dec_cross = nn.ModuleList(
            CrossAttention(Dd.dim, Dd.n_heads, c.norm_eps) for _ in range(n_dec_cross)
        )
        self.dec_blocks = nn.ModuleList(
            Block(Dd.dim, Dd.n_heads, None, dec_rope, Dd.mlp_hidden, c.norm_eps) for _ in range(Dd.n_layers)
        )
        self.dec_norm = RMSNorm(Dd.dim, eps=c.norm_eps)
        self.head = nn.Linear(Dd.dim, c.vocab_size, bias=False)
        self._init_weights()
        self.entropy_model: Transformer | None = None
        if c.entropy_model is not None:  # built after init: it keeps its own initialisation
            self.entropy_model = Transformer(c.entropy_model)
            self.entropy_model.requires_grad_(False)
            self.entropy_model.eval()

    def _init_weights(self) -> None:
        c, std = self.config, self.config.init_std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
        for emb in (self.embed.byte_embed, self.embed.hash_embed):
            nn.init.normal_(emb.weight, std=c.encoder.dim**-0.5)
        # residual branches: keep each stack's stream variance flat over its depth
        for blocks, cross, depth in (
            (self.enc_blocks, self.enc_cross, c.encoder.n_layers),
            (self.latent_blocks, [], c.latent.n_layers),
            (self.dec_blocks, self.dec_cross, c.decoder.n_layers),
        ):
            init_residual_projections(blocks, std, depth)
            for x in cross:
                nn.init.normal_(x.attn.wo.weight, std=std / math.sqrt(2 * depth))

    def train(self, mode: bool = True) -> BLT:
        super().train(mode)
        if self.entropy_model is not None:
            self.entropy_model.eval()  # frozen: never in training mode
        return self

    def new_cache(self, B: int, max_patches: int | None = None, device=None, dtype=None) -> BLTCache:
        """Empty caches for B rows; the latent one holds ``max_patches`` (default max_seq_len)."""
        c = self.config
        p = self.head.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype

        G = c.latent
        n_kv, max_patches = G.n_kv_heads or G.n_heads, max_patches or c.max_seq_len
        latent = [KVCache(B, n_kv, max_patches, G.dim // G.n_heads, device, dtype) for _ in range(G.n_layers)]
        entropy = None
        if c.patcher.needs_entropies:
            entropy = self.entropy_model.new_cache(B, device=device, dtype=dtype)
        rings = [_ring_caches(local, B, device, dtype, WindowedKVCache) for local in (c.encoder, c.decoder)]
        return BLTCache(rings[0], latent, rings[1], entropy)

    # --- stages -------------------------------------------------------------------------------
    def inputs(self, ids: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """ids [B, T], modality [B] -> input stream [B, T]: the tag, then ids[:, :-1]."""
        if ids.dim() != 2 or modality.shape != ids.shape[:1]:
            raise ValueError(
                f"expected ids [B, T] and modality [B], got {tuple(ids.shape)} and {tuple(modality.shape)}"
            )
        return torch.cat([modality[:, None].to(ids.dtype), ids[:, :-1]], dim=1)  # [B, 1 + T-1]

    def patch(self, ids: torch.Tensor, modality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch the targets: ids [B, T] -> (lengths [B, P], patch_ids [B, T]); runs the frozen
        entropy model for entropy patching."""
        entropies = None
        if self.config.patcher.needs_entropies:
            with torch.no_grad():
                entropies = compute_entropies(self.entropy_model, ids, modality)
        return patching.patch(ids, self.config.patcher, entropies)

    @torch.no_grad()
    def calibrate_threshold(
        self, ids: torch.Tensor, modality: torch.Tensor, target_mean_patch_len: float | None = None
    ) -> float:
        """Set ``patcher.threshold`` so that entropy patching of ``ids`` gives the target mean
        patch length (default ``patcher.patch_size``); returns the threshold."""
        if not self.config.patcher.needs_entropies:
            raise ValueError(f"calibrate_threshold needs entropy patching, not {self.config.patcher.kind!r}")
        entropies = compute_entropies(self.entropy_model, ids, modality)
        threshold = patching.find_threshold(entropies, target_mean_patch_len, ids, self.config.patcher)
        self.config.patcher.threshold = threshold
        return threshold

    def encode_bytes(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        caches: list[WindowedKVCache] | None = None,
    ) -> list[torch.Tensor]:
        """Local encoder over embedded inputs [B, n, D_E] -> the states after each layer.

        ``caches`` (``BLTCache.encoder``): continue a stream; positions default to the cache length.
        """
        mask = None if caches else _local_mask(self.config.encoder.window, x.shape[1], x.device)
        states = []
        for i, block in enumerate(self.enc_blocks):
            cache = caches[i] if caches else None
            x = block(x, positions=positions, mask_mod=mask, causal=True, cache=cache)
            states.append(x)
        return states

    def encode_patches(
        self, states: list[torch.Tensor], input_patch_ids: torch.Tensor, num_patches: int
    ) -> torch.Tensor:
        """Pool the encoder states of each input patch into one latent input vector.

        states: per-layer encoder states [B, n, D_E]; input_patch_ids [B, n]: patch of every
        input position (ids >= num_patches are ignored) -> [B, num_patches, D_G].
        """
        k = self.config.cross_attn_k
        B, n, D = states[-1].shape
        used = states[-len(self.enc_cross):]  # all layers, or only the last
        pooled = _patch_max_pool(used[0], input_patch_ids, num_patches)  # [B, P, D_E]
        queries = self.pool_proj(pooled).view(B, num_patches * k, D)  # [B, P, k*D] -> [B, P*k, D]

        def own_patch(b, h, q_idx, kv_idx):
            return input_patch_ids[b, kv_idx] == q_idx // k

        mask = prepare_mask(own_patch, B, num_patches * k, n, queries.device)
        for cross, h in zip(self.enc_cross, used):
            queries = cross(queries, h, mask)
        # [B, P*k, D] -> [B, P, k*D] -> [B, P, D_G]
        return self.to_latent(queries.view(B, num_patches, k * D))

    def latent(
        self,
        patches: torch.Tensor,
        positions: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """Latent transformer, causal over patches: [B, P, D_G] -> normalised states [B, P, D_G].

        ``caches`` (``BLTCache.latent``): continue a stream, e.g. one closed patch at a time.
        """
        for i, block in enumerate(self.latent_blocks):
            cache = caches[i] if caches else None
            patches = block(patches, positions=positions, causal=True, cache=cache)
        return self.latent_norm(patches)

    def decoder_slots(self, latent_states: torch.Tensor) -> torch.Tensor:
        """Latent states [B, P, D_G] -> decoder cross-attention slots [B, P*k, D_D] (k per patch)."""
        B, P, _ = latent_states.shape
        # [B, P, D_G] -> [B, P, k*D_D] -> [B, P*k, D_D]
        return self.to_decoder(latent_states).view(B, P * self.config.cross_attn_k, -1)

    def decode(
        self,
        enc_states: torch.Tensor,
        slots: torch.Tensor,
        patch_ids: torch.Tensor | None,
        positions: torch.Tensor | None = None,
        caches: list[WindowedKVCache] | None = None,
    ) -> torch.Tensor:
        """Local decoder: encoder states [B, n, D_E] of the inputs, slots [B, P*k, D_D] and the
        patch of every target [B, n] (byte t reads the slots of latent state patch_ids[t]) ->
        logits [B, n, V]. ``caches`` (``BLTCache.decoder``): continue a stream."""
        k = self.config.cross_attn_k
        B, n, _ = enc_states.shape

        def state_before_own_patch(b, h, q_idx, kv_idx):
            return kv_idx // k == patch_ids[b, q_idx]

        # no patch ids: one byte per row reading all k slots (incremental decoding)
        cross_mask = None if patch_ids is None else prepare_mask(state_before_own_patch, B, n, slots.shape[1], slots.device)
        self_mask = None if caches else _local_mask(self.config.decoder.window, n, enc_states.device)
        h = self.enc_to_dec(enc_states)
        for i, block in enumerate(self.dec_blocks):
            if i < len(self.dec_cross):
                h = self.dec_cross[i](h, slots, cross_mask)
            cache = caches[i] if caches else None
            h = block(h, positions=positions, mask_mod=self_mask, causal=True, cache=cache)
        return self.head(self.dec_norm(h))

    # --- full forward -------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        inputs = self.inputs(ids, modality)
        lengths, patch_ids = self.patch(ids, modality)
        P = lengths.shape[1]
        # input position 0 (the tag) is patch 0; input p+1 carries ids[p], of target patch
        # patch_ids[p], which is input patch patch_ids[p] + 1. Latent state j has seen input
        # patches 0..j (the tag and target patches < j) and is read by target patch j.
        input_patch_ids = torch.cat([torch.zeros_like(patch_ids[:, :1]), patch_ids[:, :-1] + 1], dim=1)
        states = self.encode_bytes(self.embed(inputs))
        latent = self.latent(self.encode_patches(states, input_patch_ids, P))
        logits = self.decode(states[-1], self.decoder_slots(latent), patch_ids)
        n_patches, n_bytes = patching.patch_counts(patch_ids, ids, self.config.pad_id)
        self.aux = {"num_patches": n_patches, "num_bytes": n_bytes}
        return logits

    # --- incremental decoding -----------------------------------------------------------------
    @property
    def decode_block_size(self) -> int:
        """Bytes per ``decode_block`` call (one CUDA graph replay in models/generate.py)."""
        return DECODE_BLOCK

    def new_state(
        self, modality: torch.Tensor, max_len: int, dtype: torch.dtype | None = None, device_caches: bool = True
    ) -> BLTState:
        """Empty decoding state for rows with tags ``modality`` [B] (its device is used), able to
        decode ``max_len`` positions. Cache ``dtype`` defaults to the weights'. The caches are
        always the fixed-shape device kind (``device_caches`` is accepted for the common
        signature of the backbones)."""
        c = self.config
        B, dev = modality.shape[0], modality.device
        dtype = dtype or self.head.weight.dtype

        G = c.latent
        num_patches = torch.zeros(B, dtype=torch.long, device=dev)
        capacity = min(max_len + 1, LATENT_MIN_CAPACITY)  # grown by reserve_patches
        latent = [
            RowKVCache(num_patches, G.n_kv_heads or G.n_heads, G.dim // G.n_heads, capacity, dtype)
            for _ in range(G.n_layers)
        ]
        entropy = None
        if c.patcher.needs_entropies:  # (max_len only sizes an entropy model without a window)
            entropy = self.entropy_model.new_cache(B, max_len, device=dev, dtype=dtype, device_caches=True)
        # An input patch spans at most as many inputs as the longest patch (PAD aside, which
        # prefill refuses): the ring of encoder states that pooling reads needs no more. With
        # a bound, the compiled steps see the same shapes for every sample length.
        p = c.patcher
        longest = min(p.patch_size, p.max_patch_len or p.patch_size) if p.kind == "strided" else p.max_patch_len
        R = longest or max_len
        H = max(max(c.hash_ngrams.sizes), 2)  # n-gram hashes and the patch rules look back this far
        return BLTState(
            modality=modality,
            max_len=max_len,
            pos=0,
            t=torch.zeros((), dtype=torch.long, device=dev),
            cache=BLTCache(
                _ring_caches(c.encoder, B, dev, dtype, DeviceWindowedKVCache),
                latent,
                _ring_caches(c.decoder, B, dev, dtype, DeviceWindowedKVCache),
                entropy,
            ),
            history=torch.full((B, H), -1, dtype=torch.long, device=dev),
            enc_ring=[torch.zeros(B, R, c.encoder.dim, device=dev, dtype=dtype) for _ in self.enc_cross],
            ring_pos=torch.full((R,), -1, dtype=torch.long, device=dev),
            num_patches=num_patches,
            open_start=torch.zeros_like(num_patches),
            content_start=torch.zeros_like(num_patches),
            entropy=torch.zeros(B, device=dev),
            slots=torch.zeros(B, c.cross_attn_k, c.decoder.dim, device=dev, dtype=dtype),
        )

    @torch.no_grad()
    def step(self, state: BLTState, prev: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, V] for position ``state.pos``, given ``prev`` [B] = the bytes at position
        ``state.pos - 1`` (None exactly when ``state.pos == 0``; never PAD, unchecked here: a
        sync per byte); advances ``state.pos`` by one.

        The recipe of the module docstring, batched at fixed shapes: the entropy model and the
        local encoder take input ``pos``; the latent model steps every row at its own patch
        index and only the rows whose byte ``pos`` starts a patch keep the result; the local
        decoder emits the logits.
        """
        t = state.pos
        if (prev is None) != (t == 0):
            raise ValueError(f"step at position {t}: prev must be {'None' if t == 0 else 'the byte at t-1 [B]'}")
        if t >= state.max_len:
            raise ValueError(f"state is full: max_len {state.max_len} positions decoded")
        self.reserve_patches(state, t + 1)
        logits = self._decode_step(state, state.modality if prev is None else prev)
        state.pos = t + 1
        return logits

    def prepare_block(self, state: BLTState) -> bool:
        """Host-side preparation of ``decode_block`` at ``state.pos`` (raises if it cannot run):
        makes the latent caches hold its patches. True when they were reallocated, i.e. a CUDA
        graph captured before must be captured again. Calling it again changes nothing."""
        t, n = state.pos, self.decode_block_size
        if t == 0:
            raise ValueError("decode_block needs the byte before it: start with step or prefill")
        if t + n > state.max_len:
            raise ValueError(f"state is full: position {t} + block of {n} > max_len {state.max_len}")
        return self.reserve_patches(state, t + n)

    def decode_block(
        self, state: BLTState, prev: torch.Tensor, sample: Callable[[torch.Tensor, int], torch.Tensor]
    ) -> torch.Tensor:
        """Decode ``decode_block_size`` bytes from ``state.pos``: byte j drawn by
        ``sample(logits [B, V], j) -> ids [B]`` and fed to step j+1. ``prev`` [B]: the bytes at
        ``state.pos - 1``. Returns the bytes [B, n] and advances ``state.pos`` by n.

        After ``prepare_block`` the host does the same thing for every block, with no syncs and
        fixed shapes: one CUDA graph captured on any block replays every later one until the
        latent caches grow (``models/generate.py``)."""
        self.prepare_block(state)
        out = []
        for j in range(self.decode_block_size):
            prev = sample(self._decode_step(state, prev), j)
            out.append(prev)
        state.pos += self.decode_block_size
        return torch.stack(out, 1)  # n x [B] -> [B, n]

    def reserve_patches(self, state: BLTState, until: int) -> bool:
        """Make the latent caches hold every patch the steps before position ``until`` may start
        (each step starts at most one per row). The host keeps an upper bound of the patch
        count and reads the true one (a sync) only when the bound exceeds the capacity; then
        the caches grow by ``LATENT_GROWTH`` until they hold the bound, to at most max_len + 1
        slots. True when they were reallocated."""
        if until <= state.reserved_to:
            return False
        capacity, moved = state.cache.latent[0].capacity, False
        bound = state.patch_bound + until - state.reserved_to
        if bound > capacity:
            bound = int(state.num_patches.max()) + until - state.pos
            if bound > capacity:  # at most max_len + 1 slots: one patch per position, one throwaway
                while capacity < bound:
                    capacity = max(int(capacity * LATENT_GROWTH), capacity + 1)
                capacity = min(capacity, state.max_len + 1)
                for cache in state.cache.latent:
                    cache.grow(capacity)
                moved = True
        state.patch_bound, state.reserved_to = bound, until
        return moved

    def _decode_step(self, state: BLTState, u: torch.Tensor) -> torch.Tensor:
        """One position: input u [B] (the tag at position 0, else the previous byte) -> logits [B, V]."""
        starts, pooled, enc = self.decode_front(state, u.contiguous())  # one layout for compiled steps
        return self.decode_back(state, self.decode_latent(state, pooled), starts, enc)

    def decode_front(self, state: BLTState, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Device work of a step before the latent model, at fixed shapes (a pipeline may
        torch.compile it): the entropy model and the local encoder take input u [B] at
        position ``t``; whether byte t starts a patch; the open input patch (inputs
        ``open_start``..t) pooled. -> (starts [B] bool, pooled [B, 1, D_G], encoder state [B, 1, D_E])."""
        c = self.config
        t, hist = state.t, state.history
        hist.copy_(torch.cat([hist[:, 1:], u[:, None].to(hist.dtype)], dim=1))  # [B, H]: newest last
        entropy = None
        if c.patcher.needs_entropies:
            entropy = step_entropies(self.entropy_model, u[:, None], state.cache.entropy)[:, 0]
        starts = self._starts(state, entropy)
        n_max = max(c.hash_ngrams.sizes)
        x = self.embed(hist[:, -1:], history=hist[:, hist.shape[1] - n_max : -1])  # [B, 1, D_E]
        states = self.encode_bytes(x, caches=state.cache.encoder)
        slot = (t % state.ring_pos.shape[0])[None]  # [1]
        for ring, h in zip(state.enc_ring, states[-len(self.enc_cross) :]):
            ring.index_copy_(1, slot, h.to(ring.dtype))
        state.ring_pos.index_copy_(0, slot, t[None])
        outside = (state.ring_pos[None, :] < state.open_start[:, None]).long()  # [B, R]: 0 = open patch
        pooled = self.encode_patches(state.enc_ring, outside, 1)  # [B, 1, D_G]; id 1 is ignored
        return starts, pooled, states[-1]

    def decode_latent(self, state: BLTState, pooled: torch.Tensor) -> torch.Tensor:
        """One latent step of every row at its own patch index, over the latent caches: pooled
        [B, 1, D_G] -> [B, 1, D_G] (before the final norm). Its shapes follow the caches'
        capacity (compilable with dynamic shapes: ``growing_steps``)."""
        slot = state.num_patches
        keys = state.cache.latent[0].slots
        mask = AttentionMask(1, len(keys), dense=(keys <= slot[:, None])[:, None, None, :])  # [B, 1, 1, C]
        x = pooled
        for block, cache in zip(self.latent_blocks, state.cache.latent):
            x = block(x, positions=slot[:, None], mask_mod=mask, causal=True, cache=cache)
        return x

    def decode_back(
        self, state: BLTState, latent: torch.Tensor, starts: torch.Tensor, enc: torch.Tensor
    ) -> torch.Tensor:
        """Device work of a step after the latent model, at fixed shapes (compilable): the rows
        that start a patch take its decoder slots and close their input patch; the local
        decoder reads encoder state ``enc`` [B, 1, D_E] -> logits [B, V]; ``t`` advances."""
        new = self.decoder_slots(self.latent_norm(latent))  # [B, k, D_D]
        state.slots.copy_(torch.where(starts[:, None, None], new.to(state.slots.dtype), state.slots))
        state.num_patches.add_(starts.long())
        state.open_start.copy_(torch.where(starts, state.t + 1, state.open_start))
        logits = self.decode(enc, state.slots, None, caches=state.cache.decoder)  # [B, 1, V]
        state.t.add_(1)
        return logits[:, 0]

    def _starts(self, state: BLTState, entropy: torch.Tensor | None) -> torch.Tensor:
        """Whether byte t starts a patch, per row [B] bool: ``patching.patch_starts`` evaluated
        at its newest position only, from bytes < t and the entropy of byte t (device ops only)."""
        p, t = self.config.patcher, state.t
        B = state.history.shape[0]
        if p.kind == "strided":
            start = t % p.patch_size == 0
            if p.max_patch_len is not None:
                start = start | (t % p.patch_size % p.max_patch_len == 0)
            return start.expand(B)
        prev = torch.where(t >= 1, state.history[:, -1], -1)  # byte t-1 (input t); -1 before the start
        prev2 = torch.where(t >= 2, state.history[:, -2], -1)  # byte t-2
        if p.kind == "space":
            start = patching.is_space_like(prev) & ~patching.is_space_like(prev2)
        else:
            score = entropy.float()
            if p.kind == "entropy_relative":
                score = score - state.entropy
            state.entropy.copy_(entropy)
            start = score > p.threshold
        if p.split_after_special:
            start = start | ((prev >= patching.NUM_BYTES) & (prev != p.pad_id))
        not_after_pad = prev != p.pad_id
        if p.first_patch_len_one:
            start = start | (t == 1)
        start = (start & not_after_pad) | (t == 0)
        if p.max_patch_len is not None:
            state.content_start.copy_(torch.where(start, t, state.content_start))
            start = start | (((t - state.content_start) % p.max_patch_len == 0) & not_after_pad)
        return start

    @torch.no_grad()
    def prefill(self, state: BLTState, ids: torch.Tensor) -> torch.Tensor:
        """Feed a prompt ids [B, n] into a fresh state, one byte at a time; returns logits
        [B, n+1, V] for positions 0..n and leaves ``state.pos = n + 1`` (next: ``step(state, byte_n)``)."""
        if state.pos != 0:
            raise ValueError(f"prefill needs a fresh state (pos 0), got pos {state.pos}")
        n = ids.shape[1]
        if n + 1 > state.max_len:
            raise ValueError(f"prompt of {n} bytes needs max_len >= {n + 1}, state has {state.max_len}")
        if bool((ids == self.config.pad_id).any()):  # no max-length cut after a PAD: the ring would overflow
            raise ValueError(f"prompt holds PAD ({self.config.pad_id}): padding is never inside a stream")
        out = [self.step(state, None if t == 0 else ids[:, t - 1]) for t in range(n + 1)]
        return torch.stack(out, dim=1)

    # --- accounting ---------------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Trainable parameters: the frozen entropy model is not counted."""
        return sum(
            p.numel()
            for name, p in self.named_parameters()
            if not name.startswith("entropy_model.")
            and not (exclude_embeddings and name.startswith("embed."))
        )

    def flops_per_byte(self, mean_patch_len: float | None = None) -> float:
        """Training FLOPs per byte at ``max_seq_len`` (see models/flops.py for the conventions).

        ``mean_patch_len``: default the last forward's measured mean (non-PAD bytes per patch,
        ``aux``), else ``patcher.patch_size``. The BLT part counts 3× its forward; the frozen
        entropy model only its forward (no backward through it).
        """
        c = self.config
        if mean_patch_len is None:
            if self.aux:
                mean_patch_len = self.aux["num_bytes"].item() / max(self.aux["num_patches"].item(), 1)
            else:
                mean_patch_len = float(c.patcher.patch_size)
        T, L, k = c.max_seq_len, float(mean_patch_len), c.cross_attn_k
        P = T / L  # patches per window
        E, G, Dd = c.encoder, c.latent, c.decoder

        def cross_flops(layers: nn.ModuleList, per_byte: tuple[str, ...], per_slot: tuple[str, ...], d: int):
            # per byte: its own projections, the slot projections amortised over the patch
            # (k slots per L bytes), and k (query, key) pairs in either direction
            total = 0.0
            for x in layers:
                lin = x.attn.projection_flops()
                total += sum(lin[n] for n in per_byte) + k / L * sum(lin[n] for n in per_slot)
                total += attention_flops(k, d)
            return total

        forward = (
            linear_flops(self.enc_blocks)
            + E.n_layers * attention_flops(attention_pairs(T, window=E.window), E.dim) / T
            + cross_flops(self.enc_cross, ("wk", "wv"), ("wq", "wo"), E.dim)
            + (linear_flops(self.pool_proj) + linear_flops(self.to_latent)) / L
            + linear_flops(self.latent_blocks) / L
            + G.n_layers * attention_flops(P * (P + 1) / 2, G.dim) / T
            + linear_flops(self.to_decoder) / L
            + linear_flops(self.enc_to_dec)
            + cross_flops(self.dec_cross, ("wq", "wo"), ("wk", "wv"), Dd.dim)
            + linear_flops(self.dec_blocks)
            + Dd.n_layers * attention_flops(attention_pairs(T, window=Dd.window), Dd.dim) / T
            + linear_flops(self.head)
        )
        total = TRAIN_FACTOR * forward
        if c.patcher.needs_entropies:
            total += self.entropy_model.flops_per_byte() / TRAIN_FACTOR
        return total
