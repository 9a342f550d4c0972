"""models/kv_cache.py: every cache behind Attention equals full attention, chunked or stepped;
misuse is refused with one clear message."""

import pytest
import torch
from conftest import attn_and_input, causal_mask

from polybyte.models import kv_cache as C
from polybyte.models import masks as M


def test_kv_cache_decoding_matches_full_causal_attention():
    attn, x = attn_and_input()
    B, T, _ = x.shape
    full = attn(x)
    cache = C.KVCache(B, 2, T, 8, x.device, x.dtype)
    steps = [attn(x[:, t : t + 1], positions=torch.tensor([t]), cache=cache) for t in range(T)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
    # chunked prefill into a non-empty cache stays causal (SDPA's is_causal alone would not)
    cache.reset()
    chunks = [attn(x[:, a:b], cache=cache) for a, b in [(0, 4), (4, 9), (9, 10), (10, 11)]]
    assert (torch.cat(chunks, 1) - full).abs().max() < 1e-5


def test_device_cache_decoding_matches_full_causal_attention():
    """DeviceKVCache (fill level on the device, whole buffer attended with a slot mask): chunked
    prefill then single steps equal full causal attention; a reset starts afresh."""
    attn, x = attn_and_input()
    B, T, _ = x.shape
    full = attn(x)
    cache = C.DeviceKVCache(B, 2, T + 5, 8, x.device, x.dtype)  # slack: unfilled slots are masked
    for _ in range(2):
        outs = [attn(x[:, :4], cache=cache)] + [attn(x[:, t : t + 1], cache=cache) for t in range(4, T)]
        assert cache.length == T and cache.k.shape[2] == T + 5
        assert (torch.cat(outs, 1) - full).abs().max() < 1e-5
        cache.reset()
    with pytest.raises(ValueError, match="masks by position itself"):
        attn(x, cache=cache, mask_mod=causal_mask())
    with pytest.raises(ValueError, match="is for self-attention"):
        attn(x, x, cache=cache)


@pytest.mark.parametrize("chunks", [[1] * 11, [5, 1, 3, 2], [11]])
def test_windowed_cache_decoding_matches_full_sliding_window(chunks):
    attn, x = attn_and_input()
    B, T, _ = x.shape
    window = 3
    full = attn(x, mask_mod=M.sliding_window_mask(window))
    ring = C.WindowedKVCache(B, 2, window, 8, x.device, x.dtype)
    linear = C.KVCache(B, 2, T, 8, x.device, x.dtype)
    outs_ring, outs_linear, a = [], [], 0
    for n in chunks:
        outs_ring.append(attn(x[:, a : a + n], cache=ring))
        # a full-length cache with the window applied at the absolute query offset
        offset_mask = M.sliding_window_mask(window, q_offset=a)
        outs_linear.append(attn(x[:, a : a + n], cache=linear, mask_mod=offset_mask))
        a += n
    assert ring.length == T and ring.k.shape[2] == window
    assert (torch.cat(outs_ring, 1) - full).abs().max() < 1e-5
    assert (torch.cat(outs_linear, 1) - full).abs().max() < 1e-5


@pytest.mark.parametrize("window", [1, 3, 20])
def test_device_windowed_cache_steps_match_full_sliding_window(window):
    """DeviceWindowedKVCache (ring with its position on the device, whole ring attended with a
    position mask): single steps equal full sliding-window attention, before and after the
    ring wraps and when the window exceeds the stream; more than one step per call is refused."""
    attn, x = attn_and_input()
    B, T, _ = x.shape
    full = attn(x, mask_mod=M.sliding_window_mask(window))
    ring = C.DeviceWindowedKVCache(B, 2, window, 8, x.device, x.dtype)
    for _ in range(2):
        steps = [attn(x[:, t : t + 1], cache=ring) for t in range(T)]
        assert ring.length == T and ring.k.shape[2] == window
        assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
        ring.reset()
    with pytest.raises(ValueError, match="one step per update, got 2"):
        attn(x[:, :2], cache=ring)


def test_cache_misuse_errors():
    attn, x = attn_and_input()
    ring = C.WindowedKVCache(2, 2, 3, 8, x.device, x.dtype)
    with pytest.raises(ValueError, match="applies its own causal window"):
        attn(x, cache=ring, mask_mod=M.sliding_window_mask(3))
    small = C.KVCache(2, 2, 4, 8, x.device, x.dtype)
    with pytest.raises(ValueError, match="KV cache overflow: 0 \\+ 11 > max_len 4"):
        attn(x, cache=small)
