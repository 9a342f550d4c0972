"""Transformer building blocks: RMSNorm, RoPE, SwiGLU, attention, the pre-norm block, init.

How a mask becomes a kernel call lives in models/masks.py, and the KV caches of incremental
decoding in models/kv_cache.py; ``Attention`` uses both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import LayerCache
from .masks import AttentionMask, MaskMod, masked_attention

RMSNorm = nn.RMSNorm  # torch's own (fused on CUDA); eps set by callers


# --- rotary position embedding ----------------------------------------------------------------
class RoPE(nn.Module):
    """Rotary embedding, rotate-half convention, applied to [B, H, T, Dh] at given positions.

    Computed in fp32 from absolute integer positions, so cached decoding (positions offset by
    the cache length) rotates exactly like the full forward.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device=None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.theta**exponents)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) would round the frequencies (angles off by ~distance·2^-9 rad):
        # they stay fp32, recomputed on the new device
        super()._apply(fn, recurse)
        self.inv_freq = self._inv_freq(self.inv_freq.device)
        return self

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, H, T, Dh]; positions [T] or [B, T] (integer) -> rotated x, same dtype."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq  # [.., T, Dh/2]
        cos, sin = freqs.cos(), freqs.sin()
        if positions.dim() == 2:  # [B, T, Dh/2] -> [B, 1, T, Dh/2]
            cos, sin = cos[:, None], sin[:, None]
        cos = torch.cat([cos, cos], dim=-1)  # [.., T, Dh/2] -> [.., T, Dh]
        sin = torch.cat([sin, sin], dim=-1)
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (x.float() * cos + rotated * sin).to(x.dtype)


# --- MLP --------------------------------------------------------------------------------------
class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x); hidden defaults to 8/3·dim rounded up to a multiple of 64.

    w1 and w3 are one [2·hidden, dim] matrix ``w13``: one matmul instead of two (decoding steps
    are a few rows, where each matmul's launch, not its FLOPs, costs)."""

    def __init__(self, dim: int, hidden: int | None = None, multiple_of: int = 64) -> None:
        super().__init__()
        if hidden is None:
            hidden = swiglu_hidden(dim, multiple_of)
        self.hidden = hidden
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)  # [.., 2*hidden] -> 2 x [.., hidden]
        return self.w2(F.silu(gate) * up)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _fuse_keys(state_dict, prefix, "w13", ["w1", "w3"])  # exports from before the fusion
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _fuse_keys(state_dict, prefix: str, fused: str, parts: list[str]) -> None:
    """Old checkpoints hold separate projections: stack ``parts`` into ``fused`` in place."""
    keys = [f"{prefix}{name}.weight" for name in parts]
    if all(k in state_dict for k in keys) and f"{prefix}{fused}.weight" not in state_dict:
        state_dict[f"{prefix}{fused}.weight"] = torch.cat([state_dict.pop(k) for k in keys])


def swiglu_hidden(dim: int, multiple_of: int = 64) -> int:
    """Default SwiGLU width: 8/3·dim (same parameters as a 4·dim GELU MLP), rounded up."""
    hidden = int(8 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# --- attention module -------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head (grouped-query) attention with optional RoPE, self- or cross-attention.

    forward(x, kv=None, positions=None, kv_positions=None, mask_mod=None, causal=True, cache=None)
      x [B, Tq, D]; kv [B, Tk, D_kv] for cross-attention (default: x, self-attention);
      positions [Tq] or [B, Tq]: RoPE positions of the queries (and keys, for self-attention);
        default arange(Tq), or the next positions of the cache when one is given;
      kv_positions: RoPE positions of cross-attention keys. Cross-attention applies RoPE only
        when kv_positions is given (rotating the queries alone encodes nothing);
      mask_mod: a mask_mod or prepared AttentionMask (then ``causal`` is ignored);
      cache: a ``LayerCache`` of this layer (self-attention only; models/kv_cache.py): new
        keys/values are stored and the queries attend over what the cache returns, with the
        mask the cache derives (by positions: chunked prefill into a non-empty cache stays
        causal; device caches and rings mask by position themselves and take no mask_mod).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        kv_dim: int | None = None,
        rope: RoPE | None = None,
    ) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        if n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {n_heads} not divisible by n_kv_heads {self.n_kv_heads}")
        self.head_dim = dim // n_heads
        self.dim, self.kv_dim = dim, kv_dim or dim
        self.q_size, self.kv_size = n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        # Projections fused into as few matmuls as the inputs allow (decoding steps are a few
        # rows: each matmul's launch costs more than its FLOPs): queries, keys and values from
        # one [q + 2·kv, dim] matrix when keys come from inputs of the same width, else queries
        # and [2·kv, kv_dim] keys+values apart. Cross-attention uses row slices (views) of it.
        if self.kv_dim == dim:
            self.wqkv = nn.Linear(dim, self.q_size + 2 * self.kv_size, bias=False)
        else:
            self.wq = nn.Linear(dim, self.q_size, bias=False)
            self.wkv = nn.Linear(self.kv_dim, 2 * self.kv_size, bias=False)
        self.wo = nn.Linear(self.q_size, dim, bias=False)
        self.rope = rope

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # exports from before the fusion hold wq, wk, wv apart
        if self.kv_dim == self.dim:
            _fuse_keys(state_dict, prefix, "wqkv", ["wq", "wk", "wv"])
        else:
            _fuse_keys(state_dict, prefix, "wkv", ["wk", "wv"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        """Queries [.., H·Dh] of x [.., dim]."""
        if self.kv_dim == self.dim:
            return F.linear(x, self.wqkv.weight[: self.q_size])
        return self.wq(x)

    def project_kv(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values, each [.., Hkv·Dh], of src [.., kv_dim]."""
        weight = self.wqkv.weight[self.q_size :] if self.kv_dim == self.dim else self.wkv.weight
        return F.linear(src, weight).split(self.kv_size, dim=-1)

    def projection_flops(self) -> dict[str, int]:
        """Forward FLOPs per row of each projection: {"wq", "wk", "wv", "wo"} (2·in·out each)."""
        q, kv = 2 * self.dim * self.q_size, 2 * self.kv_dim * self.kv_size
        return {"wq": q, "wk": kv, "wv": kv, "wo": 2 * self.q_size * self.dim}

    def forward(
        self,
        x: torch.Tensor,
        kv: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        kv_positions: torch.Tensor | None = None,
        mask_mod: MaskMod | AttentionMask | None = None,
        causal: bool = True,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        B, Tq, _ = x.shape
        self_attn = kv is None
        src = x if self_attn else kv
        Tk = src.shape[1]
        if self_attn and self.kv_dim == self.dim:  # one matmul: [B, Tq, q + 2*kv] -> q, k, v
            q, k, v = self.wqkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        else:
            q, (k, v) = self.project_q(x), self.project_kv(src)
        q = q.view(B, Tq, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, Tq, Dh]
        k = k.view(B, Tk, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, Tk, Dh]
        v = v.view(B, Tk, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:  # the protocol of models/kv_cache.py, in its order
            if not self_attn:
                raise ValueError(f"a {type(cache).__name__} is for self-attention: pass kv=None")
            cache.check(mask_mod, causal)
            q_pos = cache.next_positions(Tq)  # read before update
        if self.rope is not None and (self_attn or kv_positions is not None):
            if positions is None:
                positions = q_pos if cache is not None else torch.arange(Tq, device=x.device)
            q = self.rope(q, positions)
            k = self.rope(k, positions if self_attn else kv_positions)
        if cache is not None:
            k, v, kv_pos = cache.update(k, v)
            mask_mod, causal = cache.mask(q_pos, kv_pos, mask_mod, causal)
        out = masked_attention(q, k, v, mask_mod, causal=causal, gqa=self.n_kv_heads != self.n_heads)
        out = out.transpose(1, 2).reshape(B, Tq, self.n_heads * self.head_dim)  # [B, Tq, H*Dh]
        return self.wo(out)


class Block(nn.Module):
    """Pre-norm transformer block: x + drop(attn(norm(x))), then x + drop(mlp(norm(x))).

    ``dropout`` is residual dropout (GPT-2's, on each branch's output), active in training mode
    only; 0 leaves no module in the graph."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        rope: RoPE | None = None,
        mlp_hidden: int | None = None,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, n_heads, n_kv_heads, rope=rope)
        self.mlp_norm = RMSNorm(dim, eps=norm_eps)
        self.mlp = SwiGLU(dim, mlp_hidden)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), **attn_kwargs))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class CrossAttention(nn.Module):
    """Pre-norm cross-attention with a residual on the queries (no MLP, no RoPE), as in BLT:
    x + attn(norm(x), norm(kv)); ``double_residual``: x + (x + attn), as transformers' BLT."""

    def __init__(self, dim: int, n_heads: int, norm_eps: float, double_residual: bool = False) -> None:
        super().__init__()
        self.q_norm = RMSNorm(dim, eps=norm_eps)
        self.kv_norm = RMSNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, n_heads)
        self.double_residual = double_residual

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        out = self.attn(self.q_norm(x), self.kv_norm(kv), mask_mod=mask, causal=False)
        return x + (out + x) if self.double_residual else x + out


def checked_output_ids(ids, vocab_size: int) -> tuple[int, ...]:
    """Output ids to mask (a config's ``unused_outputs``), sorted and unique; ValueError outside the vocabulary."""
    ids = tuple(sorted(set(ids)))
    if any(not 0 <= i < vocab_size for i in ids):
        raise ValueError(f"unused_outputs must be ids in 0..{vocab_size - 1}, got {ids}")
    return ids


class OutputMask(nn.Module):
    """logits [.., V] with the ids in ``unused`` set to -inf (an imported model's outputs that its
    source has no row for); the identity when ``unused`` is empty."""

    def __init__(self, unused: tuple[int, ...]):
        super().__init__()
        ids = torch.tensor(unused, dtype=torch.long) if unused else None
        self.register_buffer("ids", ids, persistent=False)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.ids is None else logits.index_fill(-1, self.ids, float("-inf"))


def init_normal(module: nn.Module, std: float) -> None:
    """Normal(0, std) init of every Linear and Embedding weight under ``module``."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)


def init_residual_projections(blocks, std: float, depth: int) -> None:
    """GPT-2 init of the projections that write into the residual stream (attention ``wo``,
    MLP ``w2``): std / sqrt(2·depth), so the stream's variance stays flat over ``depth`` blocks."""
    for b in blocks:
        for w in (b.attn.wo.weight, b.mlp.w2.weight):
            nn.init.normal_(w, std=std / math.sqrt(2 * depth))
