import dataclasses
import math

import pytest
import torch

from polybyte.models import build_model, config_to_dict
from polybyte.models.base import nll_loss
from polybyte.models.megabyte import PRESETS, Megabyte, MegabyteConfig

PAD, TEXT, IMAGE = 256, 258, 259


def tiny(**kw) -> Megabyte:
    cfg = dict(
        patch_size=4,
        global_dim=8,
        global_layers=2,
        global_heads=2,
        local_dim=16,
        local_layers=2,
        local_heads=2,
        max_seq_len=64,
    )
    cfg.update(kw)
    torch.manual_seed(0)
    return Megabyte(MegabyteConfig(**cfg)).eval()


@pytest.mark.parametrize("r", [0, 2])
@pytest.mark.parametrize("t", [8, 11])  # a patch boundary (P = 4) and inside a patch
def test_causality(r, t):
    m = tiny(cross_patch_r=r)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 24), generator=g)
    changed = ids.clone()
    changed[:, t:] = (ids[:, t:] + 1 + torch.randint(0, 255, ids[:, t:].shape, generator=g)) % 256
    modality = torch.tensor([TEXT, IMAGE])
    with torch.no_grad():
        a, b = m(ids, modality), m(changed, modality)
    # logits[:, t] predicts byte t from bytes < t, so positions <= t must not move
    assert (a[:, : t + 1] - b[:, : t + 1]).abs().max() < 1e-5
    # ... while later positions do see the changed bytes (the check above is not vacuous)
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().amax(-1).min() > 1e-4


def test_cross_patch_attention_sees_previous_patch_tail():
    # With r = 2, byte 0 of patch 2 (position 8) attends to the local states of positions 6, 7,
    # whose inputs embed bytes 5, 6 (local inputs are shifted by one), so byte 6 reaches it without
    # the global model. Zero the global path to tell the two models apart.
    for r, should_move in ((0, False), (2, True)):
        m = tiny(cross_patch_r=r)
        with torch.no_grad():
            m.proj.weight.zero_()  # local model gets no global information
        ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
        changed = ids.clone()
        changed[0, 6] = (ids[0, 6] + 1) % 256
        with torch.no_grad():
            d = (m(ids, torch.tensor([TEXT])) - m(changed, torch.tensor([TEXT])))[0, 8].abs().max()
        assert (d > 1e-4) == should_move


def test_modality_conditions_first_position():
    m = tiny()
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        a = m(ids, torch.tensor([TEXT]))
        b = m(ids, torch.tensor([IMAGE]))
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="modality tags must be ids 258"):
        m(ids, torch.tensor([65]))


def test_seq_len_must_be_multiple_of_patch_size():
    m = tiny()
    with pytest.raises(ValueError, match=r"seq_len=10, patch_size=4.*Pad the window with PAD \(256\) to 12"):
        m(torch.zeros(1, 10, dtype=torch.long), torch.tensor([TEXT]))


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="cross_patch_r"):
        MegabyteConfig(patch_size=4, cross_patch_r=5)
    with pytest.raises(ValueError, match="global_heads"):
        MegabyteConfig(patch_size=4, global_dim=5, global_heads=3)


def test_zero_bytes_are_targets_and_pad_is_not():
    m = tiny()
    ids = torch.tensor([[0, 0, 65, 0, 66, 0, 0, 0, 67, 0, PAD, PAD]])
    logits = m(ids, torch.tensor([TEXT]))
    logits.retain_grad()
    loss, nll = nll_loss(logits, ids, m.config.pad_id)
    keep = ids != PAD
    assert (nll[ids == 0] > 0).all()
    assert (nll[~keep] == 0).all()
    assert torch.allclose(loss, nll.sum() / keep.sum())  # mean over the 10 non-PAD targets
    loss.backward()
    grad = logits.grad[0].abs().sum(-1)  # [T]
    assert (grad[ids[0] == 0] > 0).all() and (grad[~keep[0]] == 0).all()
    loss2, nll2 = m.loss(ids, torch.tensor([TEXT]))
    assert torch.allclose(loss2, loss) and torch.allclose(nll2, nll)


def test_learns_tinyshakespeare(shakespeare):
    data = torch.tensor(list(shakespeare), dtype=torch.long)
    train, val = data[:-20000], data[-20000:]
    torch.manual_seed(0)
    cfg = MegabyteConfig(
        patch_size=4,
        global_dim=32,
        global_layers=2,
        global_heads=4,
        local_dim=64,
        local_layers=2,
        local_heads=2,
        max_seq_len=128,
    )
    m = Megabyte(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=6e-3, betas=(0.9, 0.95), weight_decay=0.0)
    B, T = 16, 128
    modality = torch.full((B,), TEXT)
    g = torch.Generator().manual_seed(0)
    for step in range(200):
        starts = torch.randint(0, len(train) - T, (B,), generator=g)
        ids = train[starts[:, None] + torch.arange(T)]  # [B, T]
        for group in opt.param_groups:
            group["lr"] = 6e-3 * min(1.0, (step + 1) / 20)  # linear warm-up
        loss, _ = m.loss(ids, modality)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    held_out = val[: 64 * T].view(64, T)
    with torch.no_grad():
        val_loss, _ = m.loss(held_out, torch.full((64,), TEXT))
    assert val_loss.item() / math.log(2) < 4.0  # bits/byte on unseen text; uniform is 8.04


@pytest.mark.parametrize("r", [0, 2])
def test_cached_decoding_equals_full_forward(r):
    m = tiny(cross_patch_r=r)
    T = 20
    ids = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(3))
    modality = torch.tensor([TEXT, IMAGE])
    with torch.no_grad():
        full = m(ids, modality)
    # teacher-forced, one byte at a time
    state = m.new_state(modality, T)
    steps = torch.stack([m.step(state, None if t == 0 else ids[:, t - 1]) for t in range(T)], 1)
    assert (steps - full).abs().max() < 1e-5
    # prompt prefill (complete patches at once, then a partial one), then steps
    for n in (3, 4, 9, 16):
        state = m.new_state(modality, T)
        pre = m.prefill(state, ids[:, :n])  # logits for positions 0..n
        rest = [m.step(state, ids[:, t - 1])[:, None] for t in range(n + 1, T)]
        assert (torch.cat([pre, *rest], 1) - full).abs().max() < 1e-5
    # greedy: the bytes chosen step by step, rescored by one full forward
    state = m.new_state(modality, T)
    out, prev = [], None
    for _ in range(T):
        logits = m.step(state, prev)
        prev = logits.argmax(-1)
        out.append(logits)
    greedy_ids = torch.stack([o.argmax(-1) for o in out], 1)
    with torch.no_grad():
        assert (m(greedy_ids, modality) - torch.stack(out, 1)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="state is full"):
        m.step(state, prev)


def test_flops_per_byte_matches_hand_formula():
    m = tiny(global_dim=16, local_dim=32, cross_patch_r=1)
    # P = 4, global width 4*16 = 64, local width 32, V = 264; seq_len 32 -> K = 8 patches.
    # SwiGLU hidden: 8/3*64 = 170 -> 192, 8/3*32 = 85 -> 128 (rounded up to a multiple of 64).
    glob = 2 * (2 * (4 * 64 * 64 + 3 * 64 * 192) + 4 * 64 * (8 + 1) / 2)  # 2 layers, per patch
    loc = 2 * (2 * (4 * 32 * 32 + 3 * 32 * 128) + 4 * 32 * ((4 + 1) / 2 + 1 * 7 / 8))  # per byte
    proj, head = 2 * 16 * 32, 2 * 32 * 264
    expected = 3 * (glob / 4 + proj + loc + head)
    assert m.flops_per_byte(seq_len=32) == pytest.approx(expected, rel=1e-12)

    # the matmul part is 6 x (multiply-adds per byte), counted from the actual weights
    def linear(mod):
        return sum(x.weight.numel() for x in mod.modules() if isinstance(x, torch.nn.Linear))

    per_byte = linear(m.global_blocks) / 4 + linear(m.proj) + linear(m.local_blocks) + linear(m.head)
    attention = 3 * (2 * 4 * 64 * 4.5 / 4 + 2 * 4 * 32 * 3.375)
    assert m.flops_per_byte(seq_len=32) == pytest.approx(6 * per_byte + attention, rel=1e-12)
    with pytest.raises(ValueError, match="fixed at patch_size=4"):
        m.flops_per_byte(6.0)


def test_presets_sizes():
    for name, lo, hi in (("small", 25e6, 35e6), ("base", 150e6, 190e6)):
        with torch.device("meta"):
            m = Megabyte(PRESETS[name])
        glob = sum(p.numel() for p in m.global_blocks.parameters())
        assert lo < m.num_params() < hi
        assert glob > 0.8 * m.num_params()  # the global model is the bulk, as in the paper
        assert m.flops_per_byte(seq_len=12296) > m.flops_per_byte(seq_len=8192) > 0
    assert dataclasses.asdict(PRESETS["tiny"]) == dataclasses.asdict(MegabyteConfig())


def test_registry_round_trip():
    cfg = MegabyteConfig(patch_size=4, global_dim=8, local_dim=16, cross_patch_r=1, max_seq_len=64)
    d = config_to_dict(cfg)
    assert d["backbone"] == "megabyte"
    m = build_model(d)
    assert isinstance(m, Megabyte) and m.config == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        build_model({**d, "patch": 4})


@pytest.mark.gpu
def test_local_model_over_whole_rows_equals_per_patch_on_cuda(monkeypatch):
    """On CUDA the local model runs as one block-diagonal FlexAttention per row; it must give
    the per-patch path's logits and gradients."""
    import polybyte.models.megabyte as M

    model = tiny(max_seq_len=512).cuda()
    ids = torch.randint(0, 256, (2, 512), device="cuda")
    modality = torch.tensor([TEXT, IMAGE], device="cuda")

    def run():
        model.zero_grad()
        loss, _ = nll_loss(model(ids, modality), ids, 256)
        loss.backward()
        return model(ids, modality).detach(), model.local_blocks[0].attn.wqkv.weight.grad.clone()

    flat, g_flat = run()
    monkeypatch.setattr(M, "use_flex", lambda device, q_len=0: False)
    sep, g_sep = run()
    assert (flat - sep).abs().max() < 1e-4
    assert (g_flat - g_sep).abs().max() < 1e-4 * max(1.0, g_sep.abs().max().item())


@pytest.mark.parametrize("r", [0, 2])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(r):
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    modality = torch.tensor([TEXT, IMAGE])
    out = {}
    for ckpt in (False, True):
        model = tiny(cross_patch_r=r, activation_checkpointing=ckpt).train()
        loss, _ = nll_loss(model(ids, modality), ids, PAD)
        loss.backward()
        out[ckpt] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    assert torch.equal(out[False][0], out[True][0])
    for name, grad in out[False][1].items():
        assert torch.allclose(grad, out[True][1][name], atol=1e-6), name
