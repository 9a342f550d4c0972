"""Checkpoint export without pickles: ``DIR/model.safetensors`` + ``DIR/config.json``.

`config.json` holds the backbone config (``{"backbone": ..., fields}``), the modality adapter
settings the model was trained with (``{"text": {...}, "image": {...}}``) and a few facts about
the run (step, seq_len). `eval` and `sample` rebuild everything from these two files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from polybyte.models import ByteLM, build_model, config_to_dict

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_exported(
    out_dir,
    model: ByteLM,
    modalities: dict[str, dict],
    extra: dict[str, Any] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model``'s weights (or ``state``, e.g. gathered from FSDP shards) and config."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared storage (tied weights): save each tensor contiguous on its own.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in (state or model.state_dict()).items()}
    save_file(state, str(out / WEIGHTS))
    info = {"model": config_to_dict(model.config), "modalities": modalities, **(extra or {})}
    (out / CONFIG).write_text(json.dumps(info, indent=2, sort_keys=True))
    return out


def resolve(path) -> Path:
    """Accept an export folder, a folder's model.safetensors, or a Lightning ``X.ckpt`` (-> ``X/``)."""
    p = Path(path)
    if p.suffix == ".ckpt":
        p = p.with_suffix("")
    if p.is_file() and p.name == WEIGHTS:
        p = p.parent
    if not (p / WEIGHTS).is_file() or not (p / CONFIG).is_file():
        raise FileNotFoundError(
            f"{path}: no {WEIGHTS} + {CONFIG} found; pass a checkpoint folder written by `polybyte fit` "
            f"(e.g. runs/NAME/checkpoints/last) or its .ckpt file"
        )
    return p


def load_exported(path, device: str | torch.device = "cpu") -> tuple[ByteLM, dict[str, Any]]:
    """Rebuild the model from an export folder; returns (model in eval mode, config.json dict).

    Raises ValueError, naming the file, for an unreadable or invalid config.json, an unreadable
    model.safetensors, weights unlike the config, or NaN/Inf weights (a diverged run).
    """
    folder = resolve(path)
    config, weights = folder / CONFIG, folder / WEIGHTS
    try:  # a torn, hand-edited or foreign config.json: one ValueError naming the file
        info = json.loads(config.read_text())
        model = build_model(dict(info["model"]))
    except Exception as e:  # noqa: BLE001 — any layer constructor may reject a bad field
        raise ValueError(f"{config}: not a valid polybyte export config ({_one_line(e)})") from None
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as e:  # empty, truncated or not safetensors at all
        raise ValueError(f"{weights}: unreadable safetensors file ({_one_line(e)})") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"{weights}: {len(bad)} of {len(state)} tensors hold NaN/Inf (e.g. {bad[0]}); "
            f"the run that wrote it diverged, use an earlier checkpoint"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # missing/unexpected tensors or shapes unlike the config's dims
        raise ValueError(f"{weights} does not match {config} ({_one_line(e)})") from None
    return model.to(device).eval(), info


def _one_line(e: Exception, limit: int = 300) -> str:
    """An exception as one short line: its type and whitespace-collapsed message."""
    text = " ".join(str(e).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
