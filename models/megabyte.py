"""MEGABYTE (Yu et al. 2023, "MEGABYTE: Predicting Million-byte Sequences with Multiscale
Transformers"): a large global transformer over patches of P bytes and a small local
transformer that predicts the bytes inside each patch.

Data flow for ids [B, T] (T = K·P):

1. Patch embedder: ``h = E_global[ids] + E_pos[t]`` ([B, T, D_G]), concatenated per patch into
   [B, K, P·D_G].
2. Global decoder (width P·D_G, causal over the K patches) on the patches shifted right by one;
   position 0 holds a trainable pad patch chosen by the row's modality tag, so the first payload
   byte starts patch 0 and the tag never occupies a grid position.
3. Shared projection: the global output of patch k, [P·D_G], is split into P slices of D_G, one
   per byte position, each mapped D_G -> D_L by the same linear map.
4. Local decoder (width D_L, causal over the P bytes of one patch, all B·K patches as one
   batch): input at byte j = E_local[byte j-1 of the patch] (a trainable pad byte at j = 0)
   + projected global slice j. Optional cross-patch attention: every local layer also attends to
   the previous patch's last r keys/values of that layer.
5. RMSNorm + linear head -> logits [B, T, V].

Incremental decoding (for generation): ``models/megabyte_decoding.py``, a mixin of `Megabyte`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import flops, tokens
from .base import ByteLM, ByteLMConfig
from .kv_cache import LayerCache
from .layers import Block, RMSNorm, RoPE, init_normal, init_residual_projections
from .masks import FLEX_BLOCK, block_diagonal_mask, prepare_mask, use_flex
from .megabyte_decoding import MegabyteDecoding


@dataclasses.dataclass
class MegabyteConfig(ByteLMConfig):
    """Defaults are the ``tiny`` preset. See PRESETS for small (~30M) and base (~170M)."""

    patch_size: int = 8  # P: bytes per patch; seq_len must be a multiple of it
    global_dim: int = 16  # D_G: per-byte width of the patch embedder; global width is P·D_G
    global_layers: int = 2  # transformer blocks of the global (patch-level) decoder
    global_heads: int = 2  # attention heads of the global decoder (P·D_G must divide evenly)
    local_dim: int = 64  # D_L: width of the local (byte-level) decoder
    local_layers: int = 2  # transformer blocks of the local decoder
    local_heads: int = 2  # attention heads of the local decoder
    max_seq_len: int = 16384  # longest window in bytes (size of the learned position table)
    # Learned absolute byte positions added in the patch embedder, as the paper (E^pos). They give
    # the global model absolute position; set False to rely on RoPE alone (saves
    # max_seq_len·D_G parameters).
    learned_pos: bool = True
    # RoPE base for both decoders (global: over patch index; local: over byte-in-patch). The paper
    # used learned positions only; RoPE is the better-performing modern default. 0 turns it off.
    rope_theta: float = 10000.0
    # Cross-patch attention (paper's variant): local layers also attend to the last r bytes of the
    # previous patch (its keys/values in the same layer). 0 = off (the paper's default model);
    # 1 <= r <= patch_size.
    cross_patch_r: int = 0
    # Activation checkpointing: in training, keep only each block's input and recompute the block
    # in the backward pass (about a third more compute for far less activation memory; what lets
    # million-byte windows train on one GPU, configs/text-megabyte-1m.yaml).
    activation_checkpointing: bool = False
    first_tag_id: int = tokens.FIRST_TAG  # id of the first modality tag (258 text, 259 image, 260 audio, ...)
    num_tags: int = tokens.NUM_TAGS  # modality tags first_tag_id .. first_tag_id+num_tags-1 get a pad patch each
    norm_eps: float = 1e-5  # RMSNorm epsilon
    # Std of the normal init of every weight; residual output projections (attention wo, MLP w2)
    # are scaled by 1/sqrt(2·layers) of their decoder (GPT-2), norms start at 1.
    init_std: float = 0.02

    def __post_init__(self) -> None:
        P = self.patch_size
        if P < 1:
            raise ValueError(f"patch_size must be >= 1, got {P}")
        if (P * self.global_dim) % self.global_heads:
            raise ValueError(
                f"global width patch_size*global_dim = {P * self.global_dim} is not divisible by "
                f"global_heads = {self.global_heads}"
            )
        if self.local_dim % self.local_heads:
            raise ValueError(f"local_dim {self.local_dim} is not divisible by local_heads {self.local_heads}")
        if not 0 <= self.cross_patch_r <= P:
            raise ValueError(f"cross_patch_r must be in [0, patch_size={P}], got {self.cross_patch_r}")
        if self.max_seq_len % P:
            raise ValueError(f"max_seq_len {self.max_seq_len} must be a multiple of patch_size {P}")


# Shipped sizes (learned_pos on, max_seq_len 16384, V = 264; counts from num_params(), FLOPs from
# flops_per_byte(seq_len=8192 text / 12,296 ImageNet64 = 12,288 payload + EOS padded to 8·1537):
#   tiny    835,456 params (global 2 x 128, local 2 x 64; 262k of it the position table)
#           1.27e6 / 1.37e6 training FLOPs per byte
#   small   30,132,736 params (global 8 x 512, local 4 x 256; global 85%)
#           4.22e7 / 4.38e7 training FLOPs per byte
#   base    173,554,688 params (global 12 x 1024, local 6 x 512; global 87.5%)
#           2.40e8 / 2.45e8 training FLOPs per byte
PRESETS: dict[str, MegabyteConfig] = {
    "tiny": MegabyteConfig(),
    "small": MegabyteConfig(
        patch_size=8,
        global_dim=64,
        global_layers=8,
        global_heads=8,
        local_dim=256,
        local_layers=4,
        local_heads=4,
    ),
    "base": MegabyteConfig(
        patch_size=8,
        global_dim=128,
        global_layers=12,
        global_heads=16,
        local_dim=512,
        local_layers=6,
        local_heads=8,
    ),
}


class Megabyte(MegabyteDecoding, ByteLM):
    """MEGABYTE byte LM; see the module docstring for the architecture."""

    backbone = "megabyte"  # registry name (models/__init__.py)

    def __init__(self, config: MegabyteConfig) -> None:
        super().__init__()
        self.config = c = config
        P, Dg, Dl = c.patch_size, c.global_dim, c.local_dim
        Wg = P * Dg  # global width
        self.global_embed = nn.Embedding(c.vocab_size, Dg)
        self.pos_embed = nn.Embedding(c.max_seq_len, Dg) if c.learned_pos else None
        self.pad_patch = nn.Parameter(torch.empty(c.num_tags, Wg))  # trainable start patch per tag
        g_rope = RoPE(Wg // c.global_heads, c.rope_theta) if c.rope_theta else None
        self.global_blocks = nn.ModuleList(
            Block(Wg, c.global_heads, rope=g_rope, norm_eps=c.norm_eps, dropout=c.dropout)
            for _ in range(c.global_layers)
        )
        self.global_norm = RMSNorm(Wg, eps=c.norm_eps)
        self.proj = nn.Linear(Dg, Dl, bias=False)  # shared over the P byte slices
        self.local_embed = nn.Embedding(c.vocab_size, Dl)
        self.pad_byte = nn.Parameter(torch.empty(Dl))  # local input at byte 0 of every patch
        l_rope = RoPE(Dl // c.local_heads, c.rope_theta) if c.rope_theta else None
        self.local_blocks = nn.ModuleList(
            Block(Dl, c.local_heads, rope=l_rope, norm_eps=c.norm_eps, dropout=c.dropout) for _ in range(c.local_layers)
        )
        self.local_norm = RMSNorm(Dl, eps=c.norm_eps)
        self.head = nn.Linear(Dl, c.vocab_size, bias=False)
        self._init_weights()

    @property
    def seq_multiple(self) -> int:
        return self.config.patch_size

    @property
    def fixed_patch_len(self) -> int | None:
        return self.config.patch_size

    def _init_weights(self) -> None:
        std = self.config.init_std
        init_normal(self, std)
        nn.init.normal_(self.pad_patch, std=std)
        nn.init.normal_(self.pad_byte, std=std)
        for blocks in (self.global_blocks, self.local_blocks):
            init_residual_projections(blocks, std, len(blocks))

    # --- shared pieces ------------------------------------------------------------------------
    def _tag_index(self, modality: torch.Tensor, B: int) -> torch.Tensor:
        c = self.config
        if modality.shape != (B,):
            raise ValueError(f"modality must have shape [B]=[{B}], got {list(modality.shape)}")
        idx = modality - c.first_tag_id
        if not torch.compiler.is_compiling() and ((idx < 0) | (idx >= c.num_tags)).any():
            raise ValueError(
                f"modality tags must be ids {c.first_tag_id}..{c.first_tag_id + c.num_tags - 1} "
                f"(258 text, 259 image, 260 audio), got {modality.tolist()}"
            )
        return idx

    def _check_len(self, T: int) -> None:
        c = self.config
        if T % c.patch_size:
            k = -(-T // c.patch_size)
            raise ValueError(
                f"MEGABYTE needs seq_len to be a multiple of patch_size: seq_len={T}, "
                f"patch_size={c.patch_size}. Pad the window with PAD ({c.pad_id}) to "
                f"{k * c.patch_size} or choose seq_len/patch_size so that one divides the other."
            )
        if T > c.max_seq_len:
            raise ValueError(f"seq_len {T} exceeds max_seq_len {c.max_seq_len}; raise max_seq_len")

    def _embed_patches(self, ids: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """ids [B, n·P] at byte positions start.. -> patch vectors [B, n, P·D_G]. ``start`` may be
        a 0-dim device tensor (CUDA-graph decoding, where the patch index lives on the device)."""
        B, T = ids.shape
        h = self.global_embed(ids)  # [B, T, D_G]
        if self.pos_embed is not None and isinstance(start, torch.Tensor):
            h = h + self.pos_embed(start + torch.arange(T, device=ids.device))
        elif self.pos_embed is not None:
            h = h + self.pos_embed.weight[start : start + T]
        return h.reshape(B, T // self.config.patch_size, -1)  # [B, T, D_G] -> [B, T/P, P*D_G]

    def _run_global(self, x: torch.Tensor, caches: list[LayerCache] | None) -> torch.Tensor:
        """Global decoder on patch inputs x [B, n, P·D_G] at patch positions 0.. (no caches) or
        continuing the caches; returns the projected conditioning [B, n, P, D_L]."""
        B, n, _ = x.shape
        positions = None if caches is not None else torch.arange(n, device=x.device)  # caches know theirs
        for i, blk in enumerate(self.global_blocks):
            if caches is None and self._checkpointing():
                x = checkpoint(blk, x, use_reentrant=False, positions=positions, causal=True)
            else:
                x = blk(x, positions=positions, causal=True, cache=None if caches is None else caches[i])
        x = self.global_norm(x)
        x = x.view(B, n, self.config.patch_size, self.config.global_dim)  # [B, n, P*D_G] -> [B, n, P, D_G]
        return self.proj(x)  # [B, n, P, D_L]

    def _local_input(self, ids: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """ids [B, K·P], cond [B, K, P, D_L] -> local decoder input [B·K, P, D_L]."""
        B, K, P, Dl = cond.shape
        emb = self.local_embed(ids.view(B, K, P)[:, :, :-1])  # byte j-1 of each patch, [B, K, P-1, D_L]
        pad = self.pad_byte.to(emb.dtype).expand(B, K, 1, Dl)
        x = torch.cat([pad, emb], dim=2) + cond  # [B, K, P, D_L]
        return x.reshape(B * K, P, Dl)  # [B, K, P, D_L] -> [B*K, P, D_L]

    def _run_local(self, x: torch.Tensor, K: int, keep_inputs: bool = False):
        """Local decoder over all patches: x [B·K, P, D_L] -> (logits [B·K, P, V], layer inputs
        [L, B·K, P, D_L] if keep_inputs else None).

        Without cross-patch attention on CUDA, when patches tile 128-byte blocks, the B·K
        attentions of P bytes run as one FlexAttention per row over its K·P bytes with a
        block-diagonal causal mask (only the diagonal 128x128 tiles are computed; as separate
        P-byte problems every kernel tile would be >98% padding). Otherwise they run per patch."""
        r, P = self.config.cross_patch_r, self.config.patch_size
        BK, _, Dl = x.shape
        # patches must tile FlexAttention's 128-byte blocks exactly (P divides 128, K·P a multiple of it)
        flat = not r and use_flex(x.device, K * P) and FLEX_BLOCK % P == 0 and (K * P) % FLEX_BLOCK == 0
        if flat:  # [B*K, P, D_L] -> [B, K*P, D_L]; RoPE positions restart at every patch
            x = x.reshape(BK // K, K * P, Dl)
            pos = torch.arange(K * P, device=x.device) % P
            mask = block_diagonal_mask(P, K * P, x.device)
        else:
            pos = torch.arange(r, r + P, device=x.device)
        if r:  # one mask for every layer, rows b*K + k: [B*K, 1, P, r+P]
            mask = prepare_mask(_cross_patch_mask(r, K), BK, P, r + P, x.device)

        def layer(x, blk):  # one local block: [B*K, P, D_L] (flat: [B, K*P, D_L]) -> same
            h = blk.attn_norm(x)
            if r:
                # last r normed inputs of each patch: [B*K, P, D_L] -> [B, K, r, D_L], moved one
                # patch later (patch 0 gets zeros, masked out) -> [B*K, r, D_L]
                tail = h.view(BK // K, K, P, Dl)[:, :, P - r :]
                tail = torch.cat([torch.zeros_like(tail[:, :1]), tail[:, :-1]], 1).reshape(BK, r, Dl)
                a = blk.attn(
                    h,
                    torch.cat([tail, h], 1),  # [B*K, r+P, D_L]
                    positions=pos,
                    kv_positions=torch.arange(r + P, device=x.device),
                    mask_mod=mask,
                    causal=False,
                )
            elif flat:
                a = blk.attn(h, positions=pos, mask_mod=mask)
            else:
                a = blk.attn(h, positions=pos, causal=True)
            x = x + a
            return x + blk.mlp(blk.mlp_norm(x))

        kept = []
        for blk in self.local_blocks:
            if keep_inputs:
                kept.append(x.reshape(BK, P, Dl))
            x = checkpoint(layer, x, blk, use_reentrant=False) if self._checkpointing() else layer(x, blk)
        logits = self.head(self.local_norm(x)).reshape(BK, P, -1)  # [B*K, P, V]
        return logits, (torch.stack(kept) if keep_inputs else None)

    def _checkpointing(self) -> bool:
        return self.config.activation_checkpointing and self.training and torch.is_grad_enabled()

    # --- training / scoring -------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """ids [B, T] (T a multiple of P), modality [B] -> logits [B, T, V]."""
        logits, _ = self._forward(ids, modality)
        return logits

    def _forward(self, ids, modality, global_caches=None, keep_inputs=False):
        B, T = ids.shape
        self._check_len(T)
        K = T // self.config.patch_size
        tag = self._tag_index(modality, B)
        patches = self._embed_patches(ids, 0)  # [B, K, P*D_G]
        pad = self.pad_patch[tag][:, None].to(patches.dtype)  # [B, 1, P*D_G]
        x = torch.cat([pad, patches[:, :-1]], 1)  # global input: shifted right by one patch
        cond = self._run_global(x, global_caches)  # [B, K, P, D_L]
        logits, kept = self._run_local(self._local_input(ids, cond), K, keep_inputs)
        return logits.view(B, T, -1), kept  # [B*K, P, V] -> [B, T, V]

    def flops_per_byte(self, mean_patch_len: float | None = None, *, seq_len: int | None = None) -> float:
        """Training FLOPs per byte at ``seq_len`` (default max_seq_len), by the conventions of
        ``flops.py`` (2 per multiply-add, attention per allowed query-key pair, 3 x forward):

          global, per patch:  2·(linear weights of the global blocks) + L_G·4·P·D_G·(K+1)/2
          local, per byte:    2·(linear weights of the local blocks)
                              + L_L·4·D_L·((P+1)/2 + r·(K-1)/K)      (patch 0 has no tail)
          per byte:           3 · [global/P + 2·D_G·D_L (projection) + local + 2·D_L·V (head)]

        with K = seq_len/P patches; a block's linear weights are 4·D² + 3·D·H_mlp. The global
        model runs once per patch, so its cost per byte is divided by P. MEGABYTE's patches are
        fixed, so ``mean_patch_len`` must be None or P.
        """
        c = self.config
        P, r = c.patch_size, c.cross_patch_r
        if mean_patch_len is not None and mean_patch_len != P:
            raise ValueError(f"MEGABYTE patches are fixed at patch_size={P}; got mean_patch_len={mean_patch_len}")
        T = c.max_seq_len if seq_len is None else seq_len
        self._check_len(T)
        K = T // P
        glob = K * flops.linear_flops(self.global_blocks) + c.global_layers * flops.attention_flops(
            flops.attention_pairs(K), P * c.global_dim
        )  # one sequence
        local_pairs = K * flops.attention_pairs(P) + (K - 1) * r * P  # causal in-patch + tails
        per_byte = sum(flops.linear_flops(mod) for mod in (self.proj, self.local_blocks, self.head))
        loc = T * per_byte + c.local_layers * flops.attention_flops(local_pairs, c.local_dim)
        return flops.training_flops((glob + loc) / T)


def _cross_patch_mask(r: int, K: int):
    """Local attention over [previous patch's last r bytes, this patch's P bytes]: causal with the
    r tail slots in front; patch 0 of each row (b % K == 0) has no previous patch."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + r) & ((kv_idx >= r) | (b % K != 0))

    return mask_mod
