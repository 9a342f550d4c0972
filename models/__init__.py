"""Pure-torch byte models: no Lightning, no file I/O, no global state beyond this registry.

Importing the package imports the three backbones and registers them by name; ``base.py`` (the
`ByteLM` interface) never imports them. Module map: README.md, "Code map".
"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import blt, megabyte, transformer
from .base import ByteLM, ByteLMConfig, DecodingState, dataclass_from_dict, nll_loss  # noqa: F401
from .blt import BLT, BLTConfig
from .megabyte import Megabyte, MegabyteConfig
from .transformer import Transformer, TransformerConfig

# name -> (model class, config class); the class's ``backbone`` is its name here
_BACKBONES: dict[str, tuple[type[ByteLM], type[ByteLMConfig]]] = {}
# name -> {preset name: config dataclass or its fields as a (nested) dict}
_PRESETS: dict[str, dict[str, Any]] = {}


def register_backbone(name: str, config_cls: type[ByteLMConfig], presets: dict[str, Any] | None = None):
    """Class decorator registering a backbone: ``@register_backbone("mine", MyConfig, PRESETS)``;
    ``presets`` maps names to configs (or their fields as dicts) that ``{"preset": NAME}`` starts from."""

    def wrap(cls: type[ByteLM]) -> type[ByteLM]:
        if getattr(cls, "backbone", name) != name:
            raise ValueError(f"{cls.__name__}.backbone is {cls.backbone!r}, registered as {name!r}")
        cls.backbone = name
        _BACKBONES[name] = (cls, config_cls)
        _PRESETS[name] = dict(presets or {})
        return cls

    return wrap


for _cls, _cfg, _module in (
    (Transformer, TransformerConfig, transformer),
    (Megabyte, MegabyteConfig, megabyte),
    (BLT, BLTConfig, blt),
):
    register_backbone(_cls.backbone, _cfg, _module.PRESETS)(_cls)


def backbone_names() -> list[str]:
    return sorted(_BACKBONES)


def config_class(name: str) -> type[ByteLMConfig]:
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {sorted(_BACKBONES)}")
    return _BACKBONES[name][1]


def build_model(config: ByteLMConfig | dict[str, Any], name: str | None = None) -> ByteLM:
    """Build a backbone from its config dataclass, or from a dict ``{"backbone": name, ...}``."""
    if isinstance(config, dict):
        config = dict(config)
        name = config.pop("backbone", name)
        config = config_from_dict(name, config)
    for key, (cls, cfg_cls) in _BACKBONES.items():
        if type(config) is cfg_cls and (name is None or name == key):
            return cls(config)
    raise ValueError(f"no backbone takes a {type(config).__name__}; known: {sorted(_BACKBONES)}")


def preset_names(name: str) -> list[str]:
    config_class(name)  # an unknown backbone says so
    return sorted(_PRESETS[name])


def preset_dict(name: str, preset: str) -> dict[str, Any]:
    """Every field of backbone ``name``'s preset ``preset`` as a plain (nested) dict."""
    if preset not in _PRESETS.get(name, {}):
        raise ValueError(f"unknown {name} preset {preset!r}; known: {preset_names(name)}")
    p = _PRESETS[name][preset]
    return dataclasses.asdict(p if dataclasses.is_dataclass(p) else dataclass_from_dict(config_class(name), p))


def merge_fields(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over``'s keys set; a dict in both (a nested config) is merged key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_fields(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(name: str, d: dict[str, Any]) -> ByteLMConfig:
    """Rebuild a (possibly nested) config dataclass from plain dicts, rejecting unknown keys.
    ``{"preset": "base", ...}`` starts from that preset and sets only the keys given (nested
    parts such as BLT's ``encoder`` key by key): a config file states only what differs."""
    d = dict(d)
    preset = d.pop("preset", None)
    if preset is not None:
        d = merge_fields(preset_dict(name, preset), d)
    return dataclass_from_dict(config_class(name), d)


def config_to_dict(config: ByteLMConfig) -> dict[str, Any]:
    for key, (_, cfg_cls) in _BACKBONES.items():
        if type(config) is cfg_cls:
            return {"backbone": key, **dataclasses.asdict(config)}
    raise ValueError(f"unregistered config type {type(config).__name__}")
