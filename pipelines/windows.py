"""Cutting samples into windows of ``seq_len`` ids (pure functions; DESIGN.md §2).

* text: documents are framed ``[TEXT] + payload + [EOS]``. Training concatenates them and cuts
  the stream into ``seq_len`` windows (packing; the stream is endless, so there is no final
  partial window to drop). In-stream TEXT/EOS ids are targets of the loss but not of BPB.
* image / audio: one sample per window, ``payload + [EOS] + [PAD]*...``. An audio payload of
  ``seq_len`` bytes or more is cut into consecutive windows of ``seq_len`` payload bytes; only the
  clip's last window carries the EOS.
* validation and ``polybyte eval``: every sample windowed on its own (`stream_windows`; a text
  document too, its last window padded with PAD so no byte is lost), so both score the same
  windows.

Windows are int16 arrays; the modality tag of a row travels beside them, outside the byte grid.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from polybyte.modalities import EOS, PAD, TAG_NAMES, TAGS, TEXT

# Windows are int16 arrays (ids < 264): a quarter of int64's memory in the shuffle buffers.
WINDOW_DTYPE = np.int16


def _framed_text(doc: bytes) -> np.ndarray:
    """``[TEXT] + doc + [EOS]`` as an int16 array."""
    out = np.empty(len(doc) + 2, dtype=WINDOW_DTYPE)
    out[0] = TEXT
    out[1:-1] = np.frombuffer(doc, dtype=np.uint8)
    out[-1] = EOS
    return out


def pack_text(docs: Iterable[bytes], seq_len: int, pad_last: bool = True) -> Iterator[np.ndarray]:
    """Frame each document ``[TEXT] + doc + [EOS]``, concatenate them, cut into windows.

    Yields int16 arrays of exactly ``seq_len`` ids; concatenating them gives back the framed
    stream exactly (no id lost or repeated). The final partial window is padded with PAD when
    ``pad_last`` (validation: nothing lost), dropped otherwise.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    pending: list[np.ndarray] = []
    n = 0
    for doc in docs:
        framed = _framed_text(doc)
        pending.append(framed)
        n += len(framed)
        if n < seq_len:
            continue
        stream = np.concatenate(pending)
        full = n // seq_len
        for i in range(full):
            yield stream[i * seq_len : (i + 1) * seq_len]
        rest = stream[full * seq_len :]
        pending, n = ([rest] if len(rest) else []), len(rest)
    if n and pad_last:
        yield np.concatenate([*pending, np.full(seq_len - n, PAD, dtype=WINDOW_DTYPE)])


def sample_stream(payload: bytes, tag: int) -> np.ndarray:
    """One sample's ids as its windows hold them: text ``[TEXT] + payload + [EOS]`` (the tag is
    in-stream, as in packed text), image/audio ``payload + [EOS]`` (tag outside the grid)."""
    if tag not in TAG_NAMES:
        raise ValueError(f"unknown modality tag {tag}; known: {TAG_NAMES}")
    if tag == TEXT:
        return _framed_text(payload)
    out = np.empty(len(payload) + 1, dtype=WINDOW_DTYPE)
    out[:-1] = np.frombuffer(payload, dtype=np.uint8)
    out[-1] = EOS
    return out


def stream_windows(
    stream: np.ndarray, seq_len: int, stride: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Cut one sample's ids into ``(window [seq_len] int16, scored [seq_len] bool)`` pairs.

    Window k starts at ``k * stride`` (default ``stride = seq_len``: consecutive windows) and is
    padded with PAD past the end of the stream; ``scored`` marks the targets it adds beyond the
    previous window, so every id of the stream is scored exactly once. A ``stride`` below
    ``seq_len`` gives each later target up to ``seq_len - stride`` ids of extra context.
    """
    stride = seq_len if stride is None else stride
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in 1..seq_len={seq_len}, got {stride}")
    done = 0  # stream ids scored so far
    begin = 0
    while done < len(stream):
        end = min(begin + seq_len, len(stream))
        window = np.full(seq_len, PAD, dtype=WINDOW_DTYPE)
        window[: end - begin] = stream[begin:end]
        scored = np.zeros(seq_len, dtype=bool)
        scored[done - begin : end - begin] = True
        yield window, scored
        done, begin = end, begin + stride


def clip_windows(payload: bytes, seq_len: int) -> list[np.ndarray]:
    """One image/audio payload -> windows of ``seq_len`` int16 ids.

    ``payload + [EOS] + [PAD]*...`` when it fits in ``seq_len - 1``. Otherwise consecutive
    windows of ``seq_len`` payload bytes (no EOS), then a last window with the remainder,
    EOS and padding (just ``[EOS] + PAD`` when the payload is a multiple of ``seq_len``).
    Window starts stay multiples of ``seq_len``, so an even ``seq_len`` keeps pcm16 samples
    aligned.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one byte and EOS), got {seq_len}")
    return [w for w, _ in stream_windows(sample_stream(payload, TAGS["image"]), seq_len)]


def train_windows(payloads: Iterable[bytes], modality: str, seq_len: int) -> Iterator[np.ndarray]:
    """Training windows: packed text (the stream is endless: no final partial window), one clip
    per window else."""
    if modality == "text":
        yield from pack_text(payloads, seq_len, pad_last=False)
    else:
        for payload in payloads:
            yield from clip_windows(payload, seq_len)


def sample_windows(payloads: Iterable[bytes], tag: int, seq_len: int) -> Iterator[np.ndarray]:
    """Each sample alone, text included: the windows `polybyte eval` scores at full stride."""
    for payload in payloads:
        for window, _ in stream_windows(sample_stream(payload, tag), seq_len):
            yield window
