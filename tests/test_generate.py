"""Cached sampling (models/generate.py): equal to uncached decoding, sampling controls, EOS, speed."""

import dataclasses
import time

import pytest
import torch
from conftest import tiny_blt

from polybyte.models import patching
from polybyte.models.blt import BLT
from polybyte.models.entropy import compute_entropies
from polybyte.models.generate import generate, make_decoder
from polybyte.models.hash_ngrams import HashNgramConfig
from polybyte.models.megabyte import Megabyte, MegabyteConfig
from polybyte.models.transformer import Transformer, TransformerConfig

TEXT, IMAGE, AUDIO, PAD, EOS = 258, 259, 260, 256, 257
PROMPTS = [b"", b"hello", b"ab, cd.\n \xc3\xa9f", b"abc def ghi jkl m"]  # lengths 0, 5, 11, 17
MODALITIES = torch.tensor([TEXT, IMAGE, AUDIO, TEXT])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


def flat(**kw):
    torch.manual_seed(0)
    defaults = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    return Transformer(TransformerConfig(**{**defaults, **kw})).eval()


def megabyte(**kw):
    torch.manual_seed(0)
    return Megabyte(MegabyteConfig(**{**dict(max_seq_len=128), **kw})).eval()


def blt(kind):
    """conftest's tiny BLT with a 2-layer entropy model; entropy kinds get a threshold for ~3-byte patches."""
    model = tiny_blt(kind, entropy_model=dict(n_layers=2, n_heads=4, window=6))
    config = model.config
    if config.patcher.needs_entropies:
        ids = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(1))
        entropies = compute_entropies(model.entropy_model, ids, MODALITIES)
        theta = patching.find_threshold(entropies, 3.0, ids, config.patcher)
        model.config.patcher = dataclasses.replace(config.patcher, threshold=theta)
    return model


MODELS = {
    "flat": lambda: flat(),
    "flat-window": lambda: flat(window=5),
    "megabyte": lambda: megabyte(),
    "megabyte-cross-patch": lambda: megabyte(cross_patch_r=3, patch_size=4, learned_pos=False),
    "blt-strided": lambda: blt("strided"),
    "blt-space": lambda: blt("space"),
    "blt-entropy": lambda: blt("entropy"),
    "blt-entropy-relative": lambda: blt("entropy_relative"),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cached_logits_match_the_full_forward(name):
    """Prefill 5 bytes, then one step per byte: every logit equals the full forward's."""
    model = MODELS[name]()
    ids = torch.tensor([list(b"the cat, sat on a mat.\n ok!?xyzw")] * 4)  # 32 bytes
    ids[1, 8:] = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(0))
    ids[2, ::3] = ord(" ")
    with torch.no_grad():
        full = model(ids, MODALITIES)
        dec = make_decoder(model, MODALITIES, ids.shape[1])
        steps = [dec.prefill(ids[:, :5])] + [dec.step(ids[:, t - 1])[:, None] for t in range(6, 32)]
    cached = torch.cat(steps, dim=1)
    assert cached.shape == full.shape
    assert (cached - full).abs().max() < 1e-4
    if name in ("blt-space", "blt-entropy", "blt-entropy-relative"):  # rows closed patches apart
        assert len(set(dec.state.num_patches.tolist())) > 1


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cached_greedy_equals_uncached(name):
    model = MODELS[name]()
    kw = dict(max_bytes=30, temperature=0, stop_at_eos=False)
    cached = generate(model, MODALITIES, PROMPTS, **kw)
    uncached = generate(model, MODALITIES, PROMPTS, use_cache=False, **kw)
    assert cached == uncached
    assert [len(r) for r in cached] == [30] * 4
    # a row decodes the same alone as inside a batch of rows at other positions
    assert generate(model, IMAGE, [PROMPTS[1]], **kw)[0] == cached[1]


def test_blt_latent_caches_grow_between_blocks(monkeypatch):
    """BLT's latent caches start small and grow (by LATENT_GROWTH) when the host's bound of the patch
    count reaches their capacity; decoding is unchanged and the capacity stays near the true
    patch count rather than one slot per byte."""
    import polybyte.models.blt_decoding as blt_module

    monkeypatch.setattr(blt_module, "LATENT_MIN_CAPACITY", 4)
    model = blt("entropy")
    kw = dict(max_bytes=60, temperature=0, stop_at_eos=False)
    prompts = [b"", b"ab", b"abc d"]
    cached = generate(model, MODALITIES[:3], prompts, **kw)
    assert cached == generate(model, MODALITIES[:3], prompts, use_cache=False, **kw)
    state = model.new_state(MODALITIES[:3], 160)
    prev = model.step(state, None).argmax(-1)
    while state.pos + model.decode_block_size <= 160:
        prev = model.decode_block(state, prev, lambda logits, j: logits.argmax(-1))[:, -1]
    capacity = state.cache.latent[0].capacity
    patches = int(state.num_patches.max())
    assert 4 < patches <= capacity < state.pos  # grew, and holds fewer slots than bytes
    assert state.patch_bound >= patches


def test_sampling_controls():
    model = flat()
    kw = dict(max_bytes=40, stop_at_eos=False)
    greedy = generate(model, MODALITIES, PROMPTS, temperature=0, **kw)
    assert generate(model, MODALITIES, PROMPTS, top_k=1, seed=5, **kw) == greedy
    assert generate(model, MODALITIES, PROMPTS, top_p=1e-6, seed=5, **kw) == greedy
    a = generate(model, MODALITIES, PROMPTS, temperature=1.0, seed=7, **kw)
    assert generate(model, MODALITIES, PROMPTS, temperature=1.0, seed=7, **kw) == a  # seeded: reproducible
    assert generate(model, MODALITIES, PROMPTS, temperature=1.0, seed=8, **kw) != a
    assert a != greedy
    # top-k restricts every draw to the k most likely bytes of the (cached) distribution
    k3 = generate(model, TEXT, [b"ab"], top_k=3, seed=1, **kw)[0]
    ids = torch.tensor([list(b"ab") + k3])
    logits = model(ids, torch.tensor([TEXT]))[0, 2:].clone()
    logits[:, 256:] = -torch.inf
    top3 = logits.topk(3, dim=-1).indices
    assert all(b in top3[i] for i, b in enumerate(k3))


class FavoursSpecials(Transformer):
    """A flat model whose head makes PAD, EOS and the tags far likelier than any byte."""

    def logits(self, h):
        out = super().logits(h).clone()
        out[..., PAD:] += 30.0
        return out


def test_only_bytes_and_eos_are_sampled():
    torch.manual_seed(0)
    model = FavoursSpecials(TransformerConfig(dim=32, n_layers=2, n_heads=4, max_seq_len=64)).eval()
    out = generate(model, MODALITIES, PROMPTS, 50, seed=0, stop_at_eos=False)
    assert all(0 <= b < 256 for row in out for b in row) and [len(r) for r in out] == [50] * 4
    # with EOS allowed it wins at once: every row stops before its first byte
    assert generate(model, MODALITIES, PROMPTS, 50, seed=0) == [[]] * 4


def overfit(model, row: list[int], steps: int):
    """Train ``model`` on 4 copies of one text row (AdamW, lr 1e-2); returned in eval mode."""
    ids, mod = torch.tensor([row] * 4), torch.full((4,), TEXT)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss, _ = model.loss(ids, mod)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_stops_at_eos():
    """A flat model trained on "abc" + EOS samples exactly "abc" and stops; rows stop separately."""
    model = overfit(flat(), [*b"abc", EOS, PAD, PAD], steps=60)
    out = generate(model, TEXT, [b"", b"a", b"ab"], max_bytes=20, temperature=0)
    assert out == [list(b"abc"), list(b"bc"), list(b"c")]
    capped = generate(model, TEXT, [b""], max_bytes=2, temperature=0)
    assert capped == [list(b"ab")]
    never = generate(model, TEXT, [b""], max_bytes=20, temperature=0, stop_at_eos=False)[0]
    assert len(never) == 20 and never[:3] == list(b"abc") and EOS not in never


def test_megabyte_whole_patch_decoding_stops_at_eos_and_ends_mid_patch():
    """MEGABYTE (P=4) trained on "abcdefghij" + EOS: after the first patch boundary whole patches
    are decoded at once; EOS inside a patch ends the row there, and a length that is not a
    multiple of P ends mid-patch (cached equals uncached)."""
    torch.manual_seed(0)
    model = overfit(Megabyte(MegabyteConfig(patch_size=4, max_seq_len=32)), [*b"abcdefghij", EOS, PAD], steps=80)
    out = generate(model, TEXT, [b"", b"a", b"abcde"], max_bytes=20, temperature=0)
    assert out == [list(b"abcdefghij"), list(b"bcdefghij"), list(b"fghij")]
    for n in (6, 9, 13):
        kw = dict(max_bytes=n, temperature=0, stop_at_eos=False)
        seen = []
        cached = generate(model, TEXT, [b"", b"ab"], progress=seen.append, **kw)
        assert cached == generate(model, TEXT, [b"", b"ab"], use_cache=False, **kw)
        assert [len(r) for r in cached] == [n, n] and sum(seen) == 2 * n


def test_progress_counts_every_byte():
    seen = []
    generate(flat(), TEXT, PROMPTS, 70, temperature=0, stop_at_eos=False, progress=seen.append)
    assert sum(seen) == 4 * 70 and len(seen) > 1


def test_bad_arguments():
    model = flat()
    with pytest.raises(ValueError, match="outside 0..263"):
        generate(model, TEXT, [[1, 2, 999]], 4)
    with pytest.raises(ValueError, match="prompt 1 holds PAD"):
        generate(model, TEXT, [b"a", [1, PAD, 2]], 4)
    with pytest.raises(ValueError, match="modality must be"):
        generate(model, torch.tensor([TEXT, TEXT]), [b"a"], 4)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, TEXT, [b"a"], 4, top_p=0)
    with pytest.raises(ValueError, match="prompts"):
        generate(model, TEXT, None, 4)


def test_megabyte_samples_a_64x64_image_on_cpu():
    """12,288 bytes per image, two images at once: global model every 8 bytes, local per byte."""
    torch.manual_seed(0)
    model = Megabyte(MegabyteConfig(max_seq_len=12288)).eval()
    start = time.perf_counter()
    out = generate(model, IMAGE, None, 12288, num=2, seed=0, stop_at_eos=False)
    seconds = time.perf_counter() - start
    print(f"MEGABYTE tiny: 2 x 12,288 bytes in {seconds:.1f} s ({2 * 12288 / seconds:,.0f} bytes/s)")
    assert [len(r) for r in out] == [12288, 12288]
    assert all(0 <= b < 256 for r in out for b in r)


def blt_per_modality(**overrides):
    """An entropy BLT with one threshold per modality tag (model.patch_targets' result), and any
    BLTConfig field overridden, e.g. transformers' hash n-gram ids (an imported BLT's)."""
    model = blt("entropy")
    if overrides:
        torch.manual_seed(0)
        model = BLT(dataclasses.replace(model.config, **overrides)).eval()
    p = model.config.patcher
    p.thresholds = {int(t): p.threshold * (0.8 + 0.2 * i) for i, t in enumerate(MODALITIES[:3].tolist())}
    return model


GRAPH_MODELS = {
    "flat": lambda: flat(),
    "flat-window": lambda: flat(window=5),
    "megabyte": lambda: megabyte(patch_size=4, max_seq_len=64),
    "megabyte-cross-patch": lambda: megabyte(patch_size=4, max_seq_len=64, cross_patch_r=2),
    "blt-entropy": lambda: blt("entropy"),
    "blt-space": lambda: blt("space"),
    # per-tag thresholds and transformers' hash ids are built from scalars inside the captured step
    "blt-thresholds-per-modality": lambda: blt_per_modality(),
    "blt-transformers-hashes": lambda: blt_per_modality(
        hash_ngrams=HashNgramConfig(table_size=97, style="transformers")
    ),
}


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("name", sorted(GRAPH_MODELS))
def test_cuda_graphs_equal_eager_decoding(name, compile, monkeypatch):
    """One CUDA graph per block (optionally over the compiled decoding steps) decodes exactly
    as the eager per-byte path (fp32, greedy and seeded sampling). BLT's latent caches start at
    4 patches, so they grow and the graph is captured again several times."""
    import polybyte.models.blt_decoding as blt_module
    from polybyte.pipelines.runtime import compile_decoding

    monkeypatch.setattr(blt_module, "LATENT_MIN_CAPACITY", 4)
    model = GRAPH_MODELS[name]().cuda()
    modality = MODALITIES[:3].cuda()
    prompts = [bytes(range(5)), b"ab", b""]
    kwargs = dict(max_bytes=50, temperature=0, stop_at_eos=False)
    eager = generate(model, modality, prompts, cuda_graphs=False, **kwargs)
    sampled_eager = generate(model, modality, prompts, max_bytes=50, seed=3, cuda_graphs=False)
    if compile:
        assert compile_decoding(model) == list(model.compilable_steps)
    graphed = generate(model, modality, prompts, cuda_graphs=True, **kwargs)
    assert graphed == eager
    assert generate(model, modality, prompts, max_bytes=50, seed=3, cuda_graphs=True) == sampled_eager


@pytest.mark.parametrize("window", [None, 5])
def test_flat_transformer_blocks_on_device_caches_match_the_full_forward(window):
    """The flat transformer's block state with device caches (what CUDA graphs replay; on a CPU
    the default is host caches): the prompt prefilled through host caches and copied in, then
    16-byte blocks, every logit equal to the full forward's; a full state refuses another step."""
    model = flat(window=window)
    ids = torch.randint(0, 256, (4, 53), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids, MODALITIES)
        state = model.new_block_state(MODALITIES, 53, device_caches=True)
        assert state.cache.device_fill
        logits = [model.prefill(state, ids[:, :4])]  # positions 0..4
        taken = []  # teacher-forced: each block's sampler records the logits and returns the true byte

        def forced(step_logits, j):
            taken.append(step_logits[:, None])
            return ids[:, state.pos - 1]

        while state.pos + model.decode_block_size <= 53:
            out = model.decode_block(state, ids[:, state.pos - 1], forced)
            assert torch.equal(out, ids[:, state.pos - model.decode_block_size : state.pos])
    got = torch.cat(logits + taken, dim=1)
    assert got.shape[1] == 5 + 3 * 16 == 53
    assert (got - full).abs().max() < 1e-4
    with pytest.raises(ValueError, match="prefill it first"):
        model.decode_block(model.new_block_state(MODALITIES, 53), ids[:, 0], forced)
    if window is None:  # a ring slides on; a full-attention cache has an end
        with pytest.raises(ValueError, match="state is full"):
            model.step(state, ids[:, -1])
        with pytest.raises(ValueError, match="does not fit"):
            model.prefill(model.new_block_state(MODALITIES, 8, device_caches=True), ids[:, :8])
