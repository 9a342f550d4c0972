"""Exports written before issue 13's restructure still load and compute the same logits: the
folders in tests/data/exports_0.1.0 were made by the code of commit 3158485 (see make.py there),
one small randomly initialised model per backbone, with that code's logits on fixed rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from polybyte.pipelines.export import load_exported

OLD = Path(__file__).parent / "data" / "exports_0.1.0"


@pytest.mark.parametrize("backbone", ["transformer", "megabyte", "blt"])
def test_export_from_before_the_restructure_loads_and_computes_the_same(backbone):
    expected = load_file(str(OLD / "expected.safetensors"))
    model, info = load_exported(OLD / backbone)
    assert model.backbone == backbone and info["model"]["backbone"] == backbone
    with torch.no_grad():
        logits = model(expected["ids"], expected["modality"])
    want = expected[f"{backbone}_logits"].float()
    assert logits.shape == want.shape
    assert (logits - want).abs().max() < 4e-3  # fp16 storage of the old logits
