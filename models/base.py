"""The `ByteLM` interface every backbone implements, and the backbone registry.

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
"""

from __future__ import annotations

import dataclasses
import typing
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class ByteLMConfig:
    """Fields every backbone config has. Subclasses add their own (with a comment each)."""

    vocab_size: int = 264  # byte values 0..255 + specials (PAD, EOS, tags, reserved)
    pad_id: int = 256  # id that is only padding: never a target, never counted


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
    def max_stream_len(self) -> int | None:
        """Longest stream (tag included) that incremental decoding continues faithfully: the
        training window ``max_seq_len``; None where attention slides over ring caches, so a
        sample may run past the window with every step seeing the last ``window`` tokens."""
        return self.config.max_seq_len

    def generate(self, modality, prompts=None, max_bytes: int = 256, **kwargs) -> list[list[int]]:
        """Cached batched sampling; see `polybyte.models.generate.generate` for the arguments."""
        from .generate import generate

        return generate(self, modality, prompts, max_bytes, **kwargs)

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


# --- registry ---------------------------------------------------------------------------------
_BACKBONES: dict[str, tuple[type[ByteLM], type[ByteLMConfig]]] = {}


def register_backbone(name: str, config_cls: type[ByteLMConfig]):
    """Class decorator: ``@register_backbone("megabyte", MegabyteConfig)``."""

    def wrap(cls: type[ByteLM]) -> type[ByteLM]:
        cls.backbone = name
        _BACKBONES[name] = (cls, config_cls)
        return cls

    return wrap


def _load_all() -> None:
    # Importing the modules registers the backbones.
    from . import blt, megabyte, transformer  # noqa: F401


def backbone_names() -> list[str]:
    _load_all()
    return sorted(_BACKBONES)


def config_class(name: str) -> type[ByteLMConfig]:
    _load_all()
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {sorted(_BACKBONES)}")
    return _BACKBONES[name][1]


def build_model(config: ByteLMConfig | dict[str, Any], name: str | None = None) -> ByteLM:
    """Build a backbone from its config dataclass, or from a dict ``{"backbone": name, ...}``."""
    _load_all()
    if isinstance(config, dict):
        config = dict(config)
        name = config.pop("backbone", name)
        config = config_from_dict(name, config)
    for key, (cls, cfg_cls) in _BACKBONES.items():
        if type(config) is cfg_cls and (name is None or name == key):
            return cls(config)
    raise ValueError(f"no backbone takes a {type(config).__name__}; known: {sorted(_BACKBONES)}")


def config_from_dict(name: str, d: dict[str, Any]) -> ByteLMConfig:
    """Rebuild a (possibly nested) config dataclass from plain dicts, rejecting unknown keys."""
    return _dataclass_from_dict(config_class(name), d)


def config_to_dict(config: ByteLMConfig) -> dict[str, Any]:
    for key, (_, cfg_cls) in _BACKBONES.items():
        if type(config) is cfg_cls:
            return {"backbone": key, **dataclasses.asdict(config)}
    raise ValueError(f"unregistered config type {type(config).__name__}")


def _dataclass_from_dict(cls, d: dict[str, Any]):
    hints = typing.get_type_hints(cls)  # resolves string annotations to classes
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for k, v in d.items():
        sub = hints.get(k)
        nested = isinstance(v, dict) and dataclasses.is_dataclass(sub)
        kwargs[k] = _dataclass_from_dict(sub, v) if nested else v
    return cls(**kwargs)
