"""Splits and data properties from the data (issue 17): explicit val sources and globs, shards
named like held-out splits, fit without val data, validation taking turns between sources, and
image size / sample rate read from the manifest, the checkpoint or the first member, with one
error for a member unlike them.

The CIFAR-10 tests copy the first samples of one real shard (``../shared/data``); everything
else is made here. The models are one-layer transformers on CPU.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import webdataset as wds
import yaml
from PIL import Image
from test_lit import metrics, run_cli

from polybyte.modalities import AUDIO, IMAGE, TEXT, get_modality
from polybyte.models.transformer import Transformer, TransformerConfig
from polybyte.pipelines import cli
from polybyte.pipelines.data import ByteDataModule
from polybyte.pipelines.export import save_exported
from polybyte.pipelines.shards import write_shards
from polybyte.pipelines.sources import resolve_sources

CIFAR_SEQ = 3080  # a 32x32 image (3,072 bytes) + EOS, rounded up to a multiple of 8


def _png(rng, size: int, height: int | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height or size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _image_tar(path: Path, sizes: list[int]) -> Path:
    """A third-party webdataset shard (KEY.png + KEY.cls, no manifest) of images of these sizes."""
    rng = np.random.default_rng(len(sizes))
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as tar:
        for i, size in enumerate(sizes):
            tar.write({"__key__": f"{path.stem}_{i:03d}", "png": _png(rng, size), "cls": b"1"})
    return path


def _head(src: Path, dst: Path, samples: int, skip: int = 0) -> Path:
    """``samples`` samples (2 members each: .jpg + .cls) of a real shard, after ``skip`` of them."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for i, member in enumerate(tin):
            if i >= 2 * (skip + samples):
                break
            if i >= 2 * skip:
                tout.addfile(member, tin.extractfile(member))
    return dst


@pytest.fixture
def cifar(shared_data, tmp_path) -> Path:
    """The CIFAR-10 layout (train-*.tar of 32x32 JPEGs + .cls, no manifest), two small shards."""
    real = shared_data / "image" / "cifar10" / "train-000000.tar"
    folder = tmp_path / "cifar10"
    _head(real, folder / "train-000000.tar", 12)
    _head(real, folder / "train-000001.tar", 6, skip=12)
    return folder


def _config(path: Path, run: Path, data: dict) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 2,
            "val_check_interval": 2,
            "check_val_every_n_epoch": None,
            "limit_val_batches": 1.0,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(run),
        },
        "checkpoint": {"every_n_train_steps": None, "save_top_k": 1},  # `last` at the end
        "model": {
            "model": {"backbone": "transformer", "dim": 16, "n_layers": 1, "n_heads": 2, "max_seq_len": CIFAR_SEQ},
            "warmup_steps": 1,
        },
        "data": {"seq_len": CIFAR_SEQ, "batch_size": 2, "num_workers": 0, "shuffle_buffer": 4, **data},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _export(path: Path, size: int) -> Path:
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(dim=16, n_layers=1, n_heads=2, max_seq_len=CIFAR_SEQ))
    modalities = {"image": get_modality("image", size=size).settings_dict()}
    return save_exported(path, model, modalities, {"step": 0, "seq_len": CIFAR_SEQ})


def _eval(args: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(["eval", "--device", "cpu", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# --- CIFAR-10 as it comes: fit and eval with no adapter settings ------------------------------
def test_cifar_tars_fit_and_eval_unchanged(cifar, tmp_path, monkeypatch, capsys):
    val = cifar / "train-000001.tar"
    config = _config(
        tmp_path / "c.yaml", tmp_path / "run", {"sources": {"image": str(cifar)}, "val_sources": {"image": str(val)}}
    )
    assert run_cli(["fit", "--config", str(config)], monkeypatch) == 0
    err = capsys.readouterr().err
    assert "image size 32 read from its first member" in err and "train-000000.tar" in err
    assert "1 of its 2 training shards are its validation shards" in err  # never trained on
    rows = [r for r in metrics(tmp_path / "run") if "val/bpb_image" in r]
    assert len(rows) == 1 and rows[0]["val/skipped"] == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last"
    assert json.loads((ckpt / "config.json").read_text())["modalities"]["image"]["size"] == 32

    # eval scores a pattern's shards as given, whatever their names (all 6, none refused)
    rc, out, err = _eval(
        ["--ckpt", str(ckpt), "--data", f"image={cifar}/train-000001.*", "--out", str(tmp_path / "r")], capsys
    )
    assert rc == 0, err
    entry = json.loads((tmp_path / "r" / "report.json").read_text())["modalities"]["image"]
    assert entry["samples"] == 6 and entry["payload_bytes"] == 6 * 3072 and entry["settings"]["size"] == 32
    assert entry["bpb"] == pytest.approx(rows[0]["val/bpb_image"], abs=1e-5)  # the same windows as fit's check
    # the folder itself has no val split: one line naming the shards to give
    rc, _, err = _eval(["--ckpt", str(ckpt), "--data", f"image={cifar}", "--out", str(tmp_path / "r2")], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and f"name the shards to score: image='{cifar / 'train-000001.tar'}'" in lines[0]


def test_eval_refuses_images_unlike_the_checkpoints_size(cifar, tmp_path, capsys):
    ckpt = _export(tmp_path / "ckpt64" / "last", size=64)
    base = ["--ckpt", str(ckpt), "--data", f"image={cifar}/*.tar", "--out", str(tmp_path / "r")]
    rc, _, err = _eval(base, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert "are 32x32 pixels" in lines[0] and "the image size is 64 (from the checkpoint)" in lines[0]
    assert """--adapter-settings '{"image": {"size": 64}}'""" in lines[0]
    # asked for explicitly, the 32-px JPEGs are resized to the model's 64, with a note
    rc, out, err = _eval([*base, "--adapter-settings", '{"image": {"size": 64}}', "--max-samples", "2"], capsys)
    assert rc == 0, err
    assert "converted to 64x64 pixels as --adapter-settings asks" in err
    entry = json.loads((tmp_path / "r" / "report.json").read_text())["modalities"]["image"]
    assert entry["samples"] == 2 and entry["payload_bytes"] == 2 * 64 * 64 * 3 and entry["settings"]["size"] == 64


# --- splits -----------------------------------------------------------------------------------
def test_fit_without_val_data_says_so_once_and_validate_refuses(cifar, tmp_path, monkeypatch, capsys):
    config = _config(tmp_path / "c.yaml", tmp_path / "run", {"sources": {"image": str(cifar)}})
    assert run_cli(["fit", "--config", str(config)], monkeypatch) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "validation" in line or "across ranks is zero" in line]
    assert len(notes) == 1, err
    assert notes[0].startswith("polybyte data: no validation data: no source has val shards (image at ")
    assert f"--data.val_sources '{{image: {cifar / 'train-000001.tar'}}}'" in notes[0]
    assert not any("val/loss" in r for r in metrics(tmp_path / "run"))
    rc = run_cli(["validate", "--config", str(config), "--ckpt_path", "last"], monkeypatch)
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and lines[-1].startswith("polybyte validate: error: nothing to validate: no source has val shards")


def test_a_shard_named_like_a_held_out_split_is_never_trained_on_by_guess(tmp_path):
    folder = tmp_path / "imagenet"
    _image_tar(folder / "imagenet-train-000000.tar", [8] * 4)
    _image_tar(folder / "imagenet-val-000000.tar", [8] * 3)
    with pytest.raises(ValueError, match=r"imagenet-val-000000.tar is named like a held-out split") as e:
        resolve_sources({"image": str(folder)})
    assert f"val_sources {{image: '{folder}/*val*.tar'}}" in str(e.value)
    for train in (f"{folder}/*train*.tar", str(folder)):  # a pattern, or the folder once val_sources takes it
        [source] = resolve_sources({"image": train}, {"image": f"{folder}/*val*.tar"})
        assert [Path(u).name for u in source.train] == ["imagenet-train-000000.tar"]
        assert [Path(u).name for u in source.val] == ["imagenet-val-000000.tar"]
    # a folder naming no split at all trains on every shard, and says so
    plain = tmp_path / "plain"
    _image_tar(plain / "part-0.tar", [8] * 2)
    [source] = resolve_sources({"image": str(plain)})
    assert len(source.train) == 1 and not source.val
    assert any("names no train-*/val-* shards: all 1 .tar files are training shards" in n for n in source.notes)


def test_val_sources_replace_the_val_shards_of_the_sources_they_name_only(tmp_path):
    (tmp_path / "txt").mkdir()
    for i in range(6):
        (tmp_path / "txt" / f"doc{i}.txt").write_text(f"document {i}\n" * 20)
    write_shards("text", [tmp_path / "txt"], tmp_path / "text", val_fraction=0.5)
    _image_tar(tmp_path / "img" / "a.tar", [8] * 3)
    _image_tar(tmp_path / "img" / "b.tar", [8] * 2)
    text, image = resolve_sources(
        {"text": str(tmp_path / "text"), "image": str(tmp_path / "img")}, {"image": str(tmp_path / "img" / "b.tar")}
    )
    assert [Path(u).name for u in text.val] == ["val-000000.tar"]  # its folder's own
    assert [Path(u).name for u in image.val] == ["b.tar"] and [Path(u).name for u in image.train] == ["a.tar"]
    with pytest.raises(ValueError, match="val source 'audio' matches no training source"):
        resolve_sources({"text": str(tmp_path / "text")}, {"audio": str(tmp_path / "img")})


def test_validation_batches_take_turns_between_sources(demo_shards):
    kw = dict(seq_len=780, batch_size=2, val_batch_size=2, num_workers=0)
    dm = ByteDataModule(sources={m: str(p) for m, p in demo_shards.items()}, **kw)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    tags = [set(modality.tolist()) for _, modality in batches]
    assert all(len(t) == 1 for t in tags)  # each batch holds one source's windows
    assert [t.pop() for t in tags[:3]] == [TEXT, IMAGE, AUDIO]  # the first three cover all sources
    # the same windows as reading one source after the other, just in turns
    alone = []
    for name, path in demo_shards.items():
        one = ByteDataModule(sources={name: str(path)}, **kw)
        one.setup("validate")
        alone += [row for ids, _ in one.val_dataloader() for row in ids]
    rows = [row for ids, _ in batches for row in ids]
    assert len(rows) == len(alone) and sorted(map(bytes, map(np.asarray, rows))) == sorted(
        map(bytes, map(np.asarray, alone))
    )


# --- properties from the data -----------------------------------------------------------------
def test_first_member_gives_the_size_and_a_later_unlike_member_is_a_counted_skip(tmp_path, capsys):
    _image_tar(tmp_path / "w" / "part-0.tar", [16, 16, 8, 16])
    dm = ByteDataModule(
        sources={"image": str(tmp_path / "w")}, val_sources={"image": str(tmp_path / "w" / "part-0.tar")},
        weights=[1.0], seq_len=800, batch_size=2, num_workers=0,
    )  # fmt: skip
    dm.setup("validate")
    [source] = dm.sources
    assert source.settings["size"] == 16 and source.strict
    assert "image size 16 read from its first member" in capsys.readouterr().err
    rows = sum(len(m) for _, m in dm.val_dataloader())
    assert rows == 3 and dm.skips("val")["mismatch"] == 1  # the 8x8 image: refused, counted


def test_a_first_member_unlike_the_manifest_or_square_less_is_one_error(tmp_path):
    (tmp_path / "png").mkdir()
    for i in range(4):
        (tmp_path / "png" / f"{i}.png").write_bytes(_png(np.random.default_rng(i), 8))
    write_shards("image", [tmp_path / "png"], tmp_path / "img", val_fraction=0.5)
    _image_tar(tmp_path / "other" / "v.tar", [16] * 2)
    spec, val = {"image": str(tmp_path / "img")}, {"image": str(tmp_path / "other" / "v.tar")}
    with pytest.raises(ValueError) as e:
        resolve_sources(spec, val, flag="--data.adapter_settings")
    assert "its validation members are 16x16 pixels" in str(e.value) and "image size is 8 (from its manifest)" in str(
        e.value
    )
    assert """--data.adapter_settings '{"image": {"size": 8}}'""" in str(e.value)
    [source] = resolve_sources(spec, val, {"image": {"size": 8}})  # explicit: converted, with a note
    assert not source.strict and any("converted to 8x8 pixels" in n for n in source.notes)
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(tmp_path / "wide.tar")) as tar:
        tar.write({"__key__": "a", "png": _png(rng, 12, height=8)})
    with pytest.raises(ValueError, match=r"a 12x8 image is not square.*give it with adapter_settings"):
        resolve_sources({"image": str(tmp_path / "wide.tar")})


def test_audio_sample_rate_from_the_first_member_without_resampling(shared_data, tmp_path):
    wavs = sorted((shared_data / "audio" / "fsdd").glob("*.wav"))[:4]
    with wds.TarWriter(str(tmp_path / "clips.tar")) as tar:
        for wav in wavs:
            tar.write({"__key__": wav.stem, "wav": wav.read_bytes()})
    dm = ByteDataModule(
        sources={"audio": str(tmp_path / "clips.tar")}, val_sources={"audio": str(tmp_path / "clips.tar")},
        weights=[1.0], seq_len=16384, batch_size=4, num_workers=0,
    )  # fmt: skip
    dm.setup("validate")
    assert dm.sources[0].settings["sample_rate"] == 8000  # FSDD's own rate, not 16 kHz
    rows = [row for ids, _ in dm.val_dataloader() for row in ids]
    for row, wav in zip(rows, wavs):
        pcm = sf.read(wav, dtype="int16")[0].astype("<i2").tobytes()
        assert bytes(row[: len(pcm)].tolist()) == pcm  # the recording's own samples
