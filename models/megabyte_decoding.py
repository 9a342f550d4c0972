"""MEGABYTE's incremental decoding (the protocol of ``models/base.py``), as a mixin of `Megabyte`.

The global model runs once per patch with its own KV cache; the local model runs once per byte
with a KV cache that is reset at each patch boundary (pre-filled with the previous patch's last
r keys/values when cross-patch attention is on). ``decode_block`` decodes one whole patch per
call. Logits equal the full forward's (tested to 1e-5 in fp32). The mixin holds no parameters:
every module it uses is `Megabyte`'s (models/megabyte.py), so state-dict keys are the model's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .base import DecodingState
from .kv_cache import DeviceKVCache, KVCache


@dataclasses.dataclass
class MegabyteState(DecodingState):
    """Incremental-decoding state of a batch; create with ``Megabyte.new_state``.

    ``pos`` is the position whose logits the next ``step`` returns; every row is at the same
    position (prompts of different lengths are teacher-forced by the caller).
    """

    # one per global layer: ceil(max_len / P) patches, max_seq_len / P for DeviceKVCaches
    global_caches: list[KVCache] | list[DeviceKVCache]
    local_caches: list[KVCache] | list[DeviceKVCache]  # one per local layer, r + P bytes; reset every patch
    patch_bytes: torch.Tensor  # [B, P] ids of the patch being decoded (global input of the next)
    local_cond: torch.Tensor  # [B, P, D_L] projected global output for the current patch (updated in place)
    layer_inputs: torch.Tensor | None  # [L_local, B, P, D_L] local layer inputs (cross-patch only)


class MegabyteDecoding:
    """``new_state`` / ``prefill`` / ``step`` and block decoding of `Megabyte` (see the module docstring)."""

    # one decoding step's device work at fixed shapes (with DeviceKVCaches): a pipeline may
    # torch.compile them for sampling (pipelines/sample.py)
    compilable_steps = ("decode_global", "decode_local")

    def new_state(
        self,
        modality: torch.Tensor,
        max_len: int,
        dtype: torch.dtype | None = None,
        device_caches: bool = False,
    ) -> MegabyteState:
        """Empty decoding state for a batch of rows with tags ``modality`` [B] (its device is used),
        able to decode ``max_len`` positions. ``dtype`` of the caches defaults to the weights'.
        ``device_caches``: every cache keeps its fill level on the device (``DeviceKVCache``):
        each step then has fixed shapes and addresses, so one captured CUDA graph (or one
        torch.compile'd function) serves every patch and byte; attention masks the empty slots."""
        c = self.config
        B = modality.shape[0]
        self._tag_index(modality, B)
        if max_len > c.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds max_seq_len {c.max_seq_len}")
        dev, dtype = modality.device, dtype or self.head.weight.dtype
        P, r = c.patch_size, c.cross_patch_r

        def caches(blocks, n):
            kind = DeviceKVCache if device_caches else KVCache
            return [kind(B, b.attn.n_kv_heads, n, b.attn.head_dim, dev, dtype) for b in blocks]

        layer_inputs = torch.zeros(c.local_layers, B, P, c.local_dim, device=dev, dtype=dtype) if r else None
        return MegabyteState(
            modality=modality,
            max_len=max_len,
            pos=0,
            # device caches are sized to the model's longest window, so that their shapes (and
            # a compiled step) are the same whatever the sample length
            global_caches=caches(self.global_blocks, c.max_seq_len // P if device_caches else -(-max_len // P)),
            local_caches=caches(self.local_blocks, r + P),
            patch_bytes=torch.full((B, P), c.pad_id, dtype=torch.long, device=dev),
            local_cond=torch.zeros(B, P, c.local_dim, device=dev, dtype=dtype),
            layer_inputs=layer_inputs,
        )

    def new_block_state(self, modality: torch.Tensor, max_len: int, dtype: torch.dtype | None = None) -> MegabyteState:
        """``new_state`` with ``device_caches``: what ``decode_block`` under a CUDA graph needs."""
        return self.new_state(modality, max_len, dtype, device_caches=True)

    @torch.no_grad()
    def step(self, state: MegabyteState, prev: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, V] for position ``state.pos``, given ``prev`` [B] = the bytes at position
        ``state.pos - 1`` (None exactly when ``state.pos == 0``); advances ``state.pos`` by one.
        At a patch boundary the global decoder runs once for the new patch."""
        c = self.config
        P, t = c.patch_size, state.pos
        if (prev is None) != (t == 0):
            want = "None" if t == 0 else "the bytes at position t-1, [B]"
            raise ValueError(f"step at position t={t}: prev must be {want}")
        if t >= state.max_len:
            raise ValueError(f"state is full: max_len {state.max_len} positions decoded")
        j = t % P
        if prev is not None:
            state.patch_bytes[:, (t - 1) % P] = prev
        if j == 0:
            self.start_patch(state, t // P)
        state.pos = t + 1
        return self.local_step(state, j, prev)

    @property
    def decode_block_size(self) -> int:
        """Bytes per ``decode_block`` call: one patch."""
        return self.config.patch_size

    def decode_block(
        self, state: MegabyteState, prev: torch.Tensor, sample: Callable[[torch.Tensor, int], torch.Tensor]
    ) -> torch.Tensor:
        """Decode the whole patch that starts at ``state.pos`` (a multiple of P, not 0): the global
        step once, then P local steps, byte j drawn by ``sample(logits [B, V], j) -> ids [B]`` and
        fed to step j+1. ``prev`` [B]: the bytes at ``state.pos - 1``. Returns the patch's bytes
        [B, P] and advances ``state.pos`` by P.

        The host does the same thing for every patch, and with ``device_caches`` (see
        ``new_state``, ``new_block_state``) every tensor it touches has a fixed address and shape, so one CUDA graph
        captured on any patch replays every later one (``models/generate.py``)."""
        self.prepare_block(state)
        out = []
        for j in range(self.config.patch_size):
            prev = sample(self.step(state, prev), j)
            out.append(prev)
        return torch.stack(out, 1)  # P x [B] -> [B, P]

    def prepare_block(self, state: MegabyteState) -> bool:
        """Raise unless ``decode_block`` can run at ``state.pos`` (host-side, no sync). Returns
        False: nothing is reallocated (a captured CUDA graph stays valid)."""
        P, t = self.config.patch_size, state.pos
        if t == 0 or t % P:
            raise ValueError(f"decode_block starts at a patch boundary after patch 0, got position {t} (P={P})")
        if t + P > state.max_len:
            raise ValueError(f"state is full: position {t} + patch of {P} > max_len {state.max_len}")
        return False

    def local_step(self, state: MegabyteState, j: int, prev: torch.Tensor | None) -> torch.Tensor:
        """The local decoder's step at in-patch position j: logits [B, V]."""
        r = self.config.cross_patch_r
        cond = state.local_cond[:, j : j + 1]  # [B, 1, D_L]
        emb = self.pad_byte.expand_as(cond) if j == 0 else self.local_embed(prev)[:, None]
        x = (emb + cond).to(cond.dtype)  # [B, 1, D_L]
        pos = torch.arange(r + j, r + j + 1, device=x.device)
        logits, inputs = self.decode_local(x, pos, state.local_caches)
        if r:  # kept for the next patch's cross-patch tail
            state.layer_inputs[:, :, j] = inputs
        return logits

    def decode_local(
        self, x: torch.Tensor, positions: torch.Tensor, caches: list[KVCache]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Device work of one local step: x [B, 1, D_L] at local positions [1] -> (logits [B, V],
        every layer's input [L_local, B, D_L] with cross-patch attention, else None). With
        DeviceKVCaches its shapes never change: a pipeline may torch.compile it."""
        inputs = []
        for blk, cache in zip(self.local_blocks, caches):
            inputs.append(x[:, 0])
            x = blk(x, positions=positions, causal=False, cache=cache)
        logits = self.head(self.local_norm(x))[:, 0]
        return logits, (torch.stack(inputs) if self.config.cross_patch_r else None)

    def decode_global(self, x: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """Device work of one global step: patch input x [B, 1, P·D_G] -> conditioning
        [B, P, D_L] of the next patch's bytes. Fixed shapes with DeviceKVCaches (see decode_local)."""
        return self._run_global(x, caches)[:, 0]

    def start_patch(self, state: MegabyteState, k: int) -> None:
        """Run the global decoder for patch k (its input is patch k-1) and reset the local caches."""
        P = self.config.patch_size
        if k == 0:
            tag = state.modality - self.config.first_tag_id  # checked by new_state
            x = self.pad_patch[tag][:, None]  # [B, 1, P*D_G]
        else:
            # the global cache holds k patches: patch k-1 starts at byte (k-1)·P; a DeviceKVCache
            # holds k on the device, so a captured graph replays for every patch
            start = (state.global_caches[0].next_positions(1) - 1) * P  # [1]
            x = self._embed_patches(state.patch_bytes, start)
        state.local_cond.copy_(self.decode_global(x, state.global_caches))  # [B, P, D_L]
        self._reset_local(state, k)

    def _reset_local(self, state: MegabyteState, k: int) -> None:
        r, P = self.config.cross_patch_r, self.config.patch_size
        for i, (blk, cache) in enumerate(zip(self.local_blocks, state.local_caches)):
            cache.reset()
            if r and k > 0:
                # keys/values of the previous patch's last r bytes, at local positions 0..r-1
                attn = blk.attn
                h = blk.attn_norm(state.layer_inputs[i, :, P - r :])  # [B, r, D_L]
                B = h.shape[0]
                # [B, r, Hkv*Dh] -> [B, Hkv, r, Dh]
                keys, vals = attn.project_kv(h)
                keys = keys.view(B, r, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
                vals = vals.view(B, r, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
                if attn.rope is not None:
                    keys = attn.rope(keys, torch.arange(r, device=h.device))
                cache.update(keys, vals)

    @torch.no_grad()
    def prefill(self, state: MegabyteState, ids: torch.Tensor) -> torch.Tensor:
        """Feed a prompt ids [B, n] into a fresh state; returns logits [B, n+1, V] for positions
        0..n (the last one predicts the first new byte) and leaves ``state.pos = n + 1``, so the
        next call is ``step(state, byte_n)``. Equal to ``step`` called n+1 times; complete
        patches go through the full forward at once."""
        if state.pos != 0:
            raise ValueError(f"prefill needs a fresh state (pos 0), got pos {state.pos}")
        B, n = ids.shape
        P = self.config.patch_size
        full = (n // P) * P  # bytes in complete patches before the patch holding position n
        if n + 1 > state.max_len:
            raise ValueError(f"prompt of {n} bytes needs max_len >= {n + 1}, state has {state.max_len}")
        out = []
        if full:
            keep = self.config.cross_patch_r > 0
            logits, kept = self._forward(ids[:, :full], state.modality, state.global_caches, keep)
            out.append(logits)
            K = full // P
            state.patch_bytes.copy_(ids[:, full - P : full])
            if kept is not None:  # layer inputs of the last complete patch: [L, B*K, P, D_L]
                state.layer_inputs.copy_(kept.view(len(kept), B, K, P, -1)[:, :, -1])
            state.pos = full
        for t in range(full, n + 1):
            out.append(self.step(state, None if t == 0 else ids[:, t - 1])[:, None])
        return torch.cat(out, 1)
