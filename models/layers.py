"""Shared layers: RMSNorm, RoPE, SwiGLU, attention (SDPA / FlexAttention) and KV caches.

Masks other than plain causal are written once as FlexAttention ``mask_mod`` functions
``(b, h, q_idx, kv_idx) -> bool`` (True = may attend). On CUDA they run through FlexAttention
with a block mask; elsewhere (CPU tests) the same function is evaluated on broadcast index
tensors into a dense boolean mask for SDPA, so both paths compute the same numbers. A mask that
many layers share is evaluated once with ``prepare_mask`` and passed in place of the mask_mod.

Plain causal self-attention goes through SDPA's ``is_causal`` path (flash / cuDNN on CUDA).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

RMSNorm = nn.RMSNorm  # torch's own (fused on CUDA); eps set by callers

# FlexAttention sparsity is per 128x128 block: shorter query runs gain nothing over a dense mask
# and would each need their own block mask (decoding steps), so they take the dense path.
FLEX_MIN_Q_LEN = 128
# FlexAttention's fused kernels refuse head dims below 16 (torch 2.11): smaller heads are zero-padded
FLEX_MIN_HEAD_DIM = 16
# Plain (unmasked or causal) attention over at most this many keys is written out as two batched
# matmuls and a softmax (``short_attention``): SDPA's flash/cuDNN kernels tile 64-128 queries and
# keys, so MEGABYTE's local attentions over 8 bytes would waste >98% of every tile and launch
# one block per 8x8 problem; written out, torch.compile fuses the mask and softmax (MEGABYTE
# base, compiled, H200: 62.2 -> 52.5 ms per training step). On CUDA MEGABYTE's local model now
# runs as one block-diagonal FlexAttention per row where it can (megabyte._run_local); this path
# serves the rest (CPU, patch sizes that do not tile 128 bytes).
SHORT_KV_LEN = 16


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


# --- mask_mods --------------------------------------------------------------------------------
# ``q_offset`` shifts query indices: with a KV cache the queries of a call are local (0..Tq-1)
# while key indices run over the whole cache, so decoding passes q_offset = cache length.
def causal_mask(q_offset: int = 0) -> MaskMod:
    def mask_mod(b, h, q_idx, kv_idx):
        return q_idx + q_offset >= kv_idx

    return mask_mod


def sliding_window_mask(window: int, q_offset: int = 0) -> MaskMod:
    """Causal with each query seeing itself and the ``window - 1`` keys before it."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")

    def mask_mod(b, h, q_idx, kv_idx):
        q = q_idx + q_offset
        return (q >= kv_idx) & (q - kv_idx < window)

    return mask_mod


def block_causal_mask(block: int) -> MaskMod:
    """Causal inside consecutive blocks of ``block`` positions, nothing across them: MEGABYTE's
    local attention run over a whole row at once (patch k = positions k·P .. k·P+P-1)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx // block == kv_idx // block) & (q_idx >= kv_idx)

    return mask_mod


def document_causal_mask(doc_ids: torch.Tensor, q_offset: int = 0) -> MaskMod:
    """Block-causal: causal, and a query sees only keys of its own document. doc_ids [B, T]."""

    def mask_mod(b, h, q_idx, kv_idx):
        q = q_idx + q_offset
        return (q >= kv_idx) & (doc_ids[b, q] == doc_ids[b, kv_idx])

    return mask_mod


def position_mask(q_pos: torch.Tensor, kv_pos: torch.Tensor, window: int | None = None) -> MaskMod:
    """Causal (optionally windowed) mask from absolute positions of queries [Tq] and keys [Tk].

    Keys at a negative position are empty cache slots and never attended.
    """

    def mask_mod(b, h, q_idx, kv_idx):
        q, k = q_pos[q_idx], kv_pos[kv_idx]
        ok = (k >= 0) & (q >= k)
        return ok if window is None else ok & (q - k < window)

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


# --- backends ---------------------------------------------------------------------------------
@functools.cache
def _compiled_flex():
    # FlexAttention only fuses when compiled; compile the kernel itself (not the model) once.
    # Default dynamic mode: a second shape (e.g. BLT's varying patch count) recompiles once
    # with symbolic sizes instead of once per shape.
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _eager_flex():
    # Unfused reference implementation: only for comparing masks on CPU (no backward there).
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def use_flex(device: torch.device, q_len: int = FLEX_MIN_Q_LEN) -> bool:
    return torch.device(device).type == "cuda" and q_len >= FLEX_MIN_Q_LEN


def _pick_backend(device, q_len: int, backend: str | None) -> str:
    if backend is None:
        return "flex" if use_flex(device, q_len) else "sdpa"
    if backend not in ("flex", "sdpa"):
        raise ValueError(f"attention backend must be 'flex', 'sdpa' or None (auto), got {backend!r}")
    return backend


@dataclasses.dataclass
class AttentionMask:
    """A mask_mod evaluated once for given sizes, reusable by every layer of a forward.

    Exactly one of ``block_mask`` (FlexAttention) and ``dense`` (bool [B or 1, 1, Tq, Tk]) is set.
    """

    q_len: int
    kv_len: int
    block_mask: object | None = None
    dense: torch.Tensor | None = None


def prepare_mask(
    mask_mod: MaskMod, B: int | None, q_len: int, kv_len: int, device, backend: str | None = None
) -> AttentionMask:
    """Evaluate ``mask_mod`` for [B, Tq, Tk]; ``B=None`` when it is the same for every row.

    ``backend``: None picks FlexAttention on CUDA (for q_len >= FLEX_MIN_Q_LEN) and a dense
    SDPA mask otherwise; "flex" / "sdpa" force one (FlexAttention on CPU runs unfused, no grad).
    """
    if _pick_backend(device, q_len, backend) == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        block_mask = create_block_mask(mask_mod, B, None, q_len, kv_len, device=device)
        return AttentionMask(q_len, kv_len, block_mask=block_mask)
    return AttentionMask(q_len, kv_len, dense=dense_mask(mask_mod, B or 1, q_len, kv_len, device))


# create_block_mask evaluates the mask_mod on all q_len x kv_len pairs: past this length the
# block-diagonal mask is written from its known tiles instead (block_diagonal_mask)
DIRECT_BLOCK_MASK_MIN_LEN = 65536
FLEX_BLOCK = 128  # FlexAttention's default tile (queries and keys)


def block_diagonal_mask(block: int, n: int, device, backend: str | None = None) -> AttentionMask:
    """``prepare_mask(block_causal_mask(block), None, n, n, device, backend)``. For FlexAttention
    over long rows (n >= DIRECT_BLOCK_MASK_MIN_LEN, ``block`` dividing the 128-wide tile and n a
    multiple of it) the BlockMask is written directly: each query tile sees only its own key
    tile. Its index table is (n/128)² int32 (268 MB at n = 2^20), where create_block_mask would
    evaluate all n² pairs (10^12 for MEGABYTE's million-byte windows)."""
    direct = n >= DIRECT_BLOCK_MASK_MIN_LEN and FLEX_BLOCK % block == 0 and n % FLEX_BLOCK == 0
    if direct and _pick_backend(device, n, backend) == "flex":
        from torch.nn.attention.flex_attention import BlockMask

        tiles = n // FLEX_BLOCK
        num = torch.ones(1, 1, tiles, dtype=torch.int32, device=device)  # [B=1, H=1, q tiles]
        idx = torch.zeros(1, 1, tiles, tiles, dtype=torch.int32, device=device)  # [.., q tile, slot]
        idx[..., 0] = torch.arange(tiles, dtype=torch.int32, device=device)  # slot 0: its own tile
        mask = BlockMask.from_kv_blocks(num, idx, mask_mod=block_causal_mask(block), seq_lengths=(n, n))
        return AttentionMask(n, n, block_mask=mask)
    return prepare_mask(block_causal_mask(block), None, n, n, device, backend)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_mod: MaskMod | AttentionMask | None,
    *,
    causal: bool = False,
    backend: str | None = None,
    gqa: bool | None = None,
) -> torch.Tensor:
    """q [B, H, Tq, Dh], k/v [B, Hkv, Tk, Dh] -> [B, H, Tq, Dh] (Tq may differ from Tk).

    No mask_mod: full attention, or SDPA's causal kernels with ``causal=True`` (flash/cuDNN on
    CUDA; top-left aligned, so only meaningful for Tq == Tk or Tq == 1 over a cache).
    A mask_mod (or a prepared ``AttentionMask``) defines the mask alone (``causal`` is ignored)
    and goes through FlexAttention on CUDA and a dense-masked SDPA elsewhere.
    Queries whose mask is empty produce zeros (not NaN). ``gqa``: whether Hkv < H, default read
    from the shapes (callers that know it pass it: under torch.compile with dynamic shapes the
    comparison would be symbolic, which SDPA refuses).
    """
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    if gqa is None:
        gqa = k.shape[1] != H
    if mask_mod is None:
        if Tk <= SHORT_KV_LEN:
            return short_attention(q, k, v, causal=causal and Tq > 1, gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and Tq > 1, enable_gqa=gqa)
    mask = mask_mod
    if not isinstance(mask, AttentionMask):
        mask = prepare_mask(mask_mod, B, Tq, Tk, q.device, backend)
    elif (mask.q_len, mask.kv_len) != (Tq, Tk):
        raise ValueError(f"prepared mask is for {mask.q_len}x{mask.kv_len}, attention is {Tq}x{Tk}")
    if mask.block_mask is not None:
        # inside a compiled model dynamo traces flex_attention itself (calling the separately
        # compiled kernel from there would break the graph at every attention)
        if torch.compiler.is_compiling():
            from torch.nn.attention.flex_attention import flex_attention as flex
        else:
            flex = _compiled_flex() if q.device.type == "cuda" else _eager_flex()
        Dh = q.shape[-1]
        if Dh < FLEX_MIN_HEAD_DIM:  # zero columns change no dot product; keep the 1/sqrt(Dh) scale
            pad = (0, FLEX_MIN_HEAD_DIM - Dh)
            out = flex(F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), block_mask=mask.block_mask, enable_gqa=gqa,
                       scale=Dh**-0.5)  # fmt: skip
            return out[..., :Dh]
        return flex(q, k, v, block_mask=mask.block_mask, enable_gqa=gqa)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=gqa)
    # Some SDPA kernels return NaN for a query with no allowed key; FlexAttention returns 0.
    return torch.where(mask.dense.any(-1, keepdim=True), out, torch.zeros_like(out))


def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, gqa: bool) -> torch.Tensor:
    """Softmax attention written out, for few keys (Tk <= SHORT_KV_LEN): q [B, H, Tq, Dh],
    k/v [B, Hkv, Tk, Dh] -> [B, H, Tq, Dh]. ``causal``: top-left aligned, as SDPA's is_causal.
    Scores stay in the inputs' dtype (bf16 under autocast); the softmax runs in fp32."""
    if gqa:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # [B, Hkv, Tk, Dh] -> [B, H, Tk, Dh]
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # [B, H, Tq, Tk]
    if causal:
        Tq, Tk = scores.shape[-2:]
        allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.float().softmax(-1).to(v.dtype)
    return probs @ v  # [B, H, Tq, Tk] @ [B, H, Tk, Dh] -> [B, H, Tq, Dh]


# --- KV caches --------------------------------------------------------------------------------
class KVCache:
    """Preallocated keys/values for incremental decoding of one attention layer.

    ``k, v``: [B, Hkv, max_len, Dh]; key j sits at absolute position j. ``append`` writes the
    new step(s) at ``length`` and returns views of everything cached so far. ``reset`` empties
    it (MEGABYTE's local model starts every patch afresh).
    """

    window: int | None = None  # full causal history (see WindowedKVCache)
    static_shape = False  # returns only the filled slots (see DeviceKVCache)

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
            raise ValueError(
                f"KV cache overflow: {self.length} + {T} > max_len {self.max_len}; "
                "allocate the cache with a larger max_len"
            )
        self.k[:, :, self.length : self.length + T] = k
        self.v[:, :, self.length : self.length + T] = v
        self.length += T
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append; return all keys/values [B, Hkv, Tk, Dh] and their absolute positions [Tk]."""
        k, v = self.append(k, v)
        return k, v, torch.arange(self.length, device=k.device)

    def reset(self) -> None:
        self.length = 0


class _DeviceFill:
    """Mixin for caches whose stream position lives on the device (``next_pos``, a 0-dim long
    tensor), so CUDA graphs can replay their steps: ``static_shape`` tells attention to mask
    the unfilled slots itself, and ``length`` reads the position back (a host sync: for checks
    and tests, not the decoding loop) or sets it (the base classes' ``reset``)."""

    static_shape = True

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.next_pos = torch.zeros((), dtype=torch.long, device=self.k.device)

    @property
    def length(self) -> int:
        return int(self.next_pos)

    @length.setter
    def length(self, value: int) -> None:
        if hasattr(self, "next_pos"):  # the base __init__ sets 0 before next_pos exists
            self.next_pos.fill_(value)


class DeviceKVCache(_DeviceFill, KVCache):
    """A KVCache whose fill level lives on the device, so CUDA graphs can replay its steps.

    ``next_pos`` is the next free slot; ``update`` writes the new keys there with
    ``index_copy_`` and returns the whole preallocated buffer (fixed shape), and the attention
    masks slots past the queries by position. Every step then launches the same kernels with
    the same shapes whatever the fill level: one CUDA graph serves all of them (MEGABYTE's
    sampling, ``models/generate.py``). Overflowing is not checked (that would need a host
    sync); callers size it. Slots are positions: key slot s sits at position s.
    """

    def __init__(self, B: int, n_kv_heads: int, max_len: int, head_dim: int, device, dtype) -> None:
        super().__init__(B, n_kv_heads, max_len, head_dim, device, dtype)
        self.slots = torch.arange(max_len, device=device)

    def next_positions(self, n: int) -> torch.Tensor:
        """Slots (= positions) [n] of the next n steps, on the device."""
        return self.next_pos + self.slots[:n]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``update`` (the whole buffer, fixed shape), without the positions."""
        return self.update(k, v)[:2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = self.next_positions(k.shape[2])
        self.k.index_copy_(2, idx, k)
        self.v.index_copy_(2, idx, v)
        self.next_pos += k.shape[2]
        return self.k, self.v, self.slots


class WindowedKVCache:
    """Ring buffer of the last ``window`` keys/values, for sliding-window self-attention.

    Memory stays O(window) however long the stream (BLT's entropy model over a 12,288-byte
    image). Keys are stored already rotated by RoPE at their absolute positions, so the slot
    order does not matter; ``pos`` records each slot's absolute position (-1 = empty) and
    attention masks by positions. Same ``update``/``reset``/``length`` protocol as KVCache.
    """

    def __init__(self, B: int, n_kv_heads: int, window: int, head_dim: int, device, dtype) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.k = torch.zeros(B, n_kv_heads, window, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((window,), -1, device=device, dtype=torch.long)
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add n new steps; return the keys/values the new queries may need and their positions.

        One step: written into the ring first, which then holds exactly the window of the new
        query (no copy). Several steps: the old ring concatenated with the new keys (the
        window of the first new query reaches back into the ring), then the last ``window``
        new keys are written.
        """
        n = k.shape[2]
        new_pos = torch.arange(self.length, self.length + n, device=self.pos.device)
        if n > 1:
            k_all = torch.cat([self.k, k], dim=2)  # [B, Hkv, W + n, Dh]
            v_all = torch.cat([self.v, v], dim=2)
            pos_all = torch.cat([self.pos, new_pos])
        keep = min(n, self.window)
        slots = new_pos[-keep:] % self.window
        self.k[:, :, slots] = k[:, :, -keep:]
        self.v[:, :, slots] = v[:, :, -keep:]
        self.pos[slots] = new_pos[-keep:]
        self.length += n
        if n > 1:
            return k_all, v_all, pos_all
        return self.k, self.v, self.pos

    def reset(self) -> None:
        self.pos.fill_(-1)
        self.length = 0


class DeviceWindowedKVCache(_DeviceFill, WindowedKVCache):
    """A WindowedKVCache whose stream position lives on the device: one step per ``update``,
    always the whole ring returned (fixed shape) with each slot's absolute position, no host
    sync. What BLT's per-byte models (entropy model, local encoder and decoder) need to run
    inside a CUDA graph (``models/generate.py``); attention masks the empty slots by position.
    """

    def next_positions(self, n: int) -> torch.Tensor:
        """Absolute position [1] of the next step (n must be 1)."""
        if n != 1:
            raise ValueError(f"a DeviceWindowedKVCache takes one step per update, got {n}")
        return self.next_pos[None]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        slot = self.next_positions(k.shape[2]) % self.window  # [1]
        self.k.index_copy_(2, slot, k)
        self.v.index_copy_(2, slot, v)
        self.pos.index_copy_(0, slot, self.next_pos[None])
        self.next_pos += 1
        return self.k, self.v, self.pos  # the ring now holds exactly the new query's window


# --- attention module -------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head (grouped-query) attention with optional RoPE, self- or cross-attention.

    forward(x, kv=None, positions=None, kv_positions=None, mask_mod=None, causal=True, cache=None)
      x [B, Tq, D]; kv [B, Tk, D_kv] for cross-attention (default: x, self-attention);
      positions [Tq] or [B, Tq]: RoPE positions of the queries (and keys, for self-attention);
        default arange(Tq), offset by the cache length when a cache is given;
      kv_positions: RoPE positions of cross-attention keys. Cross-attention applies RoPE only
        when kv_positions is given (rotating the queries alone encodes nothing);
      mask_mod: a mask_mod or prepared AttentionMask (then ``causal`` is ignored);
      cache: KVCache, WindowedKVCache or their Device* variants of this layer. New keys/values
        are appended and the queries attend over the cache. A Device* cache (self-attention
        only, no mask_mod) always masks causally by position, whatever ``causal`` says. Otherwise, with
        ``causal=True`` and no mask_mod the causal mask is aligned to absolute positions (prefilling a chunk into a non-empty cache is correct);
        a WindowedKVCache applies its window itself (mask_mod must be None). A caller's
        mask_mod over a KVCache sees local query indices and cache key indices: pass
        ``q_offset=cache.length`` (read before the call) to the mask helpers.
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
        cache: KVCache | WindowedKVCache | None = None,
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
        static = getattr(cache, "static_shape", False)
        if static:  # fill level on the device: positions of the queries, read before update
            if mask_mod is not None or not self_attn:
                raise ValueError(f"a {type(cache).__name__} is for self-attention and masks by position itself; pass mask_mod=None")
            q_slots = cache.next_positions(Tq)
        start = cache.length if cache is not None and not static else 0
        if self.rope is not None and (self_attn or kv_positions is not None):
            if positions is None:
                positions = q_slots if static else torch.arange(start, start + Tq, device=x.device)
            q = self.rope(q, positions)
            k = self.rope(k, positions if self_attn else kv_positions)
        if cache is not None:
            k, v, kv_pos = cache.update(k, v)
            if static:  # every filled slot up to the query's own position (ignores ``causal``)
                mask_mod, causal = position_mask(q_slots, kv_pos), False
            else:
                mask_mod, causal = self._cache_mask(cache, start, Tq, kv_pos, mask_mod, causal)
        out = masked_attention(q, k, v, mask_mod, causal=causal, gqa=self.n_kv_heads != self.n_heads)
        out = out.transpose(1, 2).reshape(B, Tq, self.n_heads * self.head_dim)  # [B, Tq, H*Dh]
        return self.wo(out)

    @staticmethod
    def _cache_mask(cache, start: int, Tq: int, kv_pos: torch.Tensor, mask_mod, causal: bool):
        """The mask for queries at absolute positions start..start+Tq-1 over the cached keys."""
        def q_pos():
            return torch.arange(start, start + Tq, device=kv_pos.device)

        window = getattr(cache, "window", None)
        if window is not None:
            if mask_mod is not None or not causal:
                raise ValueError("a WindowedKVCache applies its own causal window; pass mask_mod=None")
            if Tq == 1 and start >= window - 1:
                return None, False  # the ring holds exactly this query's window
            return position_mask(q_pos(), kv_pos, window), False
        if mask_mod is None and causal and Tq > 1 and start > 0:
            # SDPA's is_causal is top-left aligned: wrong for Tq < Tk, so mask by positions.
            return position_mask(q_pos(), kv_pos), False
        return mask_mod, causal


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
