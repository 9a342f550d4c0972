"""BLT's entropy model: next-byte entropies from a small flat transformer.

The entropy model is a ``Transformer`` with sliding-window attention (``PRESETS["entropy"]``).
``entropies[:, p]`` is the entropy (nats) of its distribution for byte ``p`` given the modality
tag and bytes ``< p`` — the paper's H(x_p | x_<p), which the issue calls "H[p-1]" (the
entropy after byte p-1). The entropy patcher starts a patch at p iff ``entropies[:, p] > θ``.

Rows never see each other: the model treats every row independently (no packing of rows into
one sequence, no cross-row normalisation), which the tests check against single-row runs.
"""

from __future__ import annotations

import torch

from .base import ByteLM
from .kv_cache import TransformerCache
from .transformer import Transformer, TransformerConfig, transformer_preset


def entropy_model_config(**overrides) -> TransformerConfig:
    """The entropy-model preset (windowed flat transformer) with fields overridden."""
    config = transformer_preset("entropy", **overrides)
    if config.window is None:
        raise ValueError("an entropy model needs sliding-window attention: set window (e.g. 512)")
    return config


def byte_entropies(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of softmax(logits) over the full vocabulary, in fp32.

    logits [..., V] -> [...]. -inf logits (impossible tokens) contribute 0, not NaN.
    """
    # written out rather than torch.distributions.Categorical, which torch.compile does not trace
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp.clamp_min(torch.finfo(torch.float32).min)).sum(-1)


@torch.no_grad()
def compute_entropies(model: ByteLM, ids: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    """ids [B, T], modality [B] -> entropies [B, T] (nats); see the module docstring."""
    return byte_entropies(model(ids, modality))


@torch.no_grad()
def step_entropies(model: Transformer, tokens: torch.Tensor, cache: TransformerCache) -> torch.Tensor:
    """Incremental entropies for generation: feed input tokens [B, n] through the cache.

    The stream starts with the modality tag, then the bytes: entry i is the entropy of the
    distribution of the byte after ``tokens[:, i]``, equal to ``compute_entropies`` at that
    byte's position. With a windowed model the cache is a ring buffer (O(window) memory).
    """
    return byte_entropies(model.forward_step(tokens, cache))
