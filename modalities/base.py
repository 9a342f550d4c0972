"""The byte stream contract (DESIGN.md §2) and the `Modality` interface with its registry (§3).

Token ids 0..255 are byte values; specials sit above them. One sample is framed as
``[tag] + payload + [EOS]``; PAD only ever pads. Bits-per-byte counts payload bytes only.
"""

from __future__ import annotations

import dataclasses
import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

# --- vocabulary -------------------------------------------------------------------------------
NUM_BYTES = 256
PAD = 256  # padding only; never a training target
EOS = 257  # end of one sample
TEXT = 258  # modality tags
IMAGE = 259
AUDIO = 260
RESERVED = (261, 262, 263)
VOCAB_SIZE = 264

TAGS = {"text": TEXT, "image": IMAGE, "audio": AUDIO}
TAG_NAMES = {v: k for k, v in TAGS.items()}


def frame(tag: int, payload: bytes) -> list[int]:
    """One sample as ids: ``[tag] + payload + [EOS]``."""
    if tag not in TAG_NAMES:
        raise ValueError(f"unknown modality tag {tag}; known: {TAG_NAMES}")
    return [tag, *payload, EOS]


def payload_mask(targets):
    """True where a target id is a payload byte (0..255): the positions BPB counts.

    Works on torch tensors and numpy arrays alike (anything supporting ``<``).
    """
    return targets < NUM_BYTES


# --- resource limits --------------------------------------------------------------------------
# Adapter settings that bound how much a member may decode to (decompression-bomb guards). They
# never change a payload, so two adapters that differ only in them encode data the same way.
RESOURCE_LIMITS = ("max_member_bytes", "max_pixels", "max_decoded_samples", "max_seconds")


class ResourceLimitError(ValueError):
    """A member is above one of its adapter's resource limits and is refused before decoding.

    ``setting`` names the limit (one of ``RESOURCE_LIMITS``) so callers can count skips by it.
    """

    def __init__(self, message: str, setting: str) -> None:
        super().__init__(message)
        self.setting = setting


class SettingMismatchError(ValueError):
    """A member's own property (an image's size, a recording's sample rate) differs from its
    adapter's setting while the adapter is ``strict`` (converting was not asked for).

    ``setting`` names the adapter setting (``size``, ``sample_rate``).
    """

    def __init__(self, message: str, setting: str) -> None:
        super().__init__(message)
        self.setting = setting


def check_limit(what: str, value: float, setting: str, limit: float | None) -> None:
    """Raise `ResourceLimitError` when ``value`` exceeds ``limit`` (None: no limit)."""
    if limit is not None and value > limit:
        raise ResourceLimitError(
            f"{what}, above the {setting}={limit:,} limit (raise the {setting} setting to read it)", setting
        )


def positive_limit(setting: str, value: float | None) -> None:
    """Settings check: a resource limit is a positive number or None (no limit)."""
    if value is not None and not value > 0:
        raise ValueError(f"{setting} must be positive or None (no limit), got {value}")


# --- the Modality interface -------------------------------------------------------------------
class Modality(ABC):
    """Turns stored members (file bytes) into payload bytes and back.

    Subclasses set ``name`` (registry key), ``tag`` (token id), ``extensions`` (member/file
    extensions they read, lower-case with dot) and ``Settings`` (a dataclass; saved with
    every checkpoint so sampling rebuilds the same adapter).

    ``properties`` are the settings a member itself determines (an image's ``size``, a
    recording's ``sample_rate``); `native` reads them from a member's header. An adapter
    converts members to its settings (crop and resize, resample) unless ``strict`` is set: then
    a member whose own property differs is a `SettingMismatchError`. `polybyte shard` converts;
    the loaders are strict unless the setting was given explicitly.
    """

    name: ClassVar[str]
    tag: ClassVar[int]
    extensions: ClassVar[tuple[str, ...]]
    Settings: ClassVar[type]
    properties: ClassVar[tuple[str, ...]] = ()
    strict: bool = False  # refuse members whose properties differ from the settings

    def __init__(self, settings: Any | None = None, **overrides: Any) -> None:
        if settings is None:
            settings = self.Settings(**overrides)
        elif overrides:
            settings = dataclasses.replace(settings, **overrides)
        self.settings = settings

    @abstractmethod
    def encode(self, member_bytes: bytes, meta: dict | None = None) -> bytes:
        """Stored member bytes (e.g. a PNG file, a FLAC file, UTF-8 text) -> payload bytes."""

    @abstractmethod
    def decode(self, payload: bytes) -> Any:
        """Payload bytes -> a natural object (str, PIL image, (waveform, rate))."""

    @abstractmethod
    def save(self, obj: Any, path) -> None:
        """Write a decoded object to ``path`` in the modality's file format (.txt/.png/.wav)."""

    def augmenter(self, options: dict) -> Callable[[bytes, random.Random], bytes] | None:
        """Training-time augmentation of payloads from ``options`` (``data.augment``'s entry for
        a source): a function ``(payload, rng) -> payload``, or None when the options change
        nothing. Never applied to validation, eval or sampling. A modality without any
        augmentation refuses every option."""
        if options:
            raise ValueError(f"{self.name} has no training augmentations (got {options!r})")
        return None

    def native(self, member_bytes: bytes) -> dict:
        """The ``properties`` this member has, from its header (nothing decoded); ValueError
        for a member that cannot be read or has no single value for one of them."""
        return {}

    def conversion(self, member_bytes: bytes) -> tuple[str, str] | None:
        """``(what the member is, what the adapter makes of it)``, e.g. ``("48x40 RGBA",
        "32x32 RGB")``, when encoding it changes its size, channels or rate (read from its header);
        None when it is already at the settings. ValueError for a member that cannot be read."""
        return None

    def settings_dict(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self.settings)}


_REGISTRY: dict[str, type[Modality]] = {}


def register(cls: type[Modality]) -> type[Modality]:
    """Class decorator: make a modality available by ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"modality {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def get_modality(name: str, **settings: Any) -> Modality:
    """Build a registered modality adapter by name with the given settings."""
    from . import audio, image, text  # noqa: F401  (registration side effect)

    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown modality {name!r}; known: {sorted(_REGISTRY)}") from None
    return cls(**settings)


def modality_from_dict(d: dict) -> Modality:
    """Inverse of ``Modality.settings_dict``."""
    d = dict(d)
    return get_modality(d.pop("name"), **d)


def available() -> list[str]:
    from . import audio, image, text  # noqa: F401

    return sorted(_REGISTRY)
