"""`polybyte bench`: throughput measurements.

``--what train`` times full training steps (forward, backward, fused AdamW; bf16 autocast on
GPU) of each ``--model`` config on windows cut from ``--text`` (or random bytes), with CUDA
events after warm-up, and prints bytes/s, MFU and each model's speed relative to the first
config given — the baseline measured in the same run (default: the flat transformer). Each row
is printed as soon as it is measured. ``--peers`` also times, right after each MEGABYTE and BLT
config, its reference implementation at the same shapes, batch, precision and optimizer in the
same process (lucidrains' ``megabyte-pytorch``, transformers' ``BltForCausalLM``; the ``bench``
extra installs them) and prints ours as a ratio to it. ``--json`` writes every row.

``--what sample`` times batched sampling with caches (``models/generate.py``) of each ``--model``
(a config, ``BACKBONE:PRESET`` such as ``megabyte:base``, or a checkpoint folder) against the
uncached baseline — a full forward over the whole prefix per byte — in the same run, and prints
bytes/s of both and their ratio. The cached path runs as ``polybyte sample`` does (bf16 weights,
CUDA graphs, compiled decoding steps on GPU); it is also timed before compiling and without graphs.

``--what data`` times the training loader (decode, window, shuffle, mix, batch) on CPU and
prints bytes/s and samples/s. With no ``--data`` it builds a small synthetic text/image/audio
webdataset in a temporary folder first, so it runs anywhere.
"""

# Over 500 lines on purpose: three benches sharing one command line and one set of printers.
from __future__ import annotations

import argparse
import dataclasses
import io
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from polybyte.modalities import NUM_BYTES, TAG_NAMES

from .peers import PEER_MODULES, PEER_NAMES, lucidrains_megabyte, missing_peers, transformers_blt
from .runtime import compile_decoding, default_device, device_peak_flops, prepare_for_sampling

# smallest multiple of 256 that holds a 64x64 RGB image (12,288 bytes) plus EOS
DEFAULT_SEQ_LEN = 12544
WORDS = "the of and to in is was for on that with as by at from this be are it an or not byte".split()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polybyte bench", description=__doc__.splitlines()[0])
    p.add_argument("--what", choices=["train", "sample", "data"], default="train", help="what to measure")
    g = p.add_argument_group("data (--what data)")
    g.add_argument(
        "--data",
        nargs="+",
        metavar="NAME=DIR",
        help="shard sources, e.g. text=shards/text image=shards/img; "
        "default: a synthetic dataset built in a temporary folder",
    )
    g.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="ids per window (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=8, help="windows per batch (default %(default)s)")
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default %(default)s)")
    g.add_argument("--batches", type=int, default=50, help="batches timed after the first (default %(default)s)")
    g.add_argument(
        "--shuffle-buffer", type=int, default=100, help="windows per source and worker (default %(default)s)"
    )
    g = p.add_argument_group("train (--what train)")
    g.add_argument(
        "--model",
        nargs="+",
        metavar="CONFIG",
        default=["configs/text-transformer.yaml", "configs/text-megabyte.yaml", "configs/text-blt.yaml"],
        help="LightningCLI YAML configs (their model section); the first is the baseline",
    )
    g.add_argument("--text", default=None, help="file whose bytes fill the windows (default: random bytes)")
    g.add_argument("--steps", type=int, default=20, help="timed steps per model (default %(default)s)")
    g.add_argument("--warmup", type=int, default=5, help="untimed steps first (default %(default)s)")
    g.add_argument(
        "--compile",
        nargs="?",
        const="blocks",
        default=None,
        choices=["blocks", "model"],
        help="train: torch.compile each model as polybyte fit does: its repeated layers (blocks, the "
        "default) or the whole model as one graph (sample: see --no-compile)",
    )
    g.add_argument("--train-batch-size", type=int, default=8, help="windows per step (default %(default)s)")
    g.add_argument(
        "--peers",
        action="store_true",
        help="also time the reference implementation of each MEGABYTE config (lucidrains' "
        "megabyte-pytorch) and BLT config (transformers' BltForCausalLM) at its shapes, batch, "
        "precision and optimizer, in the same process (needs the bench extra)",
    )
    g.add_argument("--json", default=None, help="also write the results to this JSON file")
    g.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="train: after timing, profile 3 steps of each row with torch.profiler and write "
        "its operator table (by device time) to DIR/NAME.txt",
    )
    g = p.add_argument_group("sample (--what sample; --model also takes BACKBONE:PRESET or a checkpoint folder)")
    g.add_argument("--modality", default="image", choices=["text", "image", "audio"], help="tag to sample under")
    g.add_argument("--sample-bytes", type=int, default=12288, help="bytes per row, cached (default: one 64x64 image)")
    g.add_argument(
        "--uncached-bytes",
        type=int,
        default=512,
        help="bytes per row timed for the uncached baseline and the like-for-like ratio (default %(default)s)",
    )
    g.add_argument("--sample-batch-size", type=int, default=16, help="rows sampled together (default %(default)s)")
    g.add_argument("--fp32", action="store_true", help="fp32 weights on GPU (default: bf16, as polybyte sample)")
    g.add_argument(
        "--no-compile",
        dest="sample_compile",
        action="store_false",
        help="do not torch.compile the decoding steps (default: compiled on GPU, as polybyte sample)",
    )
    return p


def _model_config(path: str) -> dict:
    import yaml

    cfg = yaml.safe_load(Path(path).read_text())
    return dict(cfg["model"]["model"])


def _time_training(
    net, params, batches, pad_id: int, steps: int, warmup: int, cuda: bool, aux=None, profile: Path | None = None
):
    """Run ``warmup`` then ``steps`` training steps (bf16 autocast on CUDA, the loss of
    models.base.nll_loss, gradient clipping at 1.0, fused AdamW on CUDA) of ``net(ids, modality)``;
    returns (seconds of the timed steps, mean patch length or None, seconds of the warm-up).
    ``aux``: the model whose ``aux`` holds BLT patch counts (read once, at the end).
    ``profile``: afterwards, run 3 more steps under torch.profiler and write its operator table
    (sorted by device time) to this file."""
    from polybyte.models.base import nll_loss

    device = batches[0][0].device
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    patches, patch_bytes = 0, 0

    def step(i):
        ids, modality = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = nll_loss(net(ids, modality), ids, pad_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    # One pair of CUDA events around all timed steps, not Lightning's ThroughputMonitor (a Trainer
    # callback that synchronizes after every batch): no host sync inside the timed loop.
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
        if aux is not None and "num_patches" in aux.aux:  # device sums, no sync per step
            patches = patches + aux.aux["num_patches"]
            patch_bytes = patch_bytes + aux.aux["num_bytes"]
    if cuda:
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        seconds = time.perf_counter() - t0
    mean_patch = float(patch_bytes) / float(patches) if isinstance(patches, torch.Tensor) else None
    if profile is not None:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profiler(activities=activities) as prof:
            for i in range(3):
                step(i)
            if cuda:
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        profile.parent.mkdir(parents=True, exist_ok=True)
        profile.write_text(prof.key_averages().table(sort_by=key, row_limit=45, max_name_column_width=70))
    return seconds, mean_patch, warm_s


def bench_train(
    configs: list[str],
    text: str | None,
    batch_size: int,
    steps: int,
    warmup: int,
    compile_model: bool | str,
    peers: bool = False,
    report=None,
    profile_dir: str | None = None,
) -> list[dict]:
    """Time training steps of each config (and with ``peers``, the peer implementation of each
    MEGABYTE / BLT config at its shapes, right after it); returns one result dict per row.
    ``compile_model``: a ``compile`` setting of polybyte fit (False, True, "blocks", "model");
    peers are compiled whole (``torch.compile``) whenever ours are compiled.
    ``report(row)`` is called with each row as soon as it is measured. ``profile_dir``: write a
    torch.profiler operator table per row there (``NAME.txt``)."""
    from polybyte.models import build_model
    from polybyte.pipelines.compiling import compile_for_training, compile_scope

    device = default_device()
    cuda = device.type == "cuda"
    corpus = np.frombuffer(Path(text).read_bytes(), dtype=np.uint8) if text else None
    peak = device_peak_flops(device, torch.bfloat16)  # the steps run under bf16 autocast on CUDA
    scope = compile_scope(compile_model)  # None: eager
    results = []

    def emit(row):
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        results.append(row)
        if report is not None:
            report(row)

    def say(msg):
        if report is not None:
            print(msg, flush=True)

    for path in configs:
        model_cfg = _model_config(path)
        torch.manual_seed(0)
        model = build_model(model_cfg).to(device)
        seq_len = model.config.max_seq_len
        rng = np.random.default_rng(0)

        def batch(rng=rng, seq_len=seq_len):
            if corpus is None:
                ids = rng.integers(0, 256, size=(batch_size, seq_len))
            else:
                starts = rng.integers(0, len(corpus) - seq_len, size=batch_size)
                ids = np.stack([corpus[s : s + seq_len] for s in starts])
            return torch.from_numpy(ids).long().to(device), torch.full((batch_size,), 258, device=device)

        if getattr(model.config, "patcher", None) is not None and model.config.patcher.needs_entropies:
            # An untrained entropy model is unsure everywhere (1-byte patches): calibrate the
            # threshold on this data to the configured mean patch length, as a trained one would be.
            ids, modality = batch()
            model.calibrate_threshold(ids, modality)
        batches = [batch() for _ in range(4)]
        name = Path(path).name
        say(f"{name}: {f'compiling ({scope}) and ' if scope else ''}warming up {warmup} steps ...")
        net = compile_for_training(model, scope)
        params = [p for p in model.parameters() if p.requires_grad]
        prof = Path(profile_dir) / f"{Path(name).stem}.txt" if profile_dir else None
        seconds, mean_patch, warm_s = _time_training(
            net, params, batches, model.config.pad_id, steps, warmup, cuda, aux=model, profile=prof
        )
        bytes_per_s = steps * batch_size * seq_len / seconds
        flops = model.flops_per_byte(mean_patch_len=mean_patch)
        ours = {
            "config": path,
            "name": name,
            "impl": "polybyte",
            "backbone": model.backbone,
            "params": model.num_params(),
            "seq_len": seq_len,
            "batch_size": batch_size,
            "ms_per_step": 1000 * seconds / steps,
            "bytes_per_s": bytes_per_s,
            "flops_per_byte": flops,
            "mfu": flops * bytes_per_s / peak if peak else None,
            "mean_patch_len": mean_patch,
            "compiled": scope or False,
            "warmup_s": warm_s,
            "peer": None,
        }
        del net, batches[1:]
        if peers and model.backbone in PEER_MODULES:
            emit(ours)
            make = lucidrains_megabyte if model.backbone == "megabyte" else transformers_blt
            torch.manual_seed(0)
            peer = make(model.config).to(device)
            peer_name = f"{PEER_NAMES[model.backbone]} @ {name}"
            peer_compiled = "model" if scope else False  # a peer is compiled whole
            say(f"{peer_name}: {'compiling and ' if scope else ''}warming up {warmup} steps ...")
            batches = [batch() for _ in range(4)]
            ps = [p for p in peer.parameters() if p.requires_grad]
            try:
                net = torch.compile(peer) if scope else peer
                prof = Path(profile_dir) / f"{Path(name).stem}-peer.txt" if profile_dir else None
                seconds, _, warm_s = _time_training(
                    net, ps, batches, model.config.pad_id, steps, warmup, cuda, profile=prof
                )
            except Exception as e:  # a peer that does not compile is timed eagerly, and says so
                if not scope:
                    raise
                say(f"{peer_name}: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); eager")
                peer_compiled = False
                seconds, _, warm_s = _time_training(peer, ps, batches, model.config.pad_id, steps, warmup, cuda)
            peer_bps = steps * batch_size * seq_len / seconds
            ours["peer"] = peer_name
            ours["vs_peer"] = bytes_per_s / peer_bps
            emit(
                {
                    "config": path,
                    "name": peer_name,
                    "impl": PEER_MODULES[model.backbone],
                    "backbone": model.backbone,
                    "params": sum(p.numel() for p in peer.parameters()),
                    "seq_len": seq_len,
                    "batch_size": batch_size,
                    "ms_per_step": 1000 * seconds / steps,
                    "bytes_per_s": peer_bps,
                    "flops_per_byte": None,
                    "mfu": None,
                    "mean_patch_len": float(model.config.patcher.patch_size) if model.backbone == "blt" else None,
                    "compiled": peer_compiled,
                    "warmup_s": warm_s,
                    "peer": None,
                    "ours_vs_peer": bytes_per_s / peer_bps,
                }
            )
            del peer, net, ps
        else:
            emit(ours)
        del model, params
        if cuda:
            torch.cuda.empty_cache()
    return results


def print_train_header(batch_size: int) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"train steps on {device} (bf16 autocast and fused AdamW on GPU), batch {batch_size}:")
    print(
        f"{'model':<40} {'params':>8} {'seq':>6} {'compiled':>8} {'warm s':>7} {'ms/step':>8} {'bytes/s':>12} "
        f"{'MFU':>6} {'patch':>6} {'vs first':>8} {'ours/peer':>9}",
        flush=True,
    )


def print_train_row(r: dict, base: float) -> None:
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
    patch = f"{r['mean_patch_len']:.2f}" if r["mean_patch_len"] else "-"
    vs_peer = r.get("ours_vs_peer")
    ratio = f"{vs_peer:.2f}x" if vs_peer is not None else "-"
    print(
        f"{r['name']:<40} {r['params'] / 1e6:>7.1f}M {r['seq_len']:>6} {r['compiled'] or 'no':>8} "
        f"{r['warmup_s']:>7.1f} {r['ms_per_step']:>8.1f} {r['bytes_per_s']:>12,.0f} {mfu:>6} {patch:>6} "
        f"{r['bytes_per_s'] / base:>7.2f}x {ratio:>9}",
        flush=True,
    )


def print_train(results: list[dict]) -> None:
    print_train_header(results[0]["batch_size"])
    for r in results:
        print_train_row(r, results[0]["bytes_per_s"])


def _sample_model(spec: str, device: torch.device):
    """A model to time sampling with: ``backbone:preset`` (e.g. megabyte:base, random weights), a
    LightningCLI YAML (random weights) or an exported checkpoint folder (trained weights)."""
    from polybyte.models import build_model

    path = Path(spec)
    if path.is_dir() or path.suffix == ".ckpt":
        from polybyte.pipelines.export import load_exported

        return load_exported(path, device)[0], False
    if path.suffix in (".yaml", ".yml"):
        return build_model(_model_config(spec)).to(device).eval(), True
    backbone, _, preset = spec.partition(":")
    if backbone == "transformer":
        from polybyte.models.transformer import transformer_preset as make
    elif backbone == "blt":
        from polybyte.models.blt import blt_preset as make
    elif backbone == "megabyte":
        from polybyte.models.megabyte import PRESETS

        def make(name):
            if name not in PRESETS:
                raise ValueError(f"unknown megabyte preset {name!r}; known: {sorted(PRESETS)}")
            return dataclasses.replace(PRESETS[name])
    else:
        raise ValueError(
            f"{spec}: expected BACKBONE:PRESET (transformer|megabyte|blt), a .yaml config or a checkpoint folder"
        )
    torch.manual_seed(0)
    return build_model(make(preset)).to(device).eval(), True


def bench_sample(
    spec: str,
    modality: str = "image",
    batch_size: int = 16,
    max_bytes: int = 12288,
    uncached_bytes: int = 512,
    bf16: bool | None = None,
    compile: bool | None = None,
) -> dict:
    """Time batched sampling (``models.generate``) with caches against the uncached baseline
    (a full forward over the whole prefix per byte) on the current device, same model, same run.

    Cached: ``batch_size`` rows x ``max_bytes`` bytes (capped by MEGABYTE's max_seq_len), as
    ``polybyte sample`` runs it: bf16 weights on GPU, CUDA graphs and (``compile``, default on
    GPU) the compiled decoding steps; also timed before compiling (graphs only) and without
    graphs. Uncached: the first ``uncached_bytes`` bytes only (its cost grows with the prefix),
    so the cached run is also timed over that many bytes for a like-for-like ratio. Random
    weights with BLT entropy patching get a threshold calibrated to the preset's mean patch length.
    """
    from polybyte.modalities import TAGS
    from polybyte.models.generate import generate

    device = default_device()
    cuda = device.type == "cuda"
    bf16 = cuda if bf16 is None else bf16
    compile = cuda if compile is None else compile
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
    graphs_s = timed(max_bytes, True)  # caches and graphs, nothing compiled
    compile_s = None
    if compile and model.compilable_steps:
        compile_decoding(model)
        compile_s = timed(warm, True)
    cached_s = timed(max_bytes, True) if compile_s is not None else graphs_s
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


def synthetic_shards(out_dir: Path, seed: int = 0) -> dict[str, str]:
    """Write one small webdataset per modality (.txt, .png, .flac members; no manifest) and
    return ``{modality: folder}``. Procedural content, nothing downloaded."""
    import soundfile as sf
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(seed)
    folders = {m: out_dir / m for m in ("text", "image", "audio")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(folders["text"] / "train-000000.tar")) as tar:
        for i in range(64):  # ~16 KB documents of random words
            words = rng.choice(WORDS, size=3000)
            tar.write({"__key__": f"doc{i:04d}", "txt": " ".join(words).encode()})
    yy, xx = np.mgrid[0:64, 0:64]
    with wds.TarWriter(str(folders["image"] / "train-000000.tar")) as tar:
        for i in range(128):  # gradients with noise, 64x64 RGB
            a, b, c = rng.uniform(0.5, 4.0, 3)
            base = np.stack([xx * a, yy * b, (xx + yy) * c], axis=-1) + rng.normal(0, 8, (64, 64, 3))
            buf = io.BytesIO()
            Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buf, format="PNG")
            tar.write({"__key__": f"img{i:04d}", "png": buf.getvalue()})
    t = np.arange(16000) / 16000
    with wds.TarWriter(str(folders["audio"] / "train-000000.tar")) as tar:
        for i in range(32):  # 1 s chirps at 16 kHz
            f0, f1 = rng.uniform(100, 2000, 2)
            wave = 0.3 * np.sin(2 * np.pi * (f0 + (f1 - f0) * t / 2) * t) + rng.normal(0, 0.01, t.shape)
            buf = io.BytesIO()
            sf.write(buf, (wave * 32767).astype(np.int16), 16000, format="FLAC", subtype="PCM_16")
            tar.write({"__key__": f"clip{i:04d}", "flac": buf.getvalue()})
    return {m: str(f) for m, f in folders.items()}


def bench_data(
    sources: dict[str, str] | list[str],
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = 8,
    workers: int = 2,
    batches: int = 50,
    shuffle_buffer: int = 100,
) -> dict:
    """Time ``batches`` training batches after the first (which pays for worker start-up and
    filling the shuffle buffers). Returns the measurements; bytes are grid ids (``B*seq_len``
    per batch), payload bytes only the ids 0..255. Runs torch single-threaded, as in a worker:
    on a busy CPU its thread pool makes the small collate/count ops measured here 100x slower."""
    from polybyte.pipelines.data import ByteDataModule  # imports Lightning: only --what data needs it

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dm = ByteDataModule(
            sources=sources, seq_len=seq_len, batch_size=batch_size, num_workers=workers, shuffle_buffer=shuffle_buffer
        )
        dm.setup("fit")
        start = time.perf_counter()
        it = iter(dm.train_dataloader())
        next(it)
        first, seen0 = time.perf_counter() - start, dm.seen
        rows, payload = Counter(), 0
        start = time.perf_counter()
        for _ in range(batches):
            ids, modality = next(it)
            rows.update(TAG_NAMES[t] for t in modality.tolist())
            payload += int((ids < NUM_BYTES).sum())
        elapsed = time.perf_counter() - start
        del it
    finally:
        torch.set_num_threads(threads)
    n = batches * batch_size
    return {
        "first_batch_s": first,
        "seconds": elapsed,
        "bytes_per_s": n * seq_len / elapsed,
        "payload_bytes_per_s": payload / elapsed,
        "samples_per_s": n / elapsed,
        "members_per_s": (dm.seen - seen0) / elapsed,
        "rows": {k: v / n for k, v in sorted(rows.items())},
        "skipped": dm.skipped,
    }


def _train_input_error(args) -> str | None:
    """One line saying what is wrong with ``--what train``'s arguments, or None."""
    missing = [c for c in args.model if not Path(c).is_file()]
    if missing:
        return f"config not found: {', '.join(missing)}"
    if args.text is not None and not Path(args.text).is_file():
        return f"--text {args.text}: no such file"
    if args.steps < 1 or args.warmup < 0 or args.train_batch_size < 1:
        return "--steps and --train-batch-size must be >= 1, --warmup >= 0"
    for c in args.model:
        try:
            model = _model_config(c)
        except Exception as e:  # not YAML, or no model.model section
            return f"{c}: not a LightningCLI config with a model.model section ({type(e).__name__})"
        if not isinstance(model, dict) or "backbone" not in model:
            return f"{c}: model.model has no backbone"
    if args.peers:
        absent = missing_peers()
        if absent:
            return f'--peers needs the bench extra (pip install -e ".[bench]"); not installed: {", ".join(absent)}'
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.what == "train":
        bad = _train_input_error(args)
        if bad:
            print(f"polybyte bench: {bad}", file=sys.stderr)
            return 2
        print_train_header(args.train_batch_size)
        first: list[float] = []

        def report(row):  # each row as soon as it is measured; "vs first" = ratio to the first row
            if not first:
                first.append(row["bytes_per_s"])
            print_train_row(row, first[0])

        results = bench_train(
            args.model,
            args.text,
            args.train_batch_size,
            args.steps,
            args.warmup,
            args.compile,
            peers=args.peers,
            report=report,
            profile_dir=args.profile,
        )
        for r in results:
            if r.get("vs_peer") is not None:
                print(f"{r['name']}: {r['vs_peer']:.2f}x {r['peer']} (bytes/s, same run)")
        if args.json:
            import json

            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0
    if args.what == "sample":
        try:
            results = [
                bench_sample(
                    spec,
                    args.modality,
                    args.sample_batch_size,
                    args.sample_bytes,
                    args.uncached_bytes,
                    bf16=False if args.fp32 else None,
                    compile=None if args.sample_compile else False,
                )
                for spec in args.model
            ]
        except (ValueError, FileNotFoundError) as e:
            print(f"polybyte bench: {e}", file=sys.stderr)
            return 2
        print_sample(results)
        if args.json:
            import json

            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0
    with tempfile.TemporaryDirectory(prefix="polybyte-bench-") as tmp:
        sources = args.data or synthetic_shards(Path(tmp))
        label = " ".join(args.data) if args.data else "synthetic text/image/audio"
        print(f"data: {label}; seq_len {args.seq_len}, batch {args.batch_size}, {args.workers} workers")
        try:
            r = bench_data(sources, args.seq_len, args.batch_size, args.workers, args.batches, args.shuffle_buffer)
        except ValueError as e:  # e.g. a sample longer than --seq-len: one line, not a traceback
            print(f"polybyte bench: {e}", file=sys.stderr)
            return 2
    mix = ", ".join(f"{k} {v:.0%}" for k, v in r["rows"].items())
    print(f"first batch after {r['first_batch_s']:.2f} s (worker start, shuffle buffers)")
    print(
        f"{args.batches} batches in {r['seconds']:.2f} s: {r['bytes_per_s']:,.0f} bytes/s "
        f"({r['payload_bytes_per_s']:,.0f} payload bytes/s), {r['samples_per_s']:,.1f} samples/s "
        f"({r['members_per_s']:,.1f} members decoded/s); rows: {mix}; skipped {r['skipped']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
