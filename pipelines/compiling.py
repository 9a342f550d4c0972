"""How training applies ``torch.compile`` to a model, from outside it (the model files know nothing of it).

Two scopes:

- ``"blocks"`` (default): every repeated layer — each element of an ``nn.ModuleList``, e.g. a
  transformer block or a BLT cross-attention layer — is compiled in place (``Module.compile``).
  Layers of one class share one compiled graph per distinct shape, so a 25-layer latent
  transformer compiles one block, not 25: warm-up falls from minutes to well under a minute
  (regional compilation). The code between the layers (embeddings, patching, pooling, the
  head) stays eager.
- ``"model"``: the whole forward as one graph (``torch.compile(model)``), which also fuses the
  code between layers, at the price of a warm-up that grows with depth.

Shapes are static (``dynamic=False``): every shape a training run sees is fixed by the config
(BLT pads its patches to fixed slots), and a second shape (a shorter last validation batch)
compiles once more instead of turning every graph dynamic.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

CompileScope = Literal["blocks", "model"]
SCOPES: tuple[str, ...] = ("blocks", "model")
# compiled graphs allowed per layer class: one per distinct (shape, grad mode) — BLT's encoder,
# latent, decoder and entropy-model blocks are four shapes of one Block class
RECOMPILE_LIMIT = 64


def compile_scope(value: bool | str) -> CompileScope | None:
    """The scope a ``compile`` setting names: False -> None, True -> "blocks", or the scope itself."""
    if value is False or value is None:
        return None
    if value is True:
        return "blocks"
    if value not in SCOPES:
        raise ValueError(f"compile: expected true, false or one of {', '.join(SCOPES)}; got {value!r}")
    return value  # type: ignore[return-value]


def repeated_layers(model: nn.Module) -> list[nn.Module]:
    """The elements of every ``nn.ModuleList`` under ``model``, outermost first; a layer inside
    one already listed is not listed again."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():  # pre-order: a list comes before what its layers hold
        if id(module) in inside or not isinstance(module, nn.ModuleList):
            continue
        for layer in module:
            found.append(layer)
            inside.update(id(m) for m in layer.modules())
    return found


def compile_for_training(model: nn.Module, scope: bool | str = "blocks", backend: str = "inductor") -> nn.Module:
    """``model`` compiled for training steps in ``scope`` (see the module docstring). "blocks"
    compiles its repeated layers in place and returns ``model`` itself; "model" returns a
    compiled wrapper (the parameters stay ``model``'s). ``backend``: torch.compile's."""
    scope = compile_scope(scope)
    if scope is None:
        return model
    if scope == "model":
        return torch.compile(model, backend=backend)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    layers = repeated_layers(model)
    if not layers:  # nothing repeats: the whole model is the region
        return torch.compile(model, dynamic=False, backend=backend)
    for layer in layers:
        layer.compile(dynamic=False, backend=backend)
    return model
