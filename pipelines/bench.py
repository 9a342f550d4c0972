"""`polybyte bench`: throughput measurements.

``--what train`` times full training steps (forward, backward, fused AdamW; bf16 autocast on
GPU) of each ``--model`` config on windows cut from ``--text`` (or random bytes), with CUDA
events after warm-up, and prints bytes/s, MFU and each model's speed relative to the first
config given — the baseline measured in the same run (default: the flat transformer).

``--what sample`` times batched sampling with caches (``models/generate.py``) of each ``--model``
(a config, ``BACKBONE:PRESET`` such as ``megabyte:base``, or a checkpoint folder) against the
uncached baseline — a full forward over the whole prefix per byte — in the same run, and prints
bytes/s of both and their ratio. The cached path runs as ``polybyte sample`` does (bf16 weights,
CUDA graphs, compiled decoding steps on GPU); it is also timed before compiling and without graphs.

``--what data`` times the training loader (decode, window, shuffle, mix, batch) on CPU and
prints bytes/s and samples/s. With no ``--data`` it builds a small synthetic text/image/audio
webdataset in a temporary folder first, so it runs anywhere.
"""

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
from polybyte.pipelines.data import ByteDataModule

# smallest multiple of 256 that holds a 64x64 RGB image (12,288 bytes) plus EOS
DEFAULT_SEQ_LEN = 12544
WORDS = "the of and to in is was for on that with as by at from this be are it an or not byte".split()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polybyte bench", description=__doc__.splitlines()[0])
    p.add_argument("--what", choices=["train", "sample", "data"], default="train", help="what to measure")
    g = p.add_argument_group("data (--what data)")
    g.add_argument("--data", nargs="+", metavar="NAME=DIR",
                   help="shard sources, e.g. text=shards/text image=shards/img; "
                        "default: a synthetic dataset built in a temporary folder")
    g.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="ids per window (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=8, help="windows per batch (default %(default)s)")
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default %(default)s)")
    g.add_argument("--batches", type=int, default=50, help="batches timed after the first (default %(default)s)")
    g.add_argument("--shuffle-buffer", type=int, default=100,
                   help="windows per source and worker (default %(default)s)")
    g = p.add_argument_group("train (--what train)")
    g.add_argument("--model", nargs="+", metavar="CONFIG",
                   default=["configs/text-transformer.yaml", "configs/text-megabyte.yaml", "configs/text-blt.yaml"],
                   help="LightningCLI YAML configs (their model section); the first is the baseline")
    g.add_argument("--text", default=None, help="file whose bytes fill the windows (default: random bytes)")
    g.add_argument("--steps", type=int, default=20, help="timed steps per model (default %(default)s)")
    g.add_argument("--warmup", type=int, default=5, help="untimed steps first (default %(default)s)")
    g.add_argument("--compile", action="store_true",
                   help="train: torch.compile each model (sample: see --no-compile)")
    g.add_argument("--train-batch-size", type=int, default=8, help="windows per step (default %(default)s)")
    g.add_argument("--json", default=None, help="also write the results to this JSON file")
    g = p.add_argument_group("sample (--what sample; --model also takes BACKBONE:PRESET or a checkpoint folder)")
    g.add_argument("--modality", default="image", choices=["text", "image", "audio"], help="tag to sample under")
    g.add_argument("--sample-bytes", type=int, default=12288, help="bytes per row, cached (default: one 64x64 image)")
    g.add_argument("--uncached-bytes", type=int, default=512,
                   help="bytes per row timed for the uncached baseline and the like-for-like ratio (default %(default)s)")
    g.add_argument("--sample-batch-size", type=int, default=16, help="rows sampled together (default %(default)s)")
    g.add_argument("--fp32", action="store_true", help="fp32 weights on GPU (default: bf16, as polybyte sample)")
    g.add_argument("--no-compile", dest="sample_compile", action="store_false",
                   help="do not torch.compile the decoding steps (default: compiled on GPU, as polybyte sample)")
    return p


def _model_config(path: str) -> dict:
    import yaml

    cfg = yaml.safe_load(Path(path).read_text())
    return dict(cfg["model"]["model"])


def bench_train(configs: list[str], text: str | None, batch_size: int, steps: int, warmup: int,
                compile_model: bool) -> list[dict]:  # fmt: skip
    """Time training steps of each config; returns one result dict per config."""
    from polybyte.models import build_model
    from polybyte.pipelines.lit import device_peak_flops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    corpus = np.frombuffer(Path(text).read_bytes(), dtype=np.uint8) if text else None
    results = []
    for path in configs:
        model_cfg = _model_config(path)
        torch.manual_seed(0)
        model = build_model(model_cfg).to(device)
        seq_len = model.config.max_seq_len
        rng = np.random.default_rng(0)

        def batch():
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
        net = torch.compile(model) if compile_model else model
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=cuda)
        batches = [batch() for _ in range(4)]

        def step(i):
            ids, modality = batches[i % len(batches)]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                from polybyte.models.base import nll_loss

                loss, _ = nll_loss(net(ids, modality), ids, model.config.pad_id)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        for i in range(warmup):
            step(i)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        patches = 0.0
        for i in range(steps):
            step(i)
            if "num_patches" in model.aux:
                patches += float(model.aux["num_patches"]) / float(model.aux.get("num_bytes", batch_size * seq_len))
        if cuda:
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1000
        else:
            seconds = time.perf_counter() - t0
        bytes_per_s = steps * batch_size * seq_len / seconds
        mean_patch = steps / patches if patches else None
        flops = model.flops_per_byte(mean_patch_len=mean_patch)
        peak = device_peak_flops(device)
        results.append({
            "config": path, "backbone": model.backbone, "params": model.num_params(), "seq_len": seq_len,
            "batch_size": batch_size, "ms_per_step": 1000 * seconds / steps, "bytes_per_s": bytes_per_s,
            "flops_per_byte": flops, "mfu": flops * bytes_per_s / peak if peak else None,
            "mean_patch_len": mean_patch, "compiled": compile_model,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        })  # fmt: skip
        del net, model, opt
        if cuda:
            torch.cuda.empty_cache()
    return results


def print_train(results: list[dict]) -> None:
    base = results[0]["bytes_per_s"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"train steps on {device} (bf16 autocast on GPU), batch {results[0]['batch_size']}:")
    print(f"{'config':<34} {'params':>8} {'seq':>6} {'ms/step':>8} {'bytes/s':>12} {'MFU':>6} {'patch':>6} {'vs first':>8}")
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        patch = f"{r['mean_patch_len']:.2f}" if r["mean_patch_len"] else "-"
        print(f"{Path(r['config']).name:<34} {r['params'] / 1e6:>7.1f}M {r['seq_len']:>6} {r['ms_per_step']:>8.1f} "
              f"{r['bytes_per_s']:>12,.0f} {mfu:>6} {patch:>6} {r['bytes_per_s'] / base:>7.2f}x")  # fmt: skip


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


def bench_sample(spec: str, modality: str = "image", batch_size: int = 16, max_bytes: int = 12288,
                 uncached_bytes: int = 512, bf16: bool | None = None, compile: bool | None = None) -> dict:  # fmt: skip
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
    from polybyte.pipelines.sample import compile_decoding, prepare_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    bf16 = cuda if bf16 is None else bf16
    compile = cuda if compile is None else compile
    model, random_weights = _sample_model(spec, device)
    model = prepare_model(model, device, "bf16" if bf16 else "fp32", compile=False)
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
        generate(model, tag, None, n, num=batch_size, seed=0, stop_at_eos=False, use_cache=use_cache,
                 cuda_graphs=graphs)  # fmt: skip
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
        "model": spec, "backbone": model.backbone, "params": model.num_params(), "device": str(device),
        "bf16": bf16, "batch_size": batch_size, "bytes": max_bytes, "uncached_bytes": uncached_bytes,
        "compile_s": compile_s, "cached_s": cached_s, "cached_bytes_per_s": batch_size * max_bytes / cached_s,
        "graphs_bytes_per_s": batch_size * max_bytes / graphs_s,
        "cached_short_bytes_per_s": batch_size * uncached_bytes / cached_short_s,
        "uncached_bytes_per_s": batch_size * uncached_bytes / uncached_s,
        "cached_eager_short_bytes_per_s": batch_size * uncached_bytes / eager_short_s,
    }  # fmt: skip


def print_sample(results: list[dict]) -> None:
    r0 = results[0]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"sampling on {device} ({'bf16' if r0['bf16'] else 'fp32'} weights), batch {r0['batch_size']}; "
          f"uncached = full forward over the prefix per byte, timed over the first {r0['uncached_bytes']} bytes:")
    print(f"{'model':<30} {'params':>8} {'bytes':>6} {'compile s':>9} {'seconds':>8} {'cached B/s':>11} "
          f"{'graphs only':>11} {'short: cached':>13} {'no graphs':>10} {'uncached':>9} {'ratio':>7}")
    for r in results:
        ratio = r["cached_short_bytes_per_s"] / r["uncached_bytes_per_s"]
        compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        print(f"{Path(r['model']).name:<30} {r['params'] / 1e6:>7.1f}M {r['bytes']:>6} {compile_s:>9} "
              f"{r['cached_s']:>8.2f} {r['cached_bytes_per_s']:>11,.0f} {r['graphs_bytes_per_s']:>11,.0f} "
              f"{r['cached_short_bytes_per_s']:>13,.0f} {r['cached_eager_short_bytes_per_s']:>10,.0f} "
              f"{r['uncached_bytes_per_s']:>9,.0f} {ratio:>6.1f}x")  # fmt: skip


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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dm = ByteDataModule(sources=sources, seq_len=seq_len, batch_size=batch_size, num_workers=workers,
                            shuffle_buffer=shuffle_buffer)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.what == "train":
        missing = [c for c in args.model if not Path(c).is_file()]
        if missing:
            print(f"polybyte bench: config not found: {', '.join(missing)}", file=sys.stderr)
            return 2
        results = bench_train(args.model, args.text, args.train_batch_size, args.steps, args.warmup, args.compile)
        print_train(results)
        if args.json:
            import json

            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0
    if args.what == "sample":
        try:
            results = [
                bench_sample(spec, args.modality, args.sample_batch_size, args.sample_bytes, args.uncached_bytes,
                             bf16=False if args.fp32 else None, compile=None if args.sample_compile else False)
                for spec in args.model
            ]  # fmt: skip
        except (ValueError, FileNotFoundError) as e:
            print(f"polybyte bench: {e}", file=sys.stderr)
            return 2
        print_sample(results)
        if args.json:
            import json

            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0
    if args.what != "data":
        print(f"polybyte bench: --what {args.what} is not implemented yet; use --what train or data", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="polybyte-bench-") as tmp:
        sources = args.data or synthetic_shards(Path(tmp))
        label = " ".join(args.data) if args.data else "synthetic text/image/audio"
        print(f"data: {label}; seq_len {args.seq_len}, batch {args.batch_size}, {args.workers} workers")
        r = bench_data(sources, args.seq_len, args.batch_size, args.workers, args.batches, args.shuffle_buffer)
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
