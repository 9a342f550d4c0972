"""The `ByteLM` interface every backbone implements, with its decoding protocol.

The backbones live in their own modules and the registry in ``models/__init__.py``: this
module imports neither (a base never imports its implementations).

Conventions shared by all backbones (DESIGN.md §2, §5):

* ``ids``: LongTensor[B, T] — the byte grid of one window: bytes 0..255, EOS, in-stream tags
  (packed text), PAD. ``T`` is ``seq_len``.
* ``modality``: LongTensor[B] — the modality tag id of each row (258 text, 259 image,
  260 audio). It is the context *before* position 0: backbones carry it outside the byte grid
  (a start token/patch chosen per modality), so the first payload byte starts a patch.
* ``forward(ids, modality) -> logits[B, T, V]`` where ``logits[:, t]`` is the distribution of
  ``ids[:, t]`` given ``modality`` and ``ids[:, :t]`` — every position is a target, nothing is
  shifted by the caller.
* ``loss`` is the mean cross-entropy over every non-PAD target; the per-target NLL (nats, 0 at
  PAD) is returned too so BPB over payload bytes can be computed by the caller.

Incremental decoding (what ``models/generate.py`` drives; every backbone implements it):

* ``state = model.new_state(modality [B], max_len, dtype)``: an empty `DecodingState` for B rows,
  able to emit ``max_len`` positions; every row sits at the same position ``state.pos``;
* ``model.prefill(state, ids [B, n]) -> logits [B, n+1, V]`` on a fresh state (n may be 0): the
  logits of positions 0..n, leaving ``state.pos = n + 1``;
* ``model.step(state, prev) -> logits [B, V]`` of position ``state.pos``, given ``prev`` [B] =
  the bytes at ``state.pos - 1`` (None exactly at position 0); advances ``state.pos``.

Block decoders (MEGABYTE, BLT, the flat transformer) also decode ``decode_block_size`` bytes per
call with the sampling inside, at fixed shapes and without host syncs, so that one CUDA graph
replays every block (``decode_block_size`` None: a backbone that decodes by ``step`` only):

* ``state = model.new_block_state(modality, max_len, dtype)``: a state whose every step has the
  same shapes and tensor addresses;
* ``model.prepare_block(state) -> bool``: host-side checks and cache growth before a block; True
  when buffers were reallocated (a captured graph must be captured again);
* ``model.decode_block(state, prev, sample) -> ids [B, n]``: byte j drawn by ``sample(logits,
  j)`` and fed to step j+1; advances ``state.pos`` by n.

Every logit equals the full forward's at the same position.
"""

from __future__ import annotations

import dataclasses
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from . import tokens


@dataclasses.dataclass
class ByteLMConfig:
    """Fields every backbone config has. Subclasses add their own (with a comment each)."""

    vocab_size: int = tokens.VOCAB_SIZE  # byte values 0..255 + specials (PAD, EOS, tags, reserved)
    pad_id: int = tokens.PAD  # id that is only padding: never a target, never counted
    dropout: float = 0.0  # residual dropout in every block while training (small corpora); 0 = none


@dataclasses.dataclass
class DecodingState:
    """What every backbone's decoding state holds (each backbone's subclass adds its caches)."""

    modality: torch.Tensor  # [B] modality tag ids
    max_len: int  # most positions this state can emit
    pos: int  # the position whose logits the next ``step`` returns (host)


class ByteLM(nn.Module, ABC):
    """A byte-level language model (see module docstring for the shape contract)."""

    backbone: ClassVar[str]  # registry name, e.g. "transformer", "megabyte", "blt"
    # Methods doing one decoding step's device work at fixed shapes (no host syncs): a pipeline
    # may torch.compile them for sampling (MEGABYTE: decode_global, decode_local; BLT:
    # decode_front, decode_latent, decode_back).
    compilable_steps: ClassVar[tuple[str, ...]] = ()
    # Of those, the ones whose shapes follow caches that grow while sampling (BLT's latent step):
    # compiled with dynamic shapes, once, instead of once per cache size.
    growing_steps: ClassVar[tuple[str, ...]] = ()
    config: ByteLMConfig

    def __init__(self) -> None:
        super().__init__()
        # Statistics of the most recent forward (e.g. BLT: number of patches); tensors.
        self.aux: dict[str, torch.Tensor] = {}

    @abstractmethod
    def forward(self, ids: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """ids [B, T], modality [B] -> logits [B, T, V]."""

    def loss(self, ids: torch.Tensor, modality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean CE over non-PAD targets, and the per-target NLL [B, T] in nats (0 at PAD)."""
        logits = self(ids, modality)
        return nll_loss(logits, ids, self.config.pad_id)

    @abstractmethod
    def flops_per_byte(self, mean_patch_len: float | None = None) -> float:
        """Training FLOPs (forward + backward) per byte of the grid at ``seq_len``."""

    @property
    def seq_multiple(self) -> int:
        """The forward takes windows whose length is a multiple of this (MEGABYTE: whole patches)."""
        return 1

    @property
    def fixed_patch_len(self) -> int | None:
        """Bytes per patch when every patch has that length (MEGABYTE, strided BLT), else None:
        a prompt cut at a multiple of it leaves the first sampled byte at a patch start."""
        return None

    @property
    def max_stream_len(self) -> int | None:
        """Longest stream (tag included) that incremental decoding continues faithfully: the
        training window ``max_seq_len``; None where attention slides over ring caches, so a
        sample may run past the window with every step seeing the last ``window`` tokens."""
        return self.config.max_seq_len

    # --- incremental decoding (see the module docstring) --------------------------------------
    # Bytes per ``decode_block`` call; None: the backbone decodes by ``step`` only.
    decode_block_size: int | None = None

    @abstractmethod
    def new_state(self, modality: torch.Tensor, max_len: int, dtype: torch.dtype | None = None) -> DecodingState:
        """Empty decoding state for rows with tags ``modality`` [B] (its device is used), able to
        emit ``max_len`` positions; cache ``dtype`` defaults to the weights'."""

    @abstractmethod
    def prefill(self, state: DecodingState, ids: torch.Tensor) -> torch.Tensor:
        """Feed a prompt ids [B, n] into a fresh state -> logits [B, n+1, V]; ``state.pos = n + 1``."""

    @abstractmethod
    def step(self, state: DecodingState, prev: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, V] of position ``state.pos`` given the bytes ``prev`` [B] before it (None
        at position 0); advances ``state.pos`` by one."""

    def new_block_state(self, modality: torch.Tensor, max_len: int, dtype: torch.dtype | None = None) -> DecodingState:
        """A state for ``decode_block``: every step with the same shapes and addresses. Default:
        ``new_state`` (a backbone whose states are always like that)."""
        return self.new_state(modality, max_len, dtype)

    def prepare_block(self, state: DecodingState) -> bool:
        """Host-side preparation of ``decode_block``; True when buffers were reallocated."""
        raise NotImplementedError(f"{type(self).__name__} has no block decoding (decode_block_size is None)")

    def decode_block(
        self, state: DecodingState, prev: torch.Tensor, sample: Callable[[torch.Tensor, int], torch.Tensor]
    ) -> torch.Tensor:
        """Decode ``decode_block_size`` bytes [B, n] from ``state.pos``, sampling inside."""
        raise NotImplementedError(f"{type(self).__name__} has no block decoding (decode_block_size is None)")

    def num_params(self, exclude_embeddings: bool = False) -> int:
        skip = set()
        if exclude_embeddings:
            skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)


def nll_loss(logits: torch.Tensor, ids: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, T, V], ids [B, T] -> (mean NLL over non-PAD targets, NLL [B, T] with 0 at PAD)."""
    B, T, V = logits.shape
    nll = F.cross_entropy(logits.float().reshape(B * T, V), ids.reshape(B * T), reduction="none")
    nll = nll.reshape(B, T)  # [B*T] -> [B, T]
    keep = ids != pad_id
    nll = torch.where(keep, nll, torch.zeros_like(nll))
    return nll.sum() / keep.sum().clamp_min(1), nll


# --- config (de)serialisation ----------------------------------------------------------------
def dataclass_from_dict(cls, d: dict[str, Any]):
    """Rebuild a (possibly nested) config dataclass from plain dicts, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)  # resolves string annotations to classes
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for k, v in d.items():
        sub = hints.get(k)
        nested = isinstance(v, dict) and dataclasses.is_dataclass(sub)
        kwargs[k] = dataclass_from_dict(sub, v) if nested else v
    return cls(**kwargs)
