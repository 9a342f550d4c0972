"""Pure-torch byte models: no Lightning, no file I/O, no global state beyond this registry.

Importing the package imports the three backbones and registers them by name; ``base.py`` (the
`ByteLM` interface) never imports them. Module map: README.md, "Code map".
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .base import ByteLM, ByteLMConfig, DecodingState, dataclass_from_dict, nll_loss  # noqa: F401
from .blt import BLT, BLTConfig
from .megabyte import Megabyte, MegabyteConfig
from .transformer import Transformer, TransformerConfig

# name -> (model class, config class); the class's ``backbone`` is its name here
_BACKBONES: dict[str, tuple[type[ByteLM], type[ByteLMConfig]]] = {}


def register_backbone(name: str, config_cls: type[ByteLMConfig]):
    """Class decorator registering a backbone: ``@register_backbone("mine", MyConfig)``."""

    def wrap(cls: type[ByteLM]) -> type[ByteLM]:
        if getattr(cls, "backbone", name) != name:
            raise ValueError(f"{cls.__name__}.backbone is {cls.backbone!r}, registered as {name!r}")
        cls.backbone = name
        _BACKBONES[name] = (cls, config_cls)
        return cls

    return wrap


for _cls, _cfg in ((Transformer, TransformerConfig), (Megabyte, MegabyteConfig), (BLT, BLTConfig)):
    register_backbone(_cls.backbone, _cfg)(_cls)


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


def config_from_dict(name: str, d: dict[str, Any]) -> ByteLMConfig:
    """Rebuild a (possibly nested) config dataclass from plain dicts, rejecting unknown keys."""
    return dataclass_from_dict(config_class(name), d)


def config_to_dict(config: ByteLMConfig) -> dict[str, Any]:
    for key, (_, cfg_cls) in _BACKBONES.items():
        if type(config) is cfg_cls:
            return {"backbone": key, **dataclasses.asdict(config)}
    raise ValueError(f"unregistered config type {type(config).__name__}")
