"""Byte adapters: each modality turns stored files into payload bytes and back."""

from .base import (  # noqa: F401
    AUDIO,
    EOS,
    IMAGE,
    NUM_BYTES,
    PAD,
    RESOURCE_LIMITS,
    TAG_NAMES,
    TAGS,
    TEXT,
    VOCAB_SIZE,
    Modality,
    ResourceLimitError,
    SettingMismatchError,
    available,
    frame,
    get_modality,
    modality_from_dict,
    payload_mask,
    register,
)
