"""Attention masks and the attention functions that apply them.

Masks other than plain causal are written once as FlexAttention ``mask_mod`` functions
``(b, h, q_idx, kv_idx) -> bool`` (True = may attend). On CUDA they run through FlexAttention
with a block mask; elsewhere (CPU tests) the same function is evaluated on broadcast index
tensors into a dense boolean mask for SDPA, so both paths compute the same numbers. A mask that
many layers share is evaluated once with ``prepare_mask`` and passed in place of the mask_mod.

Plain causal self-attention goes through SDPA's ``is_causal`` path (flash / cuDNN on CUDA), and
attention over a few keys is written out (``short_attention``).

``masked_attention`` lives here rather than in layers.py: which kernel runs (FlexAttention,
dense-masked SDPA, causal SDPA, the written-out short path) is decided by the mask's form and
size, and the two forms of a prepared ``AttentionMask`` are read nowhere else.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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


# --- mask_mods --------------------------------------------------------------------------------
# ``q_offset`` shifts query indices: with a KV cache the queries of a call are local (0..Tq-1)
# while key indices run over the whole cache, so decoding passes q_offset = cache length.
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


def position_mask(q_pos: torch.Tensor, kv_pos: torch.Tensor, window: int | None = None) -> MaskMod:
    """Causal (optionally windowed) mask from absolute positions of queries [Tq] and keys [Tk].

    Keys at a negative position are empty cache slots and never attended.
    """

    def mask_mod(b, h, q_idx, kv_idx):
        q, k = q_pos[q_idx], kv_pos[kv_idx]
        ok = (k >= 0) & (q >= k)
        return ok if window is None else ok & (q - k < window)

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
            out = flex(
                F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), block_mask=mask.block_mask, enable_gqa=gqa, scale=Dh**-0.5
            )
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
