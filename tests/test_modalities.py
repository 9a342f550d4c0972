"""Round trips and error messages of the text, image and audio adapters (DESIGN.md §3)."""

from __future__ import annotations

import io
import json
import math
import random
import wave

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from polybyte.modalities import get_modality, modality_from_dict
from polybyte.modalities.audio import (
    MIN_CLIP_FRACTION,
    AudioAugment,
    augment_payload,
    clip_waveform,
    decode_payload,
    encode_waveform,
    resample,
)
from polybyte.modalities.image import from_order, read_npz_batch, to_order
from polybyte.modalities.text import split_documents

RNG = np.random.default_rng(0)


def _wav_bytes(data: np.ndarray, rate: int, subtype: str, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _png_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


# --- settings ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, settings",
    [
        ("text", {"field": "body"}),
        ("image", {"size": 32, "order": "patch8"}),
        ("audio", {"sample_rate": 8000, "encoding": "mulaw8", "clip_seconds": 1.5}),
    ],
)
def test_settings_round_trip_through_dict(name, settings):
    adapter = get_modality(name, **settings)
    d = json.loads(json.dumps(adapter.settings_dict()))  # as stored in a checkpoint's config.json
    rebuilt = modality_from_dict(d)
    assert type(rebuilt) is type(adapter)
    assert rebuilt.settings == adapter.settings
    assert d["name"] == name and all(d[k] == v for k, v in settings.items())


@pytest.mark.parametrize(
    "name, settings, message",
    [
        ("image", {"order": "patch5"}, "multiple of 5"),
        ("image", {"order": "zigzag"}, "unknown image order"),
        ("image", {"size": 0}, "positive"),
        ("audio", {"encoding": "mp3"}, "unknown audio encoding"),
        ("audio", {"clip_seconds": 0}, "clip_seconds"),
    ],
)
def test_bad_settings_are_clear_errors(name, settings, message):
    with pytest.raises(ValueError, match=message):
        get_modality(name, **settings)


# --- text -------------------------------------------------------------------------------------
def test_text_bytes_identical_after_round_trip(shakespeare, tmp_path):
    text = get_modality("text")
    raw = shakespeare[:5000] + "Grüße, 東京 🙂\x00\n".encode()
    payload = text.encode(raw, {})
    assert payload == raw
    decoded = text.decode(payload)
    text.save(decoded, tmp_path / "out.txt")
    assert (tmp_path / "out.txt").read_bytes() == raw


def test_text_decode_replaces_invalid_utf8():
    text = get_modality("text")
    cut = "é".encode()[:1]  # a sample cut in the middle of a character
    assert text.decode(b"ab" + cut) == "ab\ufffd"


def test_text_json_members_use_the_text_field():
    text = get_modality("text")
    assert text.encode(json.dumps({"text": "héllo", "id": 3}).encode(), {"extension": ".json"}) == "héllo".encode()
    jsonl = b'{"text": "a"}\n\n{"text": "b"}\n'
    assert text.encode(jsonl, {"extension": ".jsonl"}) == b"a\nb"
    with pytest.raises(ValueError, match="no string field 'text'"):
        text.encode(b'{"body": "x"}', {"extension": ".json"})
    with pytest.raises(ValueError, match="line 2: invalid JSON"):
        text.encode(b'{"text": "a"}\n{oops\n', {"extension": ".jsonl"})


def test_split_documents_cuts_at_line_ends(shakespeare):
    docs = list(split_documents(shakespeare, 4096))
    assert b"".join(docs) == shakespeare
    assert all(len(d) <= 4096 for d in docs)
    assert all(d.endswith(b"\n") for d in docs[:-1])


def test_split_documents_long_line_keeps_utf8_characters_whole():
    line = "ü" * 50  # 100 bytes, no line end
    docs = list(split_documents(line.encode(), 7))
    assert b"".join(docs) == line.encode()
    assert all(len(d) <= 7 for d in docs)
    assert all(d.decode("utf-8") for d in docs)  # no character split between documents


# --- image ------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["raster", "patch1", "patch2", "patch4", "patch8", "patch16"])
def test_image_orders_invert_exactly(order):
    pixels = RNG.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    payload = to_order(pixels, order)
    assert len(payload) == 16 * 16 * 3
    np.testing.assert_array_equal(from_order(payload, 16, order), pixels)


def test_patch_order_is_blocks_in_raster_order():
    pixels = RNG.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    raster, patched = to_order(pixels, "raster"), to_order(pixels, "patch4")
    assert raster == pixels.tobytes() and patched != raster
    block = 4 * 4 * 3
    assert patched[:block] == pixels[:4, :4].tobytes()  # top-left block first
    assert patched[block : 2 * block] == pixels[:4, 4:].tobytes()  # then the block to its right
    assert patched[2 * block : 3 * block] == pixels[4:, :4].tobytes()  # then the next block row


def test_image_png_at_size_passes_through_unchanged():
    pixels = RNG.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    image = get_modality("image")
    assert image.encode(_png_bytes(pixels)) == pixels.tobytes()
    patched = get_modality("image", order="patch4")
    assert patched.encode(_png_bytes(pixels)) == to_order(pixels, "patch4")


def test_image_centre_crop_and_box_resize():
    # 128 wide x 64 high: red | green | blue bands; the centre square is all green
    pixels = np.zeros((64, 128, 3), dtype=np.uint8)
    pixels[:, :32, 0] = 255
    pixels[:, 32:96, 1] = 255
    pixels[:, 96:, 2] = 255
    out = np.frombuffer(get_modality("image", size=32).encode(_png_bytes(pixels)), np.uint8).reshape(32, 32, 3)
    assert (out == [0, 255, 0]).all()
    # box filter: every 2x2 block (0, 100, 50, 250) of a 64x64 image becomes its mean, 100
    block = np.array([[0, 100], [50, 250]], dtype=np.uint8)
    grey = np.repeat(np.tile(block, (32, 32))[:, :, None], 3, axis=2)
    out = get_modality("image", size=32).encode(_png_bytes(grey))
    assert set(out) == {100}


def test_image_reads_jpeg_greyscale_and_rgba():
    image = get_modality("image", size=16)
    rgb = RNG.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
    assert len(image.encode(_png_bytes(rgb, "JPEG"))) == 16 * 16 * 3
    grey = RNG.integers(0, 256, size=(16, 16), dtype=np.uint8)
    out = np.frombuffer(image.encode(_png_bytes(grey)), np.uint8).reshape(16, 16, 3)
    assert (out == grey[:, :, None]).all()  # grey copied into R, G and B
    rgba = np.concatenate([rgb[:16, :16], np.full((16, 16, 1), 7, np.uint8)], axis=2)
    assert image.encode(_png_bytes(rgba)) == rgb[:16, :16].tobytes()  # alpha dropped


def test_image_decode_pads_short_and_truncates_long_payloads(tmp_path):
    image = get_modality("image", size=8, order="patch2")
    pixels = RNG.integers(1, 256, size=(8, 8, 3), dtype=np.uint8)
    payload = to_order(pixels, "patch2")
    np.testing.assert_array_equal(np.asarray(image.decode(payload + b"extra")), pixels)
    short = np.asarray(image.decode(payload[:100]))
    assert short.shape == (8, 8, 3)
    assert to_order(short, "patch2") == payload[:100] + bytes(len(payload) - 100)
    image.save(image.decode(payload), tmp_path / "x.png")
    assert image.encode((tmp_path / "x.png").read_bytes()) == payload


def test_npz_reader_converts_planar_to_interleaved(tmp_path):
    pixels = RNG.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    planar = pixels.transpose(0, 3, 1, 2).reshape(5, -1)  # [N, H, W, 3] -> [N, 3*H*W], R plane first
    np.savez(tmp_path / "batch.npz", data=planar, labels=np.arange(1, 6))
    rows = list(read_npz_batch(tmp_path / "batch.npz"))
    assert [(i, label) for i, _, label in rows] == [(i, i + 1) for i in range(5)]
    for i, array, _ in rows:
        np.testing.assert_array_equal(array, pixels[i])
    np.savez(tmp_path / "bad.npz", data=np.zeros((2, 10), np.uint8))
    with pytest.raises(ValueError, match="not 3\\*S\\*S"):
        list(read_npz_batch(tmp_path / "bad.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="npz"):
        list(read_npz_batch(tmp_path / "junk.npz"))


def test_corrupt_image_is_a_clear_error():
    good = _png_bytes(RNG.integers(0, 256, size=(8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="cannot decode image"):
        get_modality("image").encode(b"definitely not an image")
    with pytest.raises(ValueError, match="cannot decode image"):
        get_modality("image").encode(good[: len(good) // 2])  # truncated file


# --- audio ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fsdd_wav(shared_data) -> bytes:
    return (shared_data / "audio" / "fsdd" / "0_george_0.wav").read_bytes()


def test_pcm16_is_bit_exact_on_a_real_wav(fsdd_wav, tmp_path):
    with wave.open(io.BytesIO(fsdd_wav)) as w:  # the WAV's PCM data chunk, read independently
        assert (w.getsampwidth(), w.getnchannels(), w.getframerate()) == (2, 1, 8000)
        pcm = w.readframes(w.getnframes())
    audio = get_modality("audio", sample_rate=8000, encoding="pcm16")
    payload = audio.encode(fsdd_wav)
    assert payload == pcm
    waveform, rate = audio.decode(payload)
    assert rate == 8000 and waveform.dtype == np.float32
    assert encode_waveform(waveform, "pcm16") == payload
    audio.save((waveform, rate), tmp_path / "x.wav")
    assert audio.encode((tmp_path / "x.wav").read_bytes()) == payload


def test_audio_augmentation_gain_and_polarity_on_a_real_clip(fsdd_wav):
    audio = get_modality("audio", sample_rate=8000, encoding="pcm16")
    payload = audio.encode(fsdd_wav)
    x = np.frombuffer(payload, "<i2").astype(np.float64)
    assert audio.augmenter({}) is None and audio.augmenter({"gain_db": 0, "invert": 0}) is None
    rng = random.Random(0)
    gains = []
    for _ in range(40):
        out = audio.augmenter({"gain_db": 6})(payload, rng)
        y = np.frombuffer(out, "<i2").astype(np.float64)
        assert len(out) == len(payload)
        # y = round(gain * x) for one gain: the intervals [(y -+ 0.5) / x] of all samples meet
        nz = x != 0
        lo, hi = (y[nz] - 0.5 * np.sign(x[nz])) / x[nz], (y[nz] + 0.5 * np.sign(x[nz])) / x[nz]
        assert lo.max() <= hi.min() + 1e-12 and not y[~nz].any()
        gains.append(float(lo.max()))
    assert 10 ** (-6 / 20) - 1e-3 <= min(gains) < 0.8 and 1.25 < max(gains) <= 10 ** (6 / 20) + 1e-3
    flips = [augment_payload(payload, "pcm16", AudioAugment(invert=0.5), rng) != payload for _ in range(200)]
    assert 70 <= sum(flips) <= 130
    loud = np.array([-32768, 32767, 30000, -30000], "<i2")
    flipped = augment_payload(loud.tobytes(), "pcm16", AudioAugment(invert=1.0), rng)
    assert np.frombuffer(flipped, "<i2").tolist() == [32767, -32767, -30000, 30000]  # clipped, not wrapped
    louder = [
        np.frombuffer(augment_payload(loud.tobytes(), "pcm16", AudioAugment(gain_db=6), rng), "<i2") for _ in range(20)
    ]
    assert all((np.sign(y) == np.sign(loud)).all() for y in louder)  # no wrap-around past full scale
    assert any(y[2] == 32767 for y in louder) and any(y[2] < 30000 for y in louder)
    mulaw = get_modality("audio", sample_rate=8000, encoding="mulaw8")
    m = mulaw.encode(fsdd_wav)
    assert mulaw.augmenter({"invert": 1.0})(m, rng) == bytes(255 - b for b in m)  # mu-law is odd-symmetric
    pcm8 = get_modality("audio", sample_rate=8000, encoding="pcm8")
    codes = bytes(range(256))
    assert pcm8.augmenter({"invert": 1.0})(codes, rng) == bytes([255] + [256 - c for c in range(1, 256)])


def test_audio_augmentation_speed_resamples_tempo_and_pitch(fsdd_wav):
    rate, n = 8000, 8000
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(n) / rate) * 32767).astype("<i2").tobytes()
    rng = random.Random(1)
    speeds = set()
    for _ in range(60):
        out = np.frombuffer(augment_payload(tone, "pcm16", AudioAugment(speed=0.1), rng), "<i2").astype(np.float64)
        speed = n / len(out)  # 1.1: 1/1.1 as many samples
        assert 0.9 - 1e-3 <= speed <= 1.1 + 1e-3
        speeds.add(round(speed, 2))
        if abs(speed - 1) > 0.03:  # the tone's pitch moves with the tempo
            peak = np.argmax(np.abs(np.fft.rfft(out * np.hanning(len(out))))) * rate / len(out)
            assert abs(peak - 440 * speed) < 3, (speed, peak)
    assert len(speeds) >= 12 and min(speeds) < 0.93 and max(speeds) > 1.07
    # on a real clip, in every encoding: the length follows the speed; speed 0 draws nothing
    for encoding in ("pcm16", "mulaw8", "pcm8"):
        audio = get_modality("audio", sample_rate=8000, encoding=encoding)
        payload = audio.encode(fsdd_wav)
        out = audio.augmenter({"speed": 0.2})(payload, random.Random(3))
        speed = round(random.Random(3).uniform(0.8, 1.2), 2)
        width = audio.bytes_per_sample
        assert abs(len(out) // width - len(payload) // width / speed) <= 1
    a, b = random.Random(5), random.Random(5)
    augment_payload(tone, "pcm16", AudioAugment(gain_db=3, speed=0), a)
    b.uniform(-3, 3)
    assert a.random() == b.random()
    with pytest.raises(ValueError, match=r"augment speed must be a number in \[0, 0.5\] \(a fraction\), got 0.7"):
        AudioAugment(speed=0.7)


def test_mulaw8_error_within_quantisation_step():
    x = np.concatenate([np.linspace(-1, 1, 20001), RNG.uniform(-1, 1, 5000)]).astype(np.float32)
    payload = encode_waveform(x, "mulaw8")
    assert len(payload) == len(x)
    y = decode_payload(payload, "mulaw8")
    mu = 255
    # half a level in the companded domain is 1/mu; the expander's slope there is
    # ln(1+mu) (1+mu|x|) / mu, growing at most by exp(ln(1+mu)/mu) across half a level
    bound = (1 / mu) * math.log1p(mu) * (1 + mu * np.abs(x)) / mu * math.exp(math.log1p(mu) / mu)
    assert (np.abs(y - x) <= bound + 1e-6).all()
    assert len(set(payload)) == 256  # all 256 levels in use over [-1, 1]


def test_pcm8_roughly_inverts():
    x = RNG.uniform(-1, 1, 10000).astype(np.float32)
    y = decode_payload(encode_waveform(x, "pcm8"), "pcm8")
    assert np.abs(y - x).max() <= 1 / 128 + 1e-6
    assert encode_waveform(np.array([-1.0, 0.0, 1.0], np.float32), "pcm8") == bytes([0, 128, 255])


def test_resampling_to_the_same_rate_is_identity():
    x = RNG.uniform(-0.9, 0.9, 3000).astype(np.float32)
    assert resample(x, 16000, 16000) is x
    audio = get_modality("audio", sample_rate=16000)
    loaded = audio.load(_wav_bytes(x, 16000, "FLOAT"))
    np.testing.assert_array_equal(loaded, x)


def test_resampling_keeps_the_pitch():
    t = np.arange(8000) / 8000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)  # 1 s of 440 Hz at 8 kHz
    audio = get_modality("audio", sample_rate=16000, encoding="pcm16")
    out, rate = audio.decode(audio.encode(_wav_bytes(tone, 8000, "PCM_16")))
    assert rate == 16000 and len(out) == 16000
    peak_hz = np.argmax(np.abs(np.fft.rfft(out))) * 16000 / len(out)
    assert abs(peak_hz - 440) <= 1


def test_stereo_is_mixed_down_to_the_mean():
    left = RNG.uniform(-0.5, 0.5, 1000).astype(np.float32)
    right = RNG.uniform(-0.5, 0.5, 1000).astype(np.float32)
    stereo = _wav_bytes(np.stack([left, right], axis=1), 8000, "FLOAT")
    mono = get_modality("audio", sample_rate=8000).load(stereo)
    np.testing.assert_allclose(mono, (left + right) / 2, atol=1e-7)


def test_flac_and_ogg_members_decode(fsdd_wav):
    pcm = sf.read(io.BytesIO(fsdd_wav), dtype="int16")[0]
    audio = get_modality("audio", sample_rate=8000)
    assert audio.encode(_wav_bytes(pcm, 8000, "PCM_16", "FLAC")) == pcm.tobytes()
    vorbis = audio.load(_wav_bytes(pcm, 8000, "VORBIS", "OGG"))
    assert abs(len(vorbis) - len(pcm)) <= 1024 and vorbis.dtype == np.float32


def test_clips_keep_a_tail_of_at_least_a_quarter():
    x = np.zeros(1000, np.int16)
    assert [len(c) for c in clip_waveform(x, 100, 3.0)] == [300, 300, 300, 100]
    assert [len(c) for c in clip_waveform(x, 100, 4.5)] == [450, 550]  # 100 < 450/4: joins the clip before
    assert [len(c) for c in clip_waveform(x, 100, 40.0)] == [1000]  # shorter than a clip: one short clip
    assert np.array_equal(np.concatenate(clip_waveform(x, 100, 4.5)), x)  # no sample lost
    assert MIN_CLIP_FRACTION == 0.25
    assert [len(c) for c in clip_waveform(x, 100, None)] == [1000]
    assert clip_waveform(x[:0], 100, None) == []


def test_corrupt_audio_is_a_clear_error(fsdd_wav):
    audio = get_modality("audio")
    with pytest.raises(ValueError, match="cannot decode audio"):
        audio.encode(b"RIFF\x00\x00garbage")
    with pytest.raises(ValueError, match="cannot decode audio"):
        audio.encode(b"")


def test_decoding_incomplete_pcm16_payload_drops_the_half_sample():
    waveform, _ = get_modality("audio", encoding="pcm16").decode(b"\x00\x40\x00\xc0\x12")
    np.testing.assert_array_equal(waveform, np.array([0.5, -0.5], np.float32))
