"""`polybyte demo`: the embedded default run, end to end on this machine.

1. builds the demo's mixed dataset (stdlib text, procedural images, synthesised audio; no
   downloads) and shards it — once, into a cache folder shared with `configs/debug.yaml`;
2. trains `configs/demo.yaml` (a small flat byte transformer) for a fixed number of steps on
   the CPU, all cores, no loader processes; a wall-time cap is only a safety net, and the
   summary says so when it cut training short;
3. evaluates bits per byte per modality next to gzip/bzip2/xz, PNG/WebP/JPEG XL and FLAC;
4. samples images (PNG), audio (WAV) and text from the trained model;
5. prints, per modality, the model's bits/byte, the best codec's and who won, the steps done,
   and where everything is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

from polybyte.modalities.audio import ENCODINGS

from .demo_data import DEMO_SETTINGS, ensure_demo_shards
from .runtime import shipped_config

DEMO_STEPS = 2500  # default training steps (configs/demo.yaml's max_steps)
DEMO_MINUTES = 10.0  # safety cap on training time: a loaded machine stops early and says so
DEMO_TEMPERATURE = 0.7  # sampling temperature: a small model's samples are clearer a little cooled


def demo_config(out: Path, steps: int, minutes: float, shards: dict[str, Path]) -> Path:
    """configs/demo.yaml with the run folder moved under ``out`` and the given length."""
    cfg = yaml.safe_load(shipped_config("demo.yaml").read_text())  # shipped with every install
    run = out / "run"
    trainer = cfg["trainer"]
    trainer["default_root_dir"] = str(run)
    trainer["max_steps"] = steps
    trainer["max_time"] = {"seconds": max(1, round(minutes * 60))}  # Trainer takes int fields only
    trainer["val_check_interval"] = max(1, steps // 3)
    cfg["checkpoint"]["every_n_train_steps"] = max(1, steps // 3)  # checkpoints follow default_root_dir
    cfg["data"]["sources"] = {m: str(d) for m, d in shards.items()}
    path = out / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_demo(out: Path, steps: int, minutes: float, samples: int) -> int:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)  # every core, explicitly: the demo has no loader processes
    shards = ensure_demo_shards()
    config = demo_config(out, steps, minutes, shards)
    if (out / "run").exists():  # each demo trains afresh: `fit` refuses a folder holding another run
        print(f"demo: replacing the previous demo run in {out / 'run'}", flush=True)
        shutil.rmtree(out / "run")

    print(
        f"\ndemo: training {config} for {steps} steps on {torch.get_num_threads()} CPU threads "
        f"(safety cap {minutes:g} min)",
        flush=True,
    )
    from .lit import main as lit_main

    t_fit = time.perf_counter()
    rc = lit_main(["fit", "--config", str(config)])
    if rc:  # the error is already printed
        return rc
    fit_seconds = time.perf_counter() - t_fit
    ckpt = out / "run" / "checkpoints" / "last"
    done = json.loads((ckpt / "config.json").read_text()).get("step", 0)

    print("\ndemo: evaluating bits per byte on the val split, with codecs", flush=True)
    from .evaluate import evaluate

    report = evaluate(ckpt, [f"{m}={d}" for m, d in shards.items()], out / "eval", codecs=True)

    print(f"\ndemo: sampling at temperature {DEMO_TEMPERATURE}", flush=True)
    from .sample import main as sample_main

    sample_dirs, failed = {}, []
    audio = DEMO_SETTINGS["audio"]
    audio_bytes = audio["sample_rate"] // 2 * ENCODINGS[audio["encoding"]]  # half a second
    jobs = (
        ("image", samples, []),
        ("audio", 2, ["--max-bytes", str(audio_bytes)]),
        ("text", 2, ["--max-bytes", "400"]),
    )
    for modality, num, extra in jobs:
        folder = out / "samples" / modality
        args = [
            "--ckpt",
            str(ckpt),
            "--modality",
            modality,
            "--num",
            str(num),
            "--out",
            str(folder),
            "--seed",
            "0",
            "--device",
            "cpu",
            "--temperature",
            str(DEMO_TEMPERATURE),
            *extra,
        ]
        if sample_main(args):
            print(f"demo: sampling {modality} failed (see the error above); going on", flush=True)
            failed.append(modality)
            continue
        sample_dirs[modality] = folder

    print(f"\ndemo: done in {time.perf_counter() - t0:.0f} s. Results (bits per byte on the val split):")
    for line in summary_lines(report):
        print(line)
    cut = f"; stopped by the {minutes:g}-minute safety cap, {steps - done} steps short" if done < steps else ""
    print(f"  trained      {done} of {steps} steps in {fit_seconds:.0f} s{cut}")
    print(f"  config       {config}")
    print(f"  checkpoint   {ckpt}  (model.safetensors + config.json)")
    print(f"  logs         {out / 'run'}  (tensorboard --logdir {out / 'run'})")
    print(f"  eval report  {out / 'eval' / 'report.md'}  (+ bpb.png)")
    for modality, folder in sample_dirs.items():
        print(f"  {modality + ' samples':<12} {folder}")
    if failed:
        print(f"polybyte demo: error: sampling failed for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def summary_lines(report: dict) -> list[str]:
    """One line per modality: the model's bits/byte, the best codec's (any codec, concatenated
    text included), which of the two won and, when the codec did, the codecs the model beat."""
    lines = []
    for name, e in report["modalities"].items():
        codecs = {c: r["bpb"] for c, r in (e.get("codecs") or {}).items() if "bpb" in r}
        line = f"  {name:<6} model {e['bpb']:.3f}"
        if codecs:
            best, bpb = min(codecs.items(), key=lambda kv: kv[1])
            line += f" | best codec {best} {bpb:.3f} | " + ("model wins" if e["bpb"] < bpb else "codec wins")
            beaten = [f"{c} {v:.3f}" for c, v in codecs.items() if e["bpb"] < v]
            if beaten and e["bpb"] >= bpb:
                line += "; model beats " + ", ".join(beaten)
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="polybyte demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="polybyte-demo", help="output folder (default: ./polybyte-demo)")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help="training steps (default %(default)s)")
    p.add_argument(
        "--minutes",
        type=float,
        default=DEMO_MINUTES,
        help="safety cap on training time in minutes (default %(default)s)",
    )
    p.add_argument("--samples", type=int, default=8, help="images to sample (default 8)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.minutes <= 0:
        print("polybyte demo: --steps and --minutes must be positive", file=sys.stderr)
        return 2
    return run_demo(Path(args.out), args.steps, args.minutes, args.samples)
