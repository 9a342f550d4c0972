"""Shared layers: RMSNorm, RoPE, SwiGLU, attention (SDPA / FlexAttention) and the KV cache.

Masks other than plain causal are written once as FlexAttention ``mask_mod`` functions
``(b, h, q_idx, kv_idx) -> bool``. On CUDA they run through FlexAttention with a block mask; on
CPU (tests) the same function is evaluated on broadcast index tensors into a dense boolean mask
for SDPA, so both paths compute the same numbers.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

RMSNorm = nn.RMSNorm  # torch's own (fused on CUDA); eps set by callers


# --- rotary position embedding ----------------------------------------------------------------
class RoPE(nn.Module):
    """Rotary embedding, rotate-half convention, applied to [B, H, T, Dh] at given positions."""

    def __init__(self, head_dim: int, theta: float = 10000.0, max_len: int = 1 << 16) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.max_len = max_len

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, H, T, Dh]; positions [T] or [B, T] (integer) -> rotated x, same dtype."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq  # [.., T, Dh/2]
        cos, sin = freqs.cos(), freqs.sin()
        if positions.dim() == 2:  # [B, T, Dh/2] -> [B, 1, T, Dh/2]
            cos, sin = cos[:, None], sin[:, None]
        cos = torch.cat([cos, cos], dim=-1)
        sin = torch.cat([sin, sin], dim=-1)
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (x.float() * cos + rotated * sin).to(x.dtype)


# --- MLP --------------------------------------------------------------------------------------
class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x); hidden defaults to 8/3·dim rounded up to a multiple of 64."""

    def __init__(self, dim: int, hidden: int | None = None, multiple_of: int = 64) -> None:
        super().__init__()
        if hidden is None:
            hidden = int(8 * dim / 3)
            hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        self.hidden = hidden
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# --- mask_mods --------------------------------------------------------------------------------
def causal_mask() -> MaskMod:
    def mask_mod(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return mask_mod


def sliding_window_mask(window: int, q_offset: int = 0) -> MaskMod:
    """Causal with each query seeing itself and the ``window - 1`` keys before it."""

    def mask_mod(b, h, q_idx, kv_idx):
        q = q_idx + q_offset
        return (q >= kv_idx) & (q - kv_idx < window)

    return mask_mod


def document_causal_mask(doc_ids: torch.Tensor) -> MaskMod:
    """Block-causal: causal, and a query sees only keys of its own document. doc_ids [B, T]."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return mask_mod


def and_masks(*mods: MaskMod) -> MaskMod:
    def mask_mod(b, h, q_idx, kv_idx):
        out = mods[0](b, h, q_idx, kv_idx)
        for m in mods[1:]:
            out = out & m(b, h, q_idx, kv_idx)
        return out

    return mask_mod


def dense_mask(mask_mod: MaskMod, B: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """Evaluate a mask_mod on broadcast indices -> bool [B, 1, q_len, kv_len]."""
    b = torch.arange(B, device=device)[:, None, None, None]
    h = torch.zeros(1, device=device, dtype=torch.long)[:, None, None, None]
    q = torch.arange(q_len, device=device)[None, None, :, None]
    k = torch.arange(kv_len, device=device)[None, None, None, :]
    return mask_mod(b, h, q, k).expand(B, 1, q_len, kv_len)


@functools.cache
def _compiled_flex():
    # FlexAttention only fuses when compiled; compile the kernel itself (not the model) once.
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def use_flex(device: torch.device) -> bool:
    return device.type == "cuda"


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_mod: MaskMod | None,
    *,
    causal: bool = False,
) -> torch.Tensor:
    """q [B, H, Tq, Dh], k/v [B, Hkv, Tk, Dh] -> [B, H, Tq, Dh].

    ``causal=True`` with no mask_mod uses SDPA's causal kernels (flash/cuDNN on CUDA).
    A mask_mod goes through FlexAttention on CUDA and a dense-masked SDPA elsewhere.
    Queries whose mask is empty produce zeros (not NaN).
    """
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    gqa = k.shape[1] != H
    if mask_mod is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and Tq > 1, enable_gqa=gqa)
    if use_flex(q.device):
        from torch.nn.attention.flex_attention import create_block_mask

        block_mask = create_block_mask(mask_mod, B, None, Tq, Tk, device=q.device)
        return _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    mask = dense_mask(mask_mod, B, Tq, Tk, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return torch.where(mask.any(-1, keepdim=True), out, torch.zeros_like(out))


# --- KV cache ---------------------------------------------------------------------------------
class KVCache:
    """Preallocated keys/values for incremental decoding of one attention layer.

    ``k, v``: [B, Hkv, max_len, Dh]. ``append`` writes the new step(s) at ``length`` and
    returns views of everything cached so far. ``reset`` empties it (MEGABYTE's local model
    starts every patch afresh).
    """

    def __init__(self, B: int, n_kv_heads: int, max_len: int, head_dim: int, device, dtype) -> None:
        self.k = torch.zeros(B, n_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length} + {T} > {self.max_len}")
        self.k[:, :, self.length : self.length + T] = k
        self.v[:, :, self.length : self.length + T] = v
        self.length += T
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def reset(self) -> None:
        self.length = 0


# --- attention module -------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head (grouped-query) attention with optional RoPE, self- or cross-attention.

    forward(x, kv=None, positions=None, kv_positions=None, mask_mod=None, causal=True, cache=None)
      x [B, Tq, D]; kv [B, Tk, D_kv] for cross-attention (default: x);
      positions [Tq] or [B, Tq] for RoPE on queries (and keys, for self-attention);
      cache: a KVCache — new keys/values are appended and attention runs over the whole cache
      (the caller passes a mask_mod or relies on causal=False for single-step decoding).
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
        kv_dim = kv_dim or dim
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(kv_dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(kv_dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.rope = rope

    def forward(
        self,
        x: torch.Tensor,
        kv: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        kv_positions: torch.Tensor | None = None,
        mask_mod: MaskMod | None = None,
        causal: bool = True,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, Tq, _ = x.shape
        src = x if kv is None else kv
        Tk = src.shape[1]
        q = self.wq(x).view(B, Tq, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, Tq, Dh]
        k = self.wk(src).view(B, Tk, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, Tk, Dh]
        v = self.wv(src).view(B, Tk, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.rope is not None:
            if positions is None:
                positions = torch.arange(Tq, device=x.device)
            q = self.rope(q, positions)
            if kv is None or kv_positions is not None:
                k = self.rope(k, positions if kv is None and kv_positions is None else kv_positions)
        if cache is not None:
            k, v = cache.append(k, v)
        out = masked_attention(q, k, v, mask_mod, causal=causal)
        out = out.transpose(1, 2).reshape(B, Tq, self.n_heads * self.head_dim)  # [B, Tq, H*Dh]
        return self.wo(out)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        rope: RoPE | None = None,
        mlp_hidden: int | None = None,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, n_heads, n_kv_heads, rope=rope)
        self.mlp_norm = RMSNorm(dim, eps=norm_eps)
        self.mlp = SwiGLU(dim, mlp_hidden)

    def forward(self, x: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), **attn_kwargs)
        return x + self.mlp(self.mlp_norm(x))
