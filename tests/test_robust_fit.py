"""Reliability of `polybyte fit` (issue 12): divergence and stop signals, on CPU.

A fit whose loss turns NaN skips and counts those steps, then stops with exit 2 and one line,
its last checkpoint left with finite weights; `eval` and `sample` refuse a non-finite export. A fit
sent SIGTERM saves `last` at the step reached, exits 143, and `--ckpt_path last` continues it.
"""

from __future__ import annotations

import io
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
from lightning.pytorch.utilities.exceptions import SIGTERMException
from safetensors.torch import load_file, save_file
from test_lit import hand_batch, metrics, run_cli, series, tiny_module, write_config
from torch.utils.data import DataLoader

from polybyte.pipelines import cli, lit
from polybyte.pipelines.export import WEIGHTS, load_exported


def finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


@pytest.fixture(scope="module")
def diverged(demo_shards, tmp_path_factory):
    """A fit at lr 1e6 (no warm-up): checkpoints every 2 steps until it stops."""
    root = tmp_path_factory.mktemp("diverge")
    run = root / "run"
    config = write_config(root / "debug.yaml", run, steps=40, val_every=1000, ckpt_every=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stderr", stderr := io.StringIO())
        rc = run_cli(
            [
                "fit",
                "--config",
                str(config),
                "--model.lr",
                "1e6",
                "--model.warmup_steps",
                "0",
                "--data.num_workers",
                "0",
            ],
            mp,
        )
    return {"root": root, "run": run, "rc": rc, "stderr": stderr.getvalue()}


def test_diverged_fit_stops_with_exit_2_and_one_line(diverged):
    assert diverged["rc"] == 2
    errors = [line for line in diverged["stderr"].splitlines() if line.startswith("polybyte fit: error:")]
    assert len(errors) == 1 and "NaN/Inf for 5 steps in a row" in errors[0]
    assert "Traceback" not in diverged["stderr"]


def test_diverged_fit_counts_skipped_steps_and_keeps_finite_checkpoint(diverged):
    run = diverged["run"]
    counted = series(metrics(run), "train/nonfinite_steps")
    assert counted[-1][1] >= 5  # the run of 5 that stopped it, at least
    assert counted[0][1] == 0  # the first steps were finite
    assert max(s for s, _ in counted) < 39  # stopped long before max_steps
    ckpts = run / "checkpoints"
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert finite(last["state_dict"])
    assert last["nonfinite_steps"] <= counted[-1][1]
    # skipped on the device: AdamW's step count (and moments) advanced only on the good steps
    adam_steps = {float(st["step"]) for st in last["optimizer_states"][0]["state"].values()}
    assert adam_steps == {float(last["global_step"] - last["nonfinite_steps"])}
    assert finite(load_file(ckpts / "last" / WEIGHTS))
    load_exported(ckpts / "last")  # loads: finite


def test_export_checkpoint_refuses_nonfinite_weights(tmp_path):
    ids, modality = hand_batch()
    ckpt = lit.ExportCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_last=True)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        callbacks=[ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    module = tiny_module()
    trainer.fit(module, train_dataloaders=DataLoader([(ids, modality)], batch_size=None))
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ck").rglob("*")}
    with torch.no_grad():
        next(module.parameters()).fill_(float("nan"))
    with pytest.raises(lit.NonFiniteWeightsError, match="NaN/Inf"):
        ckpt._save_checkpoint(trainer, str(tmp_path / "ck" / "last.ckpt"))
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ck").rglob("*")} == before  # nothing written
    assert finite(load_file(tmp_path / "ck" / "last" / WEIGHTS))


@pytest.fixture
def nan_export(diverged, tmp_path):
    """A copy of the diverged run's `last` export with one weight set to NaN."""
    folder = shutil.copytree(diverged["run"] / "checkpoints" / "last", tmp_path / "nan")
    state = load_file(folder / WEIGHTS)
    name = sorted(state)[0]
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(folder / WEIGHTS))
    return folder


def test_eval_refuses_nonfinite_export(nan_export, demo_shards, tmp_path, capsys):
    rc = cli.main(
        [
            "eval",
            "--ckpt",
            str(nan_export),
            "--data",
            f"text={demo_shards['text']}",
            "--out",
            str(tmp_path / "report"),
            "--max-samples",
            "1",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("polybyte eval: error:") and str(nan_export / WEIGHTS) in err[0]
    assert "NaN/Inf" in err[0]


def test_sample_refuses_nonfinite_export(nan_export, tmp_path, capsys):
    rc = cli.main(
        [
            "sample",
            "--ckpt",
            str(nan_export),
            "--modality",
            "text",
            "--max-bytes",
            "4",
            "--out",
            str(tmp_path / "samples"),
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("polybyte sample: error:") and str(nan_export / WEIGHTS) in err[0]
    assert not (tmp_path / "samples").exists()


def stop_fit_with_sigterm(tmp_path, workers: int, whole_group: bool, val_every: int) -> tuple[Path, int, str]:
    """Start a debug fit in a subprocess, SIGTERM it (or its whole process group, loader workers
    included, as `timeout` and SLURM do) after 3 steps; (run, exit status, stderr). No process of
    the group outlives the fit by more than 10 s."""
    run = tmp_path / "run"
    # metrics.csv is flushed at every logging step (each step here): it shows the steps as they go
    config = write_config(tmp_path / "debug.yaml", run, steps=10_000, val_every=val_every, ckpt_every=10_000)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "polybyte.pipelines.cli", "fit", "--config", str(config)]
    cmd += ["--data.num_workers", str(workers)]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            csvs = list((run / "csv").glob("version_*/metrics.csv"))
            if csvs and len(series(metrics(run), "train/loss")) >= 3:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        if whole_group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and group_alive(proc.pid):
            time.sleep(0.1)
        assert not group_alive(proc.pid), "loader workers outlived the fit"
    finally:
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    return run, proc.returncode, stderr


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_stopped_with_last_saved(run: Path, rc: int, stderr: str) -> int:
    """The fit exited 143 with its one line and saved `last` at the step reached; that step."""
    assert rc == 128 + signal.SIGTERM, stderr[-3000:]
    assert "polybyte fit: stopped by SIGTERM; `last` checkpoint saved, resume with --ckpt_path last" in stderr
    assert "Traceback" not in stderr, stderr[-3000:]
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last", "last.ckpt"]  # saved on the signal
    reached = series(metrics(run), "train/loss")[-1][0] + 1  # steps done when it stopped
    step = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert step == reached >= 3
    assert load_exported(ckpts / "last")[1]["step"] == step
    return step


def test_sigterm_to_the_process_group_spares_the_loader_workers(demo_shards, tmp_path):
    # Without the workers ignoring it, SIGTERM killed them mid-batch and the fit died with
    # "DataLoader worker ... is killed by signal: Terminated", its last steps unsaved. Validation
    # runs before the signal: after it, a worker that ignored every SIGTERM, its parent's too, hung
    # the exit (multiprocessing terminates and joins the training loader's workers at exit).
    run, rc, stderr = stop_fit_with_sigterm(tmp_path, workers=2, whole_group=True, val_every=2)
    assert_stopped_with_last_saved(run, rc, stderr)


def test_sigterm_saves_last_and_resume_continues(demo_shards, tmp_path, monkeypatch):
    run, rc, stderr = stop_fit_with_sigterm(tmp_path, workers=0, whole_group=False, val_every=10_000)
    step = assert_stopped_with_last_saved(run, rc, stderr)
    config, ckpts = tmp_path / "debug.yaml", run / "checkpoints"

    rc = run_cli(
        [
            "fit",
            "--config",
            str(config),
            "--ckpt_path",
            "last",
            "--trainer.max_steps",
            str(step + 3),
            "--data.num_workers",
            "0",
        ],
        monkeypatch,
    )
    assert rc == 0
    assert load_exported(ckpts / "last")[1]["step"] == step + 3
    assert [s for s, _ in series(metrics(run), "train/loss")] == [step, step + 1, step + 2]


class SignalAt(L.Callback):
    """Sends ``signum`` to this process at the end of training step ``step``."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1])
def test_sigint_and_sigusr1_save_last_at_step_reached(signum, tmp_path):
    before = signal.getsignal(signum)
    ids, modality = hand_batch()
    ckpt = lit.ExportCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=100, save_last=True)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=10,
        logger=False,
        callbacks=[ckpt, SignalAt(signum, 3)],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(SIGTERMException):
        trainer.fit(tiny_module(), train_dataloaders=DataLoader([(ids, modality)] * 10, batch_size=None))
    assert ckpt.received_signal == signum  # polybyte fit exits with 128 + signum
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["last", "last.ckpt"]
    assert torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)["global_step"] == 3
    assert load_exported(tmp_path / "ck" / "last")[1]["step"] == 3
    assert signal.getsignal(signum) == before  # handlers restored after the run


def test_main_exits_with_the_signal_its_checkpoint_callback_received(monkeypatch, capsys):
    """`main` reads the stop signal from the run's ExportCheckpoint (no module state): 128 + it."""

    class StoppedCLI:
        def __init__(self, *args, trainers, **kwargs) -> None:
            ckpt = lit.ExportCheckpoint()
            ckpt.received_signal = signal.SIGUSR1
            trainers.append(L.Trainer(accelerator="cpu", logger=False, callbacks=[ckpt], enable_progress_bar=False))
            raise SIGTERMException

    monkeypatch.setattr(lit, "PolybyteCLI", StoppedCLI)
    assert lit.main(["fit"]) == 128 + signal.SIGUSR1
    assert "polybyte fit: stopped by SIGUSR1" in capsys.readouterr().err
