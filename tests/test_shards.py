"""`polybyte shard`: done-when checks of issue 2, determinism, skips, CLI errors (DESIGN.md §4)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shard_reading import iter_samples, shard_paths

from polybyte.modalities import modality_from_dict
from polybyte.modalities.image import to_order
from polybyte.pipelines import cli
from polybyte.pipelines.shards import write_shards
from polybyte.pipelines.sources import read_manifest


def _all_samples(out: Path) -> dict[str, tuple[bytes, dict]]:
    manifest = read_manifest(out)
    adapter = modality_from_dict(manifest["settings"])
    paths = shard_paths(out, "train") + shard_paths(out, "val")
    samples = {key: (payload, meta) for key, payload, meta in iter_samples(paths, adapter)}
    assert len(samples) == manifest["splits"]["train"]["samples"] + manifest["splits"]["val"]["samples"]
    for key in samples:
        assert "." not in key and "/" not in key
    return samples


def _tree_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_imagenet64_npz_gives_the_raster_payloads(shared_data, tmp_path, capsys):
    npz = shared_data / "image" / "imagenet64_sample.npz"
    assert cli.main(["shard", "image", str(npz), "--out", str(tmp_path / "x")]) == 0
    assert "wrote 500 samples (train " in capsys.readouterr().out
    samples = _all_samples(tmp_path / "x")
    manifest = read_manifest(tmp_path / "x")
    with np.load(npz) as batch:
        data, labels = batch["data"], batch["labels"]
    assert len(samples) == 500 and manifest["splits"]["val"]["samples"] > 0
    seen = set()
    for payload, meta in samples.values():
        i = meta["index"]
        seen.add(i)
        assert payload == data[i].reshape(3, 64, 64).transpose(1, 2, 0).tobytes()  # planar -> raster
        assert meta["label"] == labels[i]
    assert seen == set(range(500))
    total = sum(s["payload_bytes"] for s in manifest["splits"].values())
    assert total == 500 * 12288


def test_patch_order_and_shard_limits(shared_data, tmp_path):
    npz = shared_data / "image" / "imagenet64_sample.npz"
    manifest = write_shards("image", [npz], tmp_path, settings={"order": "patch8"}, maxcount=100, val_fraction=0.2)
    train = manifest["splits"]["train"]
    assert len(train["shards"]) == math.ceil(train["samples"] / 100) > 1
    assert all((tmp_path / name).is_file() for name in train["shards"])
    with np.load(npz) as batch:
        data = batch["data"]
    for payload, meta in _all_samples(tmp_path).values():
        assert payload == to_order(data[meta["index"]].reshape(3, 64, 64).transpose(1, 2, 0), "patch8")


def test_fsdd_pcm16_payloads_equal_the_wav_pcm_data(shared_data, tmp_path, capsys):
    fsdd = shared_data / "audio" / "fsdd"
    argv = [
        "shard",
        "audio",
        str(fsdd),
        "--out",
        str(tmp_path),
        "--sample-rate",
        "8000",
        "--encoding",
        "pcm16",
    ]
    assert cli.main(argv) == 0
    assert "wrote 2000 samples" in capsys.readouterr().out
    samples = _all_samples(tmp_path)
    assert len(samples) == 2000
    total = 0
    for payload, meta in samples.values():
        with wave.open(meta["source"]) as w:
            pcm = w.readframes(w.getnframes())
        assert payload == pcm
        assert meta["sample_rate"] == 8000 and meta["samples"] * 2 == len(pcm)
        total += len(pcm)
    manifest = read_manifest(tmp_path)
    assert sum(s["payload_bytes"] for s in manifest["splits"].values()) == total


def test_tinyshakespeare_round_trips(shared_data, shakespeare, tmp_path):
    src = shared_data / "text" / "tinyshakespeare.txt"
    manifest = write_shards("text", [src], tmp_path / "a")
    samples = _all_samples(tmp_path / "a")
    assert b"".join(samples[k][0] for k in sorted(samples)) == shakespeare
    assert all(len(p) <= 65536 for p, _ in samples.values())
    assert sum(s["payload_bytes"] for s in manifest["splits"].values()) == len(shakespeare)
    # smaller documents and a larger val share: both splits used, still the same text
    manifest = write_shards("text", [src], tmp_path / "b", max_doc_bytes=8192, val_fraction=0.2)
    assert manifest["splits"]["val"]["samples"] > 0 and manifest["splits"]["train"]["samples"] > 0
    samples = _all_samples(tmp_path / "b")
    assert b"".join(samples[k][0] for k in sorted(samples)) == shakespeare


def test_same_input_gives_identical_tar_bytes(shared_data, tmp_path):
    audio_in = tmp_path / "audio_in"
    audio_in.mkdir()
    for wav in sorted((shared_data / "audio" / "fsdd").glob("*.wav"))[:40]:
        shutil.copy(wav, audio_in)
    image_in = tmp_path / "image_in"
    (image_in / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (90, 70, 3), np.uint8)).save(image_in / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(image_in / "a.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(image_in / "sub" / "a.png")
    jobs = [
        ("audio", [audio_in], {"sample_rate": 16000, "encoding": "mulaw8", "clip_seconds": 0.2}),
        ("image", [image_in], {"size": 32}),
        ("text", [shared_data / "text" / "tinyshakespeare.txt"], {}),
    ]
    for name, inputs, settings in jobs:
        outs = [tmp_path / f"{name}-{run}" for run in range(2)]
        for out in outs:
            write_shards(name, inputs, out, settings=settings, val_fraction=0.3)
        first, second = (_tree_bytes(out) for out in outs)
        assert any(n.startswith("val-") for n in first) and any(n.startswith("train-") for n in first)
        assert first == second, name
    # clips of one recording stay in one split
    split_of = {}
    for split in ("train", "val"):
        for _, _, meta in iter_samples(shard_paths(tmp_path / "audio-0", split), "audio"):
            assert split_of.setdefault(meta["source"], split) == split
    assert len(split_of) == 40 and len(_all_samples(tmp_path / "audio-0")) > 40
    # one stem twice in a folder, and once more in a subfolder: three distinct keys
    images = _all_samples(tmp_path / "image-0")
    assert {key: Path(meta["source"]).relative_to(image_in).as_posix() for key, (_, meta) in images.items()} == {
        "a": "a.jpg",
        "a-dup2": "a.png",
        "sub_a": "sub/a.png",
    }


def test_corrupt_inputs_are_skipped_and_counted(shared_data, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for wav in sorted((shared_data / "audio" / "fsdd").glob("*.wav"))[:3]:
        shutil.copy(wav, src)
    (src / "broken.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    good = (src / sorted(p.name for p in src.glob("*_*.wav"))[0]).read_bytes()
    (src / "truncated.flac").write_bytes(good[:20])
    argv = ["shard", "audio", str(src), "--out", str(tmp_path / "o"), "--sample-rate", "8000"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "wrote 3 samples" in captured.out and "2 skipped" in captured.out
    assert "broken.wav" in captured.err and "truncated.flac" in captured.err
    manifest = read_manifest(tmp_path / "o")
    assert sorted(Path(s["source"]).name for s in manifest["skipped"]) == [
        "broken.wav",
        "truncated.flac",
    ]
    assert all("cannot decode audio" in s["reason"] for s in manifest["skipped"])
    assert cli.main([*argv, "--overwrite", "--strict"]) == 1


def test_jsonl_records_and_bad_records(tmp_path):
    (tmp_path / "in").mkdir()
    lines = [{"text": "first record\n"}, {"title": "no text"}, {"text": ""}, {"text": "ünïcode"}]
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n", encoding="utf-8")
    (tmp_path / "in" / "b.json").write_text(json.dumps({"text": "json doc"}), encoding="utf-8")
    (tmp_path / "in" / "c.jsonl").write_text('{"text": "ok"}\n{broken\n', encoding="utf-8")
    manifest = write_shards("text", [tmp_path / "in"], tmp_path / "o")
    payloads = sorted(p for p, _ in _all_samples(tmp_path / "o").values())
    assert payloads == sorted([b"first record\n", "ünïcode".encode(), b"json doc"])
    reasons = {Path(s["source"]).name: s["reason"] for s in manifest["skipped"]}
    assert reasons == {
        "a.jsonl#1": "record 1: no string field 'text'",
        "a.jsonl#2": "record 2: empty text",
        "c.jsonl": "line 2: invalid JSON (Expecting property name enclosed in double quotes)",
    }


def test_cli_errors_exit_2_without_traceback(tmp_path, capsys):
    assert cli.main(["shard", "text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "input not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["shard", "video", "x", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "invalid choice: 'video'" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("hello\n")
    assert cli.main(["shard", "text", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o"), "--size", "8"]) == 2
    assert "--size do not apply to text" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "shard",
                "image",
                str(tmp_path / "t.txt"),
                "--out",
                str(tmp_path / "o"),
                "--order",
                "patch7",
            ]
        )
        == 2
    )
    assert "multiple of 7" in capsys.readouterr().err
    assert cli.main(["shard", "text", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o")]) == 0
    assert cli.main(["shard", "text", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["shard", "text", str(tmp_path / "*.md"), "--out", str(tmp_path / "p")]) == 2
    assert "no file matches" in capsys.readouterr().err


def test_console_script_end_to_end(tmp_path):
    script = Path(sys.executable).parent / "polybyte"
    if not script.exists():
        pytest.skip("console script `polybyte` not installed next to this Python")
    (tmp_path / "in").mkdir()
    for i in range(3):
        (tmp_path / "in" / f"doc.{i}.txt").write_text(f"document {i}\n")
    argv = [
        str(script),
        "shard",
        "text",
        str(tmp_path / "in" / "*.txt"),
        "--out",
        str(tmp_path / "o"),
        "--val-fraction",
        "0",
    ]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    # "document i\n" is 11 bytes
    assert run.stdout.strip() == (
        f"wrote 3 samples (train 3 / val 0) from 3 of 3 files, 33 payload bytes, 0 skipped -> {tmp_path / 'o'}"
    )
    keys = sorted(_all_samples(tmp_path / "o"))
    assert keys == ["doc_0-000000", "doc_1-000000", "doc_2-000000"]
    run = subprocess.run(
        [str(script), "shard", "text", "nope.txt", "--out", str(tmp_path / "o2")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr and "input not found: nope.txt" in run.stderr
