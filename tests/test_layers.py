import warnings

import pytest
import torch

from polybyte.models import layers as L


def reference_attention(q, k, v, mask):
    """Explicit softmax attention; mask bool [B or 1, 1, Tq, Tk]; GQA by repeating kv heads."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    probs = torch.softmax(scores.masked_fill(~mask, -torch.inf), -1).nan_to_num(0.0)
    return probs @ v


def qkv(B=2, H=4, Hkv=2, Tq=12, Tk=12, Dh=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Tq, Dh, generator=g), torch.randn(B, Hkv, Tk, Dh, generator=g),
            torch.randn(B, Hkv, Tk, Dh, generator=g))


DOCS = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]])
# cross-attention: 3 patch queries per row, each sees the 4 bytes of its own patch
PATCH_OF_BYTE = torch.arange(12) // 4


def cross_patch_mask(b, h, q_idx, kv_idx):
    return PATCH_OF_BYTE[kv_idx] == q_idx


def explicit_masks():
    """(name, mask_mod, Tq, Tk, mask written out by hand as bool [B, 1, Tq, Tk])."""
    i = torch.arange(12)
    window = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 4)
    doc = (i[:, None] >= i[None, :]) & (DOCS[:, :, None] == DOCS[:, None, :])
    cross = torch.zeros(3, 12, dtype=torch.bool)
    for p in range(3):
        cross[p, 4 * p : 4 * p + 4] = True
    return [
        ("window", L.sliding_window_mask(4), 12, 12, window[None, None].expand(2, 1, 12, 12)),
        ("document", L.document_causal_mask(DOCS), 12, 12, doc[:, None]),
        ("cross", cross_patch_mask, 3, 12, cross[None, None].expand(2, 1, 3, 12)),
    ]


MASK_CASES = pytest.mark.parametrize(
    "name,mask_mod,Tq,Tk,mask", explicit_masks(), ids=[m[0] for m in explicit_masks()]
)


@MASK_CASES
def test_sdpa_fallback_matches_explicit_softmax(name, mask_mod, Tq, Tk, mask):
    q, k, v = qkv(Tq=Tq, Tk=Tk)
    out = L.masked_attention(q, k, v, mask_mod, backend="sdpa")
    assert (out - reference_attention(q, k, v, mask)).abs().max() < 1e-5


@MASK_CASES
def test_flexattention_reads_mask_mods_like_the_fallback(name, mask_mod, Tq, Tk, mask):
    # FlexAttention's unfused CPU implementation through its own block mask: same mask semantics
    q, k, v = qkv(Tq=Tq, Tk=Tk)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = L.masked_attention(q, k, v, mask_mod, backend="flex")
    assert (flex - L.masked_attention(q, k, v, mask_mod, backend="sdpa")).abs().max() < 1e-5


@pytest.mark.parametrize("Dh", [4, 8])
def test_flexattention_with_heads_under_16_is_padded_exactly(Dh, monkeypatch):
    """FlexAttention's fused kernels need head dims >= 16: smaller heads are zero-padded with the
    scale of the true head dim, which must equal the dense path (and call flex with 16 columns)."""
    q, k, v = qkv(Dh=Dh)
    seen = []
    real = L._eager_flex()

    def spy(q, k, v, **kw):
        seen.append(q.shape[-1])
        return real(q, k, v, **kw)

    monkeypatch.setattr(L, "_eager_flex", lambda: spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = L.masked_attention(q, k, v, L.sliding_window_mask(4), backend="flex")
    assert seen == [L.FLEX_MIN_HEAD_DIM] and flex.shape == q.shape
    assert (flex - L.masked_attention(q, k, v, L.sliding_window_mask(4), backend="sdpa")).abs().max() < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("Dh", [64, 8])
@pytest.mark.parametrize("name", ["window", "document", "cross"])
def test_compiled_flex_matches_fallback_on_cuda(name, Dh):
    T, dev = 512, "cuda"  # several 128-blocks, so block sparsity is exercised
    docs = torch.stack([torch.arange(T) // 50, torch.arange(T) // 130]).to(dev)
    mask_mod, Tq = {
        "window": (L.sliding_window_mask(100), T),
        "document": (L.document_causal_mask(docs), T),
        "cross": (lambda b, h, qi, ki: ki // 16 == qi, T // 16),
    }[name]
    q, k, v = (t.to(dev).requires_grad_() for t in qkv(Tq=Tq, Tk=T, Dh=Dh))
    flex = L.masked_attention(q, k, v, mask_mod, backend="flex")
    dense = L.masked_attention(q, k, v, mask_mod, backend="sdpa")
    assert (flex - dense).abs().max() < 1e-3  # TF32 / kernel ordering differences only
    g_flex = torch.autograd.grad(flex.square().sum(), (q, k, v))
    g_dense = torch.autograd.grad(dense.square().sum(), (q, k, v))
    for a, b in zip(g_flex, g_dense):
        assert (a - b).abs().max() < 1e-2 * b.abs().max()


def test_prepared_mask_is_reused_and_checked():
    q, k, v = qkv()
    mask = L.prepare_mask(L.sliding_window_mask(4), None, 12, 12, q.device)
    direct = L.masked_attention(q, k, v, L.sliding_window_mask(4))
    assert torch.equal(L.masked_attention(q, k, v, mask), direct)
    with pytest.raises(ValueError, match="prepared mask is for 12x12"):
        L.masked_attention(q[:, :, :6], k[:, :, :6], v[:, :, :6], mask)
    with pytest.raises(ValueError, match="backend"):
        L.masked_attention(q, k, v, L.sliding_window_mask(4), backend="cudnn")


def test_document_mask_isolates_documents_and_empty_rows_are_zero():
    q, k, v = qkv(B=1, H=1, Hkv=1, Tq=6, Tk=6, Dh=4)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1]])
    out = L.masked_attention(q, k, v, L.document_causal_mask(docs))
    # position 3 starts document 1: it sees only itself
    assert torch.allclose(out[0, 0, 3], v[0, 0, 3], atol=1e-6)
    q.requires_grad_()
    empty = L.masked_attention(q, k, v, lambda b, h, qi, ki: qi < 0)
    assert torch.equal(empty, torch.zeros_like(empty))
    (grad,) = torch.autograd.grad(empty.sum() + out.sum(), q, allow_unused=True)
    assert grad is None or torch.isfinite(grad).all()


def attn_and_input(T=11, D=32, H=4, Hkv=2, seed=0):
    torch.manual_seed(seed)
    attn = L.Attention(D, H, Hkv, rope=L.RoPE(D // H))
    return attn, torch.randn(2, T, D)


def test_kv_cache_decoding_matches_full_causal_attention():
    attn, x = attn_and_input()
    B, T, _ = x.shape
    full = attn(x)
    cache = L.KVCache(B, 2, T, 8, x.device, x.dtype)
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
    cache = L.DeviceKVCache(B, 2, T + 5, 8, x.device, x.dtype)  # slack: unfilled slots are masked
    for _ in range(2):
        outs = [attn(x[:, :4], cache=cache)] + [attn(x[:, t : t + 1], cache=cache) for t in range(4, T)]
        assert cache.length == T and cache.k.shape[2] == T + 5
        assert (torch.cat(outs, 1) - full).abs().max() < 1e-5
        cache.reset()
    with pytest.raises(ValueError, match="masks by position itself"):
        attn(x, cache=cache, mask_mod=L.causal_mask())
    with pytest.raises(ValueError, match="is for self-attention"):
        attn(x, x, cache=cache)


@pytest.mark.parametrize("chunks", [[1] * 11, [5, 1, 3, 2], [11]])
def test_windowed_cache_decoding_matches_full_sliding_window(chunks):
    attn, x = attn_and_input()
    B, T, _ = x.shape
    window = 3
    full = attn(x, mask_mod=L.sliding_window_mask(window))
    ring = L.WindowedKVCache(B, 2, window, 8, x.device, x.dtype)
    linear = L.KVCache(B, 2, T, 8, x.device, x.dtype)
    outs_ring, outs_linear, a = [], [], 0
    for n in chunks:
        outs_ring.append(attn(x[:, a : a + n], cache=ring))
        # a full-length cache with the window applied at the absolute query offset
        offset_mask = L.sliding_window_mask(window, q_offset=a)
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
    full = attn(x, mask_mod=L.sliding_window_mask(window))
    ring = L.DeviceWindowedKVCache(B, 2, window, 8, x.device, x.dtype)
    for _ in range(2):
        steps = [attn(x[:, t : t + 1], cache=ring) for t in range(T)]
        assert ring.length == T and ring.k.shape[2] == window
        assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
        ring.reset()
    with pytest.raises(ValueError, match="one step per update, got 2"):
        attn(x[:, :2], cache=ring)


def test_cache_misuse_errors():
    attn, x = attn_and_input()
    ring = L.WindowedKVCache(2, 2, 3, 8, x.device, x.dtype)
    with pytest.raises(ValueError, match="applies its own causal window"):
        attn(x, cache=ring, mask_mod=L.sliding_window_mask(3))
    small = L.KVCache(2, 2, 4, 8, x.device, x.dtype)
    with pytest.raises(ValueError, match="KV cache overflow: 0 \\+ 11 > max_len 4"):
        attn(x, cache=small)


def test_cross_attention_uses_rope_only_with_key_positions():
    torch.manual_seed(0)
    attn = L.Attention(32, 4, kv_dim=24, rope=L.RoPE(8))
    x, mem = torch.randn(2, 5, 32), torch.randn(2, 7, 24)
    a = attn(x, mem, causal=False)
    b = attn(x, mem, causal=False, positions=torch.arange(5) + 100)
    assert torch.allclose(a, b)  # no key positions: positions carry no meaning, none applied
    kv_pos = torch.arange(7)
    c = attn(x, mem, causal=False, positions=torch.arange(5), kv_positions=kv_pos)
    d = attn(x, mem, causal=False, positions=torch.arange(5) + 100, kv_positions=kv_pos + 100)
    assert torch.allclose(c, d, atol=1e-5) and not torch.allclose(a, c)  # relative positions only


def test_rope_is_relative():
    rope = L.RoPE(8, theta=500.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    dots = [(rope(q, torch.tensor([p + 5])) * rope(k, torch.tensor([p]))).sum() for p in (0, 17, 300)]
    assert torch.allclose(torch.stack(dots), dots[0].expand(3), atol=1e-5)
    with pytest.raises(ValueError, match="even head dim"):
        L.RoPE(7)


def test_rope_frequencies_stay_fp32_when_the_model_is_cast():
    """Sampling casts weights to bf16: RoPE's frequencies must not be rounded with them (a bf16
    inv_freq turns a query-key distance of 1,500 into an angle error of ~0.7 rad)."""
    attn, x = attn_and_input(T=40)
    want = attn.rope.inv_freq.clone()
    reference = attn(x)
    attn.to(torch.bfloat16)
    assert attn.rope.inv_freq.dtype == torch.float32 and torch.equal(attn.rope.inv_freq, want)
    assert attn.wo.weight.dtype == torch.bfloat16
    out = attn(x.bfloat16())
    assert out.dtype == torch.bfloat16 and (out.float() - reference).abs().max() < 0.05


@pytest.mark.parametrize("kv_dim", [None, 24])
def test_checkpoints_with_separate_projections_still_load(kv_dim):
    """Exports written before q/k/v and w1/w3 were fused load into the fused layers unchanged."""
    torch.manual_seed(0)
    block = L.Block(32, 4, n_kv_heads=2)
    attn = L.Attention(32, 4, n_kv_heads=2, kv_dim=kv_dim)
    old = {}
    for name, t in block.state_dict().items():  # split the fused matrices as old exports had them
        if name.endswith("wqkv.weight"):
            for part, w in zip(["wq", "wk", "wv"], t.split([32, 16, 16])):
                old[name.replace("wqkv", part)] = w.clone()
        elif name.endswith("w13.weight"):
            for part, w in zip(["w1", "w3"], t.chunk(2)):
                old[name.replace("w13", part)] = w.clone()
        else:
            old[name] = t.clone()
    assert not any("wqkv" in k or "w13" in k for k in old)
    fresh = L.Block(32, 4, n_kv_heads=2)
    fresh.load_state_dict(old)
    x = torch.randn(2, 5, 32)
    assert torch.equal(fresh(x), block(x))
    if kv_dim:  # cross-attention layout: wq and wkv
        old = {"wq.weight": attn.wq.weight.clone(), "wo.weight": attn.wo.weight.clone()}
        old.update({f"w{n}.weight": w.clone() for n, w in zip("kv", attn.wkv.weight.chunk(2))})
        other = L.Attention(32, 4, n_kv_heads=2, kv_dim=kv_dim)
        other.load_state_dict(old)
        kv = torch.randn(2, 7, kv_dim)
        assert torch.equal(other(x, kv, causal=False), attn(x, kv, causal=False))


# --- short attentions and the block-diagonal mask (MEGABYTE's local model) ---------------------
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Hkv", [4, 2])
def test_short_attention_equals_sdpa_and_reference(causal, Hkv):
    q, k, v = qkv(B=3, H=4, Hkv=Hkv, Tq=8, Tk=8, seed=int(causal) + Hkv)
    assert 8 <= L.SHORT_KV_LEN  # this path is the one masked_attention takes
    out = L.masked_attention(q, k, v, None, causal=causal)
    rep = 4 // Hkv
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=causal)  # fmt: skip
    assert (out - ref).abs().max() < 1e-5
    mask = torch.ones(8, 8, dtype=torch.bool).tril() if causal else torch.ones(8, 8, dtype=torch.bool)
    assert (out - reference_attention(q, k, v, mask[None, None])).abs().max() < 1e-5


def test_short_attention_is_causal():
    q, k, v = qkv(B=2, H=2, Hkv=2, Tq=8, Tk=8, seed=5)
    out = L.short_attention(q, k, v, causal=True, gqa=False)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 5:] += 3.0
    v2[:, :, 5:] -= 2.0
    out2 = L.short_attention(q, k2, v2, causal=True, gqa=False)
    assert torch.equal(out[:, :, :5], out2[:, :, :5])
    assert not torch.allclose(out[:, :, 5:], out2[:, :, 5:])


def test_block_causal_mask_over_a_row_equals_attention_per_block():
    """One attention over K·P positions with the block-diagonal causal mask (MEGABYTE's local
    model on CUDA, via FlexAttention) = K separate causal attentions of P positions."""
    B, H, K, P, Dh = 2, 2, 5, 8, 16
    q, k, v = qkv(B=B, H=H, Hkv=H, Tq=K * P, Tk=K * P, Dh=Dh, seed=7)
    flat = L.masked_attention(q, k, v, L.block_causal_mask(P), backend="sdpa")

    def per_patch(t):  # [B, H, K*P, Dh] -> [B*K, H, P, Dh]
        return t.view(B, H, K, P, Dh).permute(0, 2, 1, 3, 4).reshape(B * K, H, P, Dh)

    sep = L.masked_attention(per_patch(q), per_patch(k), per_patch(v), None, causal=True)
    sep = sep.view(B, K, H, P, Dh).permute(0, 2, 1, 3, 4).reshape(B, H, K * P, Dh)
    assert (flat - sep).abs().max() < 1e-5


def test_direct_block_diagonal_block_mask_equals_create_block_mask(monkeypatch):
    """The BlockMask written from its tiles (long rows) = create_block_mask's, and attention
    through it (unfused FlexAttention on CPU) = the dense block-causal mask."""
    n, P = 512, 8
    monkeypatch.setattr(L, "DIRECT_BLOCK_MASK_MIN_LEN", 256)
    direct = L.block_diagonal_mask(P, n, "cpu", backend="flex").block_mask
    made = L.prepare_mask(L.block_causal_mask(P), None, n, n, "cpu", backend="flex").block_mask
    assert torch.equal(direct.to_dense(), made.to_dense())
    q, k, v = qkv(B=1, H=2, Hkv=2, Tq=n, Tk=n, Dh=16, seed=9)
    with torch.no_grad():
        out = L.masked_attention(q, k, v, L.AttentionMask(n, n, block_mask=direct))
        ref = L.masked_attention(q, k, v, L.block_causal_mask(P), backend="sdpa")
    assert (out - ref).abs().max() < 1e-5
