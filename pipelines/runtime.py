"""Helpers shared by the subcommands: which device to run on, its peak FLOP/s for MFU, compiling
the decoding steps for sampling (training's own compile is compiling.py), and finding the configs
shipped inside the package.

Subcommand modules (lit.py, sample.py, bench.py, ...) use these instead of each other.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Dense peaks (FLOP/s) of the GPUs that Lightning 2.6.6's get_available_flops gets wrong, by a
# part of the device name. It parses "NVIDIA H200" to no chip (it knows only names holding
# "sxm1"/"nvl1") and lists the H200 at its with-sparsity figures, twice these: the H200 SXM has
# the H100 SXM's tensor cores and clocks. It reads "NVIDIA L40S" as an L4.
PEAK_FLOPS_FIXES = {
    "H200": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, "tfloat32": 494.7e12, torch.float32: 66.9e12},
    "L40S": {torch.bfloat16: 362.1e12, torch.float16: 362.1e12, "tfloat32": 183.2e12, torch.float32: 91.6e12},
}


def default_device(name: str | None = None) -> torch.device:
    """``name`` (``"cpu"``, ``"cuda:1"``, ...) or, when None, CUDA if there is one, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def device_peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """The device's dense peak in FLOP/s for matmuls in ``dtype`` (float32 counts as TF32 unless
    the matmul precision is "highest"), for MFU: Lightning's ``get_available_flops`` but for
    `PEAK_FLOPS_FIXES`. None for CPUs and for GPUs that Lightning does not know."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    fix = next((v for k, v in PEAK_FLOPS_FIXES.items() if k in name and "NVL" not in name), None)
    if fix is not None:
        tf32 = dtype is torch.float32 and torch.get_float32_matmul_precision() != "highest"
        return fix.get("tfloat32" if tf32 else dtype)
    from lightning.fabric.utilities.throughput import get_available_flops  # here: eval and sample never load it

    return get_available_flops(device, dtype)


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


def sample_bytes(adapter, window: int | None) -> int | None:
    """Payload bytes of one whole unprompted image or audio sample: the image; one audio clip
    (``clip_seconds``) of whole audio samples, cut to the ``window - 1`` payload bytes a
    training window holds when ``window`` is given; None for audio with neither."""
    if adapter.name == "image":
        return adapter.payload_bytes
    s, bps = adapter.settings, adapter.bytes_per_sample
    fit = None if window is None else (window - 1) // bps * bps
    if s.clip_seconds is None:
        return fit
    clip = round(s.clip_seconds * s.sample_rate) * bps
    return clip if fit is None else min(clip, fit)


def draw_samples(
    model, adapter, num: int, new_bytes: int, *, prompt: bytes = b"", seed: int | None = None, **sampling
) -> list[bytes]:
    """``num`` samples of the adapter's modality from ``model`` (models/generate.py): each is
    ``prompt`` + up to ``new_bytes`` sampled bytes, payload bytes the adapter decodes. Text stops
    at EOS, images and audio never do. ``sampling``: generate's temperature, top_k, top_p,
    progress, cuda_graphs. Seeded rows are reproducible."""
    from polybyte.models.generate import generate

    tag = adapter.tag
    new = generate(model, tag, [prompt] * num, new_bytes, seed=seed, stop_at_eos=adapter.name == "text", **sampling)
    return [bytes(prompt) + bytes(s) for s in new]
