"""The demo's embedded dataset: deterministic, valid files, stdlib text, learnable images/audio."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from polybyte.pipelines.codecs import codec_bpb
from polybyte.pipelines.demo_data import LEVELS, build_demo_inputs, stdlib_documents

SMALL = dict(text_bytes=150_000, n_images=24, n_clips=8, image_size=32, sample_rate=8000)


def snapshot(root) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return root, build_demo_inputs(root, seed=3, **SMALL)


def test_same_seed_same_bytes_other_seed_other_data(built, tmp_path):
    root, dirs = built
    assert dirs == {m: root / m for m in ("text", "image", "audio")}
    again = tmp_path / "again"
    build_demo_inputs(again, seed=3, **SMALL)
    assert snapshot(again) == snapshot(root)
    other = tmp_path / "other"
    build_demo_inputs(other, seed=4, **SMALL)
    a, b = snapshot(root), snapshot(other)
    assert sum(a[k] != b.get(k) for k in a if k.startswith("image/")) > SMALL["n_images"] // 2
    assert any(a[k] != b.get(k) for k in a if k.startswith("audio/"))


def test_text_is_utf8_from_the_stdlib_prose_and_code(built):
    root, dirs = built
    files = sorted(dirs["text"].glob("*.txt"))
    assert len(files) >= 3
    texts = [f.read_bytes().decode("utf-8") for f in files]  # raises if not UTF-8
    total = sum(f.stat().st_size for f in files)
    assert 0.8 * SMALL["text_bytes"] <= total <= SMALL["text_bytes"]
    prose, code = stdlib_documents()
    sources = [t for _, t in prose + code]
    for t in texts:
        assert t and any(src.startswith(t) for src in sources)  # whole docs or line-cut prefixes
    from_code = [any(src.startswith(t) for _, src in code) for t in texts]
    assert any(from_code) and not all(from_code)  # Python sources and English prose
    record = json.loads((root / "demo_inputs.json").read_text())
    assert record["text"]["bytes"] == total and record["seed"] == 3


def test_images_are_png_of_the_size_and_compressible(built):
    _, dirs = built
    files = sorted(dirs["image"].glob("*.png"))
    assert len(files) == SMALL["n_images"]
    payloads = []
    for f in files:
        with Image.open(f) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert im.size == (SMALL["image_size"],) * 2
            payloads.append(np.asarray(im).tobytes())
    assert len(set(payloads)) == len(payloads)  # all different pictures
    values = np.unique(np.frombuffer(b"".join(payloads), np.uint8))
    assert values.tolist() == np.rint(np.arange(LEVELS) * 255 / (LEVELS - 1)).astype(int).tolist()  # posterized
    res = codec_bpb("image", payloads, {"size": SMALL["image_size"], "order": "raster"})
    assert res["PNG"]["bpb"] < 4  # structure a model can learn, not noise


def test_audio_is_16bit_wav_at_the_rate_and_compressible(built):
    _, dirs = built
    files = sorted(dirs["audio"].glob("*.wav"))
    assert len(files) == SMALL["n_clips"]
    payloads = []
    for f in files:
        info = sf.info(f)
        assert (info.format, info.subtype, info.channels) == ("WAV", "PCM_16", 1)
        assert info.samplerate == SMALL["sample_rate"]
        assert 0.5 <= info.duration <= 1.0
        x, _ = sf.read(f, dtype="int16")
        assert np.abs(x).max() > 3000  # audible, not silence
        payloads.append(x.astype("<i2").tobytes())
    res = codec_bpb("audio", payloads, {"sample_rate": SMALL["sample_rate"]})
    assert res["FLAC"]["bpb"] < 6


def test_other_sizes_and_rates(tmp_path):
    dirs = build_demo_inputs(
        tmp_path, text_bytes=5_000, n_images=2, n_clips=2, image_size=64, sample_rate=16000, clip_seconds=(0.2, 0.3)
    )
    assert Image.open(next(dirs["image"].glob("*.png"))).size == (64, 64)
    info = sf.info(next(dirs["audio"].glob("*.wav")))
    assert info.samplerate == 16000 and 0.2 <= info.duration <= 0.3


def test_existing_output_needs_overwrite_and_leaves_no_stale_files(tmp_path):
    build_demo_inputs(tmp_path, text_bytes=5_000, n_images=6, n_clips=3)
    with pytest.raises(ValueError, match="overwrite"):
        build_demo_inputs(tmp_path, text_bytes=5_000, n_images=2, n_clips=3)
    build_demo_inputs(tmp_path, text_bytes=5_000, n_images=2, n_clips=3, overwrite=True)
    assert len(list((tmp_path / "image").iterdir())) == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n_images=0), "positive"),
        (dict(image_size=2), "image_size"),
        (dict(sample_rate=100), "sample_rate"),
        (dict(clip_seconds=(1.0, 0.5)), "clip_seconds"),
    ],
)
def test_bad_parameters_are_rejected(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_demo_inputs(tmp_path, **kwargs)
