"""BLT's fixed-shape decoding (models/blt_decoding.py decode_front/latent/back, _starts,
reserve_patches, decode_block) and the CUDA-graph contract of ``decode_block`` checked on CPU:
the incremental state must equal the full forward for every patcher rule, the latent caches
must never be written past their capacity, and a block must be replayable (no host sync, no
rebinding of state tensors, the same ops and shapes on every block)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_blt as conftest_tiny_blt
from torch.utils._python_dispatch import TorchDispatchMode

import polybyte.models.blt_decoding as blt_module
from polybyte.models import patching
from polybyte.models.blt import BLT
from polybyte.models.entropy import compute_entropies
from polybyte.models.generate import generate
from polybyte.models.megabyte import Megabyte, MegabyteConfig
from polybyte.models.transformer import TransformerConfig

TEXT, IMAGE, AUDIO, PAD, EOS = 258, 259, 260, 256, 257
MOD = torch.tensor([TEXT, IMAGE, AUDIO])
T = 40

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


def stream() -> torch.Tensor:
    """Three rows of T ids: text with spaces, random bytes with specials (EOS, tags) inside,
    a long run without spaces (max-length cuts) ending in a special."""
    g = torch.Generator().manual_seed(0)
    text = list(b"the cat, sat on a mat.\n ok!?  xyzw aaaaaaaaaaaaaaaaaa")[:T]
    noise = torch.randint(0, 256, (T,), generator=g).tolist()
    noise[5], noise[6], noise[17], noise[30] = EOS, IMAGE, TEXT, EOS
    run = list(b"abcdefghijklmnopqrstuvwxyzabcdefghijklmn")[: T - 3] + [EOS, ord("x"), ord(" ")]
    return torch.tensor([text, noise, run])


def tiny_blt(patcher: dict, **overrides) -> BLT:
    """conftest's tiny BLT with one-layer local models, a 32-wide latent model and a sharper
    entropy model (init std 0.5, so that entropies spread and thresholds have gaps)."""
    fields = dict(
        encoder=dict(dim=32, n_layers=1, n_heads=2, window=5),
        latent=dict(dim=32, n_layers=2, n_heads=2),
        decoder=dict(dim=32, n_layers=1, n_heads=2, window=7),
        entropy_model=dict(n_heads=4, window=6, init_std=0.5),
    )
    return conftest_tiny_blt(patcher, **{**fields, **overrides})


def set_threshold(model: BLT, ids: torch.Tensor) -> None:
    """A threshold in the widest gap between the scores of ``ids`` near their 70% quantile, so
    that float noise between the stepped and the full entropy model cannot flip a boundary."""
    p = model.config.patcher
    e = compute_entropies(model.entropy_model, ids, MOD[: ids.shape[0]]).float()
    if p.kind == "entropy_relative":
        e = e - torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], dim=1)
    s = e.flatten().sort().values
    lo, hi = int(0.55 * len(s)), int(0.85 * len(s))
    gaps = s[lo + 1 : hi + 1] - s[lo:hi]
    i = lo + int(gaps.argmax())
    assert gaps.max() > 1e-4, "scores too close together for a safe threshold"
    model.config.patcher = dataclasses.replace(p, threshold=float(s[i] + s[i + 1]) / 2)


@torch.no_grad()
def stepped(model: BLT, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step a fresh state through ids (teacher forcing): logits [B, T, V] and the patch starts
    [B, T] read off ``num_patches`` after every step."""
    B, n = ids.shape
    state = model.new_state(MOD[:B], n)
    logits, counts = [], []
    for t in range(n):
        logits.append(model.step(state, None if t == 0 else ids[:, t - 1]))
        counts.append(state.num_patches.clone())
    counts = torch.stack(counts, 1)  # [B, T] patches started after step t
    starts = torch.cat([counts[:, :1], counts[:, 1:] - counts[:, :-1]], dim=1)
    assert set(starts.unique().tolist()) <= {0, 1}
    return torch.stack(logits, 1), starts.bool()


def assert_stepped_equals_full(model: BLT, ids: torch.Tensor) -> torch.Tensor:
    """Stepping a fresh state through ``ids`` gives the full forward's patch starts and logits;
    returns those starts [B, T]."""
    with torch.no_grad():
        full = model(ids, MOD)
        want = patching.patch_ids_to_starts(model.patch(ids, MOD)[1])
    logits, starts = stepped(model, ids)
    assert torch.equal(starts, want)
    assert (logits - full).abs().max() < 1e-4
    return want


PATCHERS = [
    dict(kind="strided", patch_size=3),
    dict(kind="strided", patch_size=3, max_patch_len=6),
    dict(kind="strided", patch_size=7, max_patch_len=3),  # cuts inside every stride: 3, 3, 1
    dict(kind="strided", patch_size=4, max_patch_len=1),
]
for _kind in ("space", "entropy", "entropy_relative"):
    for _fpl1 in (True, False):
        for _split in (True, False):
            for _mpl in (None, 4):
                flags = dict(first_patch_len_one=_fpl1, split_after_special=_split, max_patch_len=_mpl)
                PATCHERS.append(dict(kind=_kind, patch_size=3, **flags))
PATCHERS.append(dict(kind="space", patch_size=3, max_patch_len=1))  # ring of one encoder state


def _patcher_id(p: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in p.items() if k != "patch_size" or p["kind"] == "strided")


@pytest.mark.parametrize("patcher", PATCHERS, ids=[_patcher_id(p) for p in PATCHERS])
def test_stepped_starts_and_logits_equal_the_full_forward(patcher):
    """Every patcher kind and flag: the starts decided on the device one byte at a time equal
    ``patching.patch_starts`` on the whole stream (specials, first patch, PAD-free cuts), and the
    logits (ring pooling, hash history, per-row latent step) equal the full forward's."""
    model = tiny_blt(patcher)
    ids = stream()
    if model.config.patcher.needs_entropies:
        set_threshold(model, ids)
    want = assert_stepped_equals_full(model, ids)
    lengths = patching.starts_to_lengths(want)
    mpl = patcher.get("max_patch_len")
    if mpl:  # no patch outgrows the ring of encoder states, and some fill it exactly
        assert int(lengths.max()) <= mpl
        if patcher["kind"] != "strided" or patcher["patch_size"] > mpl:
            assert int(lengths.max()) == mpl


@pytest.mark.parametrize(
    "overrides",
    [
        dict(hash_ngrams=dict(sizes=(1,), table_size=97)),  # no history at all
        dict(hash_ngrams=dict(sizes=(2,), table_size=97)),  # history of one input (H = 2)
        dict(hash_ngrams=dict(sizes=(1, 3), table_size=97, num_functions=2)),
        dict(hash_ngrams=dict(sizes=(3, 4, 5, 6, 7, 8, 9, 10, 11, 12), table_size=97)),  # H > ring
        dict(cross_attn_all_layers=False, encoder=dict(dim=32, n_layers=2, n_heads=2, window=3)),
        dict(cross_attn_k=3, latent=dict(dim=48, n_layers=2, n_heads=4, n_kv_heads=2)),  # GQA latent
        dict(latent=dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1)),
    ],
    ids=["ngram1", "ngram2", "ngram1-3x2fn", "ngram-long", "last-layer-pool", "gqa-k3", "mqa"],
)
def test_stepped_logits_equal_the_full_forward_for_model_shapes(overrides):
    """Hash n-gram history lengths (including none and longer than the pooling ring), pooling
    from the last encoder layer only, grouped-query latent attention, k = 3 slots."""
    model = tiny_blt(dict(kind="space", patch_size=3, max_patch_len=5), **overrides)
    ids = stream()
    with torch.no_grad():
        full = model(ids, MOD)
    logits, _ = stepped(model, ids)
    assert (logits - full).abs().max() < 1e-4


def test_stepped_rows_stop_starting_patches_at_the_training_slots():
    """With fixed patch slots (max_patches_ratio), a row whose patches outnumber the slots of a
    max_seq_len window has the rest merged into the last slot by the full forward: stepping
    starts no patch past them, so sampling gives the logits scoring and training compute."""
    T = 150
    model = tiny_blt(dict(kind="strided", patch_size=1, max_patches_ratio=0.01), max_seq_len=T)
    slots = model.config.patcher.capacity(T)
    assert slots == 64  # a patch per byte: rows of 150 bytes overflow 64 slots
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (3, T), generator=g)
    want = assert_stepped_equals_full(model, ids)
    assert want.sum(1).tolist() == [slots] * 3  # the starts stopped at the slots
    unbounded = tiny_blt(dict(kind="strided", patch_size=1), max_seq_len=T)
    unbounded.load_state_dict(model.state_dict())
    logits, starts = stepped(unbounded, ids)
    assert starts.sum(1).tolist() == [T] * 3  # without slots, every byte starts a patch ...
    with torch.no_grad():
        assert (logits[:, slots:] - model(ids, MOD)[:, slots:]).abs().max() > 1e-2  # ... and predicts otherwise


@torch.no_grad()
def blocks_teacher_forced(model: BLT, ids: torch.Tensor, prefix: int):
    """``prefix`` single steps, then decode_block with a ``sample`` that returns the forced
    bytes: logits [B, T, V] of every position, and (capacity, moved, patch_bound, max patches)
    after each prepare_block."""
    B, n = ids.shape
    state = model.new_state(MOD[:B], n)
    logits = [model.step(state, None if t == 0 else ids[:, t - 1]) for t in range(prefix)]
    prev, log = ids[:, prefix - 1], []
    while state.pos + model.decode_block_size <= n:
        t0 = state.pos
        moved = model.prepare_block(state)
        log.append((state.cache.latent[0].capacity, moved, state.patch_bound, int(state.num_patches.max())))

        def sample(lg, j, t0=t0):
            logits.append(lg)
            return ids[:, t0 + j]

        prev = model.decode_block(state, prev, sample)[:, -1]
        # every patch the block started is within the reserved bound and the capacity
        assert int(state.num_patches.max()) <= state.patch_bound <= state.cache.latent[0].capacity
    return torch.stack(logits, 1), log, state


def test_latent_caches_grow_just_enough_with_a_patch_every_byte(monkeypatch):
    """Worst case for reserve_patches: strided patches of 1 byte (every row starts a patch at
    every byte, so the slot written at byte t is t). Starting from 2 slots, the caches must grow
    before any block writes past them, never beyond max_len + 1 slots, and decoding a block with
    teacher forcing must equal the full forward."""
    monkeypatch.setattr(blt_module, "LATENT_MIN_CAPACITY", 2)
    model = tiny_blt(dict(kind="strided", patch_size=1))
    n = 3 + 4 * model.decode_block_size  # 3 single steps, then 4 blocks
    ids = torch.randint(0, 256, (3, n), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids, MOD)
    logits, log, state = blocks_teacher_forced(model, ids, prefix=3)
    assert logits.shape == full.shape and (logits - full).abs().max() < 1e-4
    assert int(state.num_patches.max()) == n  # a patch per byte
    capacities = [c for c, *_ in log]
    assert any(m for _, m, *_ in log) and capacities == sorted(capacities)
    assert state.cache.latent[0].capacity <= n + 1
    # the step at byte t writes slot t: the last block reached the last slot it reserved
    assert state.patch_bound == n


def test_prepare_block_reports_reallocation_and_is_idempotent(monkeypatch):
    """prepare_block returns True exactly when the latent buffers were reallocated (the CUDA
    graph must be captured again) and a second call changes nothing (decode_block calls it
    again inside the captured region)."""
    monkeypatch.setattr(blt_module, "LATENT_MIN_CAPACITY", 4)
    model = tiny_blt(dict(kind="strided", patch_size=4))
    state = model.new_state(MOD, 96)
    prev = model.step(state, None).argmax(-1)
    seen_true = seen_false = False
    while state.pos + model.decode_block_size <= 96:
        before = [(c.k, c.v, c.slots) for c in state.cache.latent]
        moved = model.prepare_block(state)
        after = [(c.k, c.v, c.slots) for c in state.cache.latent]
        changed = any(a is not b for pa, pb in zip(before, after) for a, b in zip(pa, pb))
        assert moved == changed
        seen_true |= moved
        seen_false |= not moved
        snapshot = (state.reserved_to, state.patch_bound, after)
        assert model.prepare_block(state) is False
        assert (state.reserved_to, state.patch_bound, [(c.k, c.v, c.slots) for c in state.cache.latent]) == snapshot
        prev = model.decode_block(state, prev, lambda logits, j: logits.argmax(-1))[:, -1]
    assert seen_true and seen_false
    with pytest.raises(ValueError, match="state is full"):
        model.prepare_block(state)
    with pytest.raises(ValueError, match="needs the byte before it"):
        model.prepare_block(model.new_state(MOD, 80))


# --- graph safety, checked on CPU ----------------------------------------------------------
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "item", "is_nonzero", "equal"}


class OpTrace(TorchDispatchMode):
    """Records every aten op with its tensor shapes and non-tensor arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        def sig(x):
            if isinstance(x, torch.Tensor):
                return ("T", tuple(x.shape), x.dtype)
            if isinstance(x, (list, tuple)):
                return tuple(sig(y) for y in x)
            return repr(x)

        self.ops.append((func.overloadpacket.__name__, sig(args), sig(sorted((kwargs or {}).items()))))
        return func(*args, **(kwargs or {}))


def _walk(obj, path: str, out: dict, seen: set) -> None:
    """Tensors (identity, address, shape) and host scalars reachable from a decoding state."""
    if isinstance(obj, torch.Tensor):
        out[path] = ("T", id(obj), obj.data_ptr(), tuple(obj.shape))
        return
    if obj is None or isinstance(obj, (int, float, bool, str)):
        out[path] = obj
        return
    if id(obj) in seen or isinstance(obj, torch.nn.Module):
        return
    seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            _walk(x, f"{path}[{i}]", out, seen)
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            _walk(getattr(obj, f.name), f"{path}.{f.name}", out, seen)
    elif hasattr(obj, "__dict__"):
        for k, v in vars(obj).items():
            _walk(v, f"{path}.{k}", out, seen)


def state_layout(state) -> dict:
    out: dict = {}
    _walk(state, "state", out, set())
    out.pop("state.pos")  # the host position: decode_block advances it, _BlockGraph restores it
    return out


def graph_models():
    torch.manual_seed(0)
    mb = Megabyte(MegabyteConfig(patch_size=4, max_seq_len=64, cross_patch_r=2)).eval()
    return {
        "blt-entropy-relative": tiny_blt(dict(kind="entropy_relative", patch_size=3, max_patch_len=4)),
        "blt-space": tiny_blt(dict(kind="space", patch_size=3, max_patch_len=4)),
        "blt-strided": tiny_blt(dict(kind="strided", patch_size=3)),
        "megabyte": mb,
    }


@pytest.mark.parametrize("name", ["blt-entropy-relative", "blt-space", "blt-strided", "megabyte"])
def test_decode_block_is_replayable(name):
    """What a CUDA graph of decode_block needs, checked on CPU after prepare_block: no op that
    syncs with the host, no state tensor rebound or reallocated and no host value changed
    inside the block (a replay would lose both), and the same ops with the same shapes and
    constant arguments on two different blocks (one graph serves both)."""
    model = graph_models()[name]
    n = model.decode_block_size
    max_len = 4 * n
    with torch.no_grad():
        state = model.new_block_state(MOD, max_len)
        prev = None
        for _ in range(n):  # single steps up to the first block
            prev = model.step(state, prev).argmax(-1)
        traces = []
        for _ in range(2):
            moved = model.prepare_block(state)
            assert not moved  # (the latent caches start at 128 slots: no growth here)
            before = state_layout(state)
            trace = OpTrace()
            with trace:
                out = model.decode_block(state, prev, lambda lg, j: lg.argmax(-1))
            assert state_layout(state) == before
            prev = out[:, -1].clone()  # as _BlockGraph's static input buffer: contiguous
            names = {op for op, *_ in trace.ops}
            assert not names & SYNC_OPS, f"host syncs inside the block: {names & SYNC_OPS}"
            traces.append(trace.ops)
        assert len(traces[0]) == len(traces[1])
        diff = [(i, a, b) for i, (a, b) in enumerate(zip(*traces)) if a != b]
        assert not diff, f"blocks differ at op {diff[0][0]}: {diff[0][1]} vs {diff[0][2]}"


def test_compile_decoding_marks_only_the_growing_step_dynamic(monkeypatch):
    """compile_decoding compiles BLT's three steps with fullgraph, the latent one (whose shapes
    follow the growing caches) with dynamic shapes and the others static."""
    from polybyte.pipelines.runtime import compile_decoding

    calls = {}

    def fake_compile(fn, **kwargs):
        calls[fn.__name__] = kwargs
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = tiny_blt(dict(kind="space", patch_size=3))
    assert compile_decoding(model) == ["decode_front", "decode_latent", "decode_back"]
    assert calls == {
        "decode_front": dict(dynamic=False, fullgraph=True),
        "decode_latent": dict(dynamic=True, fullgraph=True),
        "decode_back": dict(dynamic=False, fullgraph=True),
    }


# --- edge cases ------------------------------------------------------------------------------
def test_prefill_with_pad_is_refused():
    """The encoder ring holds max_patch_len states, but a PAD disables max-length cuts (a longer
    patch follows it): BLT.prefill refuses a prompt holding PAD, naming it."""
    model = tiny_blt(dict(kind="space", patch_size=3, max_patch_len=3))
    ids = torch.tensor([[97, 98, 99, PAD, 100, 101, 102, 103, 104, 105, 106, 107]])
    assert int(patching.patch(ids, model.config.patcher)[0].max()) > 3
    state = model.new_state(MOD[:1], ids.shape[1])
    with pytest.raises(ValueError, match="prompt holds PAD"):
        model.prefill(state, ids[:, :-1])


def test_entropy_model_without_window_past_its_max_seq_len():
    """An entropy model without a window gets a device cache sized to the sample, not to its
    max_seq_len: sampling past that length works and equals uncached decoding."""
    model = tiny_blt(
        dict(kind="entropy", patch_size=3, threshold=1.0),
        entropy_model=TransformerConfig(dim=32, n_layers=1, n_heads=4, window=None, max_seq_len=16),
    )
    kw = dict(max_bytes=40, temperature=0, stop_at_eos=False)
    out = generate(model, TEXT, [b"ab"], **kw)
    assert len(out[0]) == 40
    assert out == generate(model, TEXT, [b"ab"], use_cache=False, **kw)


def test_stepped_starts_follow_per_tag_thresholds():
    """Per-modality thresholds (``patcher.thresholds``): each row decodes with its tag's
    threshold, as the full forward patches it, and the rows' thresholds do change boundaries."""
    model = tiny_blt(dict(kind="entropy", patch_size=3, max_patch_len=4))
    ids = stream()
    e = compute_entropies(model.entropy_model, ids, MOD).float()
    per_tag = {}
    for row, q in enumerate((0.3, 0.6, 0.85)):  # a different quantile per row, in a safe gap
        s = e[row].sort().values
        lo, hi = int((q - 0.15) * T), min(int((q + 0.15) * T), T - 1)
        gaps = s[lo + 1 : hi + 1] - s[lo:hi]
        assert gaps.max() > 1e-4, "scores too close together for a safe threshold"
        i = lo + int(gaps.argmax())
        per_tag[int(MOD[row])] = float(s[i] + s[i + 1]) / 2
    model.config.patcher = dataclasses.replace(model.config.patcher, thresholds=per_tag)
    want = assert_stepped_equals_full(model, ids)
    one = dataclasses.replace(model.config.patcher, threshold=per_tag[TEXT], thresholds=None)
    assert not torch.equal(want, patching.patch_ids_to_starts(patching.patch(ids, one, e)[1]))
