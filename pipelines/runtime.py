"""Device helpers shared by the subcommands: which device to run on, its peak FLOP/s for MFU,
and compiling the decoding steps for sampling. Training's own compile is compiling.py.

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


def shipped_config(name: str) -> Path:
    """``configs/NAME`` as shipped inside the package (e.g. ``demo.yaml``), in any install."""
    import polybyte.configs

    # `polybyte.configs` is a namespace package (YAML only): importlib.resources.files() fails on
    # an editable install, whose namespace path also holds a non-folder path-hook entry.
    for folder in polybyte.configs.__path__:
        path = Path(folder) / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"{name} not found in {list(polybyte.configs.__path__)}; reinstall polybyte")
