"""models/layers.py: RoPE, cross-attention positions, fused projections loading old exports."""

import pytest
import torch
from conftest import attn_and_input

from polybyte.models import layers as L


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


@pytest.mark.parametrize("backbone", ["transformer", "megabyte", "blt"])
def test_dropout_acts_in_training_only_and_keeps_the_weights(backbone, shakespeare):
    from conftest import tiny_blt_config

    from polybyte.models import build_model, config_to_dict

    spec = (
        config_to_dict(tiny_blt_config())
        if backbone == "blt"
        else {"backbone": backbone, "preset": "tiny", **({"patch_size": 4} if backbone == "megabyte" else {})}
    )
    torch.manual_seed(0)
    plain = build_model({**spec, "dropout": 0.0})
    dropped = build_model({**spec, "dropout": 0.3})
    assert plain.state_dict().keys() == dropped.state_dict().keys()  # no new weights: exports interchange
    dropped.load_state_dict(plain.state_dict())
    ids = torch.tensor([list(shakespeare[:64])])
    modality = torch.tensor([258])
    plain.eval(), dropped.eval()
    torch.testing.assert_close(dropped(ids, modality), plain(ids, modality))
    dropped.train()
    first, second = dropped(ids, modality), dropped(ids, modality)
    assert not torch.allclose(first, second)
    with pytest.raises(ValueError, match="dropout probability"):
        build_model({**spec, "dropout": 1.5})
