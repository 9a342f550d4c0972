"""Checkpoints on disk (issue 12, items 3, 4 and 7), on CPU, with files made here.

- One checkpoint is one unit: a save interrupted anywhere (weights, config.json, the .ckpt)
  leaves every visible file as it was; a `.ckpt` whose export records another step is refused
  by `eval` and `sample` with one line naming both; a truncated `.ckpt` is one line and exit 2
  in `fit`, `validate` and `eval`.
- One run folder: `--trainer.default_root_dir` moves logs, checkpoints and exports together,
  and a fit refuses a folder holding another run's checkpoints unless it resumes from it.
- `validate` with no checkpoint found refuses instead of scoring an untrained model.
- kill -9 in the middle of a fit, then `--ckpt_path last`: the step count continues.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from test_lit import DEBUG_YAML, hand_batch, metrics, run_cli, series, tiny_module, write_config
from torch.utils.data import DataLoader

from polybyte.pipelines import cli, export, lit
from polybyte.pipelines.export import CONFIG, WEIGHTS, load_exported


# --- helpers ----------------------------------------------------------------------------------
def fit_tiny(folder: Path, steps: int, every: int, ckpt_path: str | None = None) -> None:
    """A tiny MEGABYTE fit on one hand-made batch, checkpoints in ``folder`` every ``every`` steps."""
    ckpt = lit.ExportCheckpoint(dirpath=folder, every_n_train_steps=every, save_last=True, save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        callbacks=[ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder.parent,
    )
    ids, modality = hand_batch()
    trainer.fit(
        tiny_module(), train_dataloaders=DataLoader([(ids, modality)] * steps, batch_size=None), ckpt_path=ckpt_path
    )


def visible(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` that a reader would look at (hidden working names left out),
    with a hash of its bytes."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in files
        if not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


def ckpt_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def one_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if "error" in ln]
    assert len(lines) == 1 and lines[0].startswith(f"polybyte {command}: error: "), err
    return lines[0]


class Interrupted(Exception):
    """Stands for a kill at this point of a save."""


# --- one checkpoint, one unit -------------------------------------------------------------------
@pytest.mark.parametrize("where", ["weights", "config.json", "ckpt"])
def test_interrupted_save_leaves_every_visible_file_as_it_was(where, tmp_path, monkeypatch):
    folder = tmp_path / "ck"
    fit_tiny(folder, steps=2, every=2)
    before = visible(folder)
    assert ckpt_step(folder / "last.ckpt") == 2 and json.loads((folder / "last" / CONFIG).read_text())["step"] == 2

    def half_then_stop(path, data: bytes):
        Path(path).write_bytes(data[: len(data) // 2])  # what a kill mid-write leaves
        raise Interrupted(where)

    if where == "weights":
        monkeypatch.setattr(export, "save_file", lambda state, path: half_then_stop(path, b"\0" * 4096))
    elif where == "config.json":
        write_text = Path.write_text
        monkeypatch.setattr(
            Path,
            "write_text",
            lambda self, text, *a, **k: (
                half_then_stop(self, text.encode()) if self.name == CONFIG else write_text(self, text, *a, **k)
            ),
        )
    else:
        import lightning.fabric.plugins.io.torch_io as torch_io

        monkeypatch.setattr(torch_io, "_atomic_save", lambda checkpoint, path: half_then_stop(path, b"PK" * 4096))
    with pytest.raises(Interrupted):
        fit_tiny(folder, steps=4, every=2, ckpt_path=str(folder / "last.ckpt"))  # the step-4 save is cut short
    after = visible(folder)
    if where == "ckpt":  # the export is written first: step 4's export may stand, without its .ckpt
        assert {k: v for k, v in after.items() if "step=4/" not in k} == before
        assert not list(folder.glob("*step=4.ckpt"))
    else:
        assert after == before  # no torn weights or config.json, no .ckpt without its export
    assert ckpt_step(folder / "last.ckpt") == 2
    assert load_exported(folder / "last.ckpt")[1]["step"] == 2  # still one matching pair
    monkeypatch.undo()
    fit_tiny(folder, steps=4, every=2, ckpt_path=str(folder / "last.ckpt"))  # the next save cleans up
    assert load_exported(folder / "last.ckpt")[1]["step"] == 4
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no working copies left


@pytest.fixture
def torn(tmp_path) -> Path:
    """``last.ckpt`` at step 2 beside a ``last/`` export from step 1: the pair a kill between the
    two writes of one save leaves."""
    folder = tmp_path / "ck"
    fit_tiny(folder, steps=2, every=1)
    shutil.rmtree(folder / "last")
    shutil.copytree(folder / "epoch=0-step=1", folder / "last")
    return folder


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_ckpt_whose_export_has_another_step_is_refused(torn, command, tmp_path, capsys):
    ckpt = torn / "last.ckpt"
    args = {
        "eval": ["--data", f"text={tmp_path}", "--out", str(tmp_path / "report")],
        "sample": ["--modality", "text", "--num", "1", "--out", str(tmp_path / "samples")],
    }[command]
    assert cli.main([command, "--ckpt", str(ckpt), "--device", "cpu", *args]) == 2
    line = one_error(capsys, command)
    assert str(ckpt) in line and str(torn / "last" / CONFIG) in line
    assert "step 2" in line and "step 1" in line
    assert not (tmp_path / "report").exists() and not (tmp_path / "samples").exists()
    assert load_exported(torn / "last")[1]["step"] == 1  # the folder itself is a consistent export


def test_export_records_its_step(tmp_path):
    fit_tiny(tmp_path / "ck", steps=3, every=2)
    for name, step in [("epoch=0-step=2", 2), ("last", 3)]:
        assert json.loads((tmp_path / "ck" / name / CONFIG).read_text())["step"] == step
        assert ckpt_step(tmp_path / "ck" / f"{name}.ckpt") == step


@pytest.fixture
def truncated(tmp_path) -> Path:
    """A run folder whose ``last.ckpt`` was cut in half; its ``last/`` export is intact."""
    folder = tmp_path / "run" / "checkpoints"
    fit_tiny(folder, steps=2, every=2)
    ckpt = folder / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    return ckpt


def test_eval_refuses_truncated_ckpt(truncated, tmp_path, capsys):
    args = ["eval", "--ckpt", str(truncated), "--data", f"text={tmp_path}", "--out", str(tmp_path / "r")]
    assert cli.main(args) == 2
    assert str(truncated) in one_error(capsys, "eval")


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_fit_and_validate_refuse_truncated_ckpt_path(command, truncated, demo_shards, tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path / "debug.yaml", tmp_path / "other", steps=2, val_every=100, ckpt_every=100)
    args = [command, "--config", str(config), "--data.num_workers", "0", "--ckpt_path", str(truncated)]
    assert run_cli(args, monkeypatch) == 2
    line = one_error(capsys, command)
    assert str(truncated) in line and "truncated" in line


# --- one run folder ----------------------------------------------------------------------------
def debug_fit(*extra: str) -> list[str]:
    """configs/debug.yaml as shipped, two steps, no loader processes."""
    return [
        "fit",
        "--config",
        str(DEBUG_YAML),
        "--trainer.max_steps",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--data.num_workers",
        "0",
        *extra,
    ]


def test_default_root_dir_moves_logs_checkpoints_and_exports(demo_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli(debug_fit("--trainer.default_root_dir", "runs/exp2"), monkeypatch) == 0
    assert not (tmp_path / "runs" / "debug").exists()  # nothing in the config's own folder
    run = tmp_path / "runs" / "exp2"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "csv", "tb"]
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "checkpoints" / "last" / WEIGHTS).is_file()
    assert load_exported(run / "checkpoints" / "last.ckpt")[1]["step"] == 2
    assert list((run / "tb").glob("version_0/events.out.tfevents.*"))
    assert list((run / "tb").glob("version_0/config.yaml"))
    assert (run / "csv" / "version_0").is_dir()
    written = visible(run)

    # the same folder again, not resuming: refused, nothing written
    assert run_cli(debug_fit("--trainer.default_root_dir", "runs/exp2"), monkeypatch) == 2
    line = one_error(capsys, "fit")
    assert str(run / "checkpoints") in line and "last.ckpt" in line and "--ckpt_path last" in line
    # resuming from a checkpoint of another run into it: refused too
    fit_tiny(tmp_path / "elsewhere" / "checkpoints", steps=1, every=1)
    other = tmp_path / "elsewhere" / "checkpoints" / "last.ckpt"
    assert run_cli(debug_fit("--trainer.default_root_dir", "runs/exp2", "--ckpt_path", str(other)), monkeypatch) == 2
    assert str(other) in one_error(capsys, "fit")
    assert visible(run) == written

    # resuming it: allowed, and the run goes on in the same folder
    assert (
        run_cli(
            debug_fit("--trainer.default_root_dir", "runs/exp2", "--ckpt_path", "last", "--trainer.max_steps", "3"),
            monkeypatch,
        )
        == 0
    )
    assert load_exported(run / "checkpoints" / "last.ckpt")[1]["step"] == 3
    assert sorted(p.name for p in (run / "csv").iterdir()) == ["version_0", "version_1"]


# --- no checkpoint, no validation ----------------------------------------------------------------
@pytest.mark.parametrize("ckpt_path", [["--ckpt_path", "last"], []], ids=["last", "none"])
def test_validate_without_a_checkpoint_refuses(ckpt_path, demo_shards, tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path / "debug.yaml", tmp_path / "run", steps=2, val_every=100, ckpt_every=100)
    assert run_cli(["validate", "--config", str(config), "--data.num_workers", "0", *ckpt_path], monkeypatch) == 2
    line = one_error(capsys, "validate")
    assert str(tmp_path / "run" / "checkpoints") in line and "last" in line
    assert not (tmp_path / "run").exists()  # nothing scored, nothing logged


def test_eval_without_a_checkpoint_refuses(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert cli.main(["eval", "--ckpt", str(ckpt), "--data", f"text={tmp_path}", "--out", str(tmp_path / "r")]) == 2
    assert str(ckpt) in one_error(capsys, "eval")


# --- kill -9 mid-run, then resume ------------------------------------------------------------------
def test_kill_9_mid_fit_then_resume_continues_the_step_count(demo_shards, tmp_path, monkeypatch):
    run = tmp_path / "run"
    config = write_config(tmp_path / "debug.yaml", run, steps=10_000, val_every=10_000, ckpt_every=4)
    ckpts = run / "checkpoints"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "polybyte.pipelines.cli", "fit", "--config", str(config), "--data.num_workers", "0"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:  # a periodic checkpoint, then a few steps more
            if (ckpts / "epoch=0-step=4.ckpt").exists() and (run / "csv").exists():
                if max((s for s, _ in series(metrics(run), "train/loss")), default=0) >= 6:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    reached = max(s for s, _ in series(metrics(run), "train/loss")) + 1  # steps done when it was killed
    saved = ckpt_step(ckpts / "last.ckpt")  # the last save that completed (every 4 steps)
    assert saved >= 4 and saved % 4 == 0 and saved <= reached

    rc = run_cli(
        [
            "fit",
            "--config",
            str(config),
            "--data.num_workers",
            "0",
            "--ckpt_path",
            "last",
            "--trainer.max_steps",
            str(saved + 3),
        ],
        monkeypatch,
    )
    assert rc == 0
    assert [s for s, _ in series(metrics(run), "train/loss")] == [saved, saved + 1, saved + 2]  # not from 0
    assert ckpt_step(ckpts / "last.ckpt") == saved + 3
    assert load_exported(ckpts / "last.ckpt")[1]["step"] == saved + 3  # the pair matches again
