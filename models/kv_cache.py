"""KV caches for incremental decoding, every one behind the `LayerCache` protocol.

``Attention`` (models/layers.py) drives a cache of one self-attention layer in this order, for
Tq new queries:

1. ``cache.check(mask_mod, causal)``: raise if this cache cannot serve that mask (nothing
   written yet);
2. ``q_pos = cache.next_positions(Tq)``: the absolute positions of the new queries ([Tq], or
   [B, Tq] where rows differ), the RoPE positions unless the caller gives its own;
3. ``k, v, kv_pos = cache.update(k, v)``: store the new keys/values, return those the queries
   attend over and their absolute positions;
4. ``mask_mod, causal = cache.mask(q_pos, kv_pos, mask_mod, causal)``: the mask for them.

The kinds differ in where the fill level lives and what ``update`` returns:

* ``KVCache``: host fill level; the filled slots; the caller's mask, or causal by position;
* ``WindowedKVCache``: host; the ring (plus the new keys when several); its window, by position;
* ``DeviceKVCache``: on the device; the whole buffer (fixed shape); causal, by position;
* ``DeviceWindowedKVCache``: on the device; the whole ring (fixed shape); causal, by position;
* ``RowKVCache``: on the device, one per row; every slot (fixed between grows); the row mask.

A device fill level means no host sync and the same shapes and addresses at every step: what
CUDA graphs and compiled decoding steps need (models/generate.py). ``TransformerCache`` holds
one cache per layer of a stack.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .masks import AttentionMask, MaskMod, position_mask

Mask = MaskMod | AttentionMask | None


class LayerCache(ABC):
    """The protocol ``Attention`` uses (see the module docstring for the call order)."""

    def check(self, mask_mod: Mask, causal: bool) -> None:  # noqa: B027 (a default: any mask will do)
        """Raise if queries with this mask cannot attend over this cache (default: any mask)."""

    @abstractmethod
    def next_positions(self, n: int) -> torch.Tensor:
        """Absolute positions of the next n queries, [n] (or [B, n]); read before ``update``."""

    @abstractmethod
    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store k/v [B, Hkv, n, Dh]; return the keys/values to attend over and their positions [Tk]."""

    @abstractmethod
    def mask(self, q_pos: torch.Tensor, kv_pos: torch.Tensor, mask_mod: Mask, causal: bool) -> tuple[Mask, bool]:
        """The (mask_mod, causal) for queries at ``q_pos`` over what ``update`` returned."""


# --- host fill level --------------------------------------------------------------------------
class KVCache(LayerCache):
    """Preallocated keys/values of one attention layer; key j sits at absolute position j.

    ``k, v``: [B, Hkv, max_len, Dh]. ``update`` writes the new step(s) at ``length`` and returns
    views of everything cached so far. ``reset`` empties it (MEGABYTE's local model starts every
    patch afresh). A caller's mask_mod sees local query indices and cache key indices: pass
    ``q_offset=cache.length`` (read before the call) to the mask helpers.
    """

    def __init__(self, B: int, n_kv_heads: int, max_len: int, head_dim: int, device, dtype) -> None:
        self.k = torch.zeros(B, n_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def next_positions(self, n: int) -> torch.Tensor:
        return torch.arange(self.length, self.length + n, device=self.k.device)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        if self.length + T > self.max_len:
            raise ValueError(
                f"KV cache overflow: {self.length} + {T} > max_len {self.max_len}; "
                "allocate the cache with a larger max_len"
            )
        self.k[:, :, self.length : self.length + T] = k
        self.v[:, :, self.length : self.length + T] = v
        self.length += T
        return self.k[:, :, : self.length], self.v[:, :, : self.length], torch.arange(self.length, device=k.device)

    def mask(self, q_pos, kv_pos, mask_mod, causal):
        if mask_mod is None and causal and len(q_pos) > 1 and len(kv_pos) > len(q_pos):
            # a chunk after cached keys: SDPA's is_causal is top-left aligned (wrong for Tq < Tk)
            return position_mask(q_pos, kv_pos), False
        return mask_mod, causal

    def reset(self) -> None:
        self.length = 0


class _Ring:
    """Buffers of a ring of the last ``window`` keys/values; ``pos`` = each slot's absolute
    position (-1 = empty). Keys are stored already rotated by RoPE, so slot order is free."""

    def __init__(self, B: int, n_kv_heads: int, window: int, head_dim: int, device, dtype) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.k = torch.zeros(B, n_kv_heads, window, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((window,), -1, device=device, dtype=torch.long)


class WindowedKVCache(_Ring, LayerCache):
    """Ring buffer of the last ``window`` keys/values, for sliding-window self-attention.

    Memory stays O(window) however long the stream (BLT's entropy model over a 12,288-byte
    image); attention masks by positions and the cache applies its window itself.
    """

    def __init__(self, B: int, n_kv_heads: int, window: int, head_dim: int, device, dtype) -> None:
        super().__init__(B, n_kv_heads, window, head_dim, device, dtype)
        self.length = 0

    def check(self, mask_mod, causal) -> None:
        if mask_mod is not None or not causal:
            raise ValueError(f"a {type(self).__name__} applies its own causal window; pass mask_mod=None")

    def next_positions(self, n: int) -> torch.Tensor:
        return torch.arange(self.length, self.length + n, device=self.pos.device)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step: written into the ring first, which then holds exactly the window of the new
        query (no copy). Several steps: the old ring concatenated with the new keys (the window
        of the first new query reaches back into the ring), then the last ``window`` new keys
        are written."""
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

    def mask(self, q_pos, kv_pos, mask_mod, causal):
        if len(q_pos) == 1 and self.length >= self.window:
            return None, False  # the ring holds exactly this query's window
        return position_mask(q_pos, kv_pos, self.window), False

    def reset(self) -> None:
        self.pos.fill_(-1)
        self.length = 0


# --- device fill level ------------------------------------------------------------------------
class _DeviceFill:
    """The stream position lives on the device (``next_pos``, a 0-dim long tensor), so CUDA
    graphs can replay the steps: attention masks the unfilled slots by position, and ``length``
    reads the position back (a host sync: for checks and tests, not the decoding loop)."""

    next_pos: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.next_pos)

    def check(self, mask_mod, causal) -> None:
        if mask_mod is not None:
            raise ValueError(f"a {type(self).__name__} masks by position itself; pass mask_mod=None")

    def mask(self, q_pos, kv_pos, mask_mod, causal):
        return position_mask(q_pos, kv_pos), False  # every filled slot up to the query's own position


class DeviceKVCache(_DeviceFill, LayerCache):
    """A KVCache whose fill level lives on the device, so CUDA graphs can replay its steps.

    ``next_pos`` is the next free slot; ``update`` writes the new keys there with
    ``index_copy_`` and returns the whole preallocated buffer (fixed shape), and the attention
    masks slots past the queries by position. Every step then launches the same kernels with
    the same shapes whatever the fill level: one CUDA graph serves all of them (MEGABYTE's
    sampling, ``models/generate.py``). Overflowing is not checked (that would need a host
    sync); callers size it. Slots are positions: key slot s sits at position s.
    """

    def __init__(self, B: int, n_kv_heads: int, max_len: int, head_dim: int, device, dtype) -> None:
        self.k = torch.zeros(B, n_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.slots = torch.arange(max_len, device=device)
        self.next_pos = torch.zeros((), dtype=torch.long, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def next_positions(self, n: int) -> torch.Tensor:
        """Slots (= positions) [n] of the next n steps, on the device."""
        return self.next_pos + self.slots[:n]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = self.next_positions(k.shape[2])
        self.k.index_copy_(2, idx, k)
        self.v.index_copy_(2, idx, v)
        self.next_pos += k.shape[2]
        return self.k, self.v, self.slots

    def copy_from(self, host: KVCache) -> None:
        """Take over a host cache's steps (a prompt prefilled in one chunk there)."""
        n = host.length
        self.k[:, :, :n] = host.k[:, :, :n]
        self.v[:, :, :n] = host.v[:, :, :n]
        self.next_pos.fill_(n)

    def reset(self) -> None:
        self.next_pos.fill_(0)


class DeviceWindowedKVCache(_DeviceFill, _Ring, LayerCache):
    """A WindowedKVCache whose stream position lives on the device: one step per ``update``,
    always the whole ring returned (fixed shape) with each slot's absolute position, no host
    sync. What BLT's per-byte models (entropy model, local encoder and decoder) need to run
    inside a CUDA graph (``models/generate.py``); attention masks the empty slots by position.
    """

    def __init__(self, B: int, n_kv_heads: int, window: int, head_dim: int, device, dtype) -> None:
        _Ring.__init__(self, B, n_kv_heads, window, head_dim, device, dtype)
        self.next_pos = torch.zeros((), dtype=torch.long, device=self.k.device)

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

    def copy_from(self, host: WindowedKVCache) -> None:
        """Take over a host ring's steps: both rings keep position p in slot p % window."""
        self.k.copy_(host.k)
        self.v.copy_(host.v)
        self.pos.copy_(host.pos)
        self.next_pos.fill_(host.length)

    def reset(self) -> None:
        self.pos.fill_(-1)
        self.next_pos.fill_(0)


class RowKVCache(LayerCache):
    """KV cache of one layer whose rows hold different numbers of steps (BLT's latent model).

    In batched generation rows close patches at different bytes. The latent model therefore
    steps every row at every byte, row b at its own patch index ``next_slot[b]`` (a device
    tensor the caller advances, ``BLTState.num_patches``): its key/value is written at that slot
    and the queries see the slots up to it. A row that closed no patch computed a throwaway
    step, whose slot its next real patch overwrites. ``update`` returns all ``capacity`` slots:
    the shapes stay fixed between ``grow`` calls, so a captured CUDA graph replays the step.
    """

    def __init__(self, next_slot: torch.Tensor, n_kv_heads: int, head_dim: int, capacity: int, dtype) -> None:
        B, dev = next_slot.shape[0], next_slot.device
        self.next_slot = next_slot  # [B] where each row writes (the caller advances it)
        self.k = torch.zeros(B, n_kv_heads, capacity, head_dim, device=dev, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.slots = torch.arange(capacity, device=dev)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def grow(self, capacity: int) -> None:
        """Reallocate to ``capacity`` slots, keeping the cached ones (new addresses)."""
        old = self.capacity
        for name in ("k", "v"):
            buf = getattr(self, name)
            new = buf.new_zeros(*buf.shape[:2], capacity, buf.shape[3])  # [B, Hkv, capacity, Dh]
            new[:, :, :old] = buf
            setattr(self, name, new)
        self.slots = torch.arange(capacity, device=self.k.device)

    def next_positions(self, n: int) -> torch.Tensor:
        """Each row's slot [B, 1] (its patch index: the RoPE position); one step per update."""
        if n != 1:
            raise ValueError(f"a RowKVCache takes one step per update, got {n}")
        return self.next_slot[:, None]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One new step per row, k/v [B, Hkv, 1, Dh] -> keys/values [B, Hkv, capacity, Dh], slots."""
        rows = torch.arange(k.shape[0], device=k.device)
        self.k[rows, :, self.next_slot] = k[:, :, 0]
        self.v[rows, :, self.next_slot] = v[:, :, 0]
        return self.k, self.v, self.slots

    def mask(self, q_pos, kv_pos, mask_mod, causal):
        """The caller's row mask (one for every layer: ``row_mask``), else built here."""
        if mask_mod is None:
            mask_mod = self.row_mask()
        return mask_mod, False

    def row_mask(self) -> AttentionMask:
        """Each row sees its slots up to its own: dense [B, 1, 1, capacity]."""
        allowed = self.slots <= self.next_slot[:, None]  # [B, capacity]
        return AttentionMask(1, self.capacity, dense=allowed[:, None, None, :])


class TransformerCache:
    """The caches of every layer of one stack (a Transformer); ``length`` = input tokens consumed."""

    def __init__(self, layers: list[KVCache | WindowedKVCache | DeviceKVCache | DeviceWindowedKVCache]) -> None:
        self.layers = layers

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def device_fill(self) -> bool:
        """True for device caches (``DeviceKVCache`` / ``DeviceWindowedKVCache``): fixed shapes,
        one step per update at best; a prompt goes through host caches and ``copy_from``."""
        return isinstance(self.layers[0], _DeviceFill)

    def copy_from(self, host: TransformerCache) -> None:
        """Every layer takes over the steps of the same layer of a host ``TransformerCache``."""
        for mine, theirs in zip(self.layers, host.layers, strict=True):
            mine.copy_from(theirs)

    def reset(self) -> None:
        for c in self.layers:
            c.reset()
