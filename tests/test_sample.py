"""`polybyte sample`: images, audio and text from an exported tiny checkpoint, prompts, errors."""

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from polybyte.modalities.audio import AudioModality
from polybyte.modalities.image import ImageModality
from polybyte.modalities.text import TextModality
from polybyte.models.megabyte import Megabyte, MegabyteConfig
from polybyte.models.transformer import Transformer, TransformerConfig
from polybyte.pipelines.export import save_exported
from polybyte.pipelines.sample import main

SEQ_LEN = 512
IMAGE = ImageModality(size=8, order="patch2")  # 192 bytes
AUDIO = AudioModality(sample_rate=8000, encoding="pcm16", clip_seconds=0.02)  # 160 samples, 320 bytes
TEXT = TextModality()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny MEGABYTE exported with all three modalities."""
    torch.manual_seed(0)
    model = Megabyte(MegabyteConfig(max_seq_len=SEQ_LEN))
    modalities = {"image": IMAGE.settings_dict(), "audio": AUDIO.settings_dict(), "text": TEXT.settings_dict()}
    return save_exported(tmp_path_factory.mktemp("ckpt"), model, modalities, {"seq_len": SEQ_LEN})


@pytest.fixture(scope="module")
def text_only_ckpt(tmp_path_factory):
    """A tiny flat transformer that only knows text, with a short window."""
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(dim=32, n_layers=1, n_heads=4, max_seq_len=64))
    return save_exported(tmp_path_factory.mktemp("flat"), model, {"text": TEXT.settings_dict()}, {"seq_len": 64})


def picture(path, w=20, h=12):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_images_and_grid(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(
            [
                "--ckpt",
                str(ckpt),
                "--modality",
                "image",
                "--num",
                "3",
                "--out",
                str(out),
                "--seed",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    for i in range(3):
        with Image.open(out / f"image_{i:03d}.png") as im:
            assert im.size == (8, 8) and im.mode == "RGB"
    with Image.open(out / "grid.png") as grid, Image.open(out / "image_002.png") as im:
        cell = 64 // 8 * 8  # 8-pixel images are shown enlarged to 64 pixels, nearest neighbour
        assert grid.size[0] > 2 * cell and grid.size[1] > 2 * cell  # 2 x 2 cells for 3 images
        bottom_left = grid.crop((cell // 16, 2 * (cell // 16) + cell, cell // 16 + cell, 2 * (cell // 16) + 2 * cell))
        assert bottom_left.resize((8, 8), Image.NEAREST).tobytes() == im.tobytes()  # third image, 8x enlarged
    assert "bytes/s" in capsys.readouterr().out


def test_image_prompt_keeps_top_rows(ckpt, tmp_path):
    src, out = picture(tmp_path / "p.png"), tmp_path / "out"
    assert (
        main(
            [
                "--ckpt",
                str(ckpt),
                "--modality",
                "image",
                "--num",
                "2",
                "--out",
                str(out),
                "--prompt",
                str(src),
                "--prompt-fraction",
                "0.5",
                "--batch-size",
                "1",
            ]
        )
        == 0
    )
    original = np.asarray(IMAGE.decode(IMAGE.encode(src.read_bytes())))
    for i in range(2):
        with Image.open(out / f"image_{i:03d}.png") as im:
            pixels = np.asarray(im)
        assert (pixels[:4] == original[:4]).all()  # the kept half: 4 of 8 rows
        assert not (pixels[4:] == original[4:]).all()  # the rest is sampled
    with Image.open(out / "grid.png") as grid:
        assert grid.size[0] > 3 * 8 and grid.size[1] > 2 * 8  # prompt | completion | original per row


def test_audio_wav_at_model_rate(ckpt, tmp_path):
    out = tmp_path / "out"
    assert main(["--ckpt", str(ckpt), "--modality", "audio", "--num", "2", "--out", str(out), "--top-k", "20"]) == 0
    for i in range(2):
        wave, rate = sf.read(out / f"audio_{i:03d}.wav")
        assert rate == 8000 and len(wave) == 160
    with Image.open(out / "audio.png") as im:
        assert im.size[0] > 100


def test_audio_prompt_is_continued(ckpt, tmp_path):
    src, out = tmp_path / "p.wav", tmp_path / "out"
    t = np.arange(800) / 8000
    sf.write(src, (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 8000, subtype="PCM_16")
    assert (
        main(
            [
                "--ckpt",
                str(ckpt),
                "--modality",
                "audio",
                "--num",
                "1",
                "--out",
                str(out),
                "--prompt",
                str(src),
                "--prompt-seconds",
                "0.01",
            ]
        )
        == 0
    )
    wave, rate = sf.read(out / "audio_000.wav", dtype="int16")
    prompt, _ = sf.read(src, dtype="int16")
    assert rate == 8000 and len(wave) == 160 and (wave[:80] == prompt[:80]).all()


def test_text_prompt_continued_and_printed(ckpt, tmp_path, capsys):
    src, out = tmp_path / "p.txt", tmp_path / "out"
    src.write_text("To be, or not")
    assert (
        main(
            [
                "--ckpt",
                str(ckpt),
                "--modality",
                "text",
                "--num",
                "2",
                "--out",
                str(out),
                "--prompt",
                str(src),
                "--max-bytes",
                "40",
                "--top-p",
                "0.9",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    for i in range(2):
        data = (out / f"text_{i:03d}.txt").read_bytes()
        assert data.startswith(b"To be, or not") and len(data) <= 13 + 40
        assert f"text_{i:03d}" in printed


def _prompt_file(kind: str, path):
    """A prompt file for the 8 px / 8 kHz checkpoint: converted (another size, mode, rate or
    channel count) or already at its settings."""
    rng = np.random.default_rng(0)
    if kind == "image-size":
        return picture(path.with_suffix(".png"), w=20, h=12)
    if kind in ("image-rgba", "image-match"):
        mode = "RGBA" if kind == "image-rgba" else "RGB"
        Image.fromarray(rng.integers(0, 256, (8, 8, len(mode)), dtype=np.uint8), mode).save(path.with_suffix(".png"))
        return path.with_suffix(".png")
    rate, channels = {"audio-stereo": (16000, 2), "audio-match": (8000, 1)}[kind]
    wave = (0.3 * rng.standard_normal((rate // 10, channels))).astype(np.float32)
    sf.write(path.with_suffix(".wav"), wave, rate, subtype="PCM_16")
    return path.with_suffix(".wav")


@pytest.mark.parametrize(
    "kind, note",
    [
        ("image-size", "20x12 RGB -> 8x8 RGB"),
        ("image-rgba", "8x8 RGBA -> 8x8 RGB"),
        ("image-match", None),
        ("audio-stereo", "16000 Hz stereo -> 8000 Hz mono"),
        ("audio-match", None),
    ],
)
def test_converted_prompt_gets_one_note_line(ckpt, tmp_path, capsys, kind, note):
    """A prompt the checkpoint's adapter converts is named in one line on stderr, with what it
    was and what it became; a prompt already at the model's settings gets none."""
    src = _prompt_file(kind, tmp_path / "prompt")
    modality = kind.split("-")[0]
    args = ["--ckpt", str(ckpt), "--modality", modality, "--num", "1", "--out", str(tmp_path / "out")]
    assert main([*args, "--prompt", str(src), "--prompt-fraction", "0.25", "--seed", "0"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ([] if note is None else [f"prompt {src}: {note} (the model's settings)"])


def test_text_only_model(text_only_ckpt, tmp_path):
    out = tmp_path / "out"
    assert main(["--ckpt", str(text_only_ckpt), "--modality", "text", "--num", "1", "--out", str(out)]) == 0
    assert len((out / "text_000.txt").read_bytes()) <= 63  # the default length fits the 64-byte window


@pytest.mark.parametrize(
    "args, message",
    [
        (["--modality", "image", "--prompt", "{wav}"], "looks like audio (.wav) but --modality is image"),
        (["--modality", "text", "--prompt", "{png}"], "looks like image (.png) but --modality is text"),
        (["--modality", "image", "--prompt", "{fake}"], "cannot decode image"),
        (["--modality", "image", "--prompt", "{missing}"], "not found"),
        (["--modality", "image", "--prompt", "{png}", "--prompt-fraction", "1.0"], "--prompt-fraction"),
        (["--modality", "image", "--max-bytes", "1000"], "exceeds one 8px image"),
        (["--modality", "text", "--max-bytes", "600"], "exceed the model's window"),
    ],
)
def test_bad_input_exits_2_with_a_message(ckpt, tmp_path, capsys, args, message):
    files = {
        "wav": tmp_path / "a.wav",
        "fake": tmp_path / "fake.png",
        "png": picture(tmp_path / "a.png"),
        "missing": tmp_path / "nope.png",
    }
    sf.write(files["wav"], np.zeros(100, dtype=np.float32), 8000)
    files["fake"].write_text("not an image")
    args = [a.format(**files) for a in args]
    assert main(["--ckpt", str(ckpt), "--num", "1", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_sliding_window_model_samples_past_its_window(tmp_path, capsys):
    """A transformer whose attention window is its training window decodes on ring caches, so
    text may run past seq_len; the same model without a window stops at it."""
    torch.manual_seed(0)
    for window, rc in ((32, 0), (None, 2)):
        model = Transformer(TransformerConfig(dim=32, n_layers=1, n_heads=4, max_seq_len=32, window=window))
        ckpt = save_exported(tmp_path / f"w{window}", model, {"text": TEXT.settings_dict()}, {"seq_len": 32})
        out = tmp_path / f"out{window}"
        args = [
            "--ckpt",
            str(ckpt),
            "--modality",
            "text",
            "--num",
            "2",
            "--out",
            str(out),
            "--max-bytes",
            "100",
            "--seed",
            "0",
            "--device",
            "cpu",
            "--temperature",
            "0",
        ]
        assert main(args) == rc
        if rc == 0:
            assert model.max_stream_len is None
            sampled = [len((out / f"text_{i:03d}.txt").read_bytes()) for i in range(2)]
            assert sampled == [100, 100]  # 100 new bytes from a 32-byte window (greedy, no EOS here)
        else:
            assert model.max_stream_len == 32 and "exceed the model's window" in capsys.readouterr().err


def test_modality_missing_from_checkpoint_and_long_prompt(text_only_ckpt, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["--ckpt", str(text_only_ckpt), "--modality", "image", "--num", "1", "--out", out]) == 2
    assert "not trained on 'image'" in capsys.readouterr().err
    long = tmp_path / "long.txt"
    long.write_text("x" * 100)
    assert main(["--ckpt", str(text_only_ckpt), "--modality", "text", "--out", out, "--prompt", str(long)]) == 2
    assert "fills the model's window" in capsys.readouterr().err
    assert main(["--ckpt", str(tmp_path / "nothing"), "--modality", "text", "--out", out]) == 2
    assert "no model.safetensors" in capsys.readouterr().err


def test_bench_sample_compares_cached_with_uncached(tmp_path, capsys):
    """`polybyte bench --what sample`: a preset and a YAML config (BLT with entropy patching)."""
    import json

    from polybyte.pipelines.bench import main as bench

    config = tmp_path / "blt.yaml"
    config.write_text(
        "model:\n  model:\n    backbone: blt\n    max_seq_len: 64\n"
        "    patcher: {kind: entropy, patch_size: 3, max_patch_len: 8}\n"
        "    hash_ngrams: {table_size: 97}\n"
        "    encoder: {dim: 32, n_layers: 1, n_heads: 2, window: 8}\n"
        "    latent: {dim: 32, n_layers: 1, n_heads: 2}\n"
        "    decoder: {dim: 32, n_layers: 1, n_heads: 2, window: 8}\n"
        "    entropy_model: {dim: 32, n_layers: 1, n_heads: 2, window: 8, max_seq_len: 64}\n"
    )
    report = tmp_path / "bench.json"
    assert (
        bench(
            [
                "--what",
                "sample",
                "--model",
                "megabyte:tiny",
                str(config),
                "--sample-bytes",
                "96",
                "--uncached-bytes",
                "48",
                "--sample-batch-size",
                "2",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    results = json.loads(report.read_text())
    assert [r["backbone"] for r in results] == ["megabyte", "blt"]
    assert all(r["cached_bytes_per_s"] > 0 and r["uncached_bytes_per_s"] > 0 for r in results)
    assert "ratio" in capsys.readouterr().out
    assert bench(["--what", "sample", "--model", "nonsense:x"]) == 2


def test_prompts_are_cut_at_the_fixed_patch_length():
    """A prompt is cut to whole fixed-length patches (MEGABYTE, strided BLT) so that sampling
    starts a patch as training did; entropy/space patching and the flat model cut nowhere."""
    from conftest import tiny_blt

    from polybyte.pipelines.sample import _patch_multiple

    megabyte = Megabyte(MegabyteConfig(patch_size=4, max_seq_len=64))
    assert megabyte.fixed_patch_len == megabyte.seq_multiple == 4 and _patch_multiple(megabyte) == 4
    assert tiny_blt("strided").fixed_patch_len == 3 and _patch_multiple(tiny_blt("strided")) == 3
    assert tiny_blt("space").fixed_patch_len is None and _patch_multiple(tiny_blt("space")) == 1
    flat = Transformer(TransformerConfig(dim=32, n_layers=1, n_heads=2, max_seq_len=64))
    assert flat.fixed_patch_len is None and flat.seq_multiple == 1 and _patch_multiple(flat) == 1
