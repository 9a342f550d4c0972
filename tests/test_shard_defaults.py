"""`polybyte shard` defaults from the data (issue 17): the README's audio example on FSDD keeps
every clip at the recordings' own rate, mixed rates or sizes ask for the flag, most inputs
skipped is a non-zero exit, and the val split holds at least --min-val samples (tinyshakespeare
gives a usable one)."""

from __future__ import annotations

import shlex
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from shard_reading import iter_samples, shard_paths

from polybyte.modalities import modality_from_dict
from polybyte.pipelines import cli
from polybyte.pipelines.shards import write_shards
from polybyte.pipelines.sources import read_manifest

REPO = Path(__file__).resolve().parents[1]


def _fsdd(shared_data, folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True)
    wavs = sorted((shared_data / "audio" / "fsdd").glob("*.wav"))[:: 2000 // n][:n]
    for wav in wavs:
        shutil.copy(wav, folder)
    return sorted(folder.iterdir())


def _readme_command(modality: str) -> list[str]:
    """The README's `polybyte shard MODALITY ...` line of the CLI tour, as arguments."""
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith(f"polybyte shard {modality} "):
            return shlex.split(line.split("#", 1)[0])[1:]
    raise AssertionError(f"README has no `polybyte shard {modality}` line")


def test_readme_audio_example_keeps_every_fsdd_clip_at_its_own_rate(shared_data, tmp_path, capsys):
    wavs = _fsdd(shared_data, tmp_path / "recordings", 12)
    argv = _readme_command("audio")
    argv[argv.index("recordings/")] = str(tmp_path / "recordings")
    argv[argv.index("--out") + 1] = str(tmp_path / "out")
    assert "--clip-seconds" in argv  # FSDD clips are 0.3-0.8 s, far below the clip length
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "wrote 12 samples" in captured.out and "from 12 of 12 files" in captured.out
    assert "0 skipped" in captured.out and "resampled" not in captured.out
    assert "note: sample rate 8000 Hz read from the inputs (12 files)" in captured.err
    manifest = read_manifest(tmp_path / "out")
    assert manifest["settings"]["sample_rate"] == 8000 and manifest["files"]["converted"] == 0
    paths = shard_paths(tmp_path / "out", "train") + shard_paths(tmp_path / "out", "val")
    adapter = modality_from_dict(manifest["settings"])
    got = {meta["source"]: payload for _, payload, meta in iter_samples(paths, adapter)}
    for wav in wavs:
        with wave.open(str(wav)) as w:
            assert got[wav.as_posix()] == w.readframes(w.getnframes())  # every sample, unresampled


def test_mixed_sample_rates_ask_for_the_flag_which_resamples_and_counts(shared_data, tmp_path, capsys):
    _fsdd(shared_data, tmp_path / "in", 3)
    t = np.arange(16000) / 16000
    sf.write(tmp_path / "in" / "tone.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    argv = ["shard", "audio", str(tmp_path / "in"), "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "8000 Hz: 3 files, 16000 Hz: 1 file" in err[0] and "--sample-rate" in err[0]
    assert cli.main([*argv, "--sample-rate", "8000"]) == 0
    out = capsys.readouterr().out
    assert "wrote 4 samples" in out and "1 resampled to 8000 Hz" in out


def test_most_inputs_skipped_is_a_non_zero_exit(shared_data, tmp_path, capsys):
    _fsdd(shared_data, tmp_path / "in", 1)
    for name in ("a.wav", "b.wav"):
        (tmp_path / "in" / name).write_bytes(b"RIFF....WAVEfmt garbage")
    assert cli.main(["shard", "audio", str(tmp_path / "in"), "--out", str(tmp_path / "o")]) == 1
    captured = capsys.readouterr()
    assert "wrote 1 samples" in captured.out
    assert "polybyte shard: error: 2 of 3 input files were skipped, most of the data" in captured.err


def test_image_size_from_the_inputs_or_one_error_asking_for_it(tmp_path, capsys):
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "in" / f"{i:02d}.png")
    manifest = write_shards("image", [tmp_path / "in"], tmp_path / "o")
    assert manifest["settings"]["size"] == 8 and manifest["files"]["converted"] == 0  # not upscaled to 64
    # 12 images at 5%: the hash gives val few or none; topped up to min(--min-val 10, half of 12)
    assert manifest["splits"]["val"]["samples"] == 6 and 0 < manifest["topped_up"] <= 6
    assert write_shards("image", [tmp_path / "in"], tmp_path / "p", min_val=0)["splits"]["val"]["samples"] == 0
    assert write_shards("image", [tmp_path / "in"], tmp_path / "q", val_fraction=0)["splits"]["val"]["samples"] == 0
    Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)).save(tmp_path / "in" / "wide.png")
    assert cli.main(["shard", "image", str(tmp_path / "in"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "8x8: 12 files, 9x6: 1 file" in err[0] and "--size" in err[0]
    assert cli.main(["shard", "image", str(tmp_path / "in"), "--out", str(tmp_path / "r"), "--size", "8"]) == 0
    assert "1 centre-cropped and resized to 8px" in capsys.readouterr().out


def test_tinyshakespeare_default_split_is_usable(shared_data, shakespeare, tmp_path):
    manifest = write_shards("text", [shared_data / "text" / "tinyshakespeare.txt"], tmp_path / "t")
    val, train = manifest["splits"]["val"], manifest["splits"]["train"]
    assert val["samples"] >= 10  # not one document (64 KiB documents gave 17, 5% of them ~1)
    assert 0.03 < val["payload_bytes"] / len(shakespeare) < 0.08  # about --val-fraction of the text
    assert manifest["options"]["max_doc_bytes"] == int(len(shakespeare) * 0.05 / 10)
    assert val["payload_bytes"] + train["payload_bytes"] == len(shakespeare)
    paths = shard_paths(tmp_path / "t", "val")
    sources = {meta["doc"] for _, _, meta in iter_samples(paths, "text")}
    assert max(sources) - min(sources) > train["samples"] / 2  # spread over the play, not one scene


@pytest.mark.parametrize("min_val", [0, 10])
def test_the_split_is_deterministic(tmp_path, min_val):
    (tmp_path / "in").mkdir()
    for i in range(30):
        (tmp_path / "in" / f"d{i:02d}.txt").write_text(f"doc {i}\n")
    first = write_shards("text", [tmp_path / "in"], tmp_path / "a", min_val=min_val)
    second = write_shards("text", [tmp_path / "in"], tmp_path / "b", min_val=min_val)
    assert first["splits"] == second["splits"]
    for name in first["splits"]["val"]["shards"] + first["splits"]["train"]["shards"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert first["splits"]["val"]["samples"] >= min(min_val, 15)
