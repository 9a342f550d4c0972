"""BLT's incremental decoding (the protocol of ``models/base.py``), as a mixin of `BLT`.

The mixin holds no parameters: every module it uses is `BLT`'s (models/blt.py), so state-dict
keys are the model's. The seam for ``models/generate.py`` (``new_cache`` makes the caches;
``test_stepping_the_stages_with_caches_matches_the_full_forward`` runs this recipe). To
predict byte t, with u_t = the tag (t = 0) or ids[t-1]:

1. entropy patching: ``entropy.step_entropies(model.entropy_model, u_t, cache.entropy)`` gives
   the entropy of byte t; whether t starts a patch is known now, before byte t exists
   (``patching.patch_starts`` on the prefix, any value at position t, read at position t);
2. local encoder, one input: ``embed(u_t, history=the last max(n)-1 inputs)`` then
   ``encode_bytes(x, positions=[t], caches=cache.encoder)``; keep every layer's state;
3. if t starts patch j: the inputs of patch j (the tag for j = 0, else those after the previous
   start up to t) are complete: ``encode_patches`` on their states (patch id 0, one patch),
   ``latent_states(..., positions=[j], caches=cache.latent)``, ``decoder_slots`` -> the k slots;
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
from collections.abc import Callable

import torch

from . import patching
from .base import DecodingState
from .entropy import step_entropies
from .kv_cache import DeviceWindowedKVCache, KVCache, RowKVCache, TransformerCache, WindowedKVCache

# Bytes per decode_block call (one CUDA graph replay), the latent caches' first capacity in
# patches and the factor they grow by when a row may need more. Each growth costs an eager
# block and a new graph capture, and every slot is attended at every byte; for the base preset
# (16 x 12,288 bytes, 2.3-byte patches) 1.5 and 2 measured the same.
DECODE_BLOCK = 16
LATENT_MIN_CAPACITY = 128
LATENT_GROWTH = 1.5


def _ring_caches(local, B: int, device, dtype, kind: type) -> list:
    """One ring cache (``kind``: WindowedKVCache or DeviceWindowedKVCache) per layer of a local
    model (``local``: a blt.LocalConfig)."""
    hd = local.dim // local.n_heads
    return [kind(B, local.n_heads, local.window, hd, device, dtype) for _ in range(local.n_layers)]


@dataclasses.dataclass
class BLTCache:
    """Caches for incremental decoding of one batch (see the module docstring's recipe)."""

    encoder: list[WindowedKVCache] | list[DeviceWindowedKVCache]  # local encoder, one per layer
    latent: list[KVCache] | list[RowKVCache]  # latent transformer, one per layer (new_state: RowKVCaches)
    decoder: list[WindowedKVCache] | list[DeviceWindowedKVCache]  # local decoder, one per layer
    entropy: TransformerCache | None  # the entropy model's (entropy patching only)


@dataclasses.dataclass
class BLTState(DecodingState):
    """Incremental-decoding state of a batch; create with ``BLT.new_state``.

    Every row sits at the same byte position ``pos`` (prompts of different lengths are
    teacher-forced by the caller); rows differ in their patches. Everything a step reads or
    writes is a device tensor updated in place (``t`` mirrors ``pos``), so one captured CUDA
    graph replays any number of steps; only the latent caches grow, between blocks of steps.
    """

    t: torch.Tensor  # 0-dim long: pos, on the device
    cache: BLTCache  # Device* caches (encoder, decoder, entropy); ``latent`` holds RowKVCaches
    history: torch.Tensor  # [B, H] the last H inputs (tag, bytes), -1 before the stream starts
    enc_ring: list[torch.Tensor]  # per pooled encoder layer [B, R, D_E]: states of the last R inputs
    ring_pos: torch.Tensor  # [R] input position held by each ring slot (-1 = empty)
    num_patches: torch.Tensor  # [B] patches started so far (= the latent slot of the next one)
    open_start: torch.Tensor  # [B] first input of the input patch being filled
    content_start: torch.Tensor  # [B] last start before max-length cuts (patching.max_len_cut)
    entropy: torch.Tensor  # [B] fp32 entropy of the byte at pos - 1 (entropy_relative)
    slots: torch.Tensor  # [B, k, D_D] decoder slots of each row's current patch
    threshold: torch.Tensor | float  # entropy kinds: each row's threshold [B] (its tag's), or one float
    reserved_to: int = 0  # host: the latent caches hold every patch of the positions before it
    patch_bound: int = 0  # host: an upper bound of max(num_patches) at position reserved_to


class BLTDecoding:
    """``new_state`` / ``prefill`` / ``step`` and block decoding of `BLT` (see the module docstring)."""

    # one decoding step's device work at fixed shapes: a pipeline may torch.compile them
    compilable_steps = ("decode_front", "decode_latent", "decode_back")
    growing_steps = ("decode_latent",)  # its shapes follow the latent caches' capacity

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

    # --- incremental decoding -----------------------------------------------------------------
    @property
    def decode_block_size(self) -> int:
        """Bytes per ``decode_block`` call (one CUDA graph replay in models/generate.py)."""
        return DECODE_BLOCK

    def new_state(self, modality: torch.Tensor, max_len: int, dtype: torch.dtype | None = None) -> BLTState:
        """Empty decoding state for rows with tags ``modality`` [B] (its device is used), able to
        decode ``max_len`` positions. Cache ``dtype`` defaults to the weights'. The caches are
        always the fixed-shape device kind, so this is also the state ``decode_block`` needs
        (``new_block_state``)."""
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
            threshold=c.patcher.row_thresholds(modality),
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
        # every row at its own slot (the RowKVCaches' positions); one row mask for every layer
        mask = state.cache.latent[0].row_mask()  # [B, 1, 1, capacity]
        x = pooled
        for block, cache in zip(self.latent_blocks, state.cache.latent):
            x = block(x, mask_mod=mask, causal=True, cache=cache)
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
        logits = self.decode_bytes(enc, state.slots, None, caches=state.cache.decoder)  # [B, 1, V]
        state.t.add_(1)
        return logits[:, 0]

    def _starts(self, state: BLTState, entropy: torch.Tensor | None) -> torch.Tensor:
        """Whether byte t starts a patch, per row [B] bool: ``patching.start_rule`` and
        ``patching.max_len_cut`` at position t alone, from bytes < t and the entropy of byte t
        (device ops only; ``patching.patch_starts`` applies the same rule to a whole row). With
        ``max_patches_ratio`` a row starts no patch once it fills the slots of a max_seq_len
        window, as ``patching.patch`` merges the rest into the last slot: sampling and scoring
        see the patches training saw."""
        p, t = self.config.patcher, state.t
        B = state.history.shape[0]
        prev = torch.where(t >= 1, state.history[:, -1], -1)  # byte t-1 (input t); -1 before the start
        prev2 = torch.where(t >= 2, state.history[:, -2], -1)  # byte t-2
        score = None
        if p.needs_entropies:
            score = entropy.float()
            if p.kind == "entropy_relative":
                score = score - state.entropy  # the entropy of byte t-1 (0 before the start)
            state.entropy.copy_(entropy)
        start = patching.start_rule(p, t, prev, prev2, score, state.threshold).expand(B)
        if p.max_patch_len is not None:  # content_start: the last start before the cuts
            state.content_start.copy_(torch.where(start, t, state.content_start))
            start = start | patching.max_len_cut(p, t, state.content_start, prev)
        slots = p.capacity(self.config.max_seq_len)
        if slots is not None:  # the training windows' fixed slots: patches past them merge into the last
            start = start & (state.num_patches < slots)
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
