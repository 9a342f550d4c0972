"""models/masks.py: mask_mods through every attention backend (dense SDPA, FlexAttention, the
written-out short path), prepared masks, the block-diagonal mask."""

import warnings

import pytest
import torch
from conftest import document_causal_mask

from polybyte.models import masks as M


def reference_attention(q, k, v, mask):
    """Explicit softmax attention; mask bool [B or 1, 1, Tq, Tk]; GQA by repeating kv heads."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    probs = torch.softmax(scores.masked_fill(~mask, -torch.inf), -1).nan_to_num(0.0)
    return probs @ v


def qkv(B=2, H=4, Hkv=2, Tq=12, Tk=12, Dh=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, Tq, Dh, generator=g),
        torch.randn(B, Hkv, Tk, Dh, generator=g),
        torch.randn(B, Hkv, Tk, Dh, generator=g),
    )


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
        ("window", M.sliding_window_mask(4), 12, 12, window[None, None].expand(2, 1, 12, 12)),
        ("document", document_causal_mask(DOCS), 12, 12, doc[:, None]),
        ("cross", cross_patch_mask, 3, 12, cross[None, None].expand(2, 1, 3, 12)),
    ]


MASK_CASES = pytest.mark.parametrize("name,mask_mod,Tq,Tk,mask", explicit_masks(), ids=[m[0] for m in explicit_masks()])


@MASK_CASES
def test_sdpa_fallback_matches_explicit_softmax(name, mask_mod, Tq, Tk, mask):
    q, k, v = qkv(Tq=Tq, Tk=Tk)
    out = M.masked_attention(q, k, v, mask_mod, backend="sdpa")
    assert (out - reference_attention(q, k, v, mask)).abs().max() < 1e-5


@MASK_CASES
def test_flexattention_reads_mask_mods_like_the_fallback(name, mask_mod, Tq, Tk, mask):
    # FlexAttention's unfused CPU implementation through its own block mask: same mask semantics
    q, k, v = qkv(Tq=Tq, Tk=Tk)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = M.masked_attention(q, k, v, mask_mod, backend="flex")
    assert (flex - M.masked_attention(q, k, v, mask_mod, backend="sdpa")).abs().max() < 1e-5


@pytest.mark.parametrize("Dh", [4, 8])
def test_flexattention_with_heads_under_16_is_padded_exactly(Dh, monkeypatch):
    """FlexAttention's fused kernels need head dims >= 16: smaller heads are zero-padded with the
    scale of the true head dim, which must equal the dense path (and call flex with 16 columns)."""
    q, k, v = qkv(Dh=Dh)
    seen = []
    real = M._eager_flex()

    def spy(q, k, v, **kw):
        seen.append(q.shape[-1])
        return real(q, k, v, **kw)

    monkeypatch.setattr(M, "_eager_flex", lambda: spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = M.masked_attention(q, k, v, M.sliding_window_mask(4), backend="flex")
    assert seen == [M.FLEX_MIN_HEAD_DIM] and flex.shape == q.shape
    assert (flex - M.masked_attention(q, k, v, M.sliding_window_mask(4), backend="sdpa")).abs().max() < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("Dh", [64, 8])
@pytest.mark.parametrize("name", ["window", "document", "cross"])
def test_compiled_flex_matches_fallback_on_cuda(name, Dh):
    T, dev = 512, "cuda"  # several 128-blocks, so block sparsity is exercised
    docs = torch.stack([torch.arange(T) // 50, torch.arange(T) // 130]).to(dev)
    mask_mod, Tq = {
        "window": (M.sliding_window_mask(100), T),
        "document": (document_causal_mask(docs), T),
        "cross": (lambda b, h, qi, ki: ki // 16 == qi, T // 16),
    }[name]
    q, k, v = (t.to(dev).requires_grad_() for t in qkv(Tq=Tq, Tk=T, Dh=Dh))
    flex = M.masked_attention(q, k, v, mask_mod, backend="flex")
    dense = M.masked_attention(q, k, v, mask_mod, backend="sdpa")
    assert (flex - dense).abs().max() < 1e-3  # TF32 / kernel ordering differences only
    g_flex = torch.autograd.grad(flex.square().sum(), (q, k, v))
    g_dense = torch.autograd.grad(dense.square().sum(), (q, k, v))
    for a, b in zip(g_flex, g_dense):
        assert (a - b).abs().max() < 1e-2 * b.abs().max()


def test_prepared_mask_is_reused_and_checked():
    q, k, v = qkv()
    mask = M.prepare_mask(M.sliding_window_mask(4), None, 12, 12, q.device)
    direct = M.masked_attention(q, k, v, M.sliding_window_mask(4))
    assert torch.equal(M.masked_attention(q, k, v, mask), direct)
    with pytest.raises(ValueError, match="prepared mask is for 12x12"):
        M.masked_attention(q[:, :, :6], k[:, :, :6], v[:, :, :6], mask)
    with pytest.raises(ValueError, match="backend"):
        M.masked_attention(q, k, v, M.sliding_window_mask(4), backend="cudnn")


def test_document_mask_isolates_documents_and_empty_rows_are_zero():
    q, k, v = qkv(B=1, H=1, Hkv=1, Tq=6, Tk=6, Dh=4)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1]])
    out = M.masked_attention(q, k, v, document_causal_mask(docs))
    # position 3 starts document 1: it sees only itself
    assert torch.allclose(out[0, 0, 3], v[0, 0, 3], atol=1e-6)
    q.requires_grad_()
    empty = M.masked_attention(q, k, v, lambda b, h, qi, ki: qi < 0)
    assert torch.equal(empty, torch.zeros_like(empty))
    (grad,) = torch.autograd.grad(empty.sum() + out.sum(), q, allow_unused=True)
    assert grad is None or torch.isfinite(grad).all()


# --- short attentions and the block-diagonal mask (MEGABYTE's local model) ---------------------
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Hkv", [4, 2])
def test_short_attention_equals_sdpa_and_reference(causal, Hkv):
    q, k, v = qkv(B=3, H=4, Hkv=Hkv, Tq=8, Tk=8, seed=int(causal) + Hkv)
    assert 8 <= M.SHORT_KV_LEN  # this path is the one masked_attention takes
    out = M.masked_attention(q, k, v, None, causal=causal)
    rep = 4 // Hkv
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=causal
    )
    assert (out - ref).abs().max() < 1e-5
    mask = torch.ones(8, 8, dtype=torch.bool).tril() if causal else torch.ones(8, 8, dtype=torch.bool)
    assert (out - reference_attention(q, k, v, mask[None, None])).abs().max() < 1e-5


def test_short_attention_is_causal():
    q, k, v = qkv(B=2, H=2, Hkv=2, Tq=8, Tk=8, seed=5)
    out = M.short_attention(q, k, v, causal=True, gqa=False)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 5:] += 3.0
    v2[:, :, 5:] -= 2.0
    out2 = M.short_attention(q, k2, v2, causal=True, gqa=False)
    assert torch.equal(out[:, :, :5], out2[:, :, :5])
    assert not torch.allclose(out[:, :, 5:], out2[:, :, 5:])


def test_block_causal_mask_over_a_row_equals_attention_per_block():
    """One attention over K·P positions with the block-diagonal causal mask (MEGABYTE's local
    model on CUDA, via FlexAttention) = K separate causal attentions of P positions."""
    B, H, K, P, Dh = 2, 2, 5, 8, 16
    q, k, v = qkv(B=B, H=H, Hkv=H, Tq=K * P, Tk=K * P, Dh=Dh, seed=7)
    flat = M.masked_attention(q, k, v, M.block_causal_mask(P), backend="sdpa")

    def per_patch(t):  # [B, H, K*P, Dh] -> [B*K, H, P, Dh]
        return t.view(B, H, K, P, Dh).permute(0, 2, 1, 3, 4).reshape(B * K, H, P, Dh)

    sep = M.masked_attention(per_patch(q), per_patch(k), per_patch(v), None, causal=True)
    sep = sep.view(B, K, H, P, Dh).permute(0, 2, 1, 3, 4).reshape(B, H, K * P, Dh)
    assert (flat - sep).abs().max() < 1e-5


def test_direct_block_diagonal_block_mask_equals_create_block_mask(monkeypatch):
    """The BlockMask written from its tiles (long rows) = create_block_mask's, and attention
    through it (unfused FlexAttention on CPU) = the dense block-causal mask."""
    n, P = 512, 8
    monkeypatch.setattr(M, "DIRECT_BLOCK_MASK_MIN_LEN", 256)
    direct = M.block_diagonal_mask(P, n, "cpu", backend="flex").block_mask
    made = M.prepare_mask(M.block_causal_mask(P), None, n, n, "cpu", backend="flex").block_mask
    assert torch.equal(direct.to_dense(), made.to_dense())
    q, k, v = qkv(B=1, H=2, Hkv=2, Tq=n, Tk=n, Dh=16, seed=9)
    with torch.no_grad():
        out = M.masked_attention(q, k, v, M.AttentionMask(n, n, block_mask=direct))
        ref = M.masked_attention(q, k, v, M.block_causal_mask(P), backend="sdpa")
    assert (out - ref).abs().max() < 1e-5
