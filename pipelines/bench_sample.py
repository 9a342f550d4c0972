"""`polybyte bench --what sample`: cached sampling (as `polybyte sample` runs it) against the
uncached baseline, same model, same run."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from polybyte.modalities import NUM_BYTES

from .bench_train import model_config
from .peers import TRANSFORMERS_BLT, is_transformers_blt, time_transformers_generate, transformers_blt_pair
from .runtime import compile_decoding, default_device, prepare_for_sampling


def _sample_model(spec: str, device: torch.device):
    """A model to time sampling with: ``backbone:preset`` (e.g. megabyte:base, random weights), a
    LightningCLI YAML (random weights) or an exported checkpoint folder (trained weights)."""
    from polybyte.models import build_model

    path = Path(spec)
    if path.is_dir() or path.suffix == ".ckpt":
        from polybyte.pipelines.export import load_exported

        return load_exported(path, device)[0], False
    if path.suffix in (".yaml", ".yml"):
        return build_model(model_config(spec)).to(device).eval(), True
    backbone, _, preset = spec.partition(":")
    if not preset:
        raise ValueError(
            f"{spec}: expected BACKBONE:PRESET (e.g. megabyte:base), a .yaml config or a checkpoint folder"
        )
    torch.manual_seed(0)
    return build_model({"backbone": backbone, "preset": preset}).to(device).eval(), True


def bench_sample(
    spec: str,
    modality: str = "image",
    batch_size: int = 16,
    max_bytes: int = 12288,
    uncached_bytes: int = 512,
    bf16: bool | None = None,
    compile: bool | None = None,
    peers: bool = False,
) -> dict:
    """Time batched sampling (``models.generate``) with caches against the uncached baseline
    (a full forward over the whole prefix per byte) on the current device, same model, same run.

    Cached: ``batch_size`` rows x ``max_bytes`` bytes (capped by MEGABYTE's max_seq_len), as
    ``polybyte sample`` runs it: bf16 weights on GPU, CUDA graphs and (``compile``, default on
    GPU) the compiled decoding steps; also timed before compiling (graphs only) and without
    graphs. Uncached: the first ``uncached_bytes`` bytes only (its cost grows with the prefix),
    so the cached run is also timed over that many bytes for a like-for-like ratio. Long runs are
    timed in steady state, each after an untimed one of the same length (graph captures and
    recompiles at every cache size); ``compile_s`` is the first compile, on a short run. Random
    weights with BLT entropy patching get a threshold calibrated to the preset's mean patch length.

    ``spec`` may also name a transformers BLT (``peers.is_transformers_blt``: a folder, or random
    weights at BLT-1B's shapes), sampled through our import of it; with ``peers``, transformers'
    own greedy ``generate`` on the same weights (the same threshold, precision and batch) is timed
    over the first ``uncached_bytes`` bytes too.
    """
    from polybyte.modalities import TAGS
    from polybyte.models.generate import generate

    device = default_device()
    cuda = device.type == "cuda"
    bf16 = cuda if bf16 is None else bf16
    compile = cuda if compile is None else compile
    hf = None
    if is_transformers_blt(spec):
        model, hf = transformers_blt_pair(spec, device)
        random_weights = spec == TRANSFORMERS_BLT
    else:
        model, random_weights = _sample_model(spec, device)
    model = prepare_for_sampling(model, device, "bf16" if bf16 else "fp32", compile=False)
    tag = TAGS[modality]
    if model.backbone == "megabyte":
        max_bytes = min(max_bytes, model.config.max_seq_len)
    uncached_bytes = min(uncached_bytes, max_bytes)
    patcher = getattr(model.config, "patcher", None)
    if random_weights and patcher is not None and patcher.needs_entropies:
        ids = torch.randint(0, NUM_BYTES, (4, 1024), generator=torch.Generator().manual_seed(0)).to(device)
        model.calibrate_threshold(ids, torch.full((4,), tag, device=device))
    peer_s = None
    if hf is not None and peers:
        hf.config.patching_threshold = model.config.patcher.threshold  # the same patches as ours
        peer_s = time_transformers_generate(
            hf.to(torch.bfloat16 if bf16 else torch.float32), batch_size, uncached_bytes
        )
        hf.cpu()  # its memory back before ours is timed

    def timed(n: int, use_cache: bool, graphs: bool = True) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        generate(
            model, tag, None, n, num=batch_size, seed=0, stop_at_eos=False, use_cache=use_cache, cuda_graphs=graphs
        )
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    warm = min(64, uncached_bytes)
    timed(warm, True)  # kernels, allocator, cuBLAS handles
    timed(warm, False)
    uncached_s = timed(uncached_bytes, False)
    eager_short_s = timed(uncached_bytes, True, graphs=False)  # caches, but no CUDA graphs

    def steady(n: int) -> float:
        """Timed after an untimed run of the same length, which captured the graphs (and
        compiled the steps) at every cache size the run reaches."""
        timed(n, True)
        return timed(n, True)

    graphs_s = steady(max_bytes)  # caches and graphs, nothing compiled
    compile_s = None
    if compile and model.compilable_steps:
        compile_decoding(model)
        compile_s = timed(warm, True)  # the first compile
    cached_s = steady(max_bytes) if compile_s is not None else graphs_s
    cached_short_s = timed(uncached_bytes, True)
    return {
        "model": spec,
        "backbone": model.backbone,
        "params": model.num_params(),
        "device": str(device),
        "bf16": bf16,
        "batch_size": batch_size,
        "bytes": max_bytes,
        "uncached_bytes": uncached_bytes,
        "compile_s": compile_s,
        "cached_s": cached_s,
        "cached_bytes_per_s": batch_size * max_bytes / cached_s,
        "graphs_bytes_per_s": batch_size * max_bytes / graphs_s,
        "cached_short_bytes_per_s": batch_size * uncached_bytes / cached_short_s,
        "uncached_bytes_per_s": batch_size * uncached_bytes / uncached_s,
        "cached_eager_short_bytes_per_s": batch_size * uncached_bytes / eager_short_s,
        "transformers_bytes_per_s": None if peer_s is None else batch_size * uncached_bytes / peer_s,
    }


def print_sample(results: list[dict]) -> None:
    r0 = results[0]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        f"sampling on {device} ({'bf16' if r0['bf16'] else 'fp32'} weights), batch {r0['batch_size']}; "
        f"uncached = full forward over the prefix per byte, timed over the first {r0['uncached_bytes']} bytes:"
    )
    print(
        f"{'model':<30} {'params':>8} {'bytes':>6} {'compile s':>9} {'seconds':>8} {'cached B/s':>11} "
        f"{'graphs only':>11} {'short: cached':>13} {'no graphs':>10} {'uncached':>9} {'ratio':>7}"
    )
    for r in results:
        ratio = r["cached_short_bytes_per_s"] / r["uncached_bytes_per_s"]
        compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        print(
            f"{Path(r['model']).name:<30} {r['params'] / 1e6:>7.1f}M {r['bytes']:>6} {compile_s:>9} "
            f"{r['cached_s']:>8.2f} {r['cached_bytes_per_s']:>11,.0f} {r['graphs_bytes_per_s']:>11,.0f} "
            f"{r['cached_short_bytes_per_s']:>13,.0f} {r['cached_eager_short_bytes_per_s']:>10,.0f} "
            f"{r['uncached_bytes_per_s']:>9,.0f} {ratio:>6.1f}x"
        )
    for r in results:
        if r["transformers_bytes_per_s"] is not None:
            print(
                f"{Path(r['model']).name}: transformers generate (greedy, use_cache=False) "
                f"{r['transformers_bytes_per_s']:,.0f} B/s over the first {r['uncached_bytes']} bytes; ours cached "
                f"{r['cached_short_bytes_per_s']:,.0f} B/s over the same bytes: "
                f"{r['cached_short_bytes_per_s'] / r['transformers_bytes_per_s']:.1f}x (same run, same weights)"
            )
