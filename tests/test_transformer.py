import math
import time

import pytest
import torch

from polybyte.models import flops
from polybyte.models.transformer import PRESETS, Transformer, TransformerConfig

TEXT, IMAGE, PAD = 258, 259, 256


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    defaults = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    return Transformer(TransformerConfig(**{**defaults, **kw}))


def random_ids(B=2, T=24, seed=1):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("window", [None, 5])
def test_causality(window):
    model = tiny(window=window).eval()
    ids, mod = random_ids(), torch.tensor([TEXT, IMAGE])
    base = model(ids, mod)
    for t in (0, 7, 23):
        changed = ids.clone()
        changed[:, t:] = (changed[:, t:] + 1 + torch.arange(24 - t)) % 256
        out = model(changed, mod)
        assert (out[:, : t + 1] - base[:, : t + 1]).abs().max() < 1e-5  # logits[t] sees ids[:t] only
        if t + 1 < 24:
            assert (out[:, t + 1 :] - base[:, t + 1 :]).abs().max() > 1e-3  # later ones do see them
    assert (model(ids, torch.tensor([IMAGE, TEXT]))[:, 0] - base[:, 0]).abs().max() > 1e-3  # tag conditions


def test_sliding_window_limits_the_context():
    W = 5
    model = tiny(window=W).eval()
    ids, mod = random_ids(), torch.tensor([TEXT, TEXT])
    changed = ids.clone()
    changed[:, 0] ^= 0x55
    diff = (model(changed, mod) - model(ids, mod)).abs().amax(dim=(0, 2))
    # ids[0] is the input at position 1; each of the 2 layers reaches W-1 positions further
    reach = 1 + 2 * (W - 1)
    assert (diff[1 : reach + 1] > 1e-3).all() and (diff[reach + 1 :] < 1e-5).all() and diff[0] < 1e-5


def test_zero_bytes_are_learned_and_pad_targets_count_nothing():
    model = tiny()
    zeros, mod = torch.zeros(4, 32, dtype=torch.long), torch.full((4,), TEXT)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss, _ = model.loss(zeros, mod)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        p_zero = model(zeros, mod).softmax(-1)[..., 0]
    assert p_zero.min() > 0.9  # every 0x00 byte, first included, is a real target

    ids = random_ids(B=2, T=20)
    padded = ids.clone()
    padded[1, 12:] = PAD
    loss, nll = model.loss(padded, torch.tensor([TEXT, TEXT]))
    _, nll_full = model.loss(ids, torch.tensor([TEXT, TEXT]))
    assert torch.equal(nll[1, 12:], torch.zeros(8))
    assert torch.allclose(nll[:, :12], nll_full[:, :12], atol=1e-6)  # PAD tail changes nothing before it
    expected = (nll_full[0].sum() + nll_full[1, :12].sum()) / 32
    assert torch.allclose(loss, expected, atol=1e-6)
    grads = torch.autograd.grad(model.loss(padded, torch.tensor([TEXT, TEXT]))[0], model.head.weight)[0]
    assert grads[PAD].abs().max() > 0  # PAD is pushed down as an output, ...
    only_pad = torch.full((1, 8), PAD)
    assert model.loss(only_pad, torch.tensor([TEXT]))[0] == 0  # ... never a target


def test_learns_tinyshakespeare_below_4_bits_per_byte(shakespeare):
    torch.manual_seed(0)
    data = torch.frombuffer(bytearray(shakespeare), dtype=torch.uint8).long()
    train, val = data[:-20_000], data[-20_000:]
    B, T = 16, 128
    model = Transformer(TransformerConfig(dim=64, n_layers=2, n_heads=4, max_seq_len=T))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    mod = torch.full((B,), TEXT)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(200):
        lr = 3e-3 * min(1.0, (step + 1) / 20)
        for g in opt.param_groups:
            g["lr"] = lr
        offs = torch.randint(0, len(train) - T, (B,), generator=gen)
        batch = train[offs[:, None] + torch.arange(T)]  # [B, T]
        loss, _ = model.loss(batch, mod)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        windows = val[: 64 * T].view(64, T)  # held-out text
        val_loss, _ = model.loss(windows, torch.full((64,), TEXT))
    bpb = val_loss.item() / math.log(2)
    assert bpb < 4.0, f"{bpb:.3f} bits/byte after 200 steps ({elapsed:.1f}s)"


@pytest.mark.parametrize("window", [None, 4])
def test_cached_decoding_equals_full_forward(window):
    model = tiny(window=window).eval()
    ids, mod = random_ids(T=19), torch.tensor([TEXT, IMAGE])
    full = model(ids, mod)
    with torch.no_grad():
        state = model.new_state(mod, 20)
        cache = state.cache
        first = model.prefill(state, ids[:, :6])  # logits for ids[0..6]
        rest = [model.forward_step(ids[:, 6:9], cache)]  # a chunk, then single steps
        rest += [model.forward_step(ids[:, t : t + 1], cache) for t in range(9, 18)]
    assert cache.length == 19
    stepped = torch.cat([first, *rest], 1)
    assert (stepped - full).abs().max() < 1e-5
    with torch.no_grad():
        cache.reset()
        empty = model.prefill(state, ids[:, :0])  # no prompt: just the tag
    assert (empty[:, 0] - full[:, 0]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="empty cache"):
        model.prefill(state, ids[:, :2])


def test_input_shape_errors_are_clear():
    model = tiny()
    with pytest.raises(ValueError, match=r"expected ids \[B, T\] and modality \[B\]"):
        model(torch.zeros(8, dtype=torch.long), torch.tensor([TEXT]))
    with pytest.raises(ValueError, match="even size"):
        TransformerConfig(dim=30, n_heads=6)


def test_tied_embeddings_share_the_table():
    model = tiny(tie_embeddings=True)
    assert model.head is None
    assert model.num_params() == tiny().num_params() - 264 * 32
    assert model(random_ids(), torch.tensor([TEXT, TEXT])).shape == (2, 24, 264)


@pytest.mark.parametrize("window", [None, 16])
def test_flops_per_byte_is_6N_plus_attention(window):
    # a config where every term differs: GQA, explicit MLP width, window < T
    D, L, H, Hkv, F, V, T = 64, 3, 8, 2, 160, 264, 48
    model = tiny(dim=D, n_layers=L, n_heads=H, n_kv_heads=Hkv, mlp_hidden=F, max_seq_len=T, window=window)
    Dh = D // H
    per_layer = D * D + 2 * D * Hkv * Dh + D * D + 3 * D * F  # wq, wk+wv, wo, SwiGLU
    N = L * per_layer + D * V  # matmul weights incl. the output head; embedding lookups are free
    assert N == flops.linear_weights(model)
    if window is None:
        pairs = T * (T + 1) / 2
    else:  # query i sees min(i+1, W) keys
        pairs = sum(min(i + 1, window) for i in range(T))
    attn = 3 * L * 4 * pairs * D / T  # fwd+bwd x layers x (QK^T + AV, 2 FLOPs per MAC) per byte
    assert model.flops_per_byte() == pytest.approx(6 * N + attn, rel=1e-12)


def test_presets_build_with_their_documented_sizes():
    with torch.device("meta"):
        counts = {k: Transformer(TransformerConfig(**v)).num_params() for k, v in PRESETS.items()}
    assert 25e6 < counts["small"] < 35e6 and 160e6 < counts["base"] < 180e6 and counts["tiny"] < 1e6
