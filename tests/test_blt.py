"""BLT: causality under every patcher, row independence, loss, FLOPs, training."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import tiny_blt_config

from polybyte import models
from polybyte.models import patching
from polybyte.models.blt import BLT, BLTConfig, blt_preset
from polybyte.models.entropy import compute_entropies, step_entropies
from polybyte.models.transformer import TransformerConfig

PAD, EOS, TEXT, IMAGE = 256, 257, 258, 259


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


def tiny(kind: str = "space", **overrides) -> BLTConfig:
    """A very small BLT with short windows so that the windowed masks are exercised."""
    patcher = overrides.pop("patcher", kind)  # entropy kinds: see calibrate()
    return tiny_blt_config(patcher, **overrides)


def calibrate(model: BLT, ids: torch.Tensor, modality: torch.Tensor, mean_len: float = 3.0) -> None:
    """Entropy kinds: set the threshold that gives ``mean_len`` on these rows (find_threshold)."""
    if model.config.patcher.needs_entropies:
        ent = compute_entropies(model.entropy_model, ids, modality)
        theta = patching.find_threshold(ent, mean_len, ids, model.config.patcher)
        model.config.patcher = dataclasses.replace(model.config.patcher, threshold=theta)


def text_ids(B: int, T: int, seed: int) -> torch.Tensor:
    """Random word-like rows with spaces, punctuation, UTF-8 and an in-stream EOS/tag."""
    g = torch.Generator().manual_seed(seed)
    alphabet = torch.tensor(list(b"etaoin shrdlu ,.\n\xc3\xa9\x00"))
    ids = alphabet[torch.randint(len(alphabet), (B, T), generator=g)]
    ids[:, T // 2] = EOS
    ids[:, T // 2 + 1] = TEXT
    return ids


# --- causality and independence ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["strided", "space", "entropy", "entropy_relative"])
def test_blt_is_causal_for_every_patcher(kind):
    torch.manual_seed(0)
    model = BLT(tiny(kind)).eval()
    B, T = 2, 40
    ids = text_ids(B, T, seed=1)
    modality = torch.tensor([TEXT, IMAGE])
    calibrate(model, ids, modality)
    with torch.no_grad():
        ref = model(ids, modality)
        ref_patches = model.patch(ids, modality)[1]
        assert 8 <= ref_patches[:, -1].min() and ref_patches[:, -1].max() <= T - 8  # patches of several sizes
        g = torch.Generator().manual_seed(2)
        for t in (0, 1, 2, 5, 13, 20, 21, 22, 33, 39):
            changed = ids.clone()
            changed[:, t:] = torch.randint(0, 258, (B, T - t), generator=g)
            out = model(changed, modality)
            # logits[:, t] predicts ids[:, t]: positions <= t see only ids[:, :t]
            assert (out[:, : t + 1] - ref[:, : t + 1]).abs().max() < 1e-5, f"leak at t={t}"
            assert torch.equal(model.patch(changed, modality)[1][:, : t + 1], ref_patches[:, : t + 1])
        # the modality tag conditions every prediction, byte 0's included
        other = model(ids, torch.tensor([IMAGE, TEXT]))
        assert (other[:, 0] - ref[:, 0]).abs().max() > 1e-4


def test_latent_state_carries_every_byte_of_the_previous_patch():
    # Windows of 2 bytes: local attention reaches back ~4 positions, so a change further back
    # can only arrive through the latent state of the previous patch.
    torch.manual_seed(0)
    model = BLT(
        tiny(
            "strided",
            patcher=dict(kind="strided", patch_size=16),
            encoder=dict(dim=32, n_layers=2, n_heads=2, window=2),
            decoder=dict(dim=32, n_layers=2, n_heads=2, window=2),
        )
    ).eval()
    ids = text_ids(1, 48, seed=6)
    modality = torch.tensor([TEXT])
    with torch.no_grad():
        ref = model(ids, modality)
        for p in (0, 7, 15):  # first, middle and last byte of patch 0
            changed = ids.clone()
            changed[0, p] = (changed[0, p] + 1) % 256
            diff = (model(changed, modality) - ref).abs().amax(-1)[0]
            assert diff[26] > 1e-4  # patch 1 (bytes 16..31), far outside the local windows
            assert diff[: p + 1].max() < 1e-5


def test_rows_are_independent_with_different_patch_counts():
    torch.manual_seed(0)
    model = BLT(tiny("entropy")).eval()
    ids = text_ids(3, 30, seed=3)
    ids[1, 12:] = PAD
    ids[2, 25:] = PAD
    modality = torch.tensor([TEXT, TEXT, IMAGE])
    calibrate(model, ids, modality)
    with torch.no_grad():
        counts = model.patch(ids, modality)[1][:, -1]
        assert len(set(counts.tolist())) > 1  # rows with fewer patches get padded latent positions
        batch = model(ids, modality)
        for r in range(3):
            single = model(ids[r : r + 1], modality[r : r + 1])
            assert (single - batch[r : r + 1]).abs().max() < 1e-5
        ent = compute_entropies(model.entropy_model, ids, modality)
        alone = compute_entropies(model.entropy_model, ids[1:2], modality[1:2])
        assert torch.allclose(ent[1:2], alone, atol=1e-5)


@pytest.mark.parametrize("kind", ["space", "entropy"])
def test_stepping_the_stages_with_caches_matches_the_full_forward(kind):
    """The incremental seam for generation: one byte at a time, latent once per closed patch."""
    torch.manual_seed(0)
    model = BLT(tiny(kind)).eval()
    T = 30
    ids = text_ids(1, T, seed=7)
    modality = torch.tensor([TEXT])
    calibrate(model, ids, modality)
    n_max = max(model.config.hash_ngrams.sizes)
    with torch.no_grad():
        full = model(ids, modality)
        full_patch_ids = model.patch(ids, modality)[1]
        inputs = model.inputs(ids, modality)
        cache = model.new_cache(1)
        entropies = torch.zeros(1, 0)  # entropy of every byte so far (entropy kind)
        history: list[list[torch.Tensor]] = [[] for _ in model.enc_blocks]  # encoder states so far
        patch_start = slots = None
        for t in range(T):
            u = inputs[:, t : t + 1]  # the tag, then byte t-1
            # 1. boundary at t from bytes < t (the value put at position t is never looked at)
            if kind == "entropy":
                step = step_entropies(model.entropy_model, u, cache.entropy)
                entropies = torch.cat([entropies, step], dim=1)
            prefix = torch.cat([ids[:, :t], torch.zeros_like(u)], dim=1)
            known = entropies if kind == "entropy" else None
            starts = patching.patch_starts(prefix, model.config.patcher, known)
            # 2. local encoder, one input
            x = model.embed(u, history=inputs[:, max(0, t - n_max + 1) : t])
            for layer, state in zip(history, model.encode_bytes(x, torch.tensor([t]), cache.encoder)):
                layer.append(state)
            # 3. a new patch: pool the inputs of the closed one, one latent step, new slots
            if starts[0, t]:
                a = 0 if patch_start is None else patch_start + 1  # the tag, or bytes since the last start
                states = [torch.cat(layer[a:], dim=1) for layer in history]
                pooled = model.encode_patches(states, torch.zeros(1, t + 1 - a, dtype=torch.long), 1)
                j = cache.latent[0].length  # patches closed so far
                slots = model.decoder_slots(model.latent_states(pooled, torch.tensor([j]), cache.latent))
                patch_start = t
            assert int(full_patch_ids[0, t]) == cache.latent[0].length - 1  # same patches as the full forward
            # 4. local decoder, one byte
            step_logits = model.decode_bytes(
                history[-1][t], slots, torch.zeros(1, 1, dtype=torch.long), torch.tensor([t]), cache.decoder
            )
            assert (step_logits[:, 0] - full[:, t]).abs().max() < 1e-5, f"t={t}"


# --- loss, aux, entropy model -----------------------------------------------------------------
def test_zero_bytes_are_targets_and_pad_is_not():
    torch.manual_seed(0)
    model = BLT(tiny("space"))
    ids = text_ids(2, 24, seed=4)
    ids[:, 3] = 0
    ids[1, 20:] = PAD
    loss, nll = model.loss(ids, torch.tensor([TEXT, TEXT]))
    assert (nll[ids == 0] > 0).all()
    assert (nll[ids == PAD] == 0).all()
    assert torch.allclose(loss, nll.sum() / (ids != PAD).sum())
    loss.backward()
    assert model.embed.byte_embed.weight.grad[0].abs().sum() > 0  # a 0x00 input is embedded and trained
    assert model.aux["num_bytes"].item() == (ids != PAD).sum().item()
    assert 1 <= model.aux["num_patches"].item() < model.aux["num_bytes"].item()


def test_entropy_model_is_frozen_and_stays_in_eval():
    torch.manual_seed(0)
    model = BLT(tiny("entropy")).train()
    assert not model.entropy_model.training
    assert not any(p.requires_grad for p in model.entropy_model.parameters())
    ids = text_ids(2, 20, seed=5)
    loss, _ = model.loss(ids, torch.tensor([TEXT, TEXT]))
    loss.backward()
    assert all(p.grad is None for p in model.entropy_model.parameters())
    assert model.num_params() == sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for p in model.entropy_model.parameters()
    )


def test_config_errors_and_dict_round_trip():
    with pytest.raises(ValueError, match="needs an entropy model"):
        BLTConfig(patcher=dict(kind="entropy"))
    with pytest.raises(ValueError, match="unknown keys"):
        models.config_from_dict("blt", {"latent": {"dimm": 3}})
    cfg = tiny("entropy")
    d = models.config_to_dict(cfg)
    assert d["backbone"] == "blt"
    d.pop("backbone")
    assert models.config_from_dict("blt", d) == cfg
    model = models.build_model({"backbone": "blt", **dataclasses.asdict(cfg)})
    assert isinstance(model, BLT) and isinstance(model.config.entropy_model, TransformerConfig)


# --- FLOPs ------------------------------------------------------------------------------------
def test_flops_per_byte_by_hand():
    cfg = tiny("strided", cross_attn_all_layers=False, max_seq_len=64)
    model = BLT(cfg)
    T, L, k = 64, 3, cfg.cross_attn_k
    dE, dG, dD, V = 32, 48, 32, cfg.vocab_size

    def block(d):  # attention projections + SwiGLU (hidden 8/3·d rounded up to 64)
        hidden = 64 * math.ceil(int(8 * d / 3) / 64)
        return 2 * (4 * d * d + 3 * d * hidden)

    def windowed(w):  # allowed (query, key) pairs per query
        return (w * (w + 1) / 2 + (T - w) * w) / T

    enc = 2 * block(dE) + 2 * 4 * dE * windowed(5)
    enc_cross = 2 * 2 * dE * dE + (k / L) * 2 * 2 * dE * dE + 4 * dE * k
    pooling = (2 * dE * k * dE + 2 * k * dE * dG) / L
    P = T / L
    latent = 2 * block(dG) / L + 2 * 4 * dG * (P * (P + 1) / 2) / T + 2 * dG * k * dD / L
    dec_cross = 2 * 2 * dD * dD + (k / L) * 2 * 2 * dD * dD + 4 * dD * k
    dec = 2 * block(dD) + 2 * 4 * dD * windowed(7) + 2 * dD * V
    expected = 3 * (enc + enc_cross + pooling + latent + dec_cross + dec)
    assert model.flops_per_byte(L) == pytest.approx(expected, rel=1e-9)
    # before any forward the patcher's nominal patch size is used; after, the measured mean
    assert model.flops_per_byte() == pytest.approx(expected, rel=1e-9)
    model(torch.randint(0, 256, (1, 64)), torch.tensor([TEXT]))
    assert model.flops_per_byte() == pytest.approx(model.flops_per_byte(64 / 22), rel=1e-9)  # 22 patches
    # the entropy model adds its forward FLOPs only
    ent = BLT(tiny("entropy"))
    plain = BLT(tiny("space"))
    entropy_forward = ent.entropy_model.flops_per_byte() / 3
    assert ent.flops_per_byte(4.0) == pytest.approx(plain.flops_per_byte(4.0) + entropy_forward)


def test_presets_have_their_advertised_sizes():
    for name, lo, hi in (("small", 27e6, 33e6), ("base", 155e6, 185e6)):
        with torch.device("meta"):  # shapes only: no memory, no compute
            model = BLT(blt_preset(name))
        assert lo < model.num_params() < hi, (name, model.num_params())
        assert model.config.patcher.kind == "entropy" and model.entropy_model is not None
        assert model.flops_per_byte() < 6 * model.num_params()  # patching: below 6·N per byte
    model = BLT(blt_preset("tiny"))
    out = model(torch.randint(0, 256, (1, 32)), torch.tensor([TEXT]))
    assert out.shape == (1, 32, 264)
    with pytest.raises(ValueError, match="unknown BLT preset"):
        blt_preset("huge")


# --- learning ---------------------------------------------------------------------------------
def test_loss_falls_below_4_bits_per_byte_on_shakespeare(shakespeare):
    torch.manual_seed(0)
    data = torch.tensor(list(shakespeare))
    model = BLT(blt_preset("tiny", max_seq_len=128))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    B, T = 8, 128
    bits = []
    for _ in range(200):
        starts = torch.randint(0, len(data) - T, (B,), generator=g)
        ids = torch.stack([data[s : s + T] for s in starts])
        loss, _ = model.loss(ids, torch.full((B,), TEXT))
        opt.zero_grad()
        loss.backward()
        opt.step()
        bits.append(loss.item() / math.log(2))
    assert bits[0] > 7.0  # starts near uniform over 264 ids
    assert sum(bits[-10:]) / 10 < 4.0, bits[-10:]


def test_calibrate_threshold_hits_target_mean_patch_length():
    from polybyte.models.blt import BLTConfig
    from polybyte.models.entropy import entropy_model_config
    from polybyte.models.patching import PatcherConfig

    torch.manual_seed(0)
    cfg = BLTConfig(
        max_seq_len=64,
        patcher=PatcherConfig(kind="entropy", patch_size=4),
        hash_ngrams=dict(table_size=64),
        encoder=dict(dim=32, n_layers=1, n_heads=2, window=16),
        latent=dict(dim=32, n_layers=1, n_heads=2),
        decoder=dict(dim=32, n_layers=1, n_heads=2, window=16),
        entropy_model=entropy_model_config(dim=32, n_layers=1, n_heads=2, window=16, max_seq_len=64),
    )
    model = models.build_model(cfg)
    ids = torch.randint(0, 256, (4, 64))
    modality = torch.full((4,), 258)
    threshold = model.calibrate_threshold(ids, modality, target_mean_patch_len=4.0)
    assert model.config.patcher.threshold == threshold
    model(ids, modality)
    mean = float(model.aux["num_bytes"]) / float(model.aux["num_patches"])
    assert 3.0 <= mean <= 5.0


def test_fixed_patch_capacity_compiles_once_across_patch_counts():
    """With patcher.max_patches_ratio the patch dimension is fixed: batches with different
    patch counts reuse one compiled graph (no recompile, no graph break in patching), and rows
    that fit give the same logits as the exact (data-sized) patch dimension."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = tiny("space")
    cfg.patcher = dataclasses.replace(cfg.patcher, max_patches_ratio=3.0)  # 3 x 64/3 -> 64 slots
    model = BLT(cfg).eval()
    exact = BLT(tiny("space")).eval()
    exact.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: a break raises
    modality = torch.tensor([TEXT, TEXT])
    counts = set()
    with torch.no_grad():
        out = compiled(text_ids(2, 64, seed=11), modality)
        torch._dynamo.config.error_on_recompile = True
        try:
            for seed in (12, 13, 14):
                ids = text_ids(2, 64, seed=seed)
                ids[1, 40 + seed :] = PAD
                counts.add(int(model.patch(ids, modality)[1].max()))
                out = compiled(ids, modality)
                assert (out - exact(ids, modality)).abs().max() < 1e-5
        finally:
            torch._dynamo.config.error_on_recompile = False
    assert len(counts) > 1  # the batches really had different patch counts
    torch._dynamo.reset()


def test_patch_capacity_merges_overflow_into_the_last_slot():
    ids = text_ids(2, 64, seed=1)
    cfg = patching.PatcherConfig(kind="strided", patch_size=1, max_patches_ratio=0.5)  # 32 slots
    assert cfg.capacity(64) == 64  # rounded up to a multiple of 64, at most T
    cfg = patching.PatcherConfig(kind="strided", patch_size=4, max_patches_ratio=0.5)
    assert cfg.capacity(1024) == 128
    one_byte = patching.PatcherConfig(kind="strided", patch_size=1, max_patches_ratio=0.01)
    lengths, patch_ids = patching.patch(ids, one_byte)
    assert lengths.shape == (2, 64) and patch_ids.max() == 63  # capacity min(T, 64) = 64 slots
    cfg = patching.PatcherConfig(kind="strided", patch_size=1, max_patches_ratio=0.01)
    ids = text_ids(2, 256, seed=2)
    lengths, patch_ids = patching.patch(ids, cfg)
    assert lengths.shape == (2, 64) and int(patch_ids.max()) == 63
    assert lengths[:, -1].tolist() == [256 - 63, 256 - 63] and (lengths.sum(1) == 256).all()


def test_calibrate_thresholds_per_modality_and_they_travel_with_the_config():
    """Each tag's rows get the threshold that gives them their own target mean patch length;
    the thresholds round-trip through the config dict (as config.json stores them)."""
    import json

    torch.manual_seed(0)
    model = BLT(tiny(dict(kind="entropy", patch_size=3, max_patch_len=12))).eval()
    g = torch.Generator().manual_seed(1)
    text = torch.tensor([list(b"the cat sat on the mat, and then it sat on the hat. " * 5)[:256]] * 2)
    noise = torch.randint(0, 256, (2, 256), generator=g)
    ids, tags = torch.cat([text, noise]), torch.tensor([TEXT, TEXT, IMAGE, IMAGE])
    found = model.calibrate_thresholds(ids, tags, {TEXT: 3.0, IMAGE: 6.0})
    assert set(found) == {TEXT, IMAGE} and model.config.patcher.thresholds == found
    _, patch_ids = model.patch(ids, tags)
    for tag, target in ((TEXT, 3.0), (IMAGE, 6.0)):
        rows = tags == tag
        n_patches, n_bytes = patching.patch_counts(patch_ids[rows], ids[rows])
        assert abs(n_bytes.item() / n_patches.item() - target) < 0.1 * target
    saved = json.loads(json.dumps(models.config_to_dict(model.config)))  # tag keys become strings
    assert models.build_model(saved).config.patcher.thresholds == found
    with pytest.raises(ValueError, match="needs entropy patching"):
        BLT(tiny("space")).calibrate_thresholds(ids, tags)
