"""Every lost sample counted (issue 12, items 6-8): truncated shards against their manifest, a
truncated member counted once, all-bad val modalities, skips in metrics and in eval's report, one
line past max_skip_fraction, a stray model key, eval's adapter settings for third-party
webdatasets, `.npz` batches under max_pixels.

Every file is made here, on CPU; the models are one-layer transformers.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image
from test_lit import metrics, run_cli

from polybyte.modalities import IMAGE, ResourceLimitError, get_modality
from polybyte.modalities.image import read_npz_batch
from polybyte.models.transformer import Transformer, TransformerConfig
from polybyte.pipelines import cli
from polybyte.pipelines.data import ByteDataModule
from polybyte.pipelines.export import save_exported
from polybyte.pipelines.reading import SKIP_REASONS, TooManyBadSamples
from polybyte.pipelines.shards import write_shards
from polybyte.pipelines.sources import read_manifest

SIZE = 8  # 8x8 images: 192 payload bytes
SEQ_LEN = 200


def _png(rng, width=SIZE, height=SIZE) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(rng, size=32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _image_shards(folder: Path, n: int = 12) -> Path:
    """A `polybyte shard` folder of ``n`` 8x8 images, all in one val shard (with its manifest)."""
    src = folder.with_name(folder.name + "-png")
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        (src / f"im{i:02d}.png").write_bytes(_png(rng))
    write_shards("image", [src], folder, settings={"size": SIZE}, val_fraction=1.0)
    return folder


def _member_offsets(shard: Path) -> list[tuple[str, int, int]]:
    """``(name, header offset, data offset)`` of each member of a tar."""
    with tarfile.open(shard) as tar:
        return [(m.name, m.offset, m.offset_data) for m in tar.getmembers()]


def _cut(shard: Path, at: int) -> None:
    shard.write_bytes(shard.read_bytes()[:at])


def _val_dm(folder: Path, **kw) -> ByteDataModule:
    kw = {"seq_len": SEQ_LEN, "batch_size": 4, "num_workers": 0, **kw}
    dm = ByteDataModule(sources={"image": str(folder)}, **kw)
    dm.setup("validate")
    return dm


def _rows(batches) -> int:
    return sum(int((modality == IMAGE).sum()) for _, modality in batches)


@pytest.fixture
def image_export(tmp_path) -> Path:
    """A tiny transformer export trained (so says its config.json) on 8x8 raster images."""
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(dim=32, n_layers=1, n_heads=4, max_seq_len=256))
    modalities = {"image": get_modality("image", size=SIZE).settings_dict()}
    return save_exported(tmp_path / "ckpt" / "last", model, modalities, {"step": 0, "seq_len": SEQ_LEN})


def _eval(args: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(["eval", "--device", "cpu", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# --- truncated shards, counted against the manifest -------------------------------------------
def _png_folder(folder: Path, n: int) -> Path:
    """``n`` small PNG files im0.png .. in ``folder``."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(n):
        (folder / f"im{i}.png").write_bytes(_png(rng))
    return folder


def test_shard_manifest_records_samples_per_shard(tmp_path):
    src = _png_folder(tmp_path / "png", 7)
    manifest = write_shards("image", [src], tmp_path / "o", settings={"size": SIZE}, val_fraction=1.0, maxcount=3)
    val = manifest["splits"]["val"]
    assert val["shards"] == ["val-000000.tar", "val-000001.tar", "val-000002.tar"]
    assert val["shard_samples"] == [3, 3, 1]
    assert read_manifest(tmp_path / "o")["splits"]["val"]["shard_samples"] == [3, 3, 1]


def test_val_shard_truncated_on_a_member_boundary_counts_the_missing_samples(tmp_path, image_export, capsys):
    folder = _image_shards(tmp_path / "img")
    shard = folder / "val-000000.tar"
    tenth = [off for name, off, _ in _member_offsets(shard) if name.startswith("im09.")][0]
    _cut(shard, tenth)  # a clean cut after 9 samples: tar reads it without any error

    dm = _val_dm(folder)
    assert _rows(list(dm.val_dataloader())) == 9
    assert dm.skips("val") == {**dict.fromkeys(SKIP_REASONS, 0), "missing": 3}
    assert dm.skipped == 3 and dm.seen == 12

    argv = ["--ckpt", str(image_export), "--data", f"image={folder}", "--out", str(tmp_path / "r")]
    rc, out, err = _eval(argv, capsys)
    assert rc == 0, err
    assert "over 1728 bytes of 9 samples; 3 skipped (3 missing)" in out
    last = f"eval: report written to {tmp_path / 'r'}/report.md; 3 samples skipped (3 missing)"
    assert out.strip().splitlines()[-1] == last
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["skipped"] == {
        "total": 3,
        "undecodable": 0,
        "over_limit": 0,
        "mismatch": 0,
        "shard_error": 0,
        "missing": 3,
    }
    assert report["modalities"]["image"]["skipped"]["missing"] == 3
    assert report["modalities"]["image"]["samples"] == 9
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Skipped: 3 samples skipped (3 missing)." in md


def test_a_val_shard_the_manifest_lists_but_the_folder_lacks_is_counted(tmp_path):
    src = _png_folder(tmp_path / "png", 5)
    write_shards("image", [src], tmp_path / "o", settings={"size": SIZE}, val_fraction=1.0, maxcount=3)
    (tmp_path / "o" / "val-000001.tar").unlink()
    dm = _val_dm(tmp_path / "o")
    assert _rows(list(dm.val_dataloader())) == 3
    skips = dm.skips("val")
    assert skips["shard_error"] == 1 and skips["missing"] == 1 and dm.skipped == 2  # the 2 samples it held


def test_a_truncated_member_is_counted_once(tmp_path, caplog):
    folder = _image_shards(tmp_path / "img")
    shard = folder / "val-000000.tar"
    png = [data for name, _, data in _member_offsets(shard) if name == "im09.png"][0]
    _cut(shard, png + 100)  # inside the 10th image's PNG
    with caplog.at_level(logging.WARNING, logger="polybyte.pipelines.data"):
        dm = _val_dm(folder)
        assert _rows(list(dm.val_dataloader())) == 9
    # the broken member once (not once per layer that sees the error, nor again as a sample
    # without its PNG), then the two samples after it that the manifest lists
    assert dm.skips("val") == {**dict.fromkeys(SKIP_REASONS, 0), "shard_error": 1, "missing": 2}
    assert caplog.text.count("unexpected end of data") == 1

    # without a manifest there is nothing to compare with: the break alone is counted, once
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copy(shard, foreign / "part-0.tar")
    dm = _val_dm(foreign, val_sources={"image": str(foreign / "*.tar")}, adapter_settings={"image": {"size": SIZE}})
    assert _rows(list(dm.val_dataloader())) == 9
    assert dm.skipped == 1 and dm.skips("val")["shard_error"] == 1


def test_too_many_lost_samples_name_the_shard(tmp_path):
    folder = _image_shards(tmp_path / "img")
    shard = folder / "val-000000.tar"
    _cut(shard, [off for name, off, _ in _member_offsets(shard) if name.startswith("im03.")][0])
    dm = _val_dm(folder, min_seen_for_skip_check=5)
    with pytest.raises(TooManyBadSamples, match=rf"9 of 12 samples could not be read .*shard {shard}: 9 of them"):
        list(dm.val_dataloader())


# --- eval: adapter settings for third-party webdatasets -----------------------------------------
@pytest.fixture
def cifar_like(tmp_path) -> Path:
    """A third-party webdataset of 32x32 JPEGs (KEY.jpg + KEY.cls), no manifest."""
    folder = tmp_path / "cifar"
    folder.mkdir()
    rng = np.random.default_rng(3)
    with wds.TarWriter(str(folder / "val-000000.tar")) as tar:
        for i in range(3):
            tar.write({"__key__": f"test_cat_{i}", "jpg": _jpg(rng), "cls": b"3"})
    return folder


@pytest.fixture
def cifar_export(tmp_path) -> Path:
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(dim=16, n_layers=1, n_heads=2, max_seq_len=3080))
    modalities = {"image": get_modality("image", size=32).settings_dict()}
    return save_exported(tmp_path / "ckpt32" / "last", model, modalities, {"step": 0, "seq_len": 3080})


def test_eval_reads_a_third_party_webdataset_with_the_checkpoints_settings(cifar_like, cifar_export, tmp_path, capsys):
    base = ["--ckpt", str(cifar_export), "--batch-size", "3"]
    rc, out, err = _eval([*base, "--data", f"image={cifar_like}", "--out", str(tmp_path / "a")], capsys)
    assert rc == 0, err
    assert "of 3 samples" in out
    a = json.loads((tmp_path / "a" / "report.json").read_text())["modalities"]["image"]
    assert a["settings"]["size"] == 32 and a["payload_bytes"] == 3 * 3072
    # the same settings given explicitly, and a glob of shards instead of the folder
    flag = ["--adapter-settings", '{"image": {"size": 32}}']
    rc, _, err = _eval([*base, "--data", f"image={cifar_like}/*.tar", "--out", str(tmp_path / "b"), *flag], capsys)
    assert rc == 0, err
    b = json.loads((tmp_path / "b" / "report.json").read_text())["modalities"]["image"]
    assert b["bpb"] == pytest.approx(a["bpb"], abs=1e-9)
    # shards named like training shards (the CIFAR-10 layout): the error says how to name them
    train_only = tmp_path / "train_only"
    train_only.mkdir()
    shutil.copy(cifar_like / "val-000000.tar", train_only / "train-000000.tar")
    rc, _, err = _eval([*base, "--data", f"image={train_only}", "--out", str(tmp_path / "c")], capsys)
    assert rc == 2 and f"name the shards to score: image='{train_only / 'train-000000.tar'}'" in err


def test_eval_adapter_settings_reencode_a_manifest_folder(tmp_path, cifar_export, capsys):
    """Shards written at 8x8 are refused for a 32x32 model, with the flag that fixes it."""
    folder = _image_shards(tmp_path / "img", n=3)
    base = ["--ckpt", str(cifar_export), "--data", f"image={folder}", "--out", str(tmp_path / "r")]
    rc, _, err = _eval(base, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "size: data 8 vs model 32" in lines[0]
    assert """--adapter-settings '{"image": {"size": 32}}'""" in lines[0]
    rc, out, err = _eval([*base, "--adapter-settings", '{"image": {"size": 32}}'], capsys)
    assert rc == 0, err
    assert "of 3 samples" in out


@pytest.mark.parametrize(
    "value, message",
    [
        ('{"image": [32]}', "must map source names to settings"),
        ("{image: {size: 32", "is not JSON/YAML"),
        ('{"img": {"size": 32}}', "adapter_settings for unknown sources ['img']"),
        ('{"image": {"size": 0}}', "image size must be positive"),
    ],
)
def test_eval_bad_adapter_settings_are_one_line(value, message, cifar_like, cifar_export, tmp_path, capsys):
    rc, _, err = _eval(
        [
            "--ckpt",
            str(cifar_export),
            "--data",
            f"image={cifar_like}",
            "--out",
            str(tmp_path / "r"),
            "--adapter-settings",
            value,
        ],
        capsys,
    )
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("polybyte eval: error: ") and message in lines[0]


def test_eval_reports_over_limit_skips(tmp_path, image_export, capsys):
    folder = tmp_path / "foreign"
    folder.mkdir()
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(folder / "val-000000.tar")) as tar:
        for i in range(3):
            tar.write({"__key__": f"small{i}", "png": _png(rng)})
        tar.write({"__key__": "large", "png": _png(rng, 40, 30)})  # 1,200 pixels
        tar.write({"__key__": "broken", "png": b"\x89PNG\r\n\x1a\n truncated"})
    rc, out, err = _eval(
        [
            "--ckpt",
            str(image_export),
            "--data",
            f"image={folder}",
            "--out",
            str(tmp_path / "r"),
            "--adapter-settings",
            '{"image": {"max_pixels": 1000}}',
        ],
        capsys,
    )
    assert rc == 0, err
    assert out.strip().splitlines()[-1].endswith("; 2 samples skipped (1 undecodable, 1 over_limit)")
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["skipped"] == {
        "total": 2,
        "undecodable": 1,
        "over_limit": 1,
        "mismatch": 0,
        "shard_error": 0,
        "missing": 0,
    }
    assert "2 samples skipped (1 undecodable, 1 over_limit) on the way." in (tmp_path / "r" / "report.md").read_text()


def test_eval_with_no_readable_val_sample_is_one_line(tmp_path, image_export, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    with wds.TarWriter(str(folder / "val-000000.tar")) as tar:
        for i in range(3):
            tar.write({"__key__": f"bad{i}", "png": b"\x89PNG\r\n\x1a\n truncated"})
    rc, _, err = _eval(["--ckpt", str(image_export), "--data", f"image={folder}", "--out", str(tmp_path / "r")], capsys)
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("skipped")]
    assert rc == 2 and len(lines) == 1
    assert "none of its 3 val samples could be read (3 undecodable" in lines[0]


# --- .npz batches under max_pixels --------------------------------------------------------------
def _fake_npz(path: Path, shape: tuple[int, int]) -> None:
    """An .npz whose data.npy header declares ``shape`` uint8 but holds only 100 bytes."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("data.npy", header.getvalue() + b"\0" * 100)


def test_npz_batches_are_checked_against_max_pixels(tmp_path, capsys):
    planar = np.random.default_rng(0).integers(0, 256, (2, 3 * 64 * 64), dtype=np.uint8)
    np.savez_compressed(tmp_path / "batch.npz", data=planar, labels=np.array([1, 2]))
    with pytest.raises(ResourceLimitError, match=r"64x64 images \(4,096 pixels each\).*max_pixels=1,000"):
        next(read_npz_batch(tmp_path / "batch.npz", max_pixels=1000))
    assert len(list(read_npz_batch(tmp_path / "batch.npz", max_pixels=4096))) == 2
    # a header declaring 20000x20000 images is refused by the default limit, nothing decompressed
    _fake_npz(tmp_path / "bomb.npz", (1, 3 * 20000 * 20000))
    with pytest.raises(ResourceLimitError, match="20000x20000"):
        next(read_npz_batch(tmp_path / "bomb.npz", max_pixels=get_modality("image").settings.max_pixels))
    _fake_npz(tmp_path / "short.npz", (2, 3 * 64 * 64))  # a header promising more rows than it holds
    with pytest.raises(ValueError, match="'data' ends after 0 of its 2 images"):
        list(read_npz_batch(tmp_path / "short.npz"))

    # polybyte shard: a counted skip with its limit, like an image file above it
    rc = cli.main(
        [
            "shard",
            "image",
            str(tmp_path / "batch.npz"),
            str(tmp_path / "bomb.npz"),
            "--out",
            str(tmp_path / "o"),
            "--size",
            "64",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "wrote 2 samples" in out and "1 skipped (1 above resource limits)" in out
    [entry] = read_manifest(tmp_path / "o")["skipped"]
    assert Path(entry["source"]).name == "bomb.npz" and entry["limit"] == "max_pixels"
    rc = cli.main(["shard", "image", str(tmp_path / "batch.npz"), "--out", str(tmp_path / "p"), "--max-pixels", "1e3"])
    assert rc == 1 and read_manifest(tmp_path / "p")["skipped"][0]["limit"] == "max_pixels"


# --- polybyte fit / validate --------------------------------------------------------------------
def _text_shards(folder: Path, docs: list[bytes]) -> Path:
    src = folder.with_name(folder.name + "-txt")
    src.mkdir(parents=True)
    for i, doc in enumerate(docs):
        (src / f"doc{i:02d}.txt").write_bytes(doc)
    write_shards("text", [src], folder, val_fraction=0.3, min_val=0)  # the hash's split: doc12 trains
    return folder


def _config(path: Path, run: Path, data: dict, **trainer) -> Path:
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
            "logger": [
                {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": str(run), "name": "csv"},
                }
            ],
            **trainer,
        },
        "checkpoint": {"every_n_train_steps": None, "save_top_k": 1},  # `last` at the end
        "model": {
            "model": {"backbone": "transformer", "dim": 32, "n_layers": 1, "n_heads": 4, "max_seq_len": 256},
            "lr": 1e-3,
            "warmup_steps": 1,
        },
        "data": {"seq_len": SEQ_LEN, "batch_size": 2, "num_workers": 0, "shuffle_buffer": 4, **data},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture
def mixed_data(tmp_path) -> dict:
    """Text shards (one document above max_member_bytes) and an all-bad image webdataset."""
    rng = np.random.default_rng(0)
    docs = [bytes(rng.integers(97, 123, 150, dtype=np.uint8)) for _ in range(12)] + [b"x" * 400]
    text = _text_shards(tmp_path / "text", docs)
    images = tmp_path / "images"
    images.mkdir()
    with wds.TarWriter(str(images / "part-0.tar")) as tar:
        for i in range(3):
            tar.write({"__key__": f"bad{i}", "png": b"\x89PNG\r\n\x1a\n truncated"})
    return {
        "sources": {"text": str(text), "image": str(images)},
        "val_sources": {"text": str(text), "image": str(images / "*.tar")},
        "weights": {"text": 1.0, "image": 0.0},
        "adapter_settings": {"image": {"size": SIZE}, "text": {"max_member_bytes": 300}},
        "max_skip_fraction": 0.5,
    }


def test_fit_and_validate_count_skips_and_refuse_an_all_bad_val_modality(mixed_data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    config = _config(tmp_path / "c.yaml", run, mixed_data, max_steps=12, val_check_interval=12)
    assert run_cli(["fit", "--config", str(config)], monkeypatch) == 0
    err = capsys.readouterr().err
    # fit: a full validation pass that scored no image is a warning (a limited pass may not reach it)
    assert "polybyte fit: warning: validation scored no image sample although the data has val shards" in err
    rows = metrics(run)
    keys = set().union(*rows)
    for key in (
        "data/skipped",
        *(f"data/skipped_{r}" for r in SKIP_REASONS),
        "val/skipped",
        *(f"val/skipped_{r}" for r in SKIP_REASONS),
    ):
        assert key in keys, key
    train = [r for r in rows if "data/skipped" in r]
    assert train[-1]["data/skipped_over_limit"] >= 1  # the 400-byte document, met in training
    assert train[-1]["data/skipped"] == train[-1]["data/skipped_over_limit"]
    (val,) = [r for r in rows if "val/skipped" in r]
    assert val["val/skipped_undecodable"] == 3 and "val/bpb_text" in val and "val/bpb_image" not in val

    # validate: the same is an error, one line, exit 2 (the pass's metrics are still written)
    ckpt = run / "checkpoints" / "last.ckpt"
    rc = run_cli(["validate", "--config", str(config), "--ckpt_path", str(ckpt)], monkeypatch)
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error" in ln]
    assert rc == 2 and "Traceback" not in err
    assert len(errors) == 1 and errors[0].startswith("polybyte validate: error: validation scored no image sample")
    assert "3 val samples were skipped (3 undecodable)" in errors[0]
    (val,) = [r for r in metrics(run) if "val/skipped" in r]
    assert val["val/skipped_undecodable"] == 3
    # limited on the command line, validation may never reach the images: no error then
    rc = run_cli(
        ["validate", "--config", str(config), "--ckpt_path", str(ckpt), "--trainer.limit_val_batches", "1"], monkeypatch
    )
    assert rc == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_all_bad_training_shard_stops_with_one_line_naming_it(workers, tmp_path, monkeypatch, capsys):
    images = tmp_path / "images"
    images.mkdir()
    with wds.TarWriter(str(images / "part-0.tar")) as tar:
        for i in range(4):
            tar.write({"__key__": f"bad{i}", "png": b"\x89PNG\r\n\x1a\n truncated"})
    data = {
        "sources": {"image": str(images)},
        "adapter_settings": {"image": {"size": SIZE}},
        "num_workers": workers,
        "min_seen_for_skip_check": 5,
    }
    config = _config(tmp_path / "c.yaml", tmp_path / "run", data)
    rc = run_cli(["fit", "--config", str(config)], monkeypatch)
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error" in ln]
    assert rc == 2 and "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]
    assert len(errors) == 1 and errors[0].startswith("polybyte fit: error: ")
    assert "could not be read" in errors[0] and f"shard {images / 'part-0.tar'}" in errors[0]


@pytest.mark.parametrize(
    "model, message",
    [
        ('{"dim": 32, "bogus": 1}', "unknown key 'bogus': not a field of any backbone"),
        ('{"dim": 32}', "model.model names no backbone (keys given: ['dim'])"),
        ('{"backbone": "transformer", "dim": 32, "n_layer": 1}', "unknown key 'n_layer' (did you mean 'n_layers'?)"),
        ('{"backbone": "transfomer"}', "model.model.backbone 'transfomer' is unknown"),
    ],
)
def test_stray_key_in_a_model_override_is_one_line(model, message, tmp_path, monkeypatch, capsys):
    config = _config(tmp_path / "c.yaml", tmp_path / "run", {"sources": {"image": str(tmp_path)}})
    rc = run_cli(["fit", "--config", str(config), "--model.model", model], monkeypatch)
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error" in ln]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("polybyte fit: error: ") and message in errors[0]
