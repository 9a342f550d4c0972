"""Checkpoint export without pickles: ``DIR/model.safetensors`` + ``DIR/config.json`` + ``DIR/README.md``.

`config.json` holds the backbone config (``{"backbone": ..., fields}``), the modality adapter
settings the model was trained with (``{"text": {...}, "image": {...}}``) and a few facts about
the run (step, seq_len; from a fit also its data sources and last validation, see card.py).
`eval`, `sample` and `polybyte.load` rebuild everything from the first two files; README.md is
the model card written from them (card.py), which exports made before cards lack.

The folder is written whole under a temporary name and renamed into place (checkpoints.py), so
no reader sees a half-written config.json or weights file. Given a Lightning ``X.ckpt``,
`load_exported` loads its export ``X/`` only when both record the same step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from polybyte.models import ByteLM, build_model, config_to_dict

from .card import write_card
from .checkpoints import ckpt_step, commit, one_line, prepare

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_exported(
    out_dir,
    model: ByteLM,
    modalities: dict[str, dict],
    extra: dict[str, Any] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model``'s weights (or ``state``, e.g. gathered from FSDP shards), config and
    model card into ``out_dir``, replacing what an earlier save left there in one rename."""
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG).exists() and not (out / WEIGHTS).exists():
        raise ValueError(f"{out} is a folder but not a polybyte export; refusing to replace it")
    # safetensors refuses shared storage (tied weights): save each tensor contiguous on its own.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in (state or model.state_dict()).items()}
    info = {"model": config_to_dict(model.config), "modalities": modalities, **(extra or {})}
    tmp = prepare(out)
    tmp.mkdir()
    save_file(state, str(tmp / WEIGHTS))
    (tmp / CONFIG).write_text(json.dumps(info, indent=2, sort_keys=True))
    sizes = {name: state[name].numel() for name, _ in model.named_parameters() if name in state}
    entropy = sum(n for name, n in sizes.items() if name.startswith("entropy_model."))  # BLT's, frozen
    write_card(tmp, info, sum(sizes.values()) - entropy, entropy, path=out)
    commit(tmp, out)
    return out


def resolve(path) -> Path:
    """Accept an export folder, a folder's model.safetensors, or a Lightning ``X.ckpt`` (-> ``X/``)."""
    p = Path(path)
    if p.suffix == ".ckpt":
        p = p.with_suffix("")
    if p.is_file() and p.name == WEIGHTS:
        p = p.parent
    if not _is_export(p):
        inside = next(
            (q for q in (p / "checkpoints" / "last", p / "run" / "checkpoints" / "last") if _is_export(q)), None
        )
        advice = (
            f"it is a run folder: pass its export {inside}"
            if inside
            else "pass a checkpoint folder written by `polybyte fit` (e.g. runs/NAME/checkpoints/last) or its .ckpt"
        )
        raise FileNotFoundError(f"{path}: not a polybyte export (no {WEIGHTS} + {CONFIG} found); {advice}")
    return p


def _is_export(folder: Path) -> bool:
    return (folder / WEIGHTS).is_file() and (folder / CONFIG).is_file()


def load_exported(path, device: str | torch.device = "cpu") -> tuple[ByteLM, dict[str, Any]]:
    """Rebuild the model from an export folder; returns (model in eval mode, config.json dict).

    Raises ValueError, naming the file, for an unreadable or invalid config.json, an unreadable
    model.safetensors, weights unlike the config, or NaN/Inf weights (a diverged run); given a
    ``.ckpt``, also when it is unreadable or saved at another step than its export.
    """
    folder = resolve(path)
    config, weights = folder / CONFIG, folder / WEIGHTS
    try:  # a torn, hand-edited or foreign config.json: one ValueError naming the file
        info = json.loads(config.read_text())
        model = build_model(dict(info["model"]))
    except Exception as e:  # noqa: BLE001 — any layer constructor may reject a bad field
        raise ValueError(f"{config}: not a valid polybyte export config ({one_line(e)})") from None
    if Path(path).suffix == ".ckpt":
        check_same_step(Path(path), config, info)
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as e:  # empty, truncated or not safetensors at all
        raise ValueError(f"{weights}: unreadable safetensors file ({one_line(e)})") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"{weights}: {len(bad)} of {len(state)} tensors hold NaN/Inf (e.g. {bad[0]}); "
            f"the run that wrote it diverged, use an earlier checkpoint"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # missing/unexpected tensors or shapes unlike the config's dims
        raise ValueError(f"{weights} does not match {config} ({one_line(e)})") from None
    return model.to(device).eval(), info


def check_same_step(ckpt: Path, config: Path, info: dict[str, Any]) -> None:
    """Refuse a ``.ckpt`` whose export records another step: a save interrupted between the two
    (the export is written first), or files copied together from different saves."""
    if not ckpt.exists():
        raise FileNotFoundError(
            f"{ckpt}: no such checkpoint file (its export {config.parent} exists: pass that folder)"
        )
    step, exported = ckpt_step(ckpt), info.get("step")
    if exported is None:
        raise ValueError(
            f"{config} records no training step, so it cannot be matched with {ckpt}; "
            f"pass the folder {config.parent} to use it as it is"
        )
    if int(exported) != step:
        raise ValueError(
            f"{ckpt} is at step {step} but its export {config} is at step {exported}: they come from different "
            f"saves (one was interrupted); pass the folder {config.parent} to use the step-{exported} export"
        )
