"""`polybyte demo`: the embedded dataset (built once, cached), the generated run config, and the
whole demo end to end (train a few steps, evaluate with codecs, sample, print the summary)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from PIL import Image

from polybyte.pipelines import cli
from polybyte.pipelines.data import ByteDataModule
from polybyte.pipelines.demo import DEMO_SETTINGS, demo_config, ensure_demo_shards
from polybyte.pipelines.lit import ByteLMModule

REPO = Path(__file__).resolve().parents[1]
HAS_SAMPLING = (REPO / "pipelines" / "sample.py").is_file()


def test_demo_shards_built_once_and_reused(demo_shards, capsys):
    ready = next(iter(demo_shards.values())).parents[1] / "ready.json"
    before = ready.stat().st_mtime_ns
    assert ensure_demo_shards() == demo_shards  # cached: not rebuilt, nothing printed
    assert ready.stat().st_mtime_ns == before and capsys.readouterr().out == ""
    counts = json.loads(ready.read_text())
    for modality, folder in demo_shards.items():
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["modality"] == modality
        assert {k: manifest["settings"][k] for k in DEMO_SETTINGS[modality]} == DEMO_SETTINGS[modality]
        assert counts[modality]["train"] > 50 and counts[modality]["val"] >= 10
        assert list(folder.glob("train-*.tar")) and list(folder.glob("val-*.tar"))


def test_demo_config_is_debug_yaml_redirected(demo_shards, tmp_path, monkeypatch):
    path = demo_config(tmp_path, 40, 1.5, demo_shards)
    cfg = yaml.safe_load(path.read_text())
    debug = yaml.safe_load((REPO / "configs" / "debug.yaml").read_text())
    assert cfg["model"] == debug["model"] and cfg["data"]["seq_len"] == debug["data"]["seq_len"]
    assert cfg["data"]["sources"] == {m: str(d) for m, d in demo_shards.items()}
    assert cfg["trainer"]["max_steps"] == 40 and cfg["trainer"]["val_check_interval"] == 10
    run = str(tmp_path / "run")
    assert cfg["trainer"]["default_root_dir"] == run
    assert all(lg["init_args"]["save_dir"] == run for lg in cfg["trainer"]["logger"])
    assert cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] == f"{run}/checkpoints"

    class ParseOnly(LightningCLI):
        def instantiate_classes(self) -> None:
            pass

    monkeypatch.setattr(sys, "argv", ["polybyte"])
    parsed = ParseOnly(ByteLMModule, ByteDataModule, run=False, args=["--config", str(path)]).config
    assert parsed.trainer.max_time == {"seconds": 90}  # the Trainer takes whole units only


@pytest.mark.parametrize("args", [["--steps", "0"], ["--minutes", "0"]])
def test_demo_refuses_non_positive_budget(args, tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path), *args]) == 2
    assert "must be positive" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())




def test_demo_end_to_end(demo_shards, tmp_path, capsys, one_thread):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--steps", "6", "--minutes", "1", "--samples", "2"]) == 0
    printed = capsys.readouterr().out
    summary = printed[printed.index("demo: done in") :]
    report = json.loads((out / "eval" / "report.json").read_text())
    for modality in ("text", "image", "audio"):
        entry = report["modalities"][modality]
        assert f"{modality:<6} model {entry['bpb']:.3f} bits/byte" in summary
        assert any("bpb" in r for r in entry["codecs"].values())  # with codecs
    ckpt = out / "run" / "checkpoints" / "last"
    assert (ckpt / "model.safetensors").is_file() and json.loads((ckpt / "config.json").read_text())["step"] == 6
    assert str(ckpt) in summary and str(out / "eval" / "report.md") in summary
    md = (out / "eval" / "report.md").read_text()
    assert all(f"## {m} (" in md for m in ("text", "image", "audio"))
    with Image.open(out / "eval" / "bpb.png") as im:
        assert im.format == "PNG"
    if not HAS_SAMPLING:
        return
    images = sorted((out / "samples" / "image").glob("image_*.png"))
    assert len(images) == 2 and str(out / "samples" / "image") in summary
    for path in images:
        with Image.open(path) as im:
            assert im.size == (DEMO_SETTINGS["image"]["size"],) * 2
    clips = sorted((out / "samples" / "audio").glob("*.wav"))
    assert clips and all(sf.info(str(c)).samplerate == DEMO_SETTINGS["audio"]["sample_rate"] for c in clips)
    assert sorted((out / "samples" / "text").glob("*.txt"))
