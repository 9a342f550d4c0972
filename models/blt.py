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

Incremental decoding: ``models/blt_decoding.py``, a mixin of `BLT`; hashed n-gram embeddings:
``models/hash_ngrams.py``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from . import patching
from .base import ByteLM, ByteLMConfig, dataclass_from_dict
from .blt_decoding import BLTDecoding
from .entropy import compute_entropies
from .flops import TRAIN_FACTOR, attention_flops, attention_pairs, linear_flops
from .hash_ngrams import HashNgramConfig, HashNgramEmbedding
from .kv_cache import LayerCache
from .layers import Block, CrossAttention, OutputMask, RMSNorm, RoPE, checked_output_ids, init_residual_projections
from .masks import AttentionMask, prepare_mask, sliding_window_mask
from .patching import PatcherConfig
from .transformer import PRESETS as TRANSFORMER_PRESETS
from .transformer import Transformer, TransformerConfig


# --- configuration ----------------------------------------------------------------------------
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
    encoder_cross_all_layers: bool | None = None  # the encoder's own flag; None = cross_attn_all_layers
    decoder_cross_all_layers: bool | None = None  # the decoder's own flag; None = cross_attn_all_layers
    # q + (q + attn) instead of q + attn in every cross-attention (transformers' BLT; blt_hf.py)
    cross_attn_double_residual: bool = False
    latent_norm: bool = True  # RMSNorm after the latent transformer (transformers' BLT has none)
    # Ids whose logit is always -inf: an imported model's vocabulary has no output for them.
    unused_outputs: tuple[int, ...] = ()
    # Frozen entropy model (a windowed flat Transformer) for entropy patching; its weights are
    # loaded later into ``model.entropy_model``. None for strided / space patching.
    entropy_model: TransformerConfig | None = None
    rope_theta: float = 10000.0  # RoPE base of all self-attention (bytes and patches)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    init_std: float = 0.02  # normal init std; residual output projections get std/sqrt(2·layers)

    def __post_init__(self) -> None:
        # Accept plain dicts for the nested parts (YAML / config.json round trips).
        for name, cls in (
            ("patcher", PatcherConfig),
            ("hash_ngrams", HashNgramConfig),
            ("encoder", LocalConfig),
            ("latent", LatentConfig),
            ("decoder", LocalConfig),
        ):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, dataclass_from_dict(cls, value))
        if isinstance(self.entropy_model, dict):
            self.entropy_model = dataclass_from_dict(TransformerConfig, self.entropy_model)
        if self.patcher.needs_entropies and self.entropy_model is None:
            raise ValueError(
                f"{self.patcher.kind} patching needs an entropy model: set entropy_model to a "
                "TransformerConfig (e.g. entropy.entropy_model_config()) or use kind 'space' / 'strided'"
            )
        if self.patcher.pad_id != self.pad_id:
            raise ValueError(f"patcher.pad_id {self.patcher.pad_id} != pad_id {self.pad_id}")
        self.unused_outputs = checked_output_ids(self.unused_outputs, self.vocab_size)
        if self.cross_attn_k < 1 or self.max_seq_len < 1:
            raise ValueError(
                f"need cross_attn_k >= 1 and max_seq_len >= 1, got {self.cross_attn_k}, {self.max_seq_len}"
            )

    def cross_layers(self, decoder: bool) -> int:
        """Cross-attention layers of the encoder (after its last ones) or decoder (before its first)."""
        flag = self.decoder_cross_all_layers if decoder else self.encoder_cross_all_layers
        every = self.cross_attn_all_layers if flag is None else flag
        return (self.decoder if decoder else self.encoder).n_layers if every else 1


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


# --- building blocks --------------------------------------------------------------------------
def _local_mask(window: int, n: int, device) -> AttentionMask | None:
    """Windowed causal self-attention mask over n positions; None (plain causal) if window >= n."""
    return None if window >= n else prepare_mask(sliding_window_mask(window), None, n, n, device)


def _patch_max_pool(h: torch.Tensor, patch_ids: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Max over each patch's positions: h [B, T, D], patch_ids [B, T] -> [B, P, D] (0 for empty
    patches; positions with patch id >= P are ignored)."""
    B, T, D = h.shape
    idx = patch_ids.clamp(max=num_patches)[..., None].expand(B, T, D)
    out = h.new_zeros(B, num_patches + 1, D)  # one extra row collects the ignored positions
    return out.scatter_reduce(1, idx, h, reduce="amax", include_self=False)[:, :num_patches]


# --- the model --------------------------------------------------------------------------------
class BLT(BLTDecoding, ByteLM):
    """Byte Latent Transformer (see module docstring)."""

    backbone = "blt"  # registry name (models/__init__.py)

    def __init__(self, config: BLTConfig) -> None:
        super().__init__()
        self.config = c = config
        E, G, Dd, k = c.encoder, c.latent, c.decoder, c.cross_attn_k
        self.embed = HashNgramEmbedding(c.vocab_size, E.dim, c.hash_ngrams)
        enc_rope = RoPE(E.dim // E.n_heads, c.rope_theta)
        self.enc_blocks = nn.ModuleList(
            Block(E.dim, E.n_heads, None, enc_rope, E.mlp_hidden, c.norm_eps, c.dropout) for _ in range(E.n_layers)
        )
        double = c.cross_attn_double_residual
        self.pool_proj = nn.Linear(E.dim, k * E.dim, bias=False)  # max-pooled patch -> k queries
        self.enc_cross = nn.ModuleList(
            CrossAttention(E.dim, E.n_heads, c.norm_eps, double) for _ in range(c.cross_layers(decoder=False))
        )
        self.to_latent = nn.Linear(k * E.dim, G.dim, bias=False)
        lat_rope = RoPE(G.dim // G.n_heads, c.rope_theta)
        self.latent_blocks = nn.ModuleList(
            Block(G.dim, G.n_heads, G.n_kv_heads, lat_rope, G.mlp_hidden, c.norm_eps, c.dropout)
            for _ in range(G.n_layers)
        )
        self.latent_norm = RMSNorm(G.dim, eps=c.norm_eps) if c.latent_norm else nn.Identity()
        self.to_decoder = nn.Linear(G.dim, k * Dd.dim, bias=False)  # latent state -> k slots
        self.enc_to_dec = nn.Identity() if E.dim == Dd.dim else nn.Linear(E.dim, Dd.dim, bias=False)
        dec_rope = RoPE(Dd.dim // Dd.n_heads, c.rope_theta)
        self.dec_cross = nn.ModuleList(
            CrossAttention(Dd.dim, Dd.n_heads, c.norm_eps, double) for _ in range(c.cross_layers(decoder=True))
        )
        self.dec_blocks = nn.ModuleList(
            Block(Dd.dim, Dd.n_heads, None, dec_rope, Dd.mlp_hidden, c.norm_eps, c.dropout) for _ in range(Dd.n_layers)
        )
        self.dec_norm = RMSNorm(Dd.dim, eps=c.norm_eps)
        self.head = nn.Linear(Dd.dim, c.vocab_size, bias=False)
        self.output_mask = OutputMask(c.unused_outputs)
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
        return patching.patch(ids, self.config.patcher, entropies, modality)

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

    @torch.no_grad()
    def calibrate_thresholds(
        self, ids: torch.Tensor, modality: torch.Tensor, targets: dict[int, float] | None = None
    ) -> dict[int, float]:
        """One threshold per modality tag in ``modality`` [B]: the one that gives that tag's rows
        of ``ids`` [B, T] the target mean patch length (``targets[tag]``, default
        ``patcher.patch_size``). Stored in ``patcher.thresholds`` (other tags keep theirs)."""
        p = self.config.patcher
        if not p.needs_entropies:
            raise ValueError(f"calibrate_thresholds needs entropy patching, not {p.kind!r}")
        entropies = compute_entropies(self.entropy_model, ids, modality)
        found = {}
        for tag in sorted(set(modality.tolist())):
            rows = modality == tag
            target = (targets or {}).get(tag)
            found[tag] = patching.find_threshold(entropies[rows], target, ids[rows], p)
        p.thresholds = {**(p.thresholds or {}), **found}
        return found

    def encode_bytes(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        caches: list[LayerCache] | None = None,
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
        used = states[-len(self.enc_cross) :]  # all layers, or only the last
        pooled = _patch_max_pool(used[0], input_patch_ids, num_patches)  # [B, P, D_E]
        queries = self.pool_proj(pooled).view(B, num_patches * k, D)  # [B, P, k*D] -> [B, P*k, D]

        def own_patch(b, h, q_idx, kv_idx):
            return input_patch_ids[b, kv_idx] == q_idx // k

        mask = prepare_mask(own_patch, B, num_patches * k, n, queries.device)
        for cross, h in zip(self.enc_cross, used):
            queries = cross(queries, h, mask)
        # [B, P*k, D] -> [B, P, k*D] -> [B, P, D_G]
        return self.to_latent(queries.view(B, num_patches, k * D))

    def latent_states(
        self,
        patches: torch.Tensor,
        positions: torch.Tensor | None = None,
        caches: list[LayerCache] | None = None,
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

    def decode_bytes(
        self,
        enc_states: torch.Tensor,
        slots: torch.Tensor,
        patch_ids: torch.Tensor | None,
        positions: torch.Tensor | None = None,
        caches: list[LayerCache] | None = None,
    ) -> torch.Tensor:
        """Local decoder: encoder states [B, n, D_E] of the inputs, slots [B, P*k, D_D] and the
        patch of every target [B, n] (byte t reads the slots of latent state patch_ids[t]) ->
        logits [B, n, V]. ``caches`` (``BLTCache.decoder``): continue a stream."""
        k = self.config.cross_attn_k
        B, n, _ = enc_states.shape

        def state_before_own_patch(b, h, q_idx, kv_idx):
            return kv_idx // k == patch_ids[b, q_idx]

        # no patch ids: one byte per row reading all k slots (incremental decoding)
        cross_mask = None
        if patch_ids is not None:
            cross_mask = prepare_mask(state_before_own_patch, B, n, slots.shape[1], slots.device)
        self_mask = None if caches else _local_mask(self.config.decoder.window, n, enc_states.device)
        h = self.enc_to_dec(enc_states)
        for i, block in enumerate(self.dec_blocks):
            if i < len(self.dec_cross):
                h = self.dec_cross[i](h, slots, cross_mask)
            cache = caches[i] if caches else None
            h = block(h, positions=positions, mask_mod=self_mask, causal=True, cache=cache)
        return self.output_mask(self.head(self.dec_norm(h)))

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
        latent = self.latent_states(self.encode_patches(states, input_patch_ids, P))
        logits = self.decode_bytes(states[-1], self.decoder_slots(latent), patch_ids)
        n_patches, n_bytes = patching.patch_counts(patch_ids, ids, self.config.pad_id)
        self.aux = {"num_patches": n_patches, "num_bytes": n_bytes}
        return logits

    # --- accounting ---------------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Trainable parameters: the frozen entropy model is not counted."""
        return sum(
            p.numel()
            for name, p in self.named_parameters()
            if not name.startswith("entropy_model.") and not (exclude_embeddings and name.startswith("embed."))
        )

    @property
    def fixed_patch_len(self) -> int | None:
        patcher = self.config.patcher
        return patcher.patch_size if patcher.kind == "strided" else None

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
