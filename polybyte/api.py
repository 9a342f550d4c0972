"""The Python API: ``polybyte.load(path)`` returns a `Model` with `generate`, `score` and `save`.

A thin layer over the pipelines, so Python and the command line cannot drift apart:

* `load` is `load_exported` (export.py): an export folder (model.safetensors + config.json, as
  every checkpoint of `polybyte fit` has beside it) or its ``X.ckpt``.
* `Model.generate` checks and samples through `polybyte sample`'s own code (sample.py: the same
  prompt cuts, lengths, defaults and errors) and decodes with the export's adapters.
* `Model.score` is `polybyte eval`'s scoring (evaluate.py, bpb.py) on one sample.
* `Model.save` is `save_exported`: weights, config.json and the model card (README.md).

Bad input raises ValueError (FileNotFoundError for a path that holds no export) with the message
the CLI prints, its option names written as this API's keyword arguments.
"""

from __future__ import annotations

import copy
import io
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from PIL import Image

from polybyte.modalities.image import to_order
from polybyte.pipelines.card import CARD
from polybyte.pipelines.evaluate import default_seq_len, score
from polybyte.pipelines.export import load_exported, resolve, save_exported
from polybyte.pipelines.runtime import default_device, prepare_for_sampling
from polybyte.pipelines.sample import (
    Prompt,
    UsageError,
    encode_prompt_file,
    plan,
    sample_options,
    sample_payloads,
    trained_adapter,
)
from polybyte.pipelines.windows import sample_stream

SCORE_BATCH = 8  # windows per forward pass in `score`, as `polybyte eval`'s default


def load(path, device: str | torch.device | None = None) -> Model:
    """Load an export folder (``model.safetensors`` + ``config.json``), or a Lightning ``X.ckpt``
    whose export ``X/`` records the same step, onto ``device`` (default: CUDA if there is one).

    Raises FileNotFoundError when ``path`` holds no export, ValueError when its files are
    damaged, unlike each other or hold NaN/Inf weights."""
    dev = default_device(str(device) if device is not None else None)
    net, info = load_exported(path, dev)
    return Model(net, info, dev, resolve(path))


class Model:
    """A trained polybyte model.

    ``net`` is the backbone, a torch module (`ByteLM`: forward, loss, ...) in eval mode;
    ``info`` the export's config.json (backbone config, adapter settings, run facts).
    """

    def __init__(self, net, info: dict[str, Any], device: torch.device, path: Path | None = None) -> None:
        self.net, self.info, self.device, self.path = net, info, torch.device(device), path
        self._sampling = None  # the backbone as sampling runs it (bf16, compiled on CUDA), made once

    # --- facts ------------------------------------------------------------------------------------
    @property
    def backbone(self) -> str:
        return self.info["model"]["backbone"]

    @property
    def modalities(self) -> list[str]:
        """The modalities it was trained on (each with the adapter settings in ``info``)."""
        return list(self.info.get("modalities") or {})

    @property
    def step(self) -> int | None:
        """The training step the export was taken at, when recorded."""
        return self.info.get("step")

    @property
    def num_params(self) -> int:
        return self.net.num_params()

    @property
    def card(self) -> str | None:
        """The model card (README.md) of the folder it was loaded from; None for older exports."""
        card = self.path / CARD if self.path is not None else None
        return card.read_text() if card is not None and card.is_file() else None

    def __repr__(self) -> str:
        step = "untrained or step not recorded" if self.step is None else f"step {self.step}"
        return (
            f"polybyte.Model({self.backbone}, {self.num_params / 1e6:.2f}M parameters, {step}, "
            f"modalities {self.modalities}, {self.device})"
        )

    # --- generation -------------------------------------------------------------------------------
    def generate(
        self,
        modality: str = "text",
        prompt: Any = None,
        *,
        num: int | None = None,
        max_bytes: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        prompt_fraction: float = 0.5,
        prompt_seconds: float | None = None,
        raw: bool = False,
    ):
        """Sample one ``modality`` sample (``num=N``: a list of N), prompt included.

        prompt: text: a str or bytes; image: a PIL image or an image file's path, of which the
          top ``prompt_fraction`` of rows is kept; audio: ``(waveform, sample_rate)``, a waveform
          at the model's rate, or an audio file's path, of which the first ``prompt_seconds``
          (default ``prompt_fraction`` of a clip) are kept. Bytes are payload bytes in the
          model's own format (e.g. ``raw=True`` output), kept whole.
        max_bytes: text: new bytes (default 512, within the window); image / audio: bytes per
          sample, prompt included (default one image / one clip or window).
        temperature, top_k, top_p: sampling (0 = greedy); seed: reproducible samples.
        Returns text as str, an image as an RGB PIL image, audio as ``(float32 waveform,
        sample_rate)``; with ``raw=True`` the payload bytes instead.
        """
        options = sample_options(
            num=1 if num is None else num,
            max_bytes=max_bytes,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            prompt_fraction=prompt_fraction,
            prompt_seconds=prompt_seconds,
        )
        with _as_api_error():
            adapter = trained_adapter(self.info, modality)
            given = None if prompt is None else self._prompt(adapter, prompt)
            job, head, new_bytes = plan(self.net, self.info, adapter, options, given)
            net, dtype = self._sampler()
            payloads = sample_payloads(net, adapter, head, new_bytes, options, self.device, dtype, quiet=True)
        samples = payloads if raw else [adapter.decode(p) for p in payloads]
        return samples[0] if num is None else samples

    def _sampler(self):
        """(the backbone for sampling, its dtype): the loaded one on CPU; on CUDA a bf16 copy with
        compiled decoding steps, as `polybyte sample` runs, so `score` and `save` keep fp32."""
        dtype = "bf16" if self.device.type == "cuda" else "fp32"
        if self._sampling is None:
            net = copy.deepcopy(self.net) if self.device.type == "cuda" else self.net
            self._sampling = prepare_for_sampling(net, self.device, dtype, compile=True)
        return self._sampling, dtype

    def _prompt(self, adapter, prompt) -> Prompt:
        if isinstance(prompt, (bytes, bytearray, memoryview)):
            return Prompt(bytes(prompt), whole=True, name="the prompt bytes")
        is_path = isinstance(prompt, os.PathLike) or (isinstance(prompt, str) and adapter.name != "text")
        name = f"prompt {prompt}" if is_path else "the prompt"
        return Prompt(_payload(adapter, prompt), name=name)

    # --- scoring ----------------------------------------------------------------------------------
    def score(self, data, modality: str = "text", *, stride: int | None = None) -> float:
        """Bits per byte the model needs for ``data`` as one ``modality`` sample, scored as
        `polybyte eval` scores each val sample (its windows, its payload bytes only).

        data: bytes are the payload as the model reads it (text: its UTF-8 bytes; image: pixels
          in the model's scan order; audio: encoded samples); a str (text), a PIL image, a
          ``(waveform, sample_rate)`` pair or a file path is encoded by the export's adapter first.
        stride: `polybyte eval --stride` (default: the window, no overlap).
        """
        with _as_api_error():
            adapter = trained_adapter(self.info, modality)
            payload = _payload(adapter, data)
            if not payload:
                raise ValueError("nothing to score: the data holds no byte")
            seq_len = default_seq_len(self.net, self.info)
            stream = sample_stream(payload, adapter.tag)
            meter = score(self.net, [(stream, adapter.tag)], seq_len, stride or seq_len, SCORE_BATCH, self.device)
        meter = meter["meter"]
        return float(meter.bits.sum() / meter.count.sum())

    # --- saving -----------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write an export folder: model.safetensors, config.json (as loaded: settings and run
        facts kept) and the model card README.md, in one rename; returns the folder."""
        extra = {k: v for k, v in self.info.items() if k not in ("model", "modalities")}
        out = save_exported(path, self.net, self.info.get("modalities") or {}, extra)
        self.path = self.path or out
        return out


def _payload(adapter, data) -> bytes:
    """``data`` as the payload bytes ``adapter`` makes (bytes pass through unchanged)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if adapter.name == "text" and isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (str, os.PathLike)):
        return encode_prompt_file(adapter, data)
    if adapter.name == "image" and isinstance(data, Image.Image):
        return to_order(adapter.fit(data), adapter.settings.order)  # what encode does after decoding a file
    if adapter.name == "audio" and isinstance(data, (tuple, np.ndarray)):
        wave, rate = data if isinstance(data, tuple) else (data, adapter.settings.sample_rate)
        wave = np.asarray(wave)
        buf = io.BytesIO()  # through a WAV in memory: the adapter's mono mix, resampling and encoding
        sf.write(buf, wave, int(rate), format="WAV", subtype="PCM_16" if wave.dtype == np.int16 else "FLOAT")
        return adapter.encode(buf.getvalue(), {"extension": ".wav"})
    kinds = {
        "text": "str or bytes",
        "image": "a PIL image, an image file path or payload bytes",
        "audio": "(waveform, sample_rate), a waveform at the model's rate, an audio file path or payload bytes",
    }
    raise TypeError(f"{adapter.name} data must be {kinds.get(adapter.name, 'bytes')}, got {type(data).__name__}")


class _as_api_error:
    """Re-raise `polybyte sample`'s UsageError as a ValueError naming keyword arguments
    (``--max-bytes`` -> ``max_bytes``), without the CLI's traceback chain."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if isinstance(error, UsageError):
            raise ValueError(re.sub(r"--([a-z][a-z-]*)", lambda m: m[1].replace("-", "_"), str(error))) from None
        return False
