"""Audio adapter: mono samples at a fixed rate, as pcm16, mulaw8 or pcm8 bytes (DESIGN.md §3).

Decoding uses soundfile (WAV, FLAC, OGG); resampling and mu-law use torchaudio's DSP.

- ``pcm16``: signed 16-bit little-endian, 2 bytes per sample (MEGABYTE's choice).
- ``mulaw8``: 256-level mu-law (``torchaudio.functional.mu_law_encoding``), 1 byte per sample.
- ``pcm8``: unsigned 8-bit, ``round(x * 128 + 128)`` clipped to 0..255, 1 byte per sample.
"""

from __future__ import annotations

import functools
import io
import random
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from .base import AUDIO, Modality, SettingMismatchError, check_limit, positive_limit, register

ENCODINGS = {"pcm16": 2, "mulaw8": 1, "pcm8": 1}  # encoding -> bytes per sample
MU_LAW_LEVELS = 256
# The last, shorter piece of a recording cut into clips becomes a clip of its own when it is at
# least this fraction of a clip; a shorter tail is joined to the clip before it (so no clip is
# a sliver, and no sample is lost). A recording shorter than one clip is one, shorter, clip.
MIN_CLIP_FRACTION = 0.25


class AudioStackError(ImportError):
    """torchaudio is missing or cannot load against the installed torch."""


@functools.cache
def torchaudio_dsp():
    """torchaudio's ``(functional, transforms)`` modules, imported on first use.

    A torchaudio built for another torch release fails when its compiled extension loads; this
    turns that into one message naming both versions, and keeps every non-audio path working.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        import torchaudio.functional as functional
        import torchaudio.transforms as transforms
    except (OSError, ImportError) as e:
        try:
            found = f"torchaudio {version('torchaudio')}"
        except PackageNotFoundError:
            found = "torchaudio (not installed)"
        raise AudioStackError(
            f"{found} cannot be loaded with torch {torch.__version__} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else e!r}); install the tested pair with "
            f"`pip install -c constraints.txt -e .` (torch==2.11.0, torchaudio==2.11.0)"
        ) from e
    return functional, transforms


@functools.lru_cache(maxsize=256)  # the file rates in use plus up to 101 `AudioAugment.speed` factors
def _resampler(orig_rate: int, new_rate: int):
    """torchaudio's windowed-sinc resampler with its kernel built once per rate pair.

    Same filter as ``torchaudio.functional.resample``, which rebuilds the kernel on every call
    (about 50x slower on short clips).
    """
    return torchaudio_dsp()[1].Resample(orig_rate, new_rate)


def resample(wave: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """float32 samples at ``orig_rate`` -> ``new_rate``; identity when the rates are equal."""
    if orig_rate == new_rate or len(wave) == 0:
        return wave
    with torch.no_grad():
        return _resampler(orig_rate, new_rate)(torch.from_numpy(wave)).numpy()


def to_float(wave: np.ndarray) -> np.ndarray:
    """int16 or float samples -> float32 in [-1, 1); int16 is divided by 32768, like soundfile."""
    if wave.dtype == np.int16:
        return wave.astype(np.float32) / 32768.0
    return wave.astype(np.float32, copy=False)


def to_int16(wave: np.ndarray) -> np.ndarray:
    """Samples -> int16; float input is scaled by 32768, rounded and clipped."""
    if wave.dtype == np.int16:
        return wave
    return np.clip(np.round(wave.astype(np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def encode_waveform(wave: np.ndarray, encoding: str) -> bytes:
    """Mono samples (int16, or float in [-1, 1]) -> payload bytes in ``encoding``."""
    if encoding == "pcm16":
        return to_int16(wave).astype("<i2").tobytes()
    x = np.clip(to_float(wave), -1.0, 1.0)
    if encoding == "mulaw8":
        codes = torchaudio_dsp()[0].mu_law_encoding(torch.from_numpy(x), MU_LAW_LEVELS)
        return codes.to(torch.uint8).numpy().tobytes()
    if encoding == "pcm8":
        return np.clip(np.round(x * 128.0 + 128.0), 0, 255).astype(np.uint8).tobytes()
    raise ValueError(f"unknown audio encoding {encoding!r}; use one of {sorted(ENCODINGS)}")


def decode_payload(payload: bytes, encoding: str) -> np.ndarray:
    """Payload bytes -> float32 samples in [-1, 1]; inverse of :func:`encode_waveform`.

    For pcm16 a trailing odd byte (a sampled payload cut mid-sample) is dropped.
    """
    if encoding == "pcm16":
        usable = len(payload) - len(payload) % 2
        return to_float(np.frombuffer(payload[:usable], dtype="<i2").astype(np.int16))
    codes = np.frombuffer(bytes(payload), dtype=np.uint8)
    if encoding == "mulaw8":
        return torchaudio_dsp()[0].mu_law_decoding(torch.from_numpy(codes.astype(np.int64)), MU_LAW_LEVELS).numpy()
    if encoding == "pcm8":
        return ((codes.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    raise ValueError(f"unknown audio encoding {encoding!r}; use one of {sorted(ENCODINGS)}")


def clip_waveform(
    wave: np.ndarray,
    sample_rate: int,
    clip_seconds: float | None,
    min_fraction: float = MIN_CLIP_FRACTION,
) -> list[np.ndarray]:
    """Cut a recording into consecutive clips of ``clip_seconds`` (None: the whole recording).

    Every sample lands in exactly one clip: a recording shorter than a clip is one shorter clip,
    and a last piece under ``min_fraction`` of a clip is joined to the clip before it (which is
    then up to ``1 + min_fraction`` clips long). An empty recording gives no clips.
    """
    if clip_seconds is None:
        return [wave] if len(wave) else []
    n = round(clip_seconds * sample_rate)
    if n < 1:
        raise ValueError(f"clip_seconds={clip_seconds} is shorter than one sample at {sample_rate} Hz")
    clips = [wave[i : i + n] for i in range(0, len(wave), n)]
    if len(clips) > 1 and len(clips[-1]) < min_fraction * n:
        clips[-2:] = [wave[(len(clips) - 2) * n :]]
    return clips


@dataclass
class AudioSettings:
    # Hz. Loaders take it from the manifest, the checkpoint or the first member; `polybyte shard`
    # from its inputs. Recordings at another rate are resampled to it only when it is given
    # explicitly (strict adapters refuse them). 16000 is only the bare dataclass's default.
    sample_rate: int = 16000
    encoding: str = "pcm16"  # payload format: "pcm16" (2 bytes/sample), "mulaw8" or "pcm8" (1 byte)
    clip_seconds: float | None = None  # clip length the shard writer cuts to; None: whole file
    # Longest recording read, in seconds at the file's own rate, checked from the header before
    # decoding or resampling (an 8 KB WAV declaring 1 Hz would resample to hours); None: no limit.
    max_seconds: float | None = 600.0
    # Most samples decoded per file before mixing to mono, frames x channels (float32: 4 bytes
    # each, so the default bounds the decode at 256 MiB); None: no limit.
    max_decoded_samples: int | None = 64 * 2**20

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"unknown audio encoding {self.encoding!r}; use one of {sorted(ENCODINGS)}")
        if int(self.sample_rate) != self.sample_rate or self.sample_rate < 1:
            raise ValueError(f"sample_rate must be a positive integer (Hz), got {self.sample_rate}")
        self.sample_rate = int(self.sample_rate)
        if self.clip_seconds is not None and self.clip_seconds <= 0:
            raise ValueError(f"clip_seconds must be positive or None, got {self.clip_seconds}")
        positive_limit("max_seconds", self.max_seconds)
        positive_limit("max_decoded_samples", self.max_decoded_samples)


@dataclass
class AudioAugment:
    """Training-time augmentation of audio payloads (``data.augment``), drawn per clip."""

    # Each clip's level changes by a gain drawn uniformly in [-gain_db, +gain_db] dB; samples
    # then clip at full scale. 0: no gain change.
    gain_db: float = 0.0
    invert: float = 0.0  # probability that a clip's polarity is flipped (x -> -x)
    # Speed perturbation: each clip is resampled to play at a factor drawn uniformly in
    # [1 - speed, 1 + speed] and rounded to 0.01 (tempo and pitch together, as Kaldi's speed
    # perturbation; 1.1 leaves a clip 1/1.1 as long). 0: no change.
    speed: float = 0.0

    def __post_init__(self) -> None:
        for name, top, what in (("gain_db", 40, "dB"), ("invert", 1, "a probability"), ("speed", 0.5, "a fraction")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= top:
                raise ValueError(f"augment {name} must be a number in [0, {top}] ({what}), got {value!r}")


def augment_payload(payload: bytes, encoding: str, aug: AudioAugment, rng: random.Random) -> bytes:
    """One clip's payload with a random speed, gain and polarity (`AudioAugment`), in the same
    encoding. An option at 0 draws nothing from ``rng``."""
    speed = round(rng.uniform(1.0 - aug.speed, 1.0 + aug.speed), 2) if aug.speed else 1.0
    gain = 10.0 ** (rng.uniform(-aug.gain_db, aug.gain_db) / 20.0) if aug.gain_db else 1.0
    if aug.invert and rng.random() < aug.invert:
        gain = -gain
    if gain == 1.0 and speed == 1.0:
        return payload
    wave = decode_payload(payload, encoding)
    if speed != 1.0:  # `speed` x faster: the clip at rate 100 * speed read as rate 100
        wave = resample(wave, round(100 * speed), 100)
    return encode_waveform(np.clip(wave.astype(np.float64) * gain, -1.0, 1.0), encoding)


@register
class AudioModality(Modality):
    """Audio file bytes -> mono -> resampled to ``sample_rate`` -> encoded samples."""

    name = "audio"
    tag = AUDIO
    extensions = (".flac", ".wav", ".ogg")
    Settings = AudioSettings
    properties = ("sample_rate",)

    @property
    def bytes_per_sample(self) -> int:
        return ENCODINGS[self.settings.encoding]

    def check_size(self, frames: int, channels: int, file_rate: int) -> None:
        """Raise `ResourceLimitError` for a recording above ``max_decoded_samples`` or
        ``max_seconds`` (from its header: frames, channels and rate before resampling)."""
        check_limit(
            f"recording of {frames:,} frames x {channels} channels",
            frames * channels,
            "max_decoded_samples",
            self.settings.max_decoded_samples,
        )
        seconds = frames / file_rate
        check_limit(
            f"recording of {seconds:,.1f} s ({frames:,} frames at {file_rate} Hz)",
            seconds,
            "max_seconds",
            self.settings.max_seconds,
        )

    @staticmethod
    def _header(member_bytes: bytes) -> tuple[int, int]:
        """``(sample rate, channels)`` of a recording, from its header; ValueError if unreadable."""
        try:
            with sf.SoundFile(io.BytesIO(member_bytes)) as f:
                return int(f.samplerate), f.channels
        except (sf.SoundFileError, RuntimeError, EOFError) as e:
            why = getattr(e, "error_string", None) or str(e)
            raise ValueError(f"cannot decode audio (WAV/FLAC/OGG expected): {why}") from None

    def native(self, member_bytes: bytes) -> dict:
        """``{"sample_rate": Hz}`` of a recording, from its header."""
        return {"sample_rate": self._header(member_bytes)[0]}

    def conversion(self, member_bytes: bytes) -> tuple[str, str] | None:
        """``("44100 Hz stereo", "8000 Hz mono")`` for a recording at another rate or with more
        than one channel."""
        rate, channels = self._header(member_bytes)
        if (rate, channels) == (self.settings.sample_rate, 1):
            return None
        layout = {1: "mono", 2: "stereo"}.get(channels, f"{channels} channels")
        return f"{rate} Hz {layout}", f"{self.settings.sample_rate} Hz mono"

    def load(self, member_bytes: bytes) -> np.ndarray:
        """Audio file bytes -> mono samples at ``sample_rate``.

        Returns int16 when the file is mono 16-bit PCM already at ``sample_rate`` (so pcm16 is
        bit-exact), else float32 in [-1, 1]: the mean of the channels, resampled if needed.
        The header is checked against the limits first (`check_size`). When ``strict``, a
        recording at another rate is a `SettingMismatchError` instead of being resampled.
        """
        rate = self.settings.sample_rate
        try:
            with sf.SoundFile(io.BytesIO(member_bytes)) as f:
                self.check_size(f.frames, f.channels, f.samplerate)
                if self.strict and f.samplerate != rate:
                    raise SettingMismatchError(
                        f"a {f.samplerate} Hz recording, but the sample rate is {rate} Hz (setting "
                        f"'sample_rate'); recordings are resampled only when the rate is given "
                        f"explicitly (adapter_settings)",
                        "sample_rate",
                    )
                exact = f.channels == 1 and f.samplerate == rate and f.subtype == "PCM_16"
                data = f.read(dtype="int16" if exact else "float32", always_2d=True)
                file_rate = f.samplerate
        except (sf.SoundFileError, RuntimeError, EOFError) as e:
            why = getattr(e, "error_string", None) or str(e)  # libsndfile's reason, no object repr
            raise ValueError(f"cannot decode audio (WAV/FLAC/OGG expected): {why}") from None
        if exact:
            return data[:, 0].copy()
        mono = data.mean(axis=1, dtype=np.float32)  # [T, C] -> [T]
        return resample(mono, file_rate, rate)

    def encode(self, member_bytes: bytes, meta: dict | None = None) -> bytes:
        return encode_waveform(self.load(member_bytes), self.settings.encoding)

    def augmenter(self, options: dict):
        """Random speed, gain and polarity per training clip (`AudioAugment`'s fields as options)."""
        known = [f.name for f in fields(AudioAugment)]
        if not isinstance(options, dict):
            raise ValueError(f"audio augmentation options must be a mapping of {known}, got {options!r}")
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown audio augmentation {unknown}; known: {known}")
        aug = AudioAugment(**options)
        if not (aug.gain_db or aug.invert or aug.speed):
            return None
        encoding = self.settings.encoding
        return lambda payload, rng: augment_payload(payload, encoding, aug, rng)

    def decode(self, payload: bytes) -> tuple[np.ndarray, int]:
        """Payload -> (float32 mono waveform, sample_rate)."""
        return decode_payload(payload, self.settings.encoding), self.settings.sample_rate

    def save(self, obj: tuple[np.ndarray, int], path) -> None:
        """Write ``(waveform, sample_rate)`` as 16-bit PCM WAV."""
        wave, rate = obj
        sf.write(Path(path), to_int16(np.asarray(wave)), rate, subtype="PCM_16", format="WAV")
