"""Lossless classic-codec baselines, measured on the same payloads the model is scored on.

``codec_bpb(modality, payloads, settings)`` compresses every payload **separately** (one file
per sample, container headers included, as a user would store them) and reports
``bpb = 8 * sum(compressed bytes) / sum(payload bytes)`` per codec. For text it also reports
each codec over all samples concatenated (one stream), which removes per-file overhead and
lets the codec reuse context across documents.

* text: gzip -9, bzip2 -9, xz -9e (Python's gzip/bz2/lzma modules with those presets).
* image: PNG (Pillow, optimize, level 9), lossless WebP (Pillow, when built with WebP),
  lossless JPEG XL (the ``cjxl`` tool, ``-d 0 -e 9``, when on PATH). Payloads in ``patch{k}``
  order are put back in raster order first.
* audio: FLAC (soundfile, highest compression level). ``pcm16`` payloads are coded as 16-bit
  samples; ``pcm8`` and ``mulaw8`` payloads as 8-bit samples (byte - 128): for mu-law that is
  the companded signal, since expanding it to 16-bit linear first makes FLAC spend more bits
  than the payload itself (about 11 bits per byte on spoken digits).

A codec that cannot run here is reported as ``{"skipped": reason}``, never as an error.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, features

from polybyte.modalities.image import from_order

CONCAT = " (concatenated)"  # suffix of the text codecs run over all samples as one stream
XZ_PRESET = 9 | lzma.PRESET_EXTREME
CJXL_ARGS = ("-d", "0", "-e", "9")  # distance 0 = mathematically lossless; effort 9 = max


# --- single-payload codecs ----------------------------------------------------------------------
def gzip9(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def bzip2_9(data: bytes) -> bytes:
    return bz2.compress(data, compresslevel=9)


def xz9e(data: bytes) -> bytes:
    """``xz -9e`` output (xz container, CRC64 check).

    The dictionary is shrunk to the input size (min 4 KiB): LZMA2 never looks further back than
    the input, so the compressed size equals that of the full 64 MiB dictionary, without
    allocating ~700 MB of match-finder state on every sample.
    """
    dict_size = min(1 << 26, max(1 << 12, 1 << max(len(data) - 1, 1).bit_length()))
    filters = [{"id": lzma.FILTER_LZMA2, "preset": XZ_PRESET, "dict_size": dict_size}]
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, filters=filters)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True, compress_level=9)
    return buf.getvalue()


def webp_lossless(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    # lossless: quality is the effort of the lossless coder; method 6 is the slowest/best
    img.save(buf, format="WEBP", lossless=True, quality=100, method=6, exact=True)
    return buf.getvalue()


def jxl_lossless(img: Image.Image, cjxl: str, workdir: Path) -> bytes:
    """Lossless JPEG XL of ``img`` through the ``cjxl`` command (input handed over as PPM)."""
    src, dst = workdir / "in.ppm", workdir / "out.jxl"
    img.save(src, format="PPM")
    proc = subprocess.run([cjxl, str(src), str(dst), *CJXL_ARGS], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cjxl exited with {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return dst.read_bytes()


def _jxl_one(img: Image.Image) -> bytes:
    with tempfile.TemporaryDirectory(prefix="polybyte-jxl-") as tmp:  # one per call: calls run in threads
        return jxl_lossless(img, shutil.which("cjxl"), Path(tmp))


def _each(fn: Callable, items: Iterable) -> list[bytes]:
    """``[fn(x) for x in items]`` on one thread per core, in order. Threads, not processes:
    zlib, bz2, lzma, Pillow's encoders, libsndfile and the cjxl subprocess release the GIL."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(fn, items))


def flac(samples: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> bytes:
    """FLAC of int16 mono ``samples`` at the highest compression level (like ``flac -8``).

    ``subtype="PCM_S8"`` stores the top byte of each sample (exact for ``payload_to_samples``'s
    8-bit output, whose low bytes are zero).
    """
    buf = io.BytesIO()
    sf.write(buf, samples, sample_rate, format="FLAC", subtype=subtype, compression_level=1.0)
    return buf.getvalue()


# --- payload -> codec input --------------------------------------------------------------------
def payload_to_image(payload: bytes, size: int, order: str = "raster") -> Image.Image:
    """An RGB image from ``size*size*3`` payload bytes in ``raster`` or ``patch{k}`` order."""
    return Image.fromarray(from_order(payload, size, order), "RGB")


def payload_to_samples(payload: bytes, encoding: str = "pcm16") -> tuple[np.ndarray, str]:
    """(int16 mono samples, soundfile subtype) that code an audio payload losslessly.

    pcm16 is little-endian two's complement -> ``PCM_16``. pcm8 (unsigned, 128 = silence) and
    mulaw8 (256-level mu-law codes, monotonic in amplitude) are one byte per sample ->
    ``(byte - 128) * 256`` stored as ``PCM_S8``.
    """
    if encoding == "pcm16":
        if len(payload) % 2:
            raise ValueError(f"pcm16 payload has an odd byte count ({len(payload)}); it needs 2 bytes/sample")
        return np.frombuffer(payload, dtype="<i2").astype(np.int16), "PCM_16"
    if encoding in ("pcm8", "mulaw8"):
        codes = np.frombuffer(payload, dtype=np.uint8).astype(np.int16)
        return (codes - 128) * 256, "PCM_S8"
    raise ValueError(f"unknown audio encoding {encoding!r}; use pcm16, mulaw8 or pcm8")


# --- availability -------------------------------------------------------------------------------
def available_codecs() -> dict[str, list[tuple[str, bool, str]]]:
    """``{modality: [(codec name, available here, note)]}`` for every baseline codec."""
    cjxl = shutil.which("cjxl")
    webp = bool(features.check("webp"))
    flac_ok = "FLAC" in sf.available_formats()
    text = [
        ("gzip -9", True, "Python gzip module, level 9"),
        ("bzip2 -9", True, "Python bz2 module, level 9"),
        ("xz -9e", True, "Python lzma module, preset 9 | PRESET_EXTREME, xz container"),
    ]
    text += [(name + CONCAT, True, note + "; all samples as one stream") for name, _, note in text]
    return {
        "text": text,
        "image": [
            ("PNG", True, "Pillow, optimize=True, compress_level=9"),
            ("WebP lossless", webp, "Pillow, lossless, method 6" if webp else "Pillow was built without WebP support"),
            (
                "JPEG XL lossless",
                cjxl is not None,
                f"{cjxl} {' '.join(CJXL_ARGS)}"
                if cjxl
                else "cjxl not found on PATH (install libjxl tools, e.g. apt install libjxl-tools)",
            ),
        ],
        "audio": [
            (
                "FLAC",
                flac_ok,
                "soundfile/libsndfile, level 8; pcm16 as 16-bit, pcm8/mulaw8 bytes as 8-bit"
                if flac_ok
                else "this libsndfile has no FLAC support",
            ),
        ],
    }


# --- measurement --------------------------------------------------------------------------------
def codec_bpb(
    modality: str, payloads: list[bytes], settings: dict | None = None, progress: Callable[[str], None] | None = None
) -> dict[str, dict]:
    """Bits per payload byte of every baseline codec of ``modality`` over ``payloads``.

    ``settings`` are the adapter's settings (``Modality.settings_dict()``): images need
    ``size`` (and ``order``, default raster); audio needs ``sample_rate`` (and ``encoding``,
    default pcm16). Returns ``{codec: {"bpb", "bytes_in", "bytes_out", "samples"}}`` or
    ``{codec: {"skipped": reason}}`` for a codec that is missing or failed on this data.
    ``progress(name)`` is called after each codec (those skipped too).
    """
    settings = dict(settings or {})
    if modality not in ("text", "image", "audio"):
        raise ValueError(f"unknown modality {modality!r}; use text, image or audio")
    payloads = [bytes(p) for p in payloads]
    bytes_in = sum(len(p) for p in payloads)
    if bytes_in == 0:
        raise ValueError(f"no payload bytes to compress for {modality} ({len(payloads)} samples)")

    coders: dict[str, Callable[[], list[bytes]]] = {}
    if modality == "text":
        for name, fn in (("gzip -9", gzip9), ("bzip2 -9", bzip2_9), ("xz -9e", xz9e)):
            coders[name] = lambda fn=fn: _each(fn, payloads)
            coders[name + CONCAT] = lambda fn=fn: [fn(b"".join(payloads))]
    elif modality == "image":
        size, order = _setting(settings, "size", modality), settings.get("order", "raster")
        images = [payload_to_image(p, int(size), order) for p in payloads]
        coders["PNG"] = lambda: _each(png, images)
        coders["WebP lossless"] = lambda: _each(webp_lossless, images)
        coders["JPEG XL lossless"] = lambda: _each(_jxl_one, images)
    else:
        rate = int(_setting(settings, "sample_rate", modality))
        encoding = settings.get("encoding", "pcm16")
        waves = [payload_to_samples(p, encoding) for p in payloads]
        coders["FLAC"] = lambda: _each(lambda wave: flac(wave[0], rate, wave[1]), waves)

    results: dict[str, dict] = {}
    for name, available, note in available_codecs()[modality]:
        results[name] = _run_codec(name, coders[name], bytes_in, len(payloads)) if available else {"skipped": note}
        if progress is not None:
            progress(name)
    return results


def _run_codec(name: str, coder: Callable[[], list[bytes]], bytes_in: int, samples: int) -> dict:
    try:
        outs = coder()
    except (RuntimeError, OSError, ValueError) as err:
        return {"skipped": f"{name} failed: {err}"}
    bytes_out = sum(len(o) for o in outs)
    return {"bpb": 8 * bytes_out / bytes_in, "bytes_in": bytes_in, "bytes_out": bytes_out, "samples": samples}


def _setting(settings: dict, key: str, modality: str):
    if settings.get(key) is None:
        raise ValueError(
            f"{modality} codecs need the adapter setting {key!r} (pass the modality's "
            f"settings_dict()); got {sorted(settings)}"
        )
    return settings[key]
