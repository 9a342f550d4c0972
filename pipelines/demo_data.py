"""The demo's embedded dataset: raw text, image and audio inputs built on this machine.

Nothing is downloaded and nothing outside the Python standard library and the installed
dependencies is read:

* text — English prose and Python code that ship with CPython itself: the language-reference
  topics behind ``help()`` (``pydoc_data.topics``), the docstrings of ``builtins`` and the
  sources of a fixed list of standard-library modules. Modules missing from an install are
  skipped, so any CPython works; the exact text depends on the CPython version.
* image — procedurally drawn RGB pictures (gradients, stripes, checkerboards, shapes) from a
  small shared palette, posterized to ``LEVELS`` values per channel: flat regions and banded
  gradients, structure a small byte model learns within minutes on a CPU (byte ids carry no
  notion of "close in value", so every distinct channel value has to be learned on its own).
* audio — synthesised mono clips (chords with envelopes, chirps, short melodies, faint noise)
  written as 16-bit WAV.

Everything is deterministic for a given ``seed`` (and CPython version for text): the same call
writes byte-identical files. `ensure_demo_shards` shards them (``polybyte shard``'s writer) once
into a cache folder: what ``polybyte demo`` trains on, and ``data.sources: demo`` (`DEMO_SOURCES`)
names in a config.
"""

from __future__ import annotations

import builtins
import importlib
import json
import os
import platform
import random
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from .shards import write_shards

MODALITIES = ("text", "image", "audio")
DEMO_SOURCES = "demo"  # the `data.sources` value naming the demo shards (ByteDataModule)
DEMO_VERSION = "v3"  # bump when the demo data or its shard settings change
DEMO_SETTINGS = {  # adapter settings the demo shards are written with
    "text": {},
    "image": {"size": 16, "order": "patch2"},  # 2x2-pixel blocks of 12 bytes (one MEGABYTE patch)
    # mu-law: one byte a sample, so every byte is signal (pcm16's low bytes are near noise); a
    # small model learned audio far faster this way (5.5 against 7.5 bits/byte in the same run)
    "audio": {"sample_rate": 8000, "encoding": "mulaw8"},
}
DEMO_MAX_DOC_BYTES = 8192  # many evenly sized text documents, so the val split is not tiny
DEMO_VAL_FRACTION = 0.1


def cache_root() -> Path:
    return Path(os.environ.get("POLYBYTE_CACHE", "~/.cache/polybyte")).expanduser()


def ensure_demo_shards(cache_dir: str | Path | None = None, quiet: bool = False) -> dict[str, Path]:
    """Shard folders of the demo dataset ``{"text": DIR, "image": DIR, "audio": DIR}``.

    Built on first use into ``cache_dir`` (default ``$POLYBYTE_CACHE`` or ~/.cache/polybyte),
    atomically (a temp folder renamed into place), then reused.
    """
    root = Path(cache_dir) if cache_dir else cache_root()
    final = root / f"demo-{DEMO_VERSION}"
    dirs = {m: final / "shards" / m for m in DEMO_SETTINGS}
    if (final / "ready.json").is_file():
        return dirs
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".demo-{DEMO_VERSION}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        print(f"demo: building the embedded dataset in {final} (once)", flush=True)
    inputs = build_demo_inputs(
        tmp / "inputs", image_size=DEMO_SETTINGS["image"]["size"], sample_rate=DEMO_SETTINGS["audio"]["sample_rate"]
    )
    summary = {}
    for modality, settings in DEMO_SETTINGS.items():
        manifest = write_shards(
            modality,
            [inputs[modality]],
            tmp / "shards" / modality,
            settings=settings,
            val_fraction=DEMO_VAL_FRACTION,
            max_doc_bytes=DEMO_MAX_DOC_BYTES,
        )
        summary[modality] = {split: manifest["splits"][split]["samples"] for split in ("train", "val")}
    (tmp / "ready.json").write_text(json.dumps(summary, indent=2))
    try:
        tmp.rename(final)
    except OSError:  # another process finished first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return dirs


# Standard-library modules whose sources make the code part of the text (paths relative to
# the stdlib folder). Chosen for their long docstrings and plain, idiomatic code.
STDLIB_SOURCES = (
    "argparse.py",
    "base64.py",
    "bisect.py",
    "calendar.py",
    "collections/__init__.py",
    "colorsys.py",
    "contextlib.py",
    "copy.py",
    "csv.py",
    "dataclasses.py",
    "datetime.py",
    "difflib.py",
    "enum.py",
    "fnmatch.py",
    "fractions.py",
    "functools.py",
    "gettext.py",
    "glob.py",
    "graphlib.py",
    "heapq.py",
    "html/parser.py",
    "ipaddress.py",
    "json/__init__.py",
    "json/decoder.py",
    "json/encoder.py",
    "pprint.py",
    "queue.py",
    "random.py",
    "sched.py",
    "shlex.py",
    "statistics.py",
    "string.py",
    "textwrap.py",
    "timeit.py",
    "tokenize.py",
    "trace.py",
    "turtle.py",
    "typing.py",
    "zipfile.py",
)

# Shared palette of the procedural images (RGB); a small common palette is part of what makes
# the images learnable across samples.
PALETTE = np.array(
    [
        (16, 16, 16),
        (240, 240, 240),
        (200, 40, 40),
        (40, 160, 60),
        (40, 80, 200),
        (240, 200, 40),
        (40, 200, 200),
        (200, 60, 180),
        (240, 130, 30),
        (110, 60, 160),
        (128, 128, 128),
        (120, 80, 40),
        (20, 30, 90),
        (0, 120, 120),
        (250, 170, 190),
        (120, 130, 40),
    ],
    dtype=np.float64,
)

# Values per colour channel after posterizing (0 and 255 included): 8 levels keep gradients
# visibly smooth-ish (banded) while a model needs to learn only 8 distinct byte values.
LEVELS = 8

# Pentatonic scale degrees (semitones above the root) used for chords and melodies.
PENTATONIC = (0, 2, 4, 7, 9)


def build_demo_inputs(
    out_dir,
    *,
    seed: int = 0,
    text_bytes: int = 1 << 20,
    n_images: int = 512,
    n_clips: int = 128,
    image_size: int = 16,
    sample_rate: int = 8000,
    clip_seconds: tuple[float, float] = (0.5, 1.0),
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write the demo's raw inputs under ``out_dir`` and return ``{modality: folder}``.

    Folders: ``text/*.txt`` (about ``text_bytes`` UTF-8 bytes in several documents),
    ``image/*.png`` (``n_images`` RGB images of ``image_size`` x ``image_size``),
    ``audio/*.wav`` (``n_clips`` mono 16-bit clips at ``sample_rate``, each lasting between
    ``clip_seconds[0]`` and ``clip_seconds[1]`` seconds). ``out_dir/demo_inputs.json`` records
    the parameters and what was written. An existing non-empty modality folder is an error
    unless ``overwrite`` is true, in which case that folder is replaced (so no stale files from
    an earlier, larger build survive).
    """
    if text_bytes < 1 or n_images < 1 or n_clips < 1:
        raise ValueError(f"text_bytes, n_images and n_clips must be positive; got {text_bytes}, {n_images}, {n_clips}")
    if image_size < 4:
        raise ValueError(f"image_size must be at least 4 pixels; got {image_size}")
    if sample_rate < 1000:
        raise ValueError(f"sample_rate must be at least 1000 Hz; got {sample_rate}")
    lo, hi = clip_seconds
    if not 0.05 <= lo <= hi:
        raise ValueError(f"clip_seconds must be (min, max) with 0.05 <= min <= max; got {clip_seconds}")

    out_dir = Path(out_dir)
    dirs = {m: out_dir / m for m in MODALITIES}
    for d in dirs.values():
        if d.exists() and any(d.iterdir()):
            if not overwrite:
                raise ValueError(
                    f"{d} already exists and is not empty; pass overwrite=True to replace it "
                    f"or choose another output folder"
                )
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)

    text_docs = _write_text(dirs["text"], seed, text_bytes)
    for i in range(n_images):
        rng = np.random.default_rng([seed, 1, i])  # per-item streams: item i ignores the count
        img = draw_image(rng, image_size)
        Image.fromarray(img, "RGB").save(dirs["image"] / f"img-{i:05d}.png")
    for i in range(n_clips):
        rng = np.random.default_rng([seed, 2, i])
        clip = synth_clip(rng, sample_rate, seconds=float(rng.uniform(lo, hi)))
        sf.write(dirs["audio"] / f"clip-{i:05d}.wav", clip, sample_rate, subtype="PCM_16", format="WAV")

    record = {
        "seed": seed,
        "python": platform.python_version(),
        "text": {"documents": text_docs, "bytes": sum(d["bytes"] for d in text_docs)},
        "image": {"count": n_images, "size": image_size, "format": "png"},
        "audio": {"count": n_clips, "sample_rate": sample_rate, "clip_seconds": [lo, hi], "format": "wav pcm16"},
    }
    (out_dir / "demo_inputs.json").write_text(json.dumps(record, indent=1) + "\n")
    return dirs


# --- text -------------------------------------------------------------------------------------
def stdlib_documents() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(prose, code): lists of ``(name, text)`` documents from this CPython install.

    Prose: the ``help()`` topics and the ``builtins`` docstrings (present even without source
    files, unless docstrings were stripped with -OO). Code: the modules of ``STDLIB_SOURCES``
    that exist as UTF-8 files. Anything missing is skipped.
    """
    prose: list[tuple[str, str]] = []
    try:
        topics = importlib.import_module("pydoc_data.topics").topics
    except ImportError:
        topics = {}
    for key in sorted(topics):
        prose.append((f"topic-{_slug(key)}", f"{key}\n\n{topics[key].strip()}\n"))
    docs = []
    for name in sorted(dir(builtins)):
        doc = getattr(getattr(builtins, name), "__doc__", None)
        if name.startswith("_") or not isinstance(doc, str) or not doc.strip():
            continue
        docs.append(f"{name}\n\n{doc.strip()}\n")
    if docs:
        prose.append(("builtins", "\n\n".join(docs)))

    code: list[tuple[str, str]] = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for rel in STDLIB_SOURCES:
        try:
            text = (stdlib / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            module = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
            code.append((f"src-{_slug(module)}", text))
    return prose, code


def _write_text(folder: Path, seed: int, budget: int) -> list[dict]:
    """Write about ``budget`` bytes of stdlib text, half prose and half code, as .txt files.

    Documents are shuffled by ``seed`` within each kind; each next document comes from the
    kind with fewer bytes written so far; the one that would exceed the budget is cut at a line
    boundary and ends the text.
    """
    prose, code = stdlib_documents()
    if not prose and not code:
        raise RuntimeError(
            "found no standard-library text on this Python install (no pydoc_data topics, no "
            "builtins docstrings, no module sources); the demo's text cannot be built"
        )
    rng = random.Random(seed)
    rng.shuffle(prose)
    rng.shuffle(code)
    queues, taken = [prose, code], [0, 0]
    written, total = [], 0
    while total < budget and (prose or code):
        k = 0 if prose and (taken[0] <= taken[1] or not code) else 1
        name, text = queues[k].pop(0)
        data = text.encode("utf-8")
        last = total + len(data) > budget
        if last:
            data = _cut_lines(text, budget - total)
        if data:
            fname = f"doc-{len(written):04d}-{name}.txt"
            (folder / fname).write_bytes(data)
            written.append({"file": fname, "bytes": len(data)})
            taken[k] += len(data)
            total += len(data)
        if last:
            break
    return written


def _cut_lines(text: str, limit: int) -> bytes:
    """The longest prefix of whole lines of ``text`` whose UTF-8 encoding fits in ``limit``."""
    out, size = [], 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if size + n > limit:
            break
        out.append(line)
        size += n
    return "".join(out).encode("utf-8")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name.lower())


# --- images -----------------------------------------------------------------------------------
def draw_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """One procedural RGB picture, uint8 ``[size, size, 3]``, posterized to ``LEVELS`` values."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size  # pixel coordinates in [0, 1)
    colours = PALETTE[rng.choice(len(PALETTE), size=4, replace=False)]
    kind = rng.integers(5)
    if kind == 0:  # linear gradient at a random angle
        img = _gradient(rng, xx, yy, colours[0], colours[1])
    elif kind == 1:  # radial gradient around a random centre
        cy, cx = rng.uniform(0.2, 0.8, size=2)
        t = np.clip(np.hypot(yy - cy, xx - cx) / rng.uniform(0.4, 0.9), 0, 1)
        img = _mix(colours[0], colours[1], t)
    elif kind == 2:  # stripes of 2-3 colours, axis-aligned or diagonal
        angle = rng.choice([0.0, 0.25, 0.5, 0.75]) * np.pi
        period = rng.integers(2, 9) / size
        n = rng.integers(2, 4)
        band = np.floor((np.cos(angle) * xx + np.sin(angle) * yy) / period).astype(int) % n
        img = colours[band]
    elif kind == 3:  # checkerboard
        cell = rng.integers(2, 9) / size
        img = colours[(np.floor(xx / cell) + np.floor(yy / cell)).astype(int) % 2]
    else:  # flat or gradient background with a few shapes
        if rng.random() < 0.5:
            img = np.broadcast_to(colours[0], (size, size, 3)).copy()
        else:
            img = _gradient(rng, xx, yy, colours[0], PALETTE[rng.integers(len(PALETTE))])
        for _ in range(rng.integers(1, 5)):
            mask = _shape(rng, xx, yy)
            img[mask] = colours[rng.integers(1, 4)]
    step = 255 / (LEVELS - 1)
    return np.clip(np.rint(np.rint(img / step) * step), 0, 255).astype(np.uint8)


def _gradient(rng, xx, yy, c0, c1) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * xx + np.sin(angle) * yy
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    return _mix(c0, c1, t)


def _mix(c0, c1, t) -> np.ndarray:
    return c0 * (1 - t[..., None]) + c1 * t[..., None]  # [H, W] -> [H, W, 3]


def _shape(rng, xx, yy) -> np.ndarray:
    """Boolean mask of a random circle, ring or rectangle."""
    cy, cx = rng.uniform(0.1, 0.9, size=2)
    r = rng.uniform(0.08, 0.35)
    kind = rng.integers(3)
    if kind == 0:
        return np.hypot(yy - cy, xx - cx) < r
    if kind == 1:
        d = np.hypot(yy - cy, xx - cx)
        return (d < r) & (d > r * rng.uniform(0.4, 0.8))
    h, w = rng.uniform(0.08, 0.35, size=2)
    return (np.abs(yy - cy) < h) & (np.abs(xx - cx) < w)


# --- audio ------------------------------------------------------------------------------------
def synth_clip(rng: np.random.Generator, sample_rate: int, seconds: float) -> np.ndarray:
    """One synthesised mono clip, int16 ``[round(seconds * sample_rate)]``."""
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    root = 48 + rng.integers(0, 25)  # MIDI note of the key: C3 .. C5
    kind = rng.integers(3)
    if kind == 0:  # a chord of 1-3 scale notes with one attack/decay envelope
        notes = root + rng.choice(PENTATONIC, size=rng.integers(1, 4), replace=False)
        x = sum(_tone(_hz(m), t, sample_rate) for m in notes)
        x = x * _envelope(n, sample_rate, rng)
    elif kind == 1:  # an exponential chirp between two pitches
        f0, f1 = _hz(root), _hz(root + rng.integers(-12, 13))
        freq = f0 * (f1 / f0) ** (t / max(seconds, 1e-9))
        phase = 2 * np.pi * np.cumsum(freq) / sample_rate
        x = np.sin(phase) * _envelope(n, sample_rate, rng, decay=False)
    else:  # a melody of 3-6 equal notes from the scale
        k = int(rng.integers(3, 7))
        notes = root + rng.choice(PENTATONIC, size=k) + 12 * rng.integers(0, 2, size=k)
        x = np.zeros(n)
        bounds = np.linspace(0, n, k + 1).astype(int)
        for m, a, b in zip(notes, bounds[:-1], bounds[1:]):
            x[a:b] = _tone(_hz(m), t[a:b] - t[a], sample_rate) * _envelope(b - a, sample_rate, rng)
    x = x / max(np.max(np.abs(x)), 1e-9) * rng.uniform(0.3, 0.8) * 32767
    if rng.random() < 0.5:  # faint background hiss of a few quantisation steps
        x = x + rng.normal(0, rng.uniform(1, 4), size=n)
    return np.clip(np.rint(x), -32768, 32767).astype(np.int16)


def _hz(midi) -> float:
    return 440.0 * 2 ** ((float(midi) - 69) / 12)


def _tone(freq: float, t: np.ndarray, sample_rate: int) -> np.ndarray:
    """A note with its first three harmonics (1, 1/2, 1/4), dropping any above 0.45 * rate."""
    out = np.zeros_like(t)
    for h, amp in ((1, 1.0), (2, 0.5), (3, 0.25)):
        if h * freq < 0.45 * sample_rate:
            out += amp * np.sin(2 * np.pi * h * freq * t)
    return out


def _envelope(n: int, sample_rate: int, rng, decay: bool = True) -> np.ndarray:
    """Linear attack (5-40 ms) then exponential decay, or a flat body with a short fade out."""
    attack = max(1, min(n, int(rng.uniform(0.005, 0.04) * sample_rate)))
    env = np.ones(n)
    env[:attack] = np.linspace(0, 1, attack, endpoint=False)
    if decay:
        env[attack:] = np.exp(-np.arange(n - attack) / (rng.uniform(0.15, 0.6) * sample_rate))
    else:
        fade = min(n, int(0.02 * sample_rate))
        env[n - fade :] *= np.linspace(1, 0, fade)
    return env
