"""`polybyte eval`: exact bits per byte per modality on every val sample, beside classic codecs.

Each sample is scored as its own id stream — text ``[TEXT] + doc + [EOS]``, image/audio
``payload + [EOS]`` — cut into ``seq_len`` windows. With ``--stride`` below ``seq_len`` the
windows overlap and every window after the first scores only its last ``stride`` targets, so
each byte is scored exactly once but with up to ``seq_len - stride`` bytes of extra context.
At the default stride (= ``seq_len``) the windows are exactly the validation loader's, so the
numbers equal ``val/bpb_*`` of `polybyte validate` on the same samples.

Outputs in ``--out``: ``report.json``, ``report.md`` (one table per modality: model vs codecs),
``bpb.png`` (bar chart) and, for BLT, ``patches.png`` (per-byte entropy and patch boundaries).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from polybyte.modalities import NUM_BYTES, RESOURCE_LIMITS, TAGS

from .bpb import BPBMeter
from .export import load_exported
from .reading import SKIP_REASONS, SkipCounter, decode_payloads, read_shards, skip_summary
from .runtime import default_device
from .sources import Source, resolve_sources
from .windows import sample_stream, stream_windows


def read_val(source: Source, progress: Callable[[int], None] | None = None) -> tuple[list[bytes], SkipCounter]:
    """Every readable val payload of a source, in the fixed val order, and the counter of the
    samples lost on the way (by reason; manifest shortfalls included). ``progress(1)`` is called
    per payload read."""
    if not source.val:
        raise ValueError(
            f"source {source.name!r} has no val shards (val-*.tar); shard it with --val-fraction > 0, "
            f"or name the shards to score with a pattern"
        )
    counter = SkipCounter(max_fraction=0.5, min_seen=10)
    samples = read_shards(source.val, counter, source.expected, source.val_total)
    payloads = []
    for payload in decode_payloads(samples, source, counter):
        payloads.append(payload)
        if progress is not None:
            progress(1)
    return payloads, counter


def val_payloads(source: Source) -> list[bytes]:
    """Every readable val payload of a source, in the fixed val order (skips are counted)."""
    return read_val(source)[0]


def default_seq_len(model, info: dict) -> int:
    """The window eval scores in by default: the export's training seq_len, else the model's
    ``max_seq_len``."""
    return int(info.get("seq_len") or model.config.max_seq_len)


@torch.no_grad()
def score(
    model,
    streams: list[tuple[np.ndarray, int]],
    seq_len: int,
    stride: int,
    batch_size: int,
    device,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Sum of bits and count of payload targets per modality, plus per-sample bits.

    streams: [(ids int array, tag)] — one per sample. ``progress(n)`` is called after each batch
    with the number of payload bytes it scored.
    """
    meter = BPBMeter()
    rows: list[tuple[np.ndarray, np.ndarray, int, int]] = []  # (window, scored mask, tag, sample index)
    per_sample_bits = [0.0] * len(streams)
    for i, (stream, tag) in enumerate(streams):
        for window, scored in stream_windows(stream, seq_len, stride):
            rows.append((window, scored, tag, i))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids = torch.from_numpy(np.stack([r[0] for r in chunk])).long().to(device)  # [B, T]
        scored = torch.from_numpy(np.stack([r[1] for r in chunk])).to(device)  # [B, T] bool
        modality = torch.tensor([r[2] for r in chunk], device=device)
        _, nll = model.loss(ids, modality)
        bits = meter.update(nll, ids, modality, scored=scored).tolist()  # payload targets in `scored` only
        for r, b in zip(chunk, bits):
            per_sample_bits[r[3]] += b
        if progress is not None:
            progress(int(sum(((r[0] < NUM_BYTES) & r[1]).sum() for r in chunk)))
    return {"meter": meter, "per_sample_bits": per_sample_bits, "windows": len(rows)}


def evaluate(
    ckpt,
    data: list[str],
    out_dir,
    *,
    codecs: bool = False,
    stride: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    max_samples: int | None = None,
    adapter_settings: dict[str, dict] | None = None,
    progress: bool | None = None,
) -> dict:
    """Score the val samples of each ``modality=DIR`` source, or the shards a ``modality=PATTERN``
    names (whatever their names); write the report files.

    ``progress``: show bars on stderr per source (reading, scoring, codecs); None shows them when
    stderr is a terminal.

    ``adapter_settings`` (``{source name: {setting: value}}``, as ``data.adapter_settings``)
    override the settings a source is read with, and crop/resize or resample its members. A
    source without a manifest (a third-party webdataset) is read with the settings the
    checkpoint was trained with for its modality; its first members are checked against them.
    """
    device = default_device(device)
    model, info = load_exported(ckpt, device)
    seq_len = default_seq_len(model, info) if seq_len is None else int(seq_len)
    stride = seq_len if stride is None else int(stride)
    if seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2 (a byte and EOS), got {seq_len}")
    if not 0 < stride <= seq_len:
        raise ValueError(f"--stride must be in 1..seq_len={seq_len}, got {stride}")
    trained = info.get("modalities", {})
    sources = resolve_sources(
        data, adapter_settings=_settings_arg(adapter_settings), defaults=trained, score=True, flag="--adapter-settings"
    )
    for source in sources:
        for note in source.notes:
            print(f"eval: note: {note}", file=sys.stderr)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "checkpoint": str(ckpt),
        "step": info.get("step"),
        "backbone": info["model"]["backbone"],
        "seq_len": seq_len,
        "stride": stride,
        "params": model.num_params(),
        "modalities": {},
        "skipped": {"total": 0, **dict.fromkeys(SKIP_REASONS, 0)},
    }
    excerpt = None  # a text excerpt for BLT's patch plot
    bars = _bars(progress)
    for source in sources:
        adapter = source.adapter()
        settings = adapter.settings_dict()
        _check_settings(source, settings, trained.get(source.modality))
        with bars(f"{source.name}: reading", source.val_total, "samples") as advance:
            payloads, counter = read_val(source, advance)
        lost = counter.by_reason()
        if not payloads:
            raise ValueError(
                f"source {source.name!r}: none of its {counter.seen} val samples could be read "
                f"({skip_summary(lost)}; first failure: {counter.first}), e.g. in {source.val[0]}"
            )
        payloads = payloads[:max_samples]
        for reason, n in lost.items():
            report["skipped"][reason] += n
        report["skipped"]["total"] += counter.skipped
        if source.modality == "text" and excerpt is None:
            excerpt = payloads[0][:160]
        tag = TAGS[source.modality]
        streams = [(sample_stream(p, tag), tag) for p in payloads]
        t0 = time.perf_counter()
        with bars(f"{source.name}: scoring", sum(len(p) for p in payloads), "bytes") as advance:
            result = score(model, streams, seq_len, stride, batch_size, device, advance)
        seconds = time.perf_counter() - t0
        bits = float(result["meter"].bits.sum())
        count = int(result["meter"].count.sum())
        entry = {
            "source": source.name,
            "samples": len(payloads),
            "payload_bytes": count,
            "windows": result["windows"],
            "bpb": bits / count,
            "seconds": seconds,
            "settings": settings,
            "skipped": {"total": counter.skipped, **lost},
        }
        if source.modality == "image":
            entry["bits_per_dim"] = entry["bpb"]  # 8-bit RGB: one byte per dimension
        if source.modality == "audio":
            entry["bits_per_sample"] = entry["bpb"] * adapter.bytes_per_sample
        if codecs:
            from .codecs import available_codecs, codec_bpb

            with bars(f"{source.name}: codecs", len(available_codecs()[source.modality]), "codecs") as advance:
                entry["codecs"] = codec_bpb(source.modality, payloads, settings, lambda name: advance(1))
        report["modalities"][source.name] = entry
        skipped = f"; {counter.skipped} skipped ({skip_summary(lost)})" if counter.skipped else ""
        print(
            f"eval: {source.name}: {entry['bpb']:.4f} bits/byte over {count} bytes of {len(payloads)} samples{skipped}"
        )
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown_report(report))
    plot_bpb(report, out / "bpb.png")
    if model.backbone == "blt" and excerpt is not None:
        plot_patches(model, excerpt, out / "patches.png", device)
    print(f"eval: report written to {out}/report.md; {_skipped_line(report['skipped'])}")
    return report


def _bars(show: bool | None):
    """``bars(description, total, unit)``: a context giving ``advance(n)`` for one rich progress
    bar on stderr, which stays on screen once done; a no-op unless ``show`` (None: stderr is a
    terminal). ``total`` None: unknown."""
    from rich.console import Console

    console = Console(stderr=True)
    if not (console.is_terminal if show is None else show):
        return lambda *_: contextlib.nullcontext(lambda n: None)

    @contextlib.contextmanager
    def bar(description: str, total: int | None, unit: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn(description), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeRemainingColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task(description, total=total)
            yield lambda n: progress.advance(task, n)
            if total is None:  # an unknown total ends full
                progress.update(task, total=progress.tasks[0].completed)

    return bar


def _skipped_line(skipped: dict) -> str:
    """``{"total": 3, "missing": 3, ...}`` -> ``"3 samples skipped (3 missing)"``."""
    if not skipped.get("total"):
        return "no samples skipped"
    return f"{skipped['total']} samples skipped ({skip_summary({k: v for k, v in skipped.items() if k != 'total'})})"


def _settings_arg(value) -> dict[str, dict] | None:
    """``--adapter-settings``: a mapping ``{source name: {setting: value}}``, or its JSON/YAML text."""
    if value is None:
        return None
    if isinstance(value, str):
        import yaml

        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ValueError(f"--adapter-settings is not JSON/YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ValueError(
            f'--adapter-settings must map source names to settings, e.g. \'{{"image": {{"size": 32}}}}\'; got {value!r}'
        )
    return {str(k): dict(v) for k, v in value.items()}


def _check_settings(source: Source, settings: dict, trained: dict | None) -> None:
    """Refuse data encoded unlike the model's training data (clip length and resource limits
    do not change the encoding)."""
    if trained is None:
        return
    ignored = {"clip_seconds", *RESOURCE_LIMITS}
    differ = {k: (v, trained[k]) for k, v in settings.items() if k in trained and trained[k] != v and k not in ignored}
    if differ:
        detail = ", ".join(f"{k}: data {a!r} vs model {b!r}" for k, (a, b) in differ.items())
        fix = json.dumps({source.name: {k: b for k, (_, b) in differ.items()}})
        raise ValueError(
            f"source {source.name!r} was encoded differently from the model's training data ({detail}); "
            f"to read it as the model was trained, pass --adapter-settings '{fix}'"
        )


def markdown_report(report: dict) -> str:
    lines = [
        f"# polybyte eval — {report['backbone']}",
        "",
        f"checkpoint `{report['checkpoint']}` (step {report.get('step', '?')}), "
        f"{report['params'] / 1e6:.2f}M parameters, "
        f"seq_len {report['seq_len']}, stride {report['stride']}",
        "",
        f"Skipped: {_skipped_line(report.get('skipped') or {})}.",
        "",
    ]
    for name, e in report["modalities"].items():
        unit = " (= bits/dim)" if "bits_per_dim" in e else (", bits/sample" if "bits_per_sample" in e else "")
        lines += [
            f"## {name} ({e['samples']} samples, {e['payload_bytes']} payload bytes)",
            "",
            f"| method | bits/byte{unit} |",
            "|---|---|",
        ]
        if (e.get("skipped") or {}).get("total"):
            lines[-2:-2] = [f"{_skipped_line(e['skipped'])} on the way.", ""]
        extra = e.get("bits_per_sample")
        lines.append(f"| **{report['backbone']}** | {e['bpb']:.4f}" + (f", {extra:.3f}" if extra else "") + " |")
        for codec, r in (e.get("codecs") or {}).items():
            lines.append(f"| {codec} | " + (f"{r['bpb']:.4f} |" if "bpb" in r else f"skipped: {r['skipped']} |"))
        lines.append("")
    return "\n".join(lines)


def plot_bpb(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = report["modalities"]
    fig, axes = plt.subplots(1, len(entries), figsize=(4.5 * len(entries), 3.6), squeeze=False)
    for ax, (name, e) in zip(axes[0], entries.items()):
        labels = [report["backbone"]] + [c for c, r in (e.get("codecs") or {}).items() if "bpb" in r]
        values = [e["bpb"]] + [r["bpb"] for r in (e.get("codecs") or {}).values() if "bpb" in r]
        ax.bar(range(len(values)), values, color=["C3"] + ["C0"] * (len(values) - 1))
        ax.set_xticks(range(len(values)), labels, rotation=40, ha="right", fontsize=8)
        ax.set_title(name)
        ax.set_ylabel("bits per byte")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def plot_patches(model, text: bytes, path: Path, device) -> None:
    """A BLT's patch starts over a text excerpt, with the per-byte entropy of its entropy model
    (when it has one) that entropy patching thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from polybyte.models.entropy import compute_entropies
    from polybyte.models.patching import patch_ids_to_starts

    ids = torch.tensor([list(text)], device=device)  # [1, T]
    modality = torch.tensor([TAGS["text"]], device=device)
    _, patch_ids = model.patch(ids, modality)
    starts = patch_ids_to_starts(patch_ids)[0].cpu().numpy()
    fig, ax = plt.subplots(figsize=(min(24, 0.16 * len(text) + 2), 3.2))
    if model.entropy_model is not None:
        entropy = compute_entropies(model.entropy_model, ids, modality)[0]
        ax.plot(entropy.float().cpu().numpy(), color="C0", lw=1)
        ax.set_ylabel("entropy (nats)")
    for x in np.flatnonzero(starts):
        ax.axvline(x - 0.5, color="C3", lw=0.6, alpha=0.6)
    ax.set_xticks(range(len(text)), [chr(b) if 32 <= b < 127 else "·" for b in text], fontsize=6)
    ax.set_title(f"patch starts (red), {int(starts.sum())} patches over {len(text)} bytes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="polybyte eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint folder (or .ckpt) written by `polybyte fit`")
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="MODALITY=DIR|PATTERN",
        help="what to score per source: a shard folder's val split (text=shards/text), or exactly "
        'the shards a glob or brace pattern names, whatever their names ("image=cifar10/train-00000[89].tar")',
    )
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--codecs", action="store_true", help="also compress the same samples with classic codecs")
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: seq_len)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the training seq_len)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-samples", type=int, default=None, help="score only the first N val samples per source")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (shown by default on a terminal)")
    p.add_argument(
        "--adapter-settings",
        default=None,
        metavar="JSON",
        help="adapter settings per source name, as data.adapter_settings, e.g. "
        '\'{"image": {"size": 32}}\' (default: the manifest\'s; without one, the '
        "checkpoint's)",
    )
    args = p.parse_args(argv)
    try:
        evaluate(
            args.ckpt,
            args.data,
            args.out,
            codecs=args.codecs,
            stride=args.stride,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            device=args.device,
            max_samples=args.max_samples,
            adapter_settings=args.adapter_settings,
            progress=False if args.quiet else None,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"polybyte eval: error: {e}", file=sys.stderr)
        return 2
    return 0
