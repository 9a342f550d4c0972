"""`polybyte bench --what data`: the training loader's throughput, on a synthetic webdataset
when no data is given."""

from __future__ import annotations

import io
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from polybyte.modalities import NUM_BYTES, TAG_NAMES

# smallest multiple of 256 that holds a 64x64 RGB image (12,288 bytes) plus EOS
DEFAULT_SEQ_LEN = 12544
WORDS = "the of and to in is was for on that with as by at from this be are it an or not byte".split()


def synthetic_shards(out_dir: Path, seed: int = 0) -> dict[str, str]:
    """Write one small webdataset per modality (.txt, .png, .flac members; no manifest) and
    return ``{modality: folder}``. Procedural content, nothing downloaded."""
    import soundfile as sf
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(seed)
    folders = {m: out_dir / m for m in ("text", "image", "audio")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(folders["text"] / "train-000000.tar")) as tar:
        for i in range(64):  # ~16 KB documents of random words
            words = rng.choice(WORDS, size=3000)
            tar.write({"__key__": f"doc{i:04d}", "txt": " ".join(words).encode()})
    yy, xx = np.mgrid[0:64, 0:64]
    with wds.TarWriter(str(folders["image"] / "train-000000.tar")) as tar:
        for i in range(128):  # gradients with noise, 64x64 RGB
            a, b, c = rng.uniform(0.5, 4.0, 3)
            base = np.stack([xx * a, yy * b, (xx + yy) * c], axis=-1) + rng.normal(0, 8, (64, 64, 3))
            buf = io.BytesIO()
            Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buf, format="PNG")
            tar.write({"__key__": f"img{i:04d}", "png": buf.getvalue()})
    t = np.arange(16000) / 16000
    with wds.TarWriter(str(folders["audio"] / "train-000000.tar")) as tar:
        for i in range(32):  # 1 s chirps at 16 kHz
            f0, f1 = rng.uniform(100, 2000, 2)
            wave = 0.3 * np.sin(2 * np.pi * (f0 + (f1 - f0) * t / 2) * t) + rng.normal(0, 0.01, t.shape)
            buf = io.BytesIO()
            sf.write(buf, (wave * 32767).astype(np.int16), 16000, format="FLAC", subtype="PCM_16")
            tar.write({"__key__": f"clip{i:04d}", "flac": buf.getvalue()})
    return {m: str(f) for m, f in folders.items()}


def bench_data(
    sources: dict[str, str] | list[str],
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = 8,
    workers: int = 2,
    batches: int = 50,
    shuffle_buffer: int = 100,
) -> dict:
    """Time ``batches`` training batches after the first (which pays for worker start-up and
    filling the shuffle buffers). Returns the measurements; bytes are grid ids (``B*seq_len``
    per batch), payload bytes only the ids 0..255. Runs torch single-threaded, as in a worker:
    on a busy CPU its thread pool makes the small collate/count ops measured here 100x slower."""
    from polybyte.pipelines.data import ByteDataModule  # imports Lightning: only --what data needs it

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dm = ByteDataModule(
            sources=sources, seq_len=seq_len, batch_size=batch_size, num_workers=workers, shuffle_buffer=shuffle_buffer
        )
        dm.setup("fit")
        start = time.perf_counter()
        it = iter(dm.train_dataloader())
        next(it)
        first, seen0 = time.perf_counter() - start, dm.seen
        rows, payload = Counter(), 0
        start = time.perf_counter()
        for _ in range(batches):
            ids, modality = next(it)
            rows.update(TAG_NAMES[t] for t in modality.tolist())
            payload += int((ids < NUM_BYTES).sum())
        elapsed = time.perf_counter() - start
        del it
    finally:
        torch.set_num_threads(threads)
    n = batches * batch_size
    return {
        "first_batch_s": first,
        "seconds": elapsed,
        "bytes_per_s": n * seq_len / elapsed,
        "payload_bytes_per_s": payload / elapsed,
        "samples_per_s": n / elapsed,
        "members_per_s": (dm.seen - seen0) / elapsed,
        "rows": {k: v / n for k, v in sorted(rows.items())},
        "skipped": dm.skipped,
    }
