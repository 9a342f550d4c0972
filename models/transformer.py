"""Flat byte transformer: the baseline backbone, and BLT's entropy model (with a window).

A Llama-style decoder over the 264-token vocabulary: token embedding, pre-norm blocks (RMSNorm,
RoPE, SwiGLU, grouped-query attention), final norm, output head. The modality tag is the first
*input* token (embedded with the same table): the input is the byte grid shifted right by one
with the tag in front, so ``logits[:, t]`` predicts ``ids[:, t]`` from the tag and ``ids[:, :t]``.

Attention is causal through SDPA's ``is_causal`` (flash / cuDNN kernels on CUDA), or a causal
sliding window through FlexAttention when ``window`` is set (BLT's entropy model).

Incremental decoding: the protocol of ``models/base.py`` (``new_state`` / ``prefill`` / ``step``,
and ``decode_block``: 16 bytes per call, one CUDA graph replay on GPU) over per-layer KV caches of
the *input* stream ``[tag, b0, b1, ...]``; underneath it, and for BLT's entropy model::

    cache = model.new_cache(B, max_len)                      # per-layer KV caches
    logits = model.forward_step(tokens [B, n], cache)        # [B, n, V]: any chunk of the stream

Every logit equals the full forward's at the same position.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from .base import ByteLM, ByteLMConfig, DecodingState
from .flops import attention_flops, attention_pairs, linear_flops, training_flops
from .kv_cache import DeviceKVCache, DeviceWindowedKVCache, KVCache, TransformerCache, WindowedKVCache
from .layers import Block, OutputMask, RMSNorm, RoPE, checked_output_ids, init_normal, init_residual_projections
from .masks import AttentionMask, prepare_mask, sliding_window_mask


@dataclasses.dataclass
class TransformerConfig(ByteLMConfig):
    dim: int = 512  # model width D
    n_layers: int = 8  # number of transformer blocks
    n_heads: int = 8  # query heads; head_dim = dim / n_heads (must be even for RoPE)
    n_kv_heads: int | None = None  # key/value heads for grouped-query attention; None = n_heads
    mlp_hidden: int | None = None  # SwiGLU hidden width; None = 8/3·dim rounded up to 64
    rope_theta: float = 10000.0  # RoPE base; wavelengths up to 2π·theta bytes cover any window here
    max_seq_len: int = 2048  # training window T (bytes per row): FLOP counting, default cache size
    window: int | None = None  # sliding window: a position sees itself + window-1 before; None = full causal
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the output head with the input embedding (off: Llama/BLT default)
    init_std: float = 0.02  # normal init std; residual output projections get std/sqrt(2·n_layers) (GPT-2)
    # Ids whose logit is always -inf: an imported model's vocabulary has no output for them.
    unused_outputs: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.unused_outputs = checked_output_ids(self.unused_outputs, self.vocab_size)
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into n_heads {self.n_heads} heads of even size")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1 or None, got {self.window}")
        if self.max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {self.max_seq_len}")


# Shipped sizes (TransformerConfig kwargs). Parameters at vocab 264 with an untied head; "non-emb."
# leaves out the input embedding only; training FLOPs per byte at the preset's max_seq_len:
#   preset    params   non-emb.   FLOPs/byte
#   tiny       0.49M     0.46M      3.15M    CI / CPU tests
#   small     29.18M    29.05M    230.9M     ≈ 30M
#   base     170.31M   170.11M    1.93G      ≈ 170M
#   entropy   45.24M    45.11M    313.2M     BLT's entropy model: the paper's 14 layers, width 512,
#                                            512-byte window (it quotes 100M for that shape)
PRESETS: dict[str, dict] = {
    "tiny": dict(dim=128, n_layers=2, n_heads=4, max_seq_len=256),
    "small": dict(dim=512, n_layers=9, n_heads=8, max_seq_len=2048),
    "base": dict(dim=768, n_layers=24, n_heads=12, max_seq_len=8192),
    "entropy": dict(dim=512, n_layers=14, n_heads=8, window=512, max_seq_len=8192),
}


@dataclasses.dataclass
class TransformerState(DecodingState):
    """Decoding state of a batch (``Transformer.new_state``): the caches of the input stream
    ``[tag, b0, b1, ...]``; ``pos`` = input tokens consumed."""

    cache: TransformerCache


class Transformer(ByteLM):
    """Flat byte decoder (see module docstring)."""

    backbone = "transformer"  # registry name (models/__init__.py)

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        rope = RoPE(c.dim // c.n_heads, c.rope_theta)  # shared: it only holds frequencies
        self.blocks = nn.ModuleList(
            Block(c.dim, c.n_heads, c.n_kv_heads, rope, c.mlp_hidden, c.norm_eps, c.dropout) for _ in range(c.n_layers)
        )
        self.norm = RMSNorm(c.dim, eps=c.norm_eps)
        self.head = None if c.tie_embeddings else nn.Linear(c.dim, c.vocab_size, bias=False)
        self.output_mask = OutputMask(c.unused_outputs)
        # window masks by (length, device): they depend on nothing else, and building a
        # FlexAttention block mask every step would cost as much as a small model's forward
        self._masks: dict[tuple[int, str], AttentionMask] = {}
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.config.init_std
        init_normal(self, std)
        # residual branches add up over 2·n_layers projections: keep the stream's variance flat
        init_residual_projections(self.blocks, std, self.config.n_layers)

    # --- full forward -------------------------------------------------------------------------
    def inputs(self, ids: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """ids [B, T], modality [B] -> input tokens [B, T]: the tag, then ids[:, :-1]."""
        if ids.dim() != 2 or modality.shape != ids.shape[:1]:
            raise ValueError(
                f"expected ids [B, T] and modality [B], got {tuple(ids.shape)} and {tuple(modality.shape)}"
            )
        return torch.cat([modality[:, None].to(ids.dtype), ids[:, :-1]], dim=1)  # [B, 1 + T-1]

    def hidden(self, tokens: torch.Tensor, cache: TransformerCache | None = None) -> torch.Tensor:
        """Input tokens [B, n] -> final-norm hidden states [B, n, D].

        Without a cache the tokens are positions 0..n-1; with one they continue its stream.
        """
        B, n = tokens.shape
        x = self.embed(tokens)  # [B, n, D]
        if cache is not None:  # positions continue each layer's cache (Attention reads them)
            for block, layer_cache in zip(self.blocks, cache.layers):
                x = block(x, causal=True, cache=layer_cache)
            return self.norm(x)
        positions = torch.arange(n, device=tokens.device)
        mask = self._window_mask(n, tokens.device)
        for block in self.blocks:
            x = block(x, positions=positions, mask_mod=mask, causal=True)
        return self.norm(x)

    def _window_mask(self, n: int, device: torch.device) -> AttentionMask | None:
        """The sliding-window mask for n positions; None (SDPA causal) when the window covers n."""
        window = self.config.window
        if window is None or window >= n:
            return None
        key = (n, str(device))
        if key not in self._masks:
            self._masks[key] = prepare_mask(sliding_window_mask(window), None, n, n, device)
        return self._masks[key]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, n, D] -> logits [B, n, V]."""
        weight = self.embed.weight if self.head is None else self.head.weight
        return self.output_mask(nn.functional.linear(h, weight))

    def forward(self, ids: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        return self.logits(self.hidden(self.inputs(ids, modality)))

    # --- incremental decoding -----------------------------------------------------------------
    @property
    def max_stream_len(self) -> int | None:
        """None with a window: decoding keeps ``window`` slots per layer and slides on."""
        return None if self.config.window is not None else self.config.max_seq_len

    def new_cache(
        self,
        B: int,
        max_len: int | None = None,
        device=None,
        dtype: torch.dtype | None = None,
        device_caches: bool = False,
    ) -> TransformerCache:
        """Empty caches for B rows. ``max_len``: input tokens (tag included) it can hold,
        default ``max_seq_len``; ignored with a window (ring buffers of ``window`` slots).
        ``device_caches``: fill levels on the device (``DeviceKVCache`` /
        ``DeviceWindowedKVCache``): fixed-shape steps for CUDA graphs, no host syncs."""
        c = self.config
        p = self.embed.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        head_dim, n_kv = c.dim // c.n_heads, c.n_kv_heads or c.n_heads
        if c.window is not None:
            kind = DeviceWindowedKVCache if device_caches else WindowedKVCache
            layers = [kind(B, n_kv, c.window, head_dim, device, dtype) for _ in self.blocks]
        else:
            max_len = c.max_seq_len if max_len is None else max_len
            kind = DeviceKVCache if device_caches else KVCache
            layers = [kind(B, n_kv, max_len, head_dim, device, dtype) for _ in self.blocks]
        return TransformerCache(layers)

    def forward_step(self, tokens: torch.Tensor, cache: TransformerCache) -> torch.Tensor:
        """Feed the next input tokens [B, n] (a chunk or one step) -> logits [B, n, V].

        ``logits[:, i]`` is the distribution of the token after ``tokens[:, i]``. The first
        token of a stream must be the modality tag (``prefill`` does that).
        """
        return self.logits(self.hidden(tokens, cache))

    def new_state(self, modality: torch.Tensor, max_len: int, dtype: torch.dtype | None = None) -> TransformerState:
        """Empty decoding state for rows with tags ``modality`` [B], ``max_len`` positions (each
        position consumes one input token; a window needs only its ring)."""
        cache = self.new_cache(modality.shape[0], max_len, device=modality.device, dtype=dtype)
        return TransformerState(modality=modality, max_len=max_len, pos=0, cache=cache)

    def new_block_state(
        self, modality: torch.Tensor, max_len: int, dtype: torch.dtype | None = None, device_caches: bool | None = None
    ) -> TransformerState:
        """A state for ``decode_block``. ``device_caches`` (default: on CUDA) puts the fill levels
        on the device at fixed shapes, which a CUDA graph needs; on a CPU the host caches are
        faster (attention over the filled slots only, the prompt in one chunk)."""
        if device_caches is None:
            device_caches = modality.device.type == "cuda"
        cache = self.new_cache(
            modality.shape[0], max_len, device=modality.device, dtype=dtype, device_caches=device_caches
        )
        return TransformerState(modality=modality, max_len=max_len, pos=0, cache=cache)

    def prefill(self, state: TransformerState, ids: torch.Tensor) -> torch.Tensor:
        """Start a stream: prompt bytes ids [B, n] (n may be 0) -> logits [B, n+1, V].

        ``logits[:, t]`` predicts ``ids[:, t]`` as the full forward does; ``logits[:, n]`` is
        the distribution of the first byte after the prompt. A block state's device caches get
        the prompt through host caches, in one chunk, then take over their contents.
        """
        cache, modality = state.cache, state.modality
        if cache.length != 0:
            raise ValueError(f"prefill needs an empty cache (it holds {cache.length} tokens); call cache.reset()")
        if ids.dim() != 2 or modality.shape != ids.shape[:1]:
            raise ValueError(
                f"expected ids [B, n] and modality [B], got {tuple(ids.shape)} and {tuple(modality.shape)}"
            )
        tokens = torch.cat([modality[:, None].to(ids.dtype), ids], dim=1)  # [B, 1 + n]
        if self.config.window is None and tokens.shape[1] > state.max_len:
            raise ValueError(f"prompt of {ids.shape[1]} bytes does not fit a state of max_len {state.max_len}")
        state.pos = tokens.shape[1]
        if not cache.device_fill:
            return self.forward_step(tokens, cache)
        host = self.new_cache(len(tokens), state.max_len, device=tokens.device, dtype=cache.layers[0].k.dtype)
        logits = self.forward_step(tokens, host)
        cache.copy_from(host)
        return logits

    def step(self, state: TransformerState, prev: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, V] of position ``state.pos`` given the bytes ``prev`` [B] before it (None at
        position 0: the tag is fed); advances ``state.pos``."""
        if (prev is None) != (state.pos == 0):
            want = "None" if state.pos == 0 else "the byte at t-1 [B]"
            raise ValueError(f"step at position {state.pos}: prev must be {want}")
        if self.config.window is None and state.pos >= state.max_len:
            raise ValueError(f"state is full: max_len {state.max_len} positions decoded")
        token = state.modality if prev is None else prev
        state.pos += 1
        return self.forward_step(token[:, None].to(torch.long), state.cache)[:, 0]

    # Bytes per ``decode_block`` call: one CUDA graph replay instead of 16 steps' kernel launches.
    decode_block_size = 16

    def decode_block(
        self, state: TransformerState, prev: torch.Tensor, sample: Callable[[torch.Tensor, int], torch.Tensor]
    ) -> torch.Tensor:
        """Decode ``decode_block_size`` bytes [B, n] from ``state.pos``: byte j drawn by
        ``sample(logits [B, V], j) -> ids [B]`` and fed to step j+1; ``prev`` [B] = the bytes at
        ``state.pos - 1``. On a ``new_block_state`` every step has the same shapes and
        addresses, so one CUDA graph replays every block (models/generate.py)."""
        self.prepare_block(state)
        out = []
        for j in range(self.decode_block_size):
            prev = sample(self.step(state, prev), j)
            out.append(prev)
        return torch.stack(out, 1)  # n x [B] -> [B, n]

    def prepare_block(self, state: TransformerState) -> bool:
        """Raise unless ``decode_block`` can run at ``state.pos`` (host-side, no sync). Returns
        False: the caches never move (a captured CUDA graph stays valid)."""
        t, n = state.pos, self.decode_block_size
        if t == 0:
            raise ValueError("decode_block continues a stream: prefill it first")
        if self.config.window is None and t + n > state.max_len:
            raise ValueError(f"state is full: position {t} + block of {n} > max_len {state.max_len}")
        return False

    # --- accounting ---------------------------------------------------------------------------
    def flops_per_byte(self, mean_patch_len: float | None = None) -> float:
        """Training FLOPs per byte at ``max_seq_len``; ``mean_patch_len`` is ignored (no patches)."""
        c = self.config
        T = c.max_seq_len
        matmul = linear_flops(self.blocks) + 2 * c.dim * c.vocab_size  # per token; head counted even if tied
        attn = c.n_layers * attention_flops(attention_pairs(T, window=c.window), c.dim) / T
        return training_flops(matmul + attn)


def transformer_preset(name: str, **overrides) -> TransformerConfig:
    """A shipped size from PRESETS, with any field overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown transformer preset {name!r}; known: {sorted(PRESETS)}")
    return TransformerConfig(**{**PRESETS[name], **overrides})
