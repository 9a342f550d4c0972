"""Classic-codec baselines: lossless round trips, honest byte accounting, skips with reasons."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from polybyte.modalities.audio import torchaudio_dsp
from polybyte.pipelines import codecs
from polybyte.pipelines.codecs import (
    available_codecs,
    codec_bpb,
    payload_to_image,
    payload_to_samples,
)

RNG = np.random.default_rng(1234)


def structured_image(size: int, seed: int = 0) -> np.ndarray:
    """A gradient with a square: compressible, with every channel different."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.stack([xx * 255 // size, yy * 255 // size, (xx + yy) * 127 // size], axis=-1)
    a = rng.integers(0, size // 2)
    img[a : a + size // 4, a : a + size // 4] = rng.integers(0, 256, size=3)
    return img.astype(np.uint8)


def to_patch_order(img: np.ndarray, k: int) -> bytes:
    """Reference patch scan written as loops: k x k blocks in raster order, raster inside."""
    size = img.shape[0]
    out = bytearray()
    for by in range(0, size, k):
        for bx in range(0, size, k):
            out += img[by : by + k, bx : bx + k].tobytes()
    return bytes(out)


# --- text ---------------------------------------------------------------------------------------
def test_text_codecs_are_lossless_and_accounted(shakespeare):
    docs = [shakespeare[i : i + 20_000] for i in range(0, 100_000, 20_000)]
    res = codec_bpb("text", docs, {"name": "text"})
    for name, decompress, compress in [
        ("gzip -9", gzip.decompress, codecs.gzip9),
        ("bzip2 -9", bz2.decompress, codecs.bzip2_9),
        ("xz -9e", lzma.decompress, codecs.xz9e),
    ]:
        outs = [compress(d) for d in docs]
        assert [decompress(o) for o in outs] == docs
        r = res[name]
        assert r["bytes_in"] == sum(map(len, docs)) and r["samples"] == len(docs)
        assert r["bytes_out"] == sum(map(len, outs))
        assert r["bpb"] == pytest.approx(8 * r["bytes_out"] / r["bytes_in"])
        assert 1.5 < r["bpb"] < 4.5, (name, r)  # English text: well below 8, above ~1.5
        # one stream over all samples never pays more headers than one file per sample
        assert res[name + codecs.CONCAT]["bytes_out"] < r["bytes_out"]
    assert res["xz -9e"]["bpb"] < res["gzip -9"]["bpb"]


def test_xz_matches_full_preset_9e(shakespeare):
    """Shrinking the dictionary to the input must not change the xz -9e size."""
    for n in (100, 5_000, 70_000):
        data = shakespeare[:n]
        ours = codecs.xz9e(data)
        full = lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)
        assert ours.startswith(b"\xfd7zXZ\x00") and lzma.decompress(ours) == data
        assert len(ours) == len(full)


def test_random_bytes_do_not_compress_and_repeats_do():
    noise = [RNG.bytes(4096) for _ in range(4)]
    rep = [b"polybyte " * 500 for _ in range(4)]
    r_noise = codec_bpb("text", noise)
    r_rep = codec_bpb("text", rep)
    for name in ("gzip -9", "bzip2 -9", "xz -9e"):
        assert r_noise[name]["bpb"] >= 8.0
        assert r_rep[name]["bpb"] < 0.5


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown modality"):
        codec_bpb("video", [b"x"])
    with pytest.raises(ValueError, match="no payload bytes"):
        codec_bpb("text", [])
    with pytest.raises(ValueError, match="48 bytes"):
        codec_bpb("image", [bytes(10)], {"size": 4})
    with pytest.raises(ValueError, match="'size'"):
        codec_bpb("image", [bytes(48)], {"order": "raster"})
    with pytest.raises(ValueError, match="order"):
        codec_bpb("image", [bytes(48)], {"size": 4, "order": "zigzag"})
    with pytest.raises(ValueError, match="order"):
        codec_bpb("image", [bytes(75)], {"size": 5, "order": "patch2"})
    with pytest.raises(ValueError, match="sample_rate"):
        codec_bpb("audio", [bytes(8)], {"encoding": "pcm16"})
    with pytest.raises(ValueError, match="odd"):
        codec_bpb("audio", [bytes(7)], {"sample_rate": 8000})
    with pytest.raises(ValueError, match="encoding"):
        codec_bpb("audio", [bytes(8)], {"sample_rate": 8000, "encoding": "alaw"})


# --- images -------------------------------------------------------------------------------------
@pytest.mark.parametrize("order,k", [("raster", None), ("patch4", 4), ("patch8", 8)])
def test_payload_to_image_inverts_scan_order(order, k):
    img = RNG.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    payload = img.tobytes() if k is None else to_patch_order(img, k)
    assert np.array_equal(np.asarray(payload_to_image(payload, 32, order)), img)


def test_image_codecs_lossless_and_compress_structure():
    imgs = [structured_image(32, s) for s in range(3)]
    payloads = [to_patch_order(im, 4) for im in imgs]
    res = codec_bpb("image", payloads, {"name": "image", "size": 32, "order": "patch4"})
    webp_ok = {name: ok for name, ok, _ in available_codecs()["image"]}["WebP lossless"]
    for im in imgs:
        pil = Image.fromarray(im)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(codecs.png(pil)))), im)
        if webp_ok:
            dec = Image.open(io.BytesIO(codecs.webp_lossless(pil))).convert("RGB")
            assert np.array_equal(np.asarray(dec), im)
    expected_png = sum(len(codecs.png(Image.fromarray(im))) for im in imgs)
    assert res["PNG"]["bytes_out"] == expected_png  # patch order was put back to raster
    assert res["PNG"]["bytes_in"] == 3 * 32 * 32 * 3
    for name, ok, _ in available_codecs()["image"]:
        assert ("bpb" in res[name]) == ok
        if ok:
            assert res[name]["bpb"] < 4, (name, res[name])
    noise = [RNG.bytes(32 * 32 * 3) for _ in range(2)]
    assert codec_bpb("image", noise, {"size": 32})["PNG"]["bpb"] > 7.9


@pytest.mark.skipif(not (shutil.which("cjxl") and shutil.which("djxl")), reason="needs cjxl+djxl")
def test_jpeg_xl_is_lossless(tmp_path):
    im = structured_image(32, 5)
    data = codecs.jxl_lossless(Image.fromarray(im), shutil.which("cjxl"), tmp_path)
    (tmp_path / "x.jxl").write_bytes(data)
    subprocess.run(["djxl", str(tmp_path / "x.jxl"), str(tmp_path / "x.png")], check=True, capture_output=True)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x.png").convert("RGB")), im)
    res = codec_bpb("image", [im.tobytes()], {"size": 32})
    assert res["JPEG XL lossless"]["bytes_out"] == len(data)


def test_missing_tools_are_skipped_with_reason(monkeypatch):
    monkeypatch.setattr(codecs.shutil, "which", lambda name: None)
    monkeypatch.setattr(codecs.features, "check", lambda name: False)
    listed = {name: (ok, note) for name, ok, note in available_codecs()["image"]}
    assert listed["JPEG XL lossless"][0] is False and "cjxl" in listed["JPEG XL lossless"][1]
    res = codec_bpb("image", [structured_image(16).tobytes()], {"size": 16})
    assert "cjxl" in res["JPEG XL lossless"]["skipped"]
    assert "WebP" in res["WebP lossless"]["skipped"]
    assert res["PNG"]["bpb"] > 0


def test_failing_tool_is_skipped_not_fatal(monkeypatch):
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` command")
    monkeypatch.setattr(codecs.shutil, "which", lambda name: false)
    res = codec_bpb("image", [structured_image(16).tobytes()], {"size": 16})
    assert "cjxl exited with" in res["JPEG XL lossless"]["skipped"]
    assert "bpb" in res["PNG"]


# --- audio --------------------------------------------------------------------------------------
def read_speech(shared_data, n=6):
    wavs = sorted((shared_data / "audio").rglob("*.wav"))[:n]
    if not wavs:
        pytest.skip("no WAV files in the development data")
    clips = [sf.read(w, dtype="float32", always_2d=True) for w in wavs]
    return [x[:, 0] for x, _ in clips], clips[0][1]


def test_flac_is_lossless_on_real_audio(shared_data):
    waves, rate = read_speech(shared_data)
    payloads = [np.round(w * 32767).astype("<i2").tobytes() for w in waves]
    res = codec_bpb("audio", payloads, {"name": "audio", "sample_rate": rate, "encoding": "pcm16"})
    total = 0
    for p in payloads:
        coded = codecs.flac(payload_to_samples(p)[0], rate, "PCM_16")
        y, r = sf.read(io.BytesIO(coded), dtype="int16")
        assert r == rate and y.astype("<i2").tobytes() == p
        total += len(coded)
    assert res["FLAC"]["bytes_out"] == total
    assert res["FLAC"]["bytes_in"] == sum(map(len, payloads))
    assert 1 < res["FLAC"]["bpb"] < 8  # speech: compressible, but not trivially


@pytest.mark.parametrize("encoding", ["mulaw8", "pcm8"])
def test_8bit_encodings_are_coded_losslessly_per_payload_byte(shared_data, encoding):
    waves, rate = read_speech(shared_data)
    if encoding == "mulaw8":
        payloads = [
            torchaudio_dsp()[0].mu_law_encoding(torch.from_numpy(w), 256).to(torch.uint8).numpy().tobytes()
            for w in waves
        ]
    else:
        payloads = [np.clip(np.round(w * 127) + 128, 0, 255).astype(np.uint8).tobytes() for w in waves]
    for p in payloads:
        samples, subtype = payload_to_samples(p, encoding)
        y, _ = sf.read(io.BytesIO(codecs.flac(samples, rate, subtype)), dtype="int16")
        assert ((y >> 8) + 128).astype(np.uint8).tobytes() == p
    res = codec_bpb("audio", payloads, {"sample_rate": rate, "encoding": encoding})["FLAC"]
    assert res["bytes_in"] == sum(map(len, payloads))  # one byte per sample
    assert 1 < res["bpb"] < 8  # the 8-bit codes compress: the baseline beats storing raw bytes


def test_available_codecs_lists_every_modality():
    av = available_codecs()
    assert set(av) == {"text", "image", "audio"}
    names = {m: [n for n, _, _ in rows] for m, rows in av.items()}
    assert names["image"] == ["PNG", "WebP lossless", "JPEG XL lossless"]
    assert names["audio"] == ["FLAC"]
    assert {"gzip -9", "bzip2 -9", "xz -9e"} <= set(names["text"])
    assert all(isinstance(ok, bool) and note for rows in av.values() for _, ok, note in rows)
