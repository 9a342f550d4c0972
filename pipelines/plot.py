"""`polybyte plot RUN [RUN ...]`: learning curves — validation bits/byte per modality against
training time and against training FLOPs, one line per run and modality, with the codecs of an
eval report (``--codecs report.json``) as horizontal lines.

A run is the folder `polybyte fit` wrote (``trainer.default_root_dir``); its ``csv/version_*/
metrics.csv`` files (one per start, resumes included) are read in order. Time and FLOPs are the
cumulative ``perf/train_seconds`` and ``perf/train_flops`` that training logs at each logging
step; a validation row takes those of the last logging step at or before it.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

TIME, FLOPS = "perf/train_seconds", "perf/train_flops"


def read_metrics(run: Path) -> list[dict[str, float]]:
    """Every row of every ``csv/version_*/metrics.csv`` of ``run``, oldest start first, empty
    cells dropped. Raises FileNotFoundError naming the run when there is none."""
    versions = sorted((run / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not versions:
        raise FileNotFoundError(f"{run}: no csv/version_*/metrics.csv (not a `polybyte fit` run folder?)")
    rows = []
    for path in versions:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows


def val_curves(rows: list[dict[str, float]]) -> dict[str, list[tuple[int, float | None, float | None, float]]]:
    """``{modality: [(step, seconds, flops, bpb), ...]}`` from the ``val/bpb_*`` rows; seconds
    and FLOPs of the last training row at or before each (None before the first)."""
    curves: dict[str, list] = {}
    seconds = flops = None
    for row in sorted(rows, key=lambda r: r.get("step", 0)):
        seconds = row.get(TIME, seconds)
        flops = row.get(FLOPS, flops)
        for key, value in row.items():
            if key.startswith("val/bpb_"):
                curves.setdefault(key.removeprefix("val/bpb_"), []).append((int(row["step"]), seconds, flops, value))
    return curves


def codec_lines(report: dict) -> dict[str, dict[str, float]]:
    """``{modality source: {codec: bits/byte}}`` from an eval report.json."""
    return {
        name: {codec: r["bpb"] for codec, r in (entry.get("codecs") or {}).items() if "bpb" in r}
        for name, entry in report.get("modalities", {}).items()
    }


def plot(runs: dict[str, dict[str, list]], codecs: dict[str, dict[str, float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modalities = sorted({m for curves in runs.values() for m in curves})
    fig, axes = plt.subplots(len(modalities), 2, figsize=(11, 3.4 * len(modalities)), squeeze=False)
    for row, modality in enumerate(modalities):
        for col, (index, label, scale) in enumerate(((1, "training time (minutes)", 60.0), (2, "training FLOPs", 1.0))):
            ax = axes[row][col]
            for run, curves in runs.items():
                points = [(p[index] / scale, p[3]) for p in curves.get(modality, []) if p[index] is not None]
                if points:
                    ax.plot(*zip(*points), marker="o", markersize=3, label=run)
            for codec, bpb in sorted(codecs.get(modality, {}).items(), key=lambda kv: kv[1]):
                # named on the line itself: grey dashes in a legend cannot tell codecs apart
                ax.axhline(bpb, color="0.5", linestyle="--", linewidth=1)
                ax.annotate(
                    f"{codec} {bpb:.2f}",
                    (0.99, bpb),
                    xycoords=("axes fraction", "data"),
                    ha="right",
                    va="bottom",
                    fontsize=7,
                    color="0.35",
                )
            if col == 1:
                ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(f"val bits/byte, {modality}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polybyte plot", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders of `polybyte fit` (trainer.default_root_dir)")
    p.add_argument("--out", type=Path, default=Path("curves.png"), help="PNG to write (default %(default)s)")
    p.add_argument("--codecs", type=Path, help="an eval report.json whose codecs are drawn as horizontal lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = {run.name: val_curves(read_metrics(run)) for run in args.runs}
        codecs = codec_lines(json.loads(args.codecs.read_text())) if args.codecs else {}
    except (FileNotFoundError, json.JSONDecodeError, ValueError) as e:
        print(f"polybyte plot: error: {e}", file=sys.stderr)
        return 2
    empty = [name for name, curves in runs.items() if not curves]
    if empty:
        print(f"polybyte plot: error: no val/bpb_* rows in {', '.join(empty)} (no validation ran yet)", file=sys.stderr)
        return 2
    untimed = [name for name, curves in runs.items() if all(p[1] is None for c in curves.values() for p in c)]
    if untimed:
        print(f"polybyte plot: {', '.join(untimed)} logged no {TIME} (runs from before it): drawn on no time axis")
    plot(runs, codecs, args.out)
    points = sum(len(c) for curves in runs.values() for c in curves.values())
    print(f"polybyte plot: {points} validation points of {len(runs)} run(s) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
