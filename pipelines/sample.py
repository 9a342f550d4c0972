"""`polybyte sample`: draw images (PNG), audio (WAV) or text from an exported checkpoint.

    polybyte sample --ckpt DIR --modality image|audio|text --num N --out DIR [--prompt FILE]
                    [--prompt-fraction F | --prompt-seconds S] [--max-bytes M]
                    [--temperature T --top-k K --top-p P --seed S]
                    [--batch-size B] [--device D] [--dtype bf16|fp32] [--no-compile]

Sampling uses the backbone's caches (``models/generate.py``); on CUDA the weights are cast to
bf16 and the backbone's fixed-shape decoding steps are torch.compile'd first (MEGABYTE, BLT; the
compile time is reported apart from the sampling rate). Outputs in ``--out``:

* image: ``image_000.png`` ... and ``grid.png`` (with a prompt, one row per sample: the prompt's
  kept rows, the completion, the original);
* audio: ``audio_000.wav`` ... at the model's sample rate and ``audio.png`` (waveform and
  spectrogram per sample);
* text: ``text_000.txt`` ... (prompt + continuation), also printed to stdout.

A prompt is encoded by the checkpoint's own adapter (same crop/resize/order, sample rate and
encoding as in training): the top rows of an image (``--prompt-fraction``), the first seconds of
a recording (``--prompt-seconds``, default ``--prompt-fraction`` of the clip), or a whole text
file are kept and continued. A prompt converted on the way (an image of another size or mode, a
recording at another rate or with several channels) gets one note line on stderr, e.g.
``prompt cat.png: 48x40 RGBA -> 32x32 RGB (the model's settings)``. Bad input (a prompt of
another modality, a prompt too long for the model's window, a modality the model was not trained
on) exits with status 2 and a message.

The Python API's `Model.generate` (polybyte/api.py) runs the same steps: `trained_adapter`, a
`Prompt`, `plan` (every check above) and `sample_payloads`, with `sample_options`' defaults.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from polybyte.modalities import TAGS, get_modality, modality_from_dict
from polybyte.models.generate import generate

from .runtime import default_device, draw_samples, prepare_for_sampling, sample_bytes

TEXT_MAX_BYTES = 512  # default text continuation length
GRID_CELL = 64  # grid.png shows images smaller than this many pixels enlarged (nearest) to about it


class UsageError(ValueError):
    """Bad arguments or input: reported as one line, exit status 2 (a ValueError to the Python API)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polybyte sample", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint folder (model.safetensors + config.json) or its .ckpt")
    p.add_argument("--modality", required=True, choices=sorted(TAGS), help="what to sample")
    p.add_argument("--num", type=int, default=4, help="number of samples (default %(default)s)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--prompt", help="file to continue: an image, an audio file or a text file")
    p.add_argument(
        "--prompt-fraction",
        type=float,
        default=0.5,
        help="image: fraction of rows kept from the top; audio: fraction of the clip "
        "kept, unless --prompt-seconds (default %(default)s)",
    )
    p.add_argument("--prompt-seconds", type=float, help="audio: seconds of the prompt kept")
    p.add_argument(
        "--max-bytes",
        type=int,
        help="bytes per sample, prompt included for image and audio, new bytes for text "
        "(default: one image / one clip (or seq_len - 1) / 512)",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, help="sample among the k most likely bytes")
    p.add_argument("--top-p", type=float, help="nucleus sampling: smallest set of bytes with probability >= p")
    p.add_argument("--seed", type=int, help="random seed (reproducible samples)")
    p.add_argument("--batch-size", type=int, help="rows sampled together (default: --num)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument(
        "--dtype",
        choices=["bf16", "fp32"],
        help="weights and compute in bf16 (default on CUDA) or fp32 (default on CPU)",
    )
    p.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="do not torch.compile the decoding steps (compiled by default on CUDA)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"polybyte sample: error: {e}", file=sys.stderr)
        return 2


# --- the job ----------------------------------------------------------------------------------
def sample_options(**overrides) -> argparse.Namespace:
    """The options of `polybyte sample` at its defaults, with ``overrides`` (``num=2``,
    ``max_bytes=100``, ...): the Python API samples through the same code with the same defaults."""
    args = build_parser().parse_args(["--ckpt", "", "--modality", "text", "--out", ""])
    unknown = sorted(set(overrides) - set(vars(args)))
    if unknown:
        raise TypeError(f"unknown sampling option(s) {unknown}; known: {sorted(vars(args))}")
    vars(args).update(overrides)
    return args


def run(args: argparse.Namespace) -> int:
    from polybyte.pipelines.export import load_exported

    try:
        device = default_device(args.device)
    except RuntimeError as e:
        raise UsageError(f"--device {args.device}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    try:
        model, info = load_exported(args.ckpt, device)
    except (FileNotFoundError, ValueError) as e:  # missing or unreadable export files
        raise UsageError(str(e)) from None
    adapter = trained_adapter(info, args.modality)
    given = None if args.prompt is None else Prompt(encode_prompt_file(adapter, args.prompt), name=str(args.prompt))
    note = None if args.prompt is None else prompt_note(adapter, args.prompt)
    if note:
        print(note, file=sys.stderr)
    job, prompt, new_bytes = plan(model, info, adapter, args, given)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = prepare_for_sampling(model, device, dtype, args.compile)
    job.save(sample_payloads(model, adapter, prompt, new_bytes, args, device, dtype), out, prompt)
    return 0


@dataclass
class Prompt:
    """What every sample continues: a payload, cut to ``--prompt-fraction`` / ``--prompt-seconds``
    (an image or recording, from a file or a Python object) or, with ``whole``, kept as given."""

    payload: bytes
    whole: bool = False
    name: str = "the prompt"  # for messages


def trained_adapter(info: dict, modality: str):
    """The adapter the export was trained with for ``modality``; UsageError if it knows none."""
    known = info.get("modalities", {})
    if modality not in known:
        raise UsageError(f"the checkpoint was not trained on {modality!r}; it knows {sorted(known) or 'no modality'}")
    return modality_from_dict(known[modality])


def encode_prompt_file(adapter, path) -> bytes:
    """A prompt file's payload, encoded by the checkpoint's adapter (refused if its extension
    belongs to another modality)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"prompt file {path} not found")
    suffix = path.suffix.lower()
    for name in TAGS:
        if name != adapter.name and suffix in get_modality(name).extensions:
            raise UsageError(f"prompt {path} looks like {name} ({suffix}) but --modality is {adapter.name}")
    try:
        return adapter.encode(path.read_bytes(), {"extension": suffix})
    except ValueError as e:
        raise UsageError(f"prompt {path}: {e}") from None


def prompt_note(adapter, path) -> str | None:
    """``prompt cat.png: 48x40 RGBA -> 32x32 RGB (the model's settings)`` when encoding the prompt
    file (already checked by `encode_prompt_file`) converts it; None when it matches the model."""
    change = adapter.conversion(Path(path).read_bytes())
    return None if change is None else f"prompt {path}: {change[0]} -> {change[1]} (the model's settings)"


def plan(model, info: dict, adapter, args, given: Prompt | None) -> tuple[_Job, bytes, int]:
    """Check the request against the model: (the job, the prompt payload, the bytes to sample)."""
    if args.num < 1:
        raise UsageError(f"--num must be >= 1, got {args.num}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    # a model whose attention slides samples past its training window; others stop at it
    window = info.get("seq_len") if model.max_stream_len is not None else None
    job = _JOBS[adapter.name](adapter, args, window, model, given)
    prompt = job.prompt()
    new_bytes = job.max_new(len(prompt))
    if window is not None and len(prompt) + new_bytes > window - 1:
        raise UsageError(
            f"prompt ({len(prompt)} bytes) + {new_bytes} new bytes exceed the model's window "
            f"(seq_len {window} holds {window - 1} payload bytes); shorten the prompt or lower --max-bytes"
        )
    return job, prompt, new_bytes


def sample_payloads(
    model, adapter, prompt: bytes, new_bytes: int, args, device, dtype, quiet: bool = False
) -> list[bytes]:
    """args.num samples of the adapter's modality, each ``prompt`` + its continuation, from a
    model ready for sampling (`prepare_for_sampling`); unless ``quiet``, with a progress bar and
    the bytes/s printed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    batch = args.batch_size or args.num
    if model.compilable_steps and args.compile and device.type == "cuda":
        start = time.perf_counter()  # compile for each batch size used, outside the timing
        for n in {min(batch, args.num), args.num % batch} - {0}:
            generate(model, adapter.tag, None, 3 * model.seq_multiple, num=n, stop_at_eos=False)
        torch.cuda.synchronize(device)
        if not quiet:
            print(f"compiled the decoding steps in {time.perf_counter() - start:.1f} s")
    samples: list[bytes] = []
    columns = (TextColumn("sampling"), BarColumn(), MofNCompleteColumn(), TextColumn("bytes"), TimeRemainingColumn())
    start = time.perf_counter()
    with Progress(*columns, transient=False, disable=quiet) as bar:
        task = bar.add_task("sampling", total=args.num * new_bytes)
        for first in range(0, args.num, batch):
            n = min(batch, args.num - first)
            seed = None if args.seed is None else args.seed + first
            try:
                samples += draw_samples(
                    model,
                    adapter,
                    n,
                    new_bytes,
                    prompt=prompt,
                    seed=seed,
                    temperature=args.temperature,
                    top_k=args.top_k,
                    top_p=args.top_p,
                    progress=lambda k: bar.advance(task, k),
                )
            except ValueError as e:  # e.g. a window longer than the model's positions
                raise UsageError(str(e)) from None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    produced = sum(len(s) - len(prompt) for s in samples)
    if not quiet:
        print(
            f"sampled {produced} bytes in {seconds:.2f} s: {produced / max(seconds, 1e-9):,.0f} bytes/s "
            f"({args.num} samples, batch {batch}, {device.type}, {dtype})"
        )
    return samples


# --- per-modality prompts and outputs ---------------------------------------------------------
class _Job(ABC):
    """What differs per modality: cutting the prompt, the sample length, writing the results."""

    def __init__(self, adapter, args, seq_len: int | None, model, given: Prompt | None = None) -> None:
        self.adapter, self.args, self.seq_len, self.model, self.given = adapter, args, seq_len, model, given
        self.original: bytes | None = None  # the prompt's whole payload (image grid)

    def read_prompt(self) -> bytes:
        """The given prompt's whole payload; b"" without a prompt."""
        return b"" if self.given is None else self.given.payload

    @abstractmethod
    def prompt(self) -> bytes:
        """The payload bytes every sample starts from (b"" without --prompt)."""

    @abstractmethod
    def max_new(self, prompt_len: int) -> int:
        """Bytes to sample after a prompt of ``prompt_len`` bytes."""

    @abstractmethod
    def save(self, payloads: list[bytes], out: Path, prompt: bytes) -> None:
        """Write the samples (each prompt + continuation) into ``out``."""


def _patch_multiple(model) -> int:
    """Bytes per fixed patch of the backbone (MEGABYTE, strided BLT), else 1: prompts are cut
    at multiples of it so the first sampled byte starts a patch, as in training."""
    return model.fixed_patch_len or 1


class _ImageJob(_Job):
    def prompt(self) -> bytes:
        self.original = self.read_prompt()
        if not self.original or self.given.whole:
            return self.original
        size, order = self.adapter.settings.size, self.adapter.settings.order
        frac = self.args.prompt_fraction
        if not 0 <= frac < 1:
            raise UsageError(f"--prompt-fraction must be in [0, 1) for images, got {frac}")
        row_bytes = 3 * size
        # whole rows (whole block rows in patch{k} order), and a whole number of model patches
        step = int(order[len("patch") :]) if order.startswith("patch") else 1
        P = _patch_multiple(self.model)
        step *= P // math.gcd(P, row_bytes * step)
        rows = int(frac * size) // step * step
        return self.original[: rows * row_bytes]

    def max_new(self, prompt_len: int) -> int:
        full = sample_bytes(self.adapter, None)
        total = _explicit_max(self.args, full)
        if total > full:
            raise UsageError(f"--max-bytes {total} exceeds one {self.adapter.settings.size}px image ({full} bytes)")
        if prompt_len >= total:
            raise UsageError(f"the prompt ({prompt_len} bytes) leaves nothing to sample within {total} bytes")
        return total - prompt_len

    def save(self, payloads: list[bytes], out: Path, prompt: bytes) -> None:
        from PIL import Image

        images = [self.adapter.decode(p) for p in payloads]
        for i, im in enumerate(images):
            self.adapter.save(im, out / f"image_{i:03d}.png")
        if self.original:  # one row per sample: prompt (rest grey), completion, original
            rest = self.adapter.payload_bytes - len(prompt)
            shown = self.adapter.decode(prompt + bytes([128]) * rest)
            cells = [[shown, im, self.adapter.decode(self.original)] for im in images]
        else:
            cols = math.ceil(math.sqrt(len(images)))
            cells = [images[r : r + cols] for r in range(0, len(images), cols)]
        scale = max(1, GRID_CELL // self.adapter.settings.size)  # small images enlarged, pixels kept sharp
        size = self.adapter.settings.size * scale
        gap = max(1, size // 16)
        rows, cols = len(cells), max(len(r) for r in cells)
        grid = Image.new("RGB", (cols * size + (cols + 1) * gap, rows * size + (rows + 1) * gap), (255, 255, 255))
        for r, row in enumerate(cells):
            for c, im in enumerate(row):
                grid.paste(im.resize((size, size), Image.NEAREST), (gap + c * (size + gap), gap + r * (size + gap)))
        grid.save(out / "grid.png")


class _AudioJob(_Job):
    def total(self) -> int:
        """Bytes per sample, prompt included: --max-bytes, else one clip, else the window."""
        default = sample_bytes(self.adapter, self.seq_len)
        if self.args.max_bytes is None and default is None:
            raise UsageError("the checkpoint records neither a clip length nor seq_len: pass --max-bytes")
        return _explicit_max(self.args, default)

    def prompt(self) -> bytes:
        payload = self.read_prompt()
        if not payload or self.given.whole:
            return payload
        s, bps = self.adapter.settings, self.adapter.bytes_per_sample
        if self.args.prompt_seconds is not None:
            if self.args.prompt_seconds <= 0:
                raise UsageError(f"--prompt-seconds must be positive, got {self.args.prompt_seconds}")
            n = round(self.args.prompt_seconds * s.sample_rate) * bps
        else:
            if not 0 <= self.args.prompt_fraction < 1:
                raise UsageError(f"--prompt-fraction must be in [0, 1), got {self.args.prompt_fraction}")
            n = int(self.args.prompt_fraction * self.total())
        # whole samples, and a whole number of model patches (pcm16 samples then never straddle one)
        P = _patch_multiple(self.model)
        unit = bps * P // math.gcd(bps, P)
        n = min(n, len(payload)) // unit * unit
        if n == 0:
            raise UsageError(f"the prompt {self.given.name} is shorter than one patch of audio ({unit} bytes)")
        return payload[:n]

    def max_new(self, prompt_len: int) -> int:
        total = self.total()
        if prompt_len >= total:
            s = self.adapter.settings
            secs = prompt_len / (s.sample_rate * self.adapter.bytes_per_sample)
            raise UsageError(
                f"the prompt ({secs:.2f} s, {prompt_len} bytes) leaves nothing to sample within "
                f"{total} bytes; pass a shorter --prompt-seconds or a larger --max-bytes"
            )
        return total - prompt_len

    def save(self, payloads: list[bytes], out: Path, prompt: bytes) -> None:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        waves = []
        for i, p in enumerate(payloads):
            wave, rate = self.adapter.decode(p)
            self.adapter.save((wave, rate), out / f"audio_{i:03d}.wav")
            waves.append(wave)
        rate = self.adapter.settings.sample_rate
        split = len(prompt) // self.adapter.bytes_per_sample / rate  # seconds of prompt
        fig, axes = plt.subplots(len(waves), 2, figsize=(12, 2.2 * len(waves)), squeeze=False)
        for i, wave in enumerate(waves):
            t = np.arange(len(wave)) / rate
            axes[i, 0].plot(t, wave, linewidth=0.4)
            axes[i, 0].set_ylim(-1, 1)
            axes[i, 0].set_ylabel(f"audio_{i:03d}")
            if len(wave) >= 256:
                axes[i, 1].specgram(wave, NFFT=256, Fs=rate, noverlap=128)
            for ax in axes[i]:
                if prompt:
                    ax.axvline(split, color="red", linewidth=1)
        axes[-1, 0].set_xlabel("seconds (red: end of prompt)" if prompt else "seconds")
        axes[-1, 1].set_xlabel("seconds")
        fig.tight_layout()
        fig.savefig(out / "audio.png", dpi=80)
        plt.close(fig)


class _TextJob(_Job):
    def prompt(self) -> bytes:
        return self.read_prompt()

    def max_new(self, prompt_len: int) -> int:
        default = TEXT_MAX_BYTES
        if self.seq_len is not None:
            default = min(default, self.seq_len - 1 - prompt_len)
            if default < 1 and self.args.max_bytes is None:
                raise UsageError(
                    f"the prompt ({prompt_len} bytes) fills the model's window (seq_len {self.seq_len}); "
                    "use a shorter prompt"
                )
        return _explicit_max(self.args, default)

    def save(self, payloads: list[bytes], out: Path, prompt: bytes) -> None:
        for i, p in enumerate(payloads):
            self.adapter.save(p, out / f"text_{i:03d}.txt")  # the bytes as sampled
            print(f"--- text_{i:03d} ---\n{self.adapter.decode(p)}")


def _explicit_max(args, default: int) -> int:
    """--max-bytes if given (checked positive), else ``default``."""
    if args.max_bytes is None:
        return default
    if args.max_bytes < 1:
        raise UsageError(f"--max-bytes must be >= 1, got {args.max_bytes}")
    return args.max_bytes


_JOBS = {"image": _ImageJob, "audio": _AudioJob, "text": _TextJob}
