"""The Python API (issue 17): README's example runs as written; `generate` gives what `polybyte
sample` gives, in Python types; `score` is `polybyte eval`'s number; `save` writes a loadable
export with its model card; bad input is one clear error; `import polybyte` stays cheap.

The model is a randomly initialised tiny flat transformer shaped like the demo's (sliding window
772, the demo's text / 16x16 image / 8 kHz mu-law audio settings), so every test runs in seconds.
"""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import polybyte
from polybyte.modalities import TAGS, get_modality
from polybyte.models.transformer import Transformer, TransformerConfig
from polybyte.pipelines import cli
from polybyte.pipelines.demo_data import DEMO_SETTINGS
from polybyte.pipelines.evaluate import evaluate
from polybyte.pipelines.export import CONFIG, WEIGHTS, save_exported
from polybyte.pipelines.windows import sample_stream

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 772  # the demo's window
DEMO_EXPORT = Path("polybyte-demo/run/checkpoints/last")  # where `polybyte demo` leaves its model


def tiny_model(window: int | None = SEQ_LEN) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(dim=32, n_layers=1, n_heads=2, max_seq_len=SEQ_LEN, window=window)).eval()


def demo_modalities() -> dict[str, dict]:
    return {m: get_modality(m, **s).settings_dict() for m, s in DEMO_SETTINGS.items()}


@pytest.fixture
def demo_root(tmp_path, one_thread) -> Path:
    """A folder laid out as after `polybyte demo`, holding the tiny model's export."""
    save_exported(tmp_path / DEMO_EXPORT, tiny_model(), demo_modalities(), {"step": 0, "seq_len": SEQ_LEN})
    return tmp_path


def readme_example() -> str:
    """The one ```python block of README.md's "Python API" section."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("\n## Python API\n") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, f"README's Python API section must hold one python block, found {len(blocks)}"
    return blocks[0]


def test_readme_example_runs_as_written(demo_root, monkeypatch, capsys):
    code = readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    monkeypatch.chdir(demo_root)
    scope: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), scope)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("polybyte.Model(transformer, ") and "step 0" in printed[0]
    text, image, wave, rate = (scope[k] for k in ("text", "image", "wave", "rate"))
    assert isinstance(text, str) and text.startswith("The ")
    assert isinstance(image, Image.Image) and image.size == (16, 16) and image.mode == "RGB"
    with Image.open(demo_root / "sample.png") as saved:
        assert np.array_equal(np.asarray(saved), np.asarray(image))
    assert wave.dtype == np.float32 and wave.shape == (4000,) and rate == 8000  # half a second of mu-law bytes
    bpb = float(printed[1].removesuffix(" bits/byte"))
    assert 7 < bpb < 10  # an untrained model: about log2(264) = 8.04 bits per byte
    saved = polybyte.load(demo_root / "my-model")
    assert {p.name for p in (demo_root / "my-model").iterdir()} == {WEIGHTS, CONFIG, "README.md"}
    assert saved.score(b"The quick brown fox", modality="text") == pytest.approx(bpb, abs=1e-12)


def test_generate_is_polybyte_sample_in_python_types(demo_root, tmp_path, capsys):
    """The same seed and options give the bytes `polybyte sample` writes to its files."""
    ckpt = demo_root / DEMO_EXPORT
    model = polybyte.load(ckpt, device="cpu")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Once upon")
    args = ["--ckpt", str(ckpt), "--device", "cpu", "--seed", "3", "--temperature", "0.8", "--num", "2"]
    assert (
        cli.main(
            [
                "sample",
                *args,
                "--modality",
                "text",
                "--prompt",
                str(prompt),
                "--max-bytes",
                "40",
                "--out",
                str(tmp_path / "t"),
            ]
        )
        == 0
    )
    texts = model.generate("text", "Once upon", num=2, max_bytes=40, seed=3, temperature=0.8, raw=True)
    assert texts == [(tmp_path / "t" / f"text_{i:03d}.txt").read_bytes() for i in range(2)]
    as_str = model.generate("text", b"Once upon", num=2, max_bytes=40, seed=3, temperature=0.8)
    assert as_str == [t.decode("utf-8", errors="replace") for t in texts]
    # an image prompt: the CLI reads a PNG, the API takes the PIL image; both keep its top rows
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))  # fitted to 16x16 by the adapter
    picture.save(tmp_path / "cat.png")
    assert (
        cli.main(
            [
                "sample",
                *args,
                "--modality",
                "image",
                "--prompt",
                str(tmp_path / "cat.png"),
                "--out",
                str(tmp_path / "i"),
            ]
        )
        == 0
    )
    images = model.generate("image", picture, num=2, seed=3, temperature=0.8)
    for i, im in enumerate(images):
        with Image.open(tmp_path / "i" / f"image_{i:03d}.png") as cli_image:
            assert np.array_equal(np.asarray(im), np.asarray(cli_image))
    adapter = get_modality("image", **DEMO_SETTINGS["image"])
    rows = np.asarray(adapter.decode(adapter.encode((tmp_path / "cat.png").read_bytes())))[:8]
    assert np.array_equal(np.asarray(images[0])[:8], rows)  # prompt_fraction 0.5: 8 of 16 rows kept
    # an audio prompt as (waveform, rate): resampled and encoded as a file would be
    t = np.arange(16000) / 16000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    sf.write(tmp_path / "tone.wav", tone, 16000, subtype="FLOAT")
    extra = ["--prompt-seconds", "0.25", "--max-bytes", "2400", "--out", str(tmp_path / "a")]
    assert cli.main(["sample", *args, "--modality", "audio", "--prompt", str(tmp_path / "tone.wav"), *extra]) == 0
    clips = model.generate("audio", (tone, 16000), num=2, prompt_seconds=0.25, max_bytes=2400, seed=3, temperature=0.8)
    for i, (wave, rate) in enumerate(clips):
        cli_wave, cli_rate = sf.read(tmp_path / "a" / f"audio_{i:03d}.wav", dtype="float32")
        assert rate == cli_rate == 8000 and wave.shape == cli_wave.shape == (2400,)
        assert np.abs(wave - cli_wave).max() <= 1 / 32768  # the CLI's WAV is 16-bit
    with pytest.raises(ValueError, match="tone.wav looks like audio"):
        model.generate("image", tmp_path / "tone.wav")
    capsys.readouterr()


def test_raw_bytes_prompt_is_kept_whole(demo_root):
    model = polybyte.load(demo_root / DEMO_EXPORT, device="cpu")
    head = bytes(range(100, 160))  # 60 pixel bytes: not whole rows, kept anyway
    image = model.generate("image", head, seed=1, raw=True)
    assert len(image) == 768 and image.startswith(head)
    assert model.generate("image", head, seed=1, raw=True) == image  # seeded: reproducible


def test_score_is_what_polybyte_eval_reports(demo_root, demo_shards, tmp_path, capsys):
    """Over the same val samples, the byte-weighted mean of `score` is eval's bits/byte."""
    ckpt = demo_root / DEMO_EXPORT
    model = polybyte.load(ckpt, device="cpu")
    report = evaluate(ckpt, [f"text={demo_shards['text']}"], tmp_path / "eval", max_samples=3, device="cpu")
    from polybyte.pipelines.evaluate import val_payloads
    from polybyte.pipelines.sources import resolve_sources

    payloads = val_payloads(resolve_sources([f"text={demo_shards['text']}"])[0])[:3]
    bits = sum(model.score(p, modality="text") * len(p) for p in payloads)
    assert bits / sum(map(len, payloads)) == pytest.approx(report["modalities"]["text"]["bpb"], rel=1e-9)
    capsys.readouterr()


def test_score_counts_payload_bits_and_takes_python_objects(demo_root):
    model = polybyte.load(demo_root / DEMO_EXPORT, device="cpu")
    data = "naïve café, 0 bytes: \x00\x00".encode()
    ids = torch.from_numpy(sample_stream(data, TAGS["text"])).long()[None]  # [1, T]: TEXT + data + EOS
    with torch.no_grad():
        _, nll = model.net.loss(ids, torch.tensor([TAGS["text"]]))  # [1, T]: nats of each id as a target
    payload = ids[0] < 256  # the data's bytes, 0x00 included; not the TEXT tag nor EOS
    assert int(payload.sum()) == len(data)
    expected = float(nll[0][payload].sum()) / math.log(2) / len(data)
    assert model.score(data, modality="text") == pytest.approx(expected, rel=1e-6)
    assert model.score(data.decode(), modality="text") == model.score(data, modality="text")
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    encoded = get_modality("image", **DEMO_SETTINGS["image"]).encode(_png(picture))
    assert model.score(picture, modality="image") == model.score(encoded, modality="image")
    wave = np.linspace(-0.5, 0.5, 800, dtype=np.float32)
    assert model.score((wave, 8000), modality="audio") == model.score(wave, modality="audio")
    assert model.score(b"abc" * 400, stride=386) != model.score(b"abc" * 400)  # overlapping windows: more context


def test_save_round_trip_and_model_card(demo_root, tmp_path):
    model = polybyte.load(demo_root / DEMO_EXPORT, device="cpu")
    out = model.save(tmp_path / "copy")
    again = polybyte.load(out)
    assert again.info == model.info
    assert all(torch.equal(a, b) for a, b in zip(model.net.state_dict().values(), again.net.state_dict().values()))
    card = again.card
    assert card.startswith("---\nlibrary_name: polybyte\n") and "- transformer\n" in card
    for fact in (
        "| backbone | `transformer` |",
        f"| parameters | {model.num_params:,} |",
        "dim 32, n_layers 1, n_heads 2",
        "| window | 772 ids",
        "image (16x16 RGB, patch2 order)",
        "audio (8000 Hz, mulaw8)",
        "| training steps | 0 |",
        "| val bits/byte | not measured |",
        "| licence |",
        f'model = polybyte.load("{out}")',
    ):
        assert fact in card, fact
    # the card's example runs on the export it describes
    example = re.search(r"```python\n(.*?)```", card, re.S)[1]
    exec(compile(example.replace('"sample.png"', repr(str(tmp_path / "s.png"))), "card", "exec"), {})
    assert (tmp_path / "s.png").is_file()


def test_exports_without_a_card_still_load(demo_root):
    folder = demo_root / DEMO_EXPORT
    (folder / "README.md").unlink()
    model = polybyte.load(folder)
    assert model.card is None and model.generate("text", "ab", max_bytes=5, seed=0).startswith("ab")


def test_a_blt_card_counts_its_entropy_model(tmp_path):
    from conftest import tiny_blt

    model = tiny_blt("entropy")
    info = json.loads((save_exported(tmp_path / "b", model, {}) / CONFIG).read_text())
    card = (tmp_path / "b" / "README.md").read_text()
    entropy = sum(p.numel() for p in model.entropy_model.parameters())
    assert f"| parameters | {model.num_params():,} (+{entropy:,} in the frozen entropy model) |" in card
    assert "encoder.dim 32" in card and "latent.dim 48" in card and info["model"]["backbone"] == "blt"


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m: m.generate("text", max_bytes=0), ValueError, "max_bytes must be >= 1, got 0"),
        (lambda m: m.generate("text", num=0), ValueError, "num must be >= 1"),
        (lambda m: m.generate("audio"), ValueError, "pass max_bytes"),
        (
            lambda m: m.generate("image", prompt_fraction=1.5, prompt=Image.new("RGB", (16, 16))),
            ValueError,
            "prompt_fraction",
        ),
        (lambda m: m.generate("video"), ValueError, "not trained on 'video'"),
        (lambda m: m.generate("text", "x", top_q=0.9), TypeError, "top_q"),
        (lambda m: m.score(b""), ValueError, "nothing to score"),
        (lambda m: m.score(3), TypeError, "text data must be str or bytes"),
        (lambda m: m.score(b"abc", stride=10_000), ValueError, "stride"),
    ],
)
def test_bad_requests_are_one_clear_error(demo_root, call, error, message):
    model = polybyte.load(demo_root / DEMO_EXPORT, device="cpu")
    with pytest.raises(error, match=re.escape(message)) as caught:
        call(model)
    assert "--" not in str(caught.value)  # the options are named as keyword arguments


def test_load_refuses_what_is_not_an_export(demo_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not a polybyte export.*it is a run folder: pass its export .*last"):
        polybyte.load(demo_root / "polybyte-demo")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match="not a polybyte export"):
        polybyte.load(tmp_path / "notes")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / WEIGHTS).write_bytes(b"nope")
    (bad / CONFIG).write_text("{}")
    with pytest.raises(ValueError, match="not a valid polybyte export config"):
        polybyte.load(bad)


def test_version_is_pyprojects_and_the_cli_prints_it(capsys):
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert polybyte.__version__ == pyproject
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"polybyte {pyproject} (torch ")
    assert {"load", "Model", "__version__"} <= set(dir(polybyte))


def test_import_polybyte_is_cheap():
    """`import polybyte` runs before every subpackage import: it must load no torch and no
    pipeline; the API's imports wait for the first `polybyte.load`."""
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "import polybyte\n"
        "dt = time.perf_counter() - t\n"
        "heavy = ('torch', 'numpy', 'lightning')\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith('polybyte.'))\n"
        "print(dt, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    seconds, heavy = out.stdout.split(" ", 1)
    assert heavy.strip() == "[]", heavy
    assert float(seconds) < 0.25  # torch alone takes seconds


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.gpu
def test_cuda_sampling_runs_a_bf16_copy_and_keeps_fp32_for_score_and_save(demo_root):
    model = polybyte.load(demo_root / DEMO_EXPORT)
    assert model.device.type == "cuda"
    before = model.score(b"hello world")
    assert model.generate("text", "The ", max_bytes=32, seed=0).startswith("The ")
    sampler, dtype = model._sampler()
    assert dtype == "bf16" and sampler is not model.net and next(sampler.parameters()).dtype == torch.bfloat16
    assert model._sampler()[0] is sampler  # prepared (and compiled) once
    assert all(p.dtype == torch.float32 for p in model.net.parameters())
    assert model.score(b"hello world") == before
    on_cpu = polybyte.load(demo_root / DEMO_EXPORT, device="cpu").score(b"hello world")
    assert before == pytest.approx(on_cpu, rel=1e-3)
