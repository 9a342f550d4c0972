"""The whole CLI path on one real image (issue 14): `polybyte shard` -> `fit` -> `sample`. A
model overfit to a single CIFAR-10 photo must greedily sample that photo back, every byte of
every pixel, colours included — shard order, tags, training windows, export and decoding all
have to agree for that to happen."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from polybyte.pipelines import cli

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "image" / "cifar10" / "train-000000.tar"
SIZE = 8  # the photo is sharded at 8x8: 192 payload bytes, memorised in seconds on a CPU

pytestmark = pytest.mark.skipif(not CIFAR.is_file(), reason="needs ../shared/data/image/cifar10")


def _one_photo(folder: Path) -> Path:
    """The first JPEG of the first CIFAR-10 shard, as the file a user would have."""
    folder.mkdir(parents=True)
    with tarfile.open(CIFAR) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        path = folder / Path(member.name).name
        path.write_bytes(tar.extractfile(member).read())
    return path


def _sharded_pixels(shards: Path) -> np.ndarray:
    """The pixels `polybyte shard` stored (the PNG member of the one train sample)."""
    (tar_path,) = sorted(shards.glob("train-*.tar"))
    with tarfile.open(tar_path) as tar:
        (member,) = [m for m in tar.getmembers() if m.name.endswith(".png")]
        return np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))


@pytest.mark.parametrize("order", ["raster", "patch2"])  # patch2: the order of the CIFAR-10 recipe
def test_model_overfit_to_one_photo_samples_it_back_exactly(order, tmp_path, monkeypatch):
    _one_photo(tmp_path / "photo")
    shards = tmp_path / "shards"
    argv = ["shard", "image", str(tmp_path / "photo"), "--out", str(shards), "--size", str(SIZE), "--order", order]
    argv += ["--val-fraction", "0"]
    assert cli.main(argv) == 0
    pixels = _sharded_pixels(shards)
    assert pixels.shape == (SIZE, SIZE, 3) and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # a photo

    run = tmp_path / "run"
    seq_len = 3 * SIZE * SIZE + 4  # the image, its EOS and room to spare: one sample per window
    config = {
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 80,
            "val_check_interval": 1000,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(run),
        },
        "checkpoint": {"every_n_train_steps": 80, "save_top_k": 1},
        "model": {
            "model": {"backbone": "transformer", "dim": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": seq_len},
            "lr": 1.0e-2,
            "warmup_steps": 10,
            "min_lr_ratio": 0.0,
        },
        "data": {"sources": {"image": str(shards)}, "seq_len": seq_len, "batch_size": 2, "num_workers": 0},
    }
    path = tmp_path / "overfit.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    monkeypatch.setattr("sys.argv", ["polybyte"])
    assert cli.main(["fit", "--config", str(path)]) == 0

    out = tmp_path / "samples"
    argv = ["sample", "--ckpt", str(run / "checkpoints" / "last"), "--modality", "image", "--num", "1"]
    assert cli.main([*argv, "--temperature", "0", "--out", str(out), "--device", "cpu", "--no-compile"]) == 0
    sampled = np.asarray(Image.open(out / "image_000.png").convert("RGB"))
    assert sampled.shape == pixels.shape
    assert np.array_equal(sampled, pixels), f"{int((sampled != pixels).any(-1).sum())} of {SIZE * SIZE} pixels differ"
