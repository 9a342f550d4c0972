"""Hostile or broken inputs (issue 12): decompression bombs are refused before decoding and
counted, bad export files and shard runs with nothing written give one line and a non-zero exit.

Every file is made here, on CPU, in a few milliseconds.
"""

from __future__ import annotations

import io
import json
import logging
import struct
import wave
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from test_data import _dm, _png, _rows  # shared loader helpers

from polybyte.modalities import IMAGE, ResourceLimitError, get_modality
from polybyte.models.transformer import Transformer, TransformerConfig
from polybyte.pipelines import cli
from polybyte.pipelines.export import CONFIG, WEIGHTS, save_exported
from polybyte.pipelines.sources import read_manifest


# --- hostile files ----------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png_header(width: int = 12000, height: int = 12000) -> bytes:
    """A PNG whose header declares ``width x height`` RGB pixels, with a short IDAT: decoding it
    would fail ("cannot decode"), so a limit error proves nothing was decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def wav(rate: int, frames: int) -> bytes:
    """A mono 16-bit WAV of ``frames`` samples declaring ``rate`` Hz."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.zeros(frames, dtype="<i2").tobytes())
    return buf.getvalue()


ONE_HZ_WAV = wav(1, 4000)  # 8 KB declaring 4,000 s: 128 MB of pcm16 once resampled to 16 kHz


def _shard(modality: str, folder: Path, out: Path, *flags: str, capsys) -> tuple[int, str, str]:
    rc = cli.main(["shard", modality, str(folder), "--out", str(out), *flags])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# --- resource limits: the adapters ------------------------------------------------------------
def test_adapters_refuse_members_above_their_limits_and_the_limits_are_settings():
    image, audio, text = get_modality("image", size=8), get_modality("audio"), get_modality("text")
    with pytest.raises(ResourceLimitError, match=r"12000x12000 image \(144,000,000 pixels\).*max_pixels") as e:
        image.load(huge_png_header())
    assert e.value.setting == "max_pixels"
    # raised past Pillow's own bomb limit, Pillow's check refuses it, still before decoding
    with pytest.raises(ResourceLimitError, match="decompression-bomb"):
        get_modality("image", size=8, max_pixels=10**9).load(huge_png_header())
    with pytest.raises(ResourceLimitError, match=r"4,000.0 s .*max_seconds"):
        audio.load(ONE_HZ_WAV)

    small_png, one_second = _png(np.random.default_rng(0)), wav(8000, 8000)
    assert image.load(small_png).shape == (8, 8, 3)
    with pytest.raises(ResourceLimitError, match="max_pixels=1,000"):
        get_modality("image", size=8, max_pixels=1000).load(small_png)  # 40x30 = 1,200 pixels
    with pytest.raises(ResourceLimitError, match="max_seconds=0.5"):
        get_modality("audio", max_seconds=0.5).load(one_second)
    with pytest.raises(ResourceLimitError, match="max_decoded_samples"):
        get_modality("audio", max_decoded_samples=4000).load(one_second)
    assert len(get_modality("audio", sample_rate=8000, max_seconds=None).load(one_second)) == 8000
    assert text.encode(b"x" * 11) == b"x" * 11
    with pytest.raises(ResourceLimitError, match="text member of 11 bytes.*max_member_bytes=10"):
        get_modality("text", max_member_bytes=10).encode(b"x" * 11)
    with pytest.raises(ValueError, match="max_pixels must be positive"):
        get_modality("image", max_pixels=0)


# --- resource limits: polybyte shard ----------------------------------------------------------
def test_shard_skips_and_counts_the_1hz_wav(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "bomb.wav").write_bytes(ONE_HZ_WAV)
    (src / "ok.wav").write_bytes(wav(8000, 8000))
    rc, out, err = _shard("audio", src, tmp_path / "o", "--sample-rate", "8000", capsys=capsys)
    assert rc == 0 and "wrote 1 samples" in out and "1 skipped (1 above resource limits)" in out
    assert "bomb.wav" in err
    [entry] = read_manifest(tmp_path / "o")["skipped"]
    assert Path(entry["source"]).name == "bomb.wav" and entry["limit"] == "max_seconds"
    assert "4,000.0 s (4,000 frames at 1 Hz)" in entry["reason"]
    # the limit is a setting: lower it and the 1 s clip goes too (so nothing is written)
    rc, _, err = _shard("audio", src, tmp_path / "p", "--sample-rate", "8000", "--max-seconds", "0.5", capsys=capsys)
    assert rc == 1 and "wrote 0 samples" in err
    assert read_manifest(tmp_path / "p")["settings"]["max_seconds"] == 0.5


def test_shard_skips_the_huge_png_header_without_decoding(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "huge.png").write_bytes(huge_png_header())
    (src / "ok.png").write_bytes(_png(np.random.default_rng(0)))
    rc, out, err = _shard("image", src, tmp_path / "o", "--size", "8", capsys=capsys)
    assert rc == 0 and "wrote 1 samples" in out and "1 skipped" in out and "huge.png" in err
    [entry] = read_manifest(tmp_path / "o")["skipped"]
    assert entry["limit"] == "max_pixels" and "12000x12000" in entry["reason"]
    rc, out, _ = _shard("image", src, tmp_path / "p", "--size", "8", "--max-pixels", "1e3", capsys=capsys)
    assert rc == 1 and read_manifest(tmp_path / "p")["settings"]["max_pixels"] == 1000


def test_shard_text_limit_checks_the_file_size(tmp_path, capsys):
    (tmp_path / "big.txt").write_text("x" * 100)
    rc, _, err = _shard("text", tmp_path / "big.txt", tmp_path / "o", "--max-member-bytes", "99", capsys=capsys)
    assert rc == 1 and "text member of 100 bytes" in err
    assert read_manifest(tmp_path / "o")["skipped"][0]["limit"] == "max_member_bytes"


# --- resource limits: the loaders -------------------------------------------------------------
def test_loader_skips_and_counts_bombs_with_their_reason(tmp_path, caplog):
    """Third-party shards (no manifest) holding both bombs among good members."""
    rng = np.random.default_rng(0)
    pictures, sounds = tmp_path / "pictures", tmp_path / "sounds"
    pictures.mkdir(), sounds.mkdir()
    with wds.TarWriter(str(pictures / "part-0.tar")) as tar:
        for i in range(4):
            tar.write({"__key__": f"good{i}", "png": _png(rng)})
        tar.write({"__key__": "huge", "png": huge_png_header()})
    with wds.TarWriter(str(sounds / "part-0.tar")) as tar:
        tar.write({"__key__": "ok", "wav": wav(16000, 100)})
        tar.write({"__key__": "bomb", "wav": ONE_HZ_WAV})
    sources = {"image": pictures, "audio": sounds}
    val = {name: str(folder / "*.tar") for name, folder in sources.items()}
    kw = {"val_sources": val, "seq_len": 256, "num_workers": 0}
    with caplog.at_level(logging.WARNING, logger="polybyte.pipelines.sources"):
        dm = _dm(sources, adapter_settings={"image": {"size": 8}}, **kw)
        batches = list(dm.val_dataloader())
    assert len(_rows(batches, IMAGE)) == 4
    assert dm.skipped == 2 and dm.over_limit == 2 and dm.seen == 7
    assert "huge: ResourceLimitError" in caplog.text and "max_pixels" in caplog.text
    assert "bomb: ResourceLimitError" in caplog.text and "max_seconds" in caplog.text
    # the loaders read the limits from the adapter settings, like every other setting
    dm = _dm(sources, adapter_settings={"image": {"size": 8, "max_pixels": 1000}}, **kw)
    assert len(_rows(list(dm.val_dataloader()), IMAGE)) == 0 and dm.over_limit == 5 + 1  # + the 1 Hz WAV


# --- bad export files: one line, exit 2 -------------------------------------------------------
@pytest.fixture
def export(tmp_path) -> Path:
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(dim=32, n_layers=1, n_heads=4, max_seq_len=64))
    modalities = {"text": get_modality("text").settings_dict()}
    return save_exported(tmp_path / "last", model, modalities, {"seq_len": 64})


def _break(export: Path, case: str) -> Path:
    """Damage one file of the export as ``case`` says; returns the file that is bad."""
    weights, config = export / WEIGHTS, export / CONFIG
    if case == "empty weights":
        weights.write_bytes(b"")
    elif case == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif case == "corrupt weights":
        weights.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif case == "invalid config":
        config.write_text(config.read_text()[:40])  # torn mid-write
    else:
        info = json.loads(config.read_text())
        if case == "wrong backbone":
            info["model"]["backbone"] = "megabite"
        else:  # "wrong dims": the config no longer matches the weights
            info["model"]["dim"] = 48
        config.write_text(json.dumps(info))
    return weights if "weights" in case else config


BAD_EXPORTS = [
    "empty weights",
    "truncated weights",
    "corrupt weights",
    "invalid config",
    "wrong backbone",
    "wrong dims",
]


@pytest.mark.parametrize("case", BAD_EXPORTS)
@pytest.mark.parametrize("command", ["eval", "sample"])
def test_bad_export_gives_one_line_naming_the_file_and_exit_2(export, tmp_path, capsys, command, case):
    bad = _break(export, case)
    args = {
        "eval": ["--data", f"text={tmp_path}", "--out", str(tmp_path / "report")],
        "sample": ["--modality", "text", "--num", "1", "--out", str(tmp_path / "samples")],
    }[command]
    rc = cli.main([command, "--ckpt", str(export), "--device", "cpu", *args])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith(f"polybyte {command}: error: ") and str(bad) in lines[0]
    assert not (tmp_path / "report").exists() and not (tmp_path / "samples").exists()


# --- shard with nothing written ---------------------------------------------------------------
def test_shard_with_only_bad_inputs_exits_non_zero(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "b.png").write_bytes(huge_png_header())
    rc, out, err = _shard("image", tmp_path, tmp_path / "o", capsys=capsys)
    assert rc == 1 and out == ""
    assert err.strip().splitlines()[-1] == (
        f"polybyte shard: error: wrote 0 samples: every input was skipped "
        f"(2 skips, reasons in {tmp_path / 'o' / 'manifest.json'})"
    )
