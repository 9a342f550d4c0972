"""The byte stream (DESIGN.md §2): framing, text packing, image/audio windows, BPB accounting."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from polybyte.modalities import AUDIO, EOS, IMAGE, NUM_BYTES, PAD, TEXT, frame, payload_mask
from polybyte.pipelines.bpb import BPBMeter, payload_bits
from polybyte.pipelines.windows import clip_windows, pack_text, sample_stream, stream_windows


def bpb(nll: torch.Tensor, ids: torch.Tensor) -> float:
    """Reference: bits per payload byte of ``nll [B, T]`` over targets that are bytes 0..255
    (tags, EOS, PAD excluded), divided by their count. NaN if there are none."""
    mask = ids < NUM_BYTES
    count = int(mask.sum())
    if count == 0:
        return float("nan")
    return float(torch.where(mask, nll.double(), 0.0).sum()) / math.log(2.0) / count


def _docs(seed: int, n: int, max_len: int) -> list[bytes]:
    rng = random.Random(seed)
    docs = [bytes(rng.randrange(256) for _ in range(rng.randrange(max_len))) for _ in range(n)]
    return [b"", b"\x00\x00", *docs, b""]  # empty docs and real 0x00 bytes are samples too


def test_frame_puts_tag_first_and_eos_last():
    assert frame(TEXT, b"a\x00b") == [TEXT, 0x61, 0x00, 0x62, EOS]
    assert frame(IMAGE, b"") == [IMAGE, EOS]
    with pytest.raises(ValueError, match="unknown modality tag"):
        frame(EOS, b"x")


@pytest.mark.parametrize("seq_len", [1, 5, 64, 1000])
def test_pack_text_loses_and_repeats_nothing(seq_len):
    docs = _docs(seq_len, 40, 300)
    stream = [i for d in docs for i in frame(TEXT, d)]
    windows = list(pack_text(docs, seq_len))
    assert all(w.shape == (seq_len,) for w in windows)
    assert len(windows) == math.ceil(len(stream) / seq_len)
    flat = np.concatenate(windows).tolist()
    pad = len(flat) - len(stream)
    assert flat[: len(stream)] == stream and flat[len(stream) :] == [PAD] * pad
    # payload mask counts every document byte exactly once, none of the tags/EOS/PAD
    assert sum(int(payload_mask(w).sum()) for w in windows) == sum(len(d) for d in docs)


def test_pack_text_drops_only_the_partial_tail_without_padding():
    docs = _docs(7, 30, 200)
    stream = [i for d in docs for i in frame(TEXT, d)]
    seq_len = 33
    kept = np.concatenate(list(pack_text(docs, seq_len, pad_last=False))).tolist()
    assert kept == stream[: len(stream) // seq_len * seq_len]


def test_pack_text_exact_multiple_has_no_padding_window():
    docs = [b"abc", b"de"]  # framed: 5 + 4 = 9 ids
    windows = [w.tolist() for w in pack_text(docs, 3)]
    assert windows == [[TEXT, 97, 98], [99, EOS, TEXT], [100, 101, EOS]]


def test_pack_text_document_longer_than_many_windows():
    doc = bytes(range(256)) * 3
    windows = list(pack_text([doc], 100))
    assert len(windows) == math.ceil((len(doc) + 2) / 100)
    assert windows[0][0] == TEXT and windows[0][1:].tolist() == list(doc[:99])


def test_clip_windows_short_payload_is_one_padded_window():
    (w,) = clip_windows(b"\x00\x01\x02", 8)
    assert w.tolist() == [0, 1, 2, EOS, PAD, PAD, PAD, PAD]
    (w,) = clip_windows(bytes(7), 8)  # exactly seq_len - 1: EOS fills the window
    assert w.tolist() == [0] * 7 + [EOS]


def test_clip_windows_cuts_long_payload_with_eos_only_at_the_end():
    payload = bytes(random.Random(0).randrange(256) for _ in range(250))
    windows = clip_windows(payload, 100)
    assert [w.shape for w in windows] == [(100,)] * 3
    assert EOS not in windows[0].tolist() and EOS not in windows[1].tolist()
    flat = np.concatenate(windows).tolist()
    assert flat[:250] == list(payload) and flat[250] == EOS and flat[251:] == [PAD] * 49
    assert sum(int(payload_mask(w).sum()) for w in windows) == 250
    # a payload that fills whole windows gets its EOS in a window of its own
    windows = clip_windows(bytes(200), 100)
    assert len(windows) == 3 and windows[2].tolist() == [EOS] + [PAD] * 99


def test_sample_stream_carries_text_tag_in_stream_only():
    assert sample_stream(b"hi", TEXT).tolist() == [TEXT, 104, 105, EOS]
    assert sample_stream(b"\x00\x01", AUDIO).tolist() == [0, 1, EOS]
    with pytest.raises(ValueError, match="unknown modality tag"):
        sample_stream(b"x", PAD)


@pytest.mark.parametrize("stride", [None, 16, 7, 1])
def test_stream_windows_score_every_id_exactly_once(stride):
    seq_len = 16
    stream = sample_stream(bytes(random.Random(1).randrange(256) for _ in range(50)), TEXT)
    pairs = list(stream_windows(stream, seq_len, stride))
    step = stride or seq_len
    scored_ids = []
    for k, (window, scored) in enumerate(pairs):
        begin = k * step
        real = stream[begin : begin + seq_len].tolist()
        assert window.tolist() == real + [PAD] * (seq_len - len(real))  # context = the stream
        assert not scored[len(real) :].any()  # padding is never scored
        scored_ids += window[scored].tolist()
    assert scored_ids == stream.tolist()
    if stride is None:  # full stride: the validation windows, equal to clip_windows for clips
        payload = bytes(range(40))
        clips = [w for w, _ in stream_windows(sample_stream(payload, IMAGE), seq_len)]
        assert [c.tolist() for c in clips] == [c.tolist() for c in clip_windows(payload, seq_len)]
    with pytest.raises(ValueError, match="stride"):
        next(stream_windows(stream, seq_len, seq_len + 1))


def test_bpb_counts_payload_targets_only():
    ids = torch.tensor([[TEXT, 65, 0, EOS, PAD], [1, 2, 3, EOS, PAD]])
    nll = torch.tensor([[9.0, 1.0, 2.0, 9.0, 9.0], [0.5, 0.5, 0.5, 9.0, 9.0]])
    expected = (1.0 + 2.0 + 0.5 * 3) / math.log(2) / 5
    assert bpb(nll, ids) == pytest.approx(expected)
    assert math.isnan(bpb(nll, torch.full_like(ids, PAD)))
    bits, count = payload_bits(nll, ids)  # the one mask training, validation and eval use
    assert float(bits.sum() / count.sum()) == pytest.approx(expected) and count.tolist() == [2, 3]
    scored = torch.tensor([[True] * 5, [False, True, True, True, True]])  # eval's overlapping windows
    assert payload_bits(nll, ids, scored)[1].tolist() == [2, 2]


def test_meter_sums_per_modality_over_batches():
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 258, (4, 16), generator=gen)  # bytes plus some PAD/EOS
        ids[:, 0] = TEXT
        nll = torch.rand(4, 16, generator=gen) * 5
        modality = torch.tensor([TEXT, IMAGE, TEXT, IMAGE])
        batches.append((nll, ids, modality))
    meter = BPBMeter()
    for b in batches:
        meter.update(*b)
    result = meter.compute()
    assert set(result) == {"text", "image"}  # audio never seen: not reported
    for tag, name in [(TEXT, "text"), (IMAGE, "image")]:
        nll = torch.cat([n[m == tag] for n, _, m in batches])
        ids = torch.cat([i[m == tag] for _, i, m in batches])
        assert result[name] == pytest.approx(bpb(nll, ids))
    totals = meter.totals()
    assert sorted(totals) == [TEXT, IMAGE, AUDIO] and totals[AUDIO].tolist() == [0.0, 0.0]
    assert totals[TEXT][1] == sum(int(payload_mask(i[m == TEXT]).sum()) for _, i, m in batches)
    single = BPBMeter()
    single.update(*batches[0])
    assert set(single.compute()) == {"text", "image"}  # only the modalities of that batch
    with pytest.raises(ValueError, match="tag ids"):
        meter.update(batches[0][0], batches[0][1], torch.tensor([0, 1, 2, 3]))
