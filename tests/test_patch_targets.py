"""Entropy patching with a threshold per modality in a fit (issue 14): `model.patch_targets`
calibrates each modality's threshold on its training windows at fit start; the thresholds reach
the export's config.json (so sampling patches alike), survive a resume without being
recalibrated, and a BLT without entropy patching or an unknown modality is one clear error."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from polybyte.models import patching
from polybyte.pipelines.data import ByteDataModule
from polybyte.pipelines.export import load_exported
from polybyte.pipelines.lit import ExportCheckpoint
from polybyte.pipelines.training import ByteLMModule

TEXT, IMAGE, AUDIO = 258, 259, 260
SEQ = 96
BLT = {
    "backbone": "blt",
    "max_seq_len": SEQ,
    "patcher": {"kind": "entropy", "patch_size": 3, "max_patch_len": 12, "max_patches_ratio": 2.0},
    "hash_ngrams": {"table_size": 97},
    "encoder": {"dim": 32, "n_layers": 1, "n_heads": 2, "window": 8},
    "latent": {"dim": 32, "n_layers": 1, "n_heads": 2},
    "decoder": {"dim": 32, "n_layers": 1, "n_heads": 2, "window": 8},
    "entropy_model": {"dim": 32, "n_layers": 1, "n_heads": 2, "window": 16, "max_seq_len": SEQ, "init_std": 0.5},
}
TARGETS = {"text": 2.5, "audio": 5.0}

pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(tmp_path, demo_shards, steps: int, ckpt_path=None, **module) -> tuple[ByteLMModule, ExportCheckpoint]:
    torch.manual_seed(0)
    net = ByteLMModule(model=BLT, lr=1e-3, warmup_steps=1, **module)
    sources = {m: str(demo_shards[m]) for m in ("text", "audio")}
    dm = ByteDataModule(sources=sources, seq_len=SEQ, batch_size=2, num_workers=0, shuffle_buffer=4)
    ckpt = ExportCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=steps, save_last=True)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        callbacks=[ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(net, dm, ckpt_path=ckpt_path)
    return net, ckpt


def test_fit_calibrates_a_threshold_per_modality_and_keeps_it(tmp_path, demo_shards, capsys):
    net, _ = _fit(tmp_path, demo_shards, 2, patch_targets=TARGETS)
    thresholds = net.model.config.patcher.thresholds
    assert set(thresholds) == {TEXT, AUDIO} and thresholds[TEXT] != thresholds[AUDIO]
    assert "patching: entropy thresholds per modality" in capsys.readouterr().out
    # on the calibration windows themselves each modality gets its own target mean
    dm = ByteDataModule(sources={m: str(demo_shards[m]) for m in TARGETS}, seq_len=SEQ, batch_size=2, num_workers=0)
    ids, tags = dm.calibration_batch(list(TARGETS))
    _, patch_ids = net.model.patch(ids, tags)
    for name, target in TARGETS.items():
        rows = tags == {"text": TEXT, "audio": AUDIO}[name]
        n_patches, n_bytes = patching.patch_counts(patch_ids[rows], ids[rows])
        assert abs(n_bytes.item() / n_patches.item() - target) < 0.15 * target
    # the export carries them (sampling reads its config.json), JSON keys back to tag ids
    exported = json.loads((tmp_path / "ck" / "last" / "config.json").read_text())
    assert {int(k): v for k, v in exported["model"]["patcher"]["thresholds"].items()} == thresholds
    assert load_exported(tmp_path / "ck" / "last")[0].config.patcher.thresholds == thresholds

    # a resume restores them from the checkpoint instead of calibrating again
    resumed, _ = _fit(tmp_path, demo_shards, 3, ckpt_path=str(tmp_path / "ck" / "last.ckpt"), patch_targets=TARGETS)
    assert resumed.model.config.patcher.thresholds == thresholds
    assert "patching: entropy thresholds" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("model", "targets", "message"),
    [
        ({**BLT, "patcher": {"kind": "space", "patch_size": 3}}, TARGETS, "needs a BLT with entropy patching"),
        (BLT, {"video": 4.0}, r"unknown modalities \['video'\]"),
        (BLT, {"image": 4.0}, r"names \['image'\] but no data source holds that modality"),
    ],
)
def test_patch_targets_errors_are_clear(model, targets, message, tmp_path, demo_shards, monkeypatch):
    monkeypatch.setitem(globals(), "BLT", model)
    with pytest.raises(ValueError, match=message):
        _fit(tmp_path, demo_shards, 1, patch_targets=targets)
