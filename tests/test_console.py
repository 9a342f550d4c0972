"""What `polybyte fit` and `polybyte eval` print (pipelines/console.py, val_samples.py, the
schedule notice and throughput of training.py, eval's bars), on the debug MEGABYTE.

One 4-step fit runs in a subprocess, as a user runs it, with the default progress bar, model
summary and TensorBoard logger; its stdout, stderr and TensorBoard events are checked, then it
is resumed with another max_steps.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count
from rich.console import Console
from test_lit import head_shards, metrics, run_cli, series, tiny_module, tiny_trainer, write_config
from torch.utils.data import DataLoader

from polybyte.pipelines import console, runtime, training
from polybyte.pipelines.evaluate import evaluate
from polybyte.pipelines.evaluate import main as eval_main
from polybyte.pipelines.optim import lr_factor, schedule_notice
from polybyte.pipelines.runtime import shipped_config
from polybyte.pipelines.training import ByteLMModule

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
VAL = {"text": 1, "image": 2, "audio": 1}


@pytest.fixture(scope="module")
def fit(demo_shards, tmp_path_factory):
    """configs/debug.yaml for 4 steps (warm-up 1, validation at steps 2 and 4), run by the
    `polybyte` entry point in a fresh interpreter."""
    root = tmp_path_factory.mktemp("console")
    run = root / "run"
    val = head_shards(demo_shards, root / "val", VAL)
    config = write_config(
        root / "debug.yaml",
        run,
        steps=STEPS,
        val_every=2,
        ckpt_every=2,
        sources={m: str(d) for m, d in demo_shards.items()},
        val_sources={m: str(d) for m, d in val.items()},
    )
    cfg = yaml.safe_load(config.read_text())
    for key in ("enable_progress_bar", "enable_model_summary"):  # Lightning's defaults: on
        del cfg["trainer"][key]
    cfg["trainer"]["limit_val_batches"] = 1
    cfg["data"]["num_workers"] = 0
    cfg["model"].update(warmup_steps=1, val_samples=2)
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "polybyte.pipelines.cli", "fit", "--config", str(config)]
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"run": run, "config": config, "cfg": cfg, "out": done.stdout, "err": done.stderr, "val": val}


def test_fit_prints_no_lightning_tips_or_deprecation_warnings(fit):
    text = fit["out"] + fit["err"]
    assert "`Trainer.fit` stopped: `max_steps=4` reached" in fit["err"]  # Lightning's own info stays
    for noise in ("💡", "litlogger", "litmodels", "LeafSpec", "FutureWarning", "DeprecationWarning"):
        assert noise not in text, noise


def test_fit_summary_shows_the_models_flops(fit):
    module = ByteLMModule(fit["cfg"]["model"]["model"])
    data = fit["cfg"]["data"]
    flops = module.model.flops_per_byte() * data["batch_size"] * data["seq_len"]
    shown = get_human_readable_count(int(flops))
    assert flops > 1e9 and shown != "0"
    (row,) = [line for line in fit["out"].splitlines() if "│ model" in line]
    assert "Megabyte" in row and shown in row and get_human_readable_count(module.model.num_params()) in row
    assert f"Total FLOPs: {shown}" in fit["out"]
    assert f"FLOPs: per training step of {data['batch_size']} × {data['seq_len']} bytes" in fit["out"]


def test_fit_progress_bar_counts_steps_with_loss_and_bytes_per_s(fit):
    (line,) = [ln for ln in fit["out"].splitlines() if f"step {STEPS}/{STEPS}" in ln]
    assert " loss " in line and " bytes/s " in line, line
    assert "Epoch" not in fit["out"] and "v_num" not in fit["out"]


def test_validation_logs_image_and_audio_samples_to_tensorboard(fit):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (path,) = glob.glob(str(fit["run"] / "tb" / "version_0" / "events.out.tfevents.*"))
    events = EventAccumulator(path, size_guidance={"images": 0, "audio": 0})
    events.Reload()
    assert events.Tags()["images"] == ["samples/image"]
    assert sorted(events.Tags()["audio"]) == ["samples/audio/0", "samples/audio/1"]
    images = events.Images("samples/image")
    assert [e.step for e in images] == [2, 4]  # one per validation
    assert images[0].width == 2 * images[0].height  # two square images side by side
    (first, _) = events.Audio("samples/audio/0")
    assert first.sample_rate == 8000 and first.length_frames > 100


def test_resume_with_other_max_steps_says_how_the_schedule_changes(fit, monkeypatch, capsys):
    args = ["fit", "--config", str(fit["config"]), "--ckpt_path", "last", "--trainer.max_steps", str(STEPS + 2)]
    assert run_cli([*args, "--model.val_samples", "0", "--trainer.enable_progress_bar", "false"], monkeypatch) == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "polybyte fit: note" in ln]
    defaults = yaml.safe_load(shipped_config("defaults.yaml").read_text())["model"]  # under every config
    lr, floor = fit["cfg"]["model"]["lr"], fit["cfg"]["model"].get("min_lr_ratio", defaults["min_lr_ratio"])
    new, old = lr * lr_factor(STEPS + 1, STEPS + 2, 1, floor), lr * lr_factor(STEPS + 1, STEPS, 1, floor)
    assert notes == [
        f"polybyte fit: note: resuming at step {STEPS} with another LR schedule than the checkpoint's "
        f"(max_steps {STEPS} -> {STEPS + 2}): it is recomputed for the new values, not continued: from "
        f"step {STEPS + 1} the LR is {new:.3g} (on the checkpoint's schedule: {old:.3g}), warm-up 1 steps, "
        f"cosine down to {lr * floor:.3g} at step {STEPS + 2}"
    ]
    logged = dict(series(metrics(fit["run"]), "lr"))
    assert logged[STEPS + 1] == pytest.approx(new) and new > 1.5 * old  # what the note says happened


def test_schedule_notice_only_for_a_changed_schedule():
    hp = SimpleNamespace(lr=1e-3, min_lr_ratio=0.1)
    same = {"max_steps": 10, "warmup_steps": 2}
    assert schedule_notice(same, dict(same), 5, hp) is None
    assert schedule_notice(None, same, 5, hp) is None  # a fresh fit
    assert schedule_notice({"max_steps": None, "warmup_steps": 2}, same, 5, hp) is None  # length unknown
    line = schedule_notice({"max_steps": 10, "warmup_steps": 4}, same, 5, hp)
    assert "(warmup_steps 4 -> 2)" in line and "max_steps 10 ->" not in line


def test_mfu_logged_against_the_peak(monkeypatch, tmp_path):
    """perf/mfu = training FLOPs per byte × bytes/s / peak, through Lightning's Throughput."""
    from test_lit import hand_batch

    monkeypatch.setattr(training, "device_peak_flops", lambda device, dtype: 1e9)
    module = tiny_module()
    batches = [hand_batch()] * 5
    tiny_trainer(tmp_path, steps=5, log_every=2).fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    rows = [r for r in metrics(tmp_path) if "perf/mfu" in r]
    assert [int(r["step"]) for r in rows] == [3]  # the first logging step (1) only starts the clock
    (row,) = rows
    assert row["perf/mfu"] == pytest.approx(module.model.flops_per_byte() * row["perf/bytes_per_s"] / 1e9, rel=1e-6)


@pytest.mark.parametrize(
    "name, dtype, peak",
    [
        ("NVIDIA H200", torch.bfloat16, 989.4e12),  # Lightning 2.6.6 knows no plain "NVIDIA H200"
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4e12),  # Lightning's own table
        ("NVIDIA L40S", torch.bfloat16, 362.1e12),  # Lightning reads it as an L4
    ],
)
def test_device_peak_flops(name, dtype, peak, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert runtime.device_peak_flops(torch.device("cuda"), dtype) == pytest.approx(peak)
    assert runtime.device_peak_flops(torch.device("cpu"), dtype) is None


def test_install_replaces_only_lightnings_defaults():
    trainer = L.Trainer(logger=False, enable_checkpointing=False)
    assert isinstance(trainer.progress_bar_callback, RichProgressBar)
    console.install(trainer, [])
    assert isinstance(trainer.progress_bar_callback, console.StepProgressBar)
    assert [type(c) for c in trainer.callbacks if isinstance(c, ModelSummary)] == [console.ByteLMSummary]
    own = TQDMProgressBar()
    trainer = L.Trainer(logger=False, enable_checkpointing=False, callbacks=[own], enable_model_summary=False)
    console.install(trainer, [own])
    assert trainer.progress_bar_callback is own and not any(isinstance(c, ModelSummary) for c in trainer.callbacks)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    console.install(trainer, [])
    assert trainer.progress_bar_callback is None


def test_eval_shows_progress_per_source(fit, tmp_path, capsys, monkeypatch):
    ckpt = fit["run"] / "checkpoints" / "last"
    data = [f"{m}={d}" for m, d in fit["val"].items()]
    report = evaluate(ckpt, data, tmp_path / "a", progress=True)
    err = capsys.readouterr().err
    for name, entry in report["modalities"].items():
        n, total = entry["samples"], entry["payload_bytes"]
        assert any(f"{name}: reading" in ln and f"{n}/{n} samples" in ln for ln in err.splitlines()), err
        assert any(f"{name}: scoring" in ln and f"{total}/{total} bytes" in ln for ln in err.splitlines()), err
    image = [f"image={fit['val']['image']}"]
    assert eval_main(["--ckpt", str(ckpt), "--data", *image, "--out", str(tmp_path / "b")]) == 0
    assert "reading" not in capsys.readouterr().err  # not a terminal: no bars
    monkeypatch.setattr(Console, "is_terminal", property(lambda self: True))
    assert eval_main(["--ckpt", str(ckpt), "--data", *image, "--out", str(tmp_path / "c")]) == 0
    assert "image: scoring" in capsys.readouterr().err
    assert eval_main(["--ckpt", str(ckpt), "--data", *image, "--out", str(tmp_path / "d"), "--quiet"]) == 0
    assert "reading" not in capsys.readouterr().err
