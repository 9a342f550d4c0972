import torch

from polybyte.models import layers as L


def test_flex_fallback_matches_explicit_mask():
    torch.manual_seed(0)
    B, H, T, Dh = 2, 2, 12, 8
    q, k, v = (torch.randn(B, H, T, Dh) for _ in range(3))
    out = L.masked_attention(q, k, v, L.sliding_window_mask(4))
    i = torch.arange(T)
    mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 4)
    ref = torch.softmax((q @ k.transpose(-1, -2)) / Dh**0.5 + torch.where(mask, 0.0, -torch.inf), -1) @ v
    assert (out - ref).abs().max() < 1e-5


def test_document_mask_isolates_documents_and_empty_rows_are_zero():
    torch.manual_seed(0)
    B, H, T, Dh = 1, 1, 6, 4
    q, k, v = (torch.randn(B, H, T, Dh) for _ in range(3))
    docs = torch.tensor([[0, 0, 0, 1, 1, 1]])
    out = L.masked_attention(q, k, v, L.document_causal_mask(docs))
    # position 3 starts document 1: it sees only itself
    assert torch.allclose(out[0, 0, 3], v[0, 0, 3], atol=1e-6)
    empty = L.masked_attention(q, k, v, lambda b, h, qi, ki: qi < 0)
    assert torch.equal(empty, torch.zeros_like(empty))


def test_kv_cache_decoding_matches_full_causal_attention():
    torch.manual_seed(0)
    B, T, D = 2, 7, 16
    attn = L.Attention(D, 4, 2, rope=L.RoPE(4))
    x = torch.randn(B, T, D)
    full = attn(x)
    cache = L.KVCache(B, 2, T, 4, x.device, x.dtype)
    steps = [attn(x[:, t : t + 1], positions=torch.tensor([t]), cache=cache) for t in range(T)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
