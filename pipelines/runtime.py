"""Helpers shared by the subcommands: which device to run on, its peak FLOP/s for MFU, compiling
the decoding steps for sampling (training's own compile is compiling.py), and finding the configs
shipped inside the package.

Subcommand modules (lit.py, sample.py, bench.py, ...) use these instead of each other.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (datasheet, FLOP/s) used for MFU; unknown devices log no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def default_device(name: str | None = None) -> torch.device:
    """``name`` (``"cpu"``, ``"cuda:1"``, ...) or, when None, CUDA if there is one, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def device_peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s (`PEAK_FLOPS`), None for CPUs and unknown GPUs."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def compile_decoding(model) -> list[str]:
    """torch.compile, in place, the methods in ``model.compilable_steps`` (one decoding step's
    device work at fixed shapes; inside the CUDA graph of models/generate.py they become a few
    fused kernels instead of hundreds). Compiled for static shapes: once per batch size, whatever
    the sample length; ``model.growing_steps`` (shapes that follow a growing cache) once, with
    dynamic shapes. Returns the names compiled."""
    for name in model.compilable_steps:
        dynamic = name in model.growing_steps
        setattr(model, name, torch.compile(getattr(model, name), dynamic=dynamic, fullgraph=True))
    return list(model.compilable_steps)


def prepare_for_sampling(model, device: torch.device, dtype: str, compile: bool):
    """The model as sampling runs it: weights in ``dtype`` (bf16 | fp32) and, with ``compile``
    on CUDA, its fixed-shape decoding steps compiled (`compile_decoding`)."""
    model = model.to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    if compile and device.type == "cuda":
        compile_decoding(model)
    return model


def shipped_config(name: str) -> Path | None:
    """The config ``name`` (``debug.yaml``; ``configs/debug.yaml`` names the same) as shipped
    inside the package, in any install (editable or wheel); None if polybyte ships none by it."""
    from importlib.resources import files

    path = files("polybyte.configs") / Path(name).name
    return Path(str(path)) if path.is_file() else None


def with_shipped_configs(args: list[str]) -> list[str]:
    """``args`` with each ``--config NAME`` (or ``-c``, ``--config=``) that names no file here but
    a shipped config, ``debug.yaml`` or ``configs/debug.yaml``, pointed at the shipped file: so
    `polybyte fit --config debug.yaml` works from any folder, not only a checkout."""

    def resolve(value: str) -> str:
        path = Path(value)
        if path.exists() or path.parent not in (Path("."), Path("configs")):
            return value
        shipped = shipped_config(path.name)
        return str(shipped) if shipped is not None else value

    out = list(args)
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve(arg.removeprefix("--config="))
    return out
