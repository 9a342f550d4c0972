"""FLOP counting shared by every backbone's ``flops_per_byte()``.

Conventions (as in Kaplan et al. / Chinchilla, counting a multiply-add as 2 FLOPs):

* a linear layer costs ``2·in·out`` FLOPs per token (row) forward; embedding and hash-table
  lookups cost nothing; norms, activations and softmax are ignored (lower order);
* attention costs ``2·2·d_attn`` FLOPs forward per (query, key) pair that the mask allows
  (QKᵀ and AV, ``d_attn = n_heads·head_dim``); counting allowed pairs exactly gives the causal
  halving and the sliding-window limit;
* training (forward + backward) = 3 × forward.

Counted by hand rather than with ``torch.utils.flop_counter``: that counter sees the kernels
actually run (a dense masked SDPA on CPU costs the full square), while MFU wants the FLOPs the
model needs at the real mask and patch lengths.
"""

from __future__ import annotations

from torch import nn

TRAIN_FACTOR = 3  # backward ≈ 2 × forward


def linear_weights(module: nn.Module) -> int:
    """Total ``in·out`` over every nn.Linear inside ``module`` (biases ignored)."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def linear_flops(module: nn.Module) -> int:
    """Forward FLOPs per token (row) of every nn.Linear inside ``module``: 2·in·out each."""
    return 2 * linear_weights(module)


def attention_pairs(q_len: int, kv_len: int | None = None, *, causal: bool = True, window: int | None = None) -> int:
    """Number of (query, key) pairs a mask allows.

    Self-attention (``kv_len`` None or equal to ``q_len``): query i sees keys
    ``max(0, i - window + 1) .. i`` (causal) or all keys (not causal, ``window`` ignored).
    Cross-attention without a structured mask (``causal=False``): ``q_len·kv_len``.
    """
    kv_len = q_len if kv_len is None else kv_len
    if not causal:
        return q_len * kv_len
    if kv_len != q_len:
        raise ValueError("causal pair counting needs q_len == kv_len; count structured masks yourself")
    if window is None or window >= q_len:
        return q_len * (q_len + 1) // 2
    # the first `window` queries see 1..window keys, every later one sees `window`
    return window * (window + 1) // 2 + (q_len - window) * window


def attention_flops(pairs: int, d_attn: int) -> int:
    """Forward FLOPs of QKᵀ and AV for ``pairs`` allowed pairs at width ``n_heads·head_dim``."""
    return 2 * 2 * pairs * d_attn


def training_flops(forward_flops: float) -> float:
    return TRAIN_FACTOR * forward_flops
