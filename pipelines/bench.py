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

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from .bench_data import DEFAULT_SEQ_LEN, bench_data, synthetic_shards
from .bench_sample import bench_sample, print_sample
from .bench_train import bench_train, model_config, print_train_header, print_train_row
from .peers import is_transformers_blt, missing_peers


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
        help="train: also time the reference implementation of each MEGABYTE config (lucidrains' "
        "megabyte-pytorch) and BLT config (transformers' BltForCausalLM) at its shapes, batch, "
        "precision and optimizer, in the same process (needs the bench extra); sample: also time "
        "transformers' own generate on each transformers BLT --model",
    )
    g.add_argument("--json", default=None, help="also write the results to this JSON file")
    g.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="train: after timing, profile 3 steps of each row with torch.profiler and write "
        "its operator table (by device time) to DIR/NAME.txt",
    )
    g = p.add_argument_group(
        "sample (--what sample; --model also takes BACKBONE:PRESET, a checkpoint folder, a transformers BLT "
        "folder or transformers-blt: random weights at BLT-1B's shapes)"
    )
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
            model = model_config(c)
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
        if any(is_transformers_blt(m) for m in args.model) and "transformers" in missing_peers():
            print(
                "polybyte bench: a transformers BLT --model needs transformers (the test or bench extra)",
                file=sys.stderr,
            )
            return 2
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
                    peers=args.peers,
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
