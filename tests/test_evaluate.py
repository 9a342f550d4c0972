"""`polybyte eval`: exact BPB over the payload bytes of every val sample, reports, codecs.

The model is the debug MEGABYTE with a wide initialisation (init_std 0.3), so its predictions
are sharp and far from uniform: an off-by-one between targets and scores would change the BPB.
The reference numbers are computed here by hand from the shard files, independently of
`pipelines/data.py`.
"""

from __future__ import annotations

import gzip
import json
import math
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from polybyte.modalities import EOS, NUM_BYTES, PAD, TAGS, TEXT, get_modality
from polybyte.modalities.audio import ENCODINGS
from polybyte.models import build_model
from polybyte.models.blt import blt_preset
from polybyte.pipelines import cli
from polybyte.pipelines.evaluate import evaluate
from polybyte.pipelines.export import load_exported, save_exported
from polybyte.pipelines.sources import resolve_sources

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 780  # debug.yaml: a 16x16 image + EOS, rounded up to a multiple of 12
MAX_SAMPLES = 2  # val samples scored per source (text docs are up to 8 KiB, audio clips ~11 KiB)


@pytest.fixture(scope="module")
def data(demo_shards) -> list[str]:
    return [f"{m}={d}" for m, d in demo_shards.items()]


@pytest.fixture(scope="module")
def settings(data) -> dict[str, dict]:
    return {s.modality: s.adapter().settings_dict() for s in resolve_sources(data)}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, settings) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "debug.yaml").read_text())["model"]["model"]
    torch.manual_seed(0)
    model = build_model(dict(cfg, init_std=0.3))
    return save_exported(tmp_path_factory.mktemp("ckpt") / "last", model, settings, {"step": 7, "seq_len": SEQ_LEN})


@pytest.fixture(scope="module")
def report(ckpt, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    result = evaluate(ckpt, data, out, codecs=True, max_samples=MAX_SAMPLES)
    return out, result


def val_payloads_by_hand(folder: Path, settings: dict, n: int) -> list[bytes]:
    """The first ``n`` val payloads: members grouped by key in tar order, decoded by the adapter."""
    adapter = get_modality(settings["name"], **{k: v for k, v in settings.items() if k != "name"})
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("val-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    payloads = []
    for members in list(samples.values())[:n]:
        ext = next(e for e in members if "." + e in adapter.extensions)
        meta = json.loads(members["json"]) if "json" in members else {}
        payloads.append(adapter.encode(members[ext], {**meta, "extension": "." + ext}))
    return payloads


def bits_by_hand(model, payload: bytes, tag: int, seq_len: int, stride: int) -> tuple[float, int]:
    """Sum of -log2 p over the payload targets of one sample and their count.

    The sample is ``[TEXT] + payload + [EOS]`` (text) or ``payload + [EOS]``; window k holds
    ids ``[k*stride, k*stride + seq_len)`` padded with PAD and scores only ids not scored yet.
    """
    stream = ([TEXT] if tag == TEXT else []) + list(payload) + [EOS]
    bits, count, done, begin = 0.0, 0, 0, 0
    while done < len(stream):
        chunk = stream[begin : begin + seq_len]
        ids = torch.tensor([chunk + [PAD] * (seq_len - len(chunk))])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids, torch.tensor([tag])).double(), -1)[0]
        for t in range(done - begin, len(chunk)):
            if chunk[t] < NUM_BYTES:
                bits -= float(logp[t, chunk[t]]) / math.log(2)
                count += 1
        done, begin = begin + len(chunk), begin + stride
    return bits, count


def test_report_json_numbers_match_manual_computation(report, ckpt, demo_shards, settings):
    _, result = report
    model, info = load_exported(ckpt)
    assert result["seq_len"] == SEQ_LEN == info["seq_len"] and result["stride"] == SEQ_LEN
    assert result["step"] == 7 == info["step"]  # the report says which weights it scored
    assert "(step 7)" in (report[0] / "report.md").read_text()
    assert set(result["modalities"]) == {"text", "image", "audio"}
    for modality, entry in result["modalities"].items():
        payloads = val_payloads_by_hand(demo_shards[modality], settings[modality], MAX_SAMPLES)
        sums = [bits_by_hand(model, p, TAGS[modality], SEQ_LEN, SEQ_LEN) for p in payloads]
        bits, count = sum(b for b, _ in sums), sum(c for _, c in sums)
        assert count == sum(len(p) for p in payloads)  # tags and EOS are not counted
        assert entry["samples"] == MAX_SAMPLES and entry["payload_bytes"] == count
        assert entry["bpb"] == pytest.approx(bits / count, rel=1e-6)
        assert 9 < entry["bpb"] < 20  # sharp random predictions: far from a uniform 8 bits
    image, audio = result["modalities"]["image"], result["modalities"]["audio"]
    assert image["bits_per_dim"] == image["bpb"]
    per_sample = ENCODINGS[settings["audio"]["encoding"]]  # bytes per audio sample
    assert audio["bits_per_sample"] == pytest.approx(per_sample * audio["bpb"])
    assert "bits_per_sample" not in image and "bits_per_dim" not in result["modalities"]["text"]


def test_report_codecs_on_the_same_samples(report, demo_shards, settings):
    _, result = report
    codecs = {m: e["codecs"] for m, e in result["modalities"].items()}
    assert {"gzip -9", "bzip2 -9", "xz -9e"} <= set(codecs["text"])
    assert {"PNG", "WebP lossless", "JPEG XL lossless"} <= set(codecs["image"])
    assert set(codecs["audio"]) == {"FLAC"}
    for m in ("text", "image", "audio"):
        for name, r in codecs[m].items():
            assert ("bpb" in r and 0 < r["bpb"] < 16) or r["skipped"], (m, name, r)
    assert "bpb" in codecs["image"]["PNG"] and "bpb" in codecs["audio"]["FLAC"]
    payloads = val_payloads_by_hand(demo_shards["text"], settings["text"], MAX_SAMPLES)
    gz = sum(len(gzip.compress(p, compresslevel=9, mtime=0)) for p in payloads)
    assert codecs["text"]["gzip -9"]["bpb"] == pytest.approx(8 * gz / sum(map(len, payloads)))


def test_report_markdown_and_plot(report):
    out, result = report
    md = (out / "report.md").read_text()
    sections = md.split("\n## ")[1:]
    assert [s.split(" ", 1)[0] for s in sections] == ["text", "image", "audio"]
    for section in sections:
        name = section.split(" ", 1)[0]
        entry = result["modalities"][name]
        rows = [ln for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith("| method")]
        assert rows[0].startswith(f"| **megabyte** | {entry['bpb']:.4f}")
        assert [r.split(" | ")[0].removeprefix("| ") for r in rows[1:]] == list(entry["codecs"])
        assert f"{entry['payload_bytes']} payload bytes" in section
    with Image.open(out / "bpb.png") as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 100
    assert not (out / "patches.png").exists()  # BLT only
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(result))


def test_stride_scores_every_byte_once(ckpt, data, demo_shards, settings, tmp_path):
    stride = SEQ_LEN // 4
    result = evaluate(ckpt, data[:1], tmp_path, stride=stride, max_samples=MAX_SAMPLES)
    entry = result["modalities"]["text"]
    model, _ = load_exported(ckpt)
    payloads = val_payloads_by_hand(demo_shards["text"], settings["text"], MAX_SAMPLES)
    sums = [bits_by_hand(model, p, TEXT, SEQ_LEN, stride) for p in payloads]
    assert entry["payload_bytes"] == sum(c for _, c in sums) == sum(map(len, payloads))
    assert entry["windows"] > sum(-(-(len(p) + 2) // SEQ_LEN) for p in payloads)  # overlapping
    assert entry["bpb"] == pytest.approx(sum(b for b, _ in sums) / entry["payload_bytes"], rel=1e-6)
    assert math.isfinite(entry["bpb"]) and result["stride"] == stride


def test_blt_report_has_patch_plot(data, settings, tmp_path):
    torch.manual_seed(0)
    model = build_model(blt_preset("tiny"))
    seq_len = model.config.max_seq_len
    ckpt = save_exported(tmp_path / "blt", model, {"text": settings["text"]}, {"seq_len": seq_len})
    result = evaluate(ckpt, data[:1], tmp_path / "out", max_samples=1)
    assert result["backbone"] == "blt"
    with Image.open(tmp_path / "out" / "patches.png") as im:
        assert im.format == "PNG"
    loaded, _ = load_exported(ckpt)
    payload = val_payloads_by_hand(Path(data[0].split("=", 1)[1]), settings["text"], 1)[0]
    bits, count = bits_by_hand(loaded, payload, TEXT, seq_len, seq_len)
    assert result["modalities"]["text"]["bpb"] == pytest.approx(bits / count, rel=1e-6)


def run_eval(args: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(["eval", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_eval(ckpt, data, tmp_path, capsys):
    args = ["--ckpt", str(ckpt), "--data", data[1], "--out", str(tmp_path), "--max-samples", "1"]
    rc, out, _ = run_eval(args, capsys)
    assert rc == 0 and "eval: image:" in out
    assert (tmp_path / "report.md").is_file() and (tmp_path / "bpb.png").is_file()
    assert json.loads((tmp_path / "report.json").read_text())["modalities"]["image"]["samples"] == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--stride", "0"], "--stride must be in 1..seq_len=780"),
        (["--stride", "4000"], "--stride must be in 1..seq_len=780"),
    ],
)
def test_cli_eval_bad_stride(extra, message, ckpt, data, tmp_path, capsys):
    rc, _, err = run_eval(["--ckpt", str(ckpt), "--data", data[0], "--out", str(tmp_path), *extra], capsys)
    assert rc == 2 and err.strip() == f"polybyte eval: error: {message}, got {extra[1]}"


def test_cli_eval_missing_checkpoint(data, tmp_path, capsys):
    rc, _, err = run_eval(["--ckpt", str(tmp_path / "nope"), "--data", data[0], "--out", str(tmp_path)], capsys)
    assert rc == 2 and err.startswith("polybyte eval: error:") and "no model.safetensors" in err


def test_cli_eval_refuses_differently_encoded_data(settings, data, tmp_path, capsys):
    model = build_model(yaml.safe_load((REPO / "configs" / "debug.yaml").read_text())["model"]["model"])
    raster = {"image": dict(settings["image"], order="raster")}  # the shards are in patch2 order
    ckpt = save_exported(tmp_path / "ck", model, raster, {"seq_len": SEQ_LEN})
    rc, _, err = run_eval(["--ckpt", str(ckpt), "--data", data[1], "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "encoded differently" in err and "order" in err
