"""Pure-torch byte models: no Lightning, no file I/O, no global state."""

from .base import (  # noqa: F401
    ByteLM,
    ByteLMConfig,
    backbone_names,
    build_model,
    config_class,
    config_from_dict,
    config_to_dict,
    register_backbone,
)
