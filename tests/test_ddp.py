"""Two-process DDP on CPU (gloo): `polybyte fit` and `polybyte validate` with devices=2.

Each rank streams its own shards; validation splits the val set between the ranks and
all-reduces the per-modality sums, so its BPB must equal `polybyte eval` on one process.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
from test_lit import head_shards, write_config

from polybyte.pipelines.evaluate import evaluate
from polybyte.pipelines.export import load_exported

VAL_SAMPLES = {"text": 2, "image": 3, "audio": 3}


def polybyte(*args: str, cwd) -> subprocess.CompletedProcess:
    # Lightning's DDP launcher re-runs this very command line for rank 1.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "polybyte.pipelines.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def last_metrics(run) -> dict[str, float]:
    versions = sorted((run / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    with open(versions[-1] / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    merged: dict[str, float] = {}
    for row in rows:
        merged.update({k: float(v) for k, v in row.items() if v != ""})
    return merged


def test_ddp_two_processes_fit_and_validate_like_one(demo_shards, tmp_path):
    run = tmp_path / "run"
    val = head_shards(demo_shards, tmp_path / "val", VAL_SAMPLES)
    config = write_config(
        tmp_path / "ddp.yaml", run, steps=6, val_every=3, ckpt_every=3, val_sources={m: str(d) for m, d in val.items()}
    )
    ddp = [
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--data.num_workers",
        "0",
        "--data.batch_size",
        "2",
    ]
    fit = polybyte("fit", "--config", str(config), *ddp, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    export = run / "checkpoints" / "last"
    model, info = load_exported(export)  # a DDP checkpoint loads on one device
    assert info["step"] == 6

    check = polybyte(
        "validate", "--config", str(config), *ddp, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), cwd=tmp_path
    )
    assert check.returncode == 0, check.stderr[-3000:]
    logged = last_metrics(run)
    report = evaluate(export, [f"{m}={d}" for m, d in val.items()], tmp_path / "eval", device="cpu")
    for modality, entry in report["modalities"].items():
        assert logged[f"val/bpb_{modality}"] == pytest.approx(entry["bpb"], abs=1e-3)
