"""The streaming loader (pipelines/data.py) on shards built from ../shared/data and on
hand-written "foreign" webdatasets."""

from __future__ import annotations

import collections
import io
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import webdataset as wds
from PIL import Image
from shard_reading import iter_samples, shard_paths

from polybyte.modalities import AUDIO, EOS, IMAGE, NUM_BYTES, PAD, TEXT, get_modality
from polybyte.pipelines.data import ByteDataModule
from polybyte.pipelines.reading import TooManyBadSamples
from polybyte.pipelines.shards import write_shards

SEQ_LEN = 12296  # a 64x64 image (12,288 bytes) + EOS, rounded up to a multiple of 8


@pytest.fixture(scope="module")
def shards(shared_data, tmp_path_factory) -> dict[str, Path]:
    """Small text/image/audio shard folders: several train and val shards each, except a single
    text val shard (so one worker reads all val text, in order)."""
    out = tmp_path_factory.mktemp("shards")
    write_shards(
        "text",
        [shared_data / "text" / "tinyshakespeare.txt"],
        out / "text",
        max_doc_bytes=4096,
        val_fraction=0.1,
        maxcount=60,
    )
    write_shards(
        "image", [shared_data / "image" / "imagenet64_sample.npz"], out / "image", val_fraction=0.1, maxcount=20
    )
    wavs = sorted((shared_data / "audio" / "fsdd").glob("*.wav"))[::40]  # 50 recordings
    write_shards("audio", wavs, out / "audio", settings={"sample_rate": 8000}, val_fraction=0.2, maxcount=4)
    return {m: out / m for m in ("text", "image", "audio")}


def _dm(sources, **kw) -> ByteDataModule:
    kw = {"seq_len": SEQ_LEN, "batch_size": 8, "num_workers": 2, "shuffle_buffer": 20, **kw}
    dm = ByteDataModule(sources={k: str(v) for k, v in sources.items()}, **kw)
    dm.setup("fit")
    return dm


def _take(loader, n):
    it = iter(loader)
    try:
        return [next(it) for _ in range(n)]
    except Exception as e:
        # Drop the DataLoader frames (they hold the iterator) so its workers shut down now;
        # left to a later garbage collection, shutdown waits out a 5 s timeout per worker.
        raise e.with_traceback(None)  # noqa: B904
    finally:
        del it


def _val_payloads(folder: Path, modality: str, settings=None) -> list[bytes]:
    adapter = get_modality(modality, **(settings or {}))
    return [payload for _, payload, _ in iter_samples(shard_paths(folder, "val"), adapter)]


def _clip_payload(row: torch.Tensor) -> bytes:
    """payload of an uncut image/audio window: everything before its EOS."""
    ids = row.tolist()
    end = ids.index(EOS)
    assert all(i == PAD for i in ids[end + 1 :])
    return bytes(ids[:end])


def _text_docs(rows) -> list[bytes]:
    """Split concatenated packed text rows back into documents."""
    ids = [i for row in rows for i in row.tolist() if i != PAD]
    docs, doc = [], None
    for i in ids:
        if i == TEXT:
            assert doc is None
            doc = []
        elif i == EOS:
            docs.append(bytes(doc))
            doc = None
        else:
            doc.append(i)
    assert doc is None
    return docs


def _rows(batches, tag):
    return [ids[b] for ids, mod in batches for b in range(len(mod)) if mod[b] == tag]


def test_train_batches_follow_the_contract_and_weights(shards):
    dm = _dm(shards, weights={"text": 2, "image": 1, "audio": 1})
    batches = _take(dm.train_dataloader(), 40)
    counts = collections.Counter()
    for ids, modality in batches:
        assert ids.shape == (8, SEQ_LEN) and ids.dtype == torch.long
        assert modality.shape == (8,) and modality.dtype == torch.long
        assert int(ids.min()) >= 0 and int(ids.max()) <= PAD + 4
        counts.update(modality.tolist())
    total = sum(counts.values())
    assert set(counts) == {TEXT, IMAGE, AUDIO}
    assert counts[TEXT] / total == pytest.approx(0.5, abs=0.1)
    assert counts[IMAGE] / total == pytest.approx(0.25, abs=0.1)
    for row in _rows(batches, IMAGE):  # payload at position 0, then EOS, then PAD
        assert row[12288] == EOS and bool((row[:12288] < NUM_BYTES).all()) and bool((row[12289:] == PAD).all())
    audio = _rows(batches, AUDIO)
    for row in audio:  # a long clip's inner windows are all payload; a last one ends with EOS
        if EOS in row.tolist():
            assert len(_clip_payload(row)) % 2 == 0  # whole pcm16 samples
        else:
            assert bool((row < NUM_BYTES).all())
    assert any(EOS in r.tolist() for r in audio)
    text = _rows(batches, TEXT)
    assert all(bool((r != PAD).all()) for r in text)  # training text is packed densely
    assert any(TEXT in r.tolist() for r in text)
    assert dm.skipped == 0 and dm.seen > 0


def test_training_stream_is_reproducible_and_a_resumed_run_moves_on(shards):
    first = _take(_dm(shards).train_dataloader(), 2)
    again = _take(_dm(shards).train_dataloader(), 2)
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(first, again))
    resumed = _dm(shards)
    resumed.load_state_dict(_dm(shards).state_dict())  # as Lightning does from a checkpoint
    assert not torch.equal(_take(resumed.train_dataloader(), 1)[0][0], first[0][0])


def test_validation_reads_every_sample_once_and_repeats_exactly(shards):
    dm = _dm(shards, val_batch_size=5)
    first = list(dm.val_dataloader())
    second = list(dm.val_dataloader())
    assert len(first) == len(second)
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(first, second))

    images = [_clip_payload(r) for r in _rows(first, IMAGE)]
    assert sorted(images) == sorted(_val_payloads(shards["image"], "image"))
    audio = [_clip_payload(r) for r in _rows(first, AUDIO)]
    assert sorted(audio) == sorted(_val_payloads(shards["audio"], "audio", {"sample_rate": 8000}))
    # one text val shard -> one worker reads it in order; each document is windowed alone
    texts, docs = _rows(first, TEXT), _val_payloads(shards["text"], "text")
    assert _text_docs(texts) == docs
    assert len(texts) == sum(math.ceil((len(d) + 2) / SEQ_LEN) for d in docs)


def test_two_ranks_each_get_data_and_split_validation_exactly(shards, monkeypatch, tmp_path):
    # a text source with a single train shard: fewer shards than ranks
    one = tmp_path / "one"
    for i in range(30):
        (tmp_path / f"doc{i:02d}.txt").write_bytes(f"document {i} ".encode() * 50)
    write_shards("text", sorted(tmp_path.glob("doc*.txt")), one, val_fraction=0.0)
    assert len(list(one.glob("train-*.tar"))) == 1
    sources = {"text": shards["text"], "image": shards["image"]}  # val: 1 text shard, 3 image shards
    per_rank_train, per_rank_val = [], []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank_train.append(_take(_dm({"text": one}, seq_len=256, num_workers=0).train_dataloader(), 3))
        per_rank_val.append(list(_dm(sources, num_workers=2).val_dataloader()))
    assert all(len(b) == 3 for b in per_rank_train)  # no rank is starved by the single shard
    assert not torch.equal(per_rank_train[0][0][0], per_rank_train[1][0][0])  # distinct streams

    images = [[_clip_payload(r) for r in _rows(v, IMAGE)] for v in per_rank_val]
    texts = [_text_docs(_rows(v, TEXT)) for v in per_rank_val]
    assert all(images) and all(texts)  # both ranks validate on both modalities
    assert sorted(images[0] + images[1]) == sorted(_val_payloads(shards["image"], "image"))
    assert sorted(texts[0] + texts[1]) == sorted(_val_payloads(shards["text"], "text"))


def _png(rng, size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _bad_image_shard(path: Path, good: int, bad: int) -> None:
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(path)) as tar:
        for i in range(good):
            tar.write({"__key__": f"good{i:03d}", "png": _png(rng)})
        for i in range(bad):  # bad ones last: the fraction check sees the good ones first
            tar.write({"__key__": f"bad{i:03d}", "png": b"\x89PNG\r\n\x1a\n truncated"})


def test_corrupt_member_is_skipped_and_counted_across_workers(tmp_path):
    _bad_image_shard(tmp_path / "part-0.tar", good=30, bad=1)
    (tmp_path / "v").mkdir()  # the same shard for validation: a shard named as val is never trained on
    shutil.copy(tmp_path / "part-0.tar", tmp_path / "v" / "part-0.tar")
    dm = _dm({"image": tmp_path}, val_sources={"image": str(tmp_path / "v" / "*.tar")}, min_seen_for_skip_check=10)
    rows = _rows(list(dm.val_dataloader()), IMAGE)
    assert len(rows) == 30 and dm.skipped == 1 and dm.seen == 31
    _take(dm.train_dataloader(), 10)  # 80 images: the bad member is met again, in a worker
    assert dm.skipped > 1 and dm.skipped / dm.seen < 0.05


def test_too_many_bad_members_raise_one_clear_error(tmp_path):
    _bad_image_shard(tmp_path / "part-0.tar", good=10, bad=10)
    dm = _dm({"image": tmp_path}, min_seen_for_skip_check=15)
    with pytest.raises(TooManyBadSamples, match=r"could not be read .* max_skip_fraction 5.0%.*bad000"):
        _take(dm.train_dataloader(), 10)


def test_foreign_webdataset_without_manifest_loads(tmp_path):
    """.jpg + .txt captions and .wav clips written by another tool, no manifest, any shard names."""
    rng = np.random.default_rng(1)
    pictures, wav_files = tmp_path / "pictures", tmp_path / "sounds"
    pictures.mkdir(), wav_files.mkdir()
    jpgs = []
    with wds.TarWriter(str(pictures / "laion-0000.tar")) as tar:
        for i in range(6):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(buf, format="JPEG")
            jpgs.append(buf.getvalue())
            tar.write({"__key__": f"{i:04d}", "jpg": jpgs[-1], "txt": f"caption {i}".encode(), "cls": b"3"})
    with wds.TarWriter(str(wav_files / "clips.tar")) as tar:
        for i in range(4):
            buf = io.BytesIO()
            sf.write(buf, rng.integers(-3000, 3000, 4000, dtype=np.int16), 16000, format="WAV", subtype="PCM_16")
            tar.write({"__key__": f"clip{i}", "wav": buf.getvalue()})
    sources = {"image": pictures, "text": pictures, "audio": wav_files}
    for folder in (pictures, wav_files):  # the same shards for validation (never trained on: copies)
        shutil.copytree(folder, tmp_path / "val" / folder.name)
    val_sources = {n: str(tmp_path / "val" / p.name / "*.tar") for n, p in sources.items()}
    # training leaves out the 10-byte captions: packing 16 KiB windows from them is slow
    weights = {"image": 1.0, "text": 0.0, "audio": 1.0}
    # 80x48 photos give no image size of their own: it is given, and they are cropped and resized to it
    settings = {"image": {"size": 64}}
    dm = _dm(
        sources,
        val_sources=val_sources,
        weights=weights,
        adapter_settings=settings,
        seq_len=16384,
        num_workers=0,
        shuffle_buffer=4,
    )

    val = list(dm.val_dataloader())
    image = get_modality("image", size=64)  # raster
    assert [_clip_payload(r) for r in _rows(val, IMAGE)] == [image.encode(j) for j in jpgs]
    assert _text_docs(_rows(val, TEXT)) == [f"caption {i}".encode() for i in range(6)]
    assert [len(_clip_payload(r)) for r in _rows(val, AUDIO)] == [8000] * 4  # 4000 pcm16 samples
    batch_ids, batch_modality = _take(dm.train_dataloader(), 1)[0]
    assert batch_ids.shape == (8, 16384) and set(batch_modality.tolist()) == {IMAGE, AUDIO}
    assert dm.skipped == 0


def test_audio_augmentation_applies_to_training_windows_only(shards):
    """invert=1 flips every training clip's polarity, sample for sample (the same windows in the
    same order as without it); validation is untouched."""
    audio = {"audio": shards["audio"]}
    plain = _take(_dm(audio, num_workers=0).train_dataloader(), 3)
    flipped_dm = _dm(audio, num_workers=0, augment={"audio": {"invert": 1.0}})
    flipped = _take(flipped_dm.train_dataloader(), 3)
    rows = [(a, b) for (x, _), (y, _) in zip(plain, flipped) for a, b in zip(x, y)]
    whole = [(a, b) for a, b in rows if EOS in a.tolist()]
    assert whole and len(whole) == sum(EOS in b.tolist() for _, b in rows)
    for a, b in whole:
        x = np.frombuffer(_clip_payload(a), "<i2").astype(np.int32)
        y = np.frombuffer(_clip_payload(b), "<i2").astype(np.int32)
        assert np.array_equal(y, np.clip(-x, -32768, 32767)) and bool((x != 0).any())
    val = [ids for ids, _ in _take(_dm(audio, num_workers=0).val_dataloader(), 2)]
    val_aug = [ids for ids, _ in _take(flipped_dm.val_dataloader(), 2)]
    assert all(torch.equal(a, b) for a, b in zip(val, val_aug))


def test_augment_errors_are_clear(shards):
    with pytest.raises(ValueError, match=r"--data.augment names sources \['speech'\], but the sources are \['audio'\]"):
        _dm({"audio": shards["audio"]}, augment={"speech": {"invert": 0.5}})
    with pytest.raises(
        ValueError,
        match=r"source 'audio': unknown audio augmentation \['pitch'\]; known: \['gain_db', 'invert', 'speed'\]",
    ):
        _dm({"audio": shards["audio"]}, augment={"audio": {"pitch": 2}})
    with pytest.raises(
        ValueError, match=r"source 'text': text has no training augmentations \(got \{'invert': 0.5\}\)"
    ):
        _dm({"text": shards["text"]}, augment={"text": {"invert": 0.5}})
    for bad in (2, "x", None, True):
        with pytest.raises(ValueError, match=r"augment invert must be a number in \[0, 1\] \(a probability\)"):
            _dm({"audio": shards["audio"]}, augment={"audio": {"invert": bad}})
    with pytest.raises(ValueError, match=r"options must be a mapping"):
        _dm({"audio": shards["audio"]}, augment={"audio": 0.5})


def test_random_augmentation_is_reproducible_across_workers(shards):
    """invert 0.5 + gain: the same seed gives the same batches with two workers; the windows
    differ from the plain stream's but keep its layout (same clips, same lengths)."""
    audio, aug = {"audio": shards["audio"]}, {"audio": {"invert": 0.5, "gain_db": 6}}
    plain = _take(_dm(audio).train_dataloader(), 3)
    first = _take(_dm(audio, augment=aug).train_dataloader(), 3)
    again = _take(_dm(audio, augment=aug).train_dataloader(), 3)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, again))
    assert not any(torch.equal(a, b) for (a, _), (b, _) in zip(plain, first))
    assert all(
        torch.equal(a == PAD, b == PAD) and torch.equal(a == EOS, b == EOS) for (a, _), (b, _) in zip(plain, first)
    )


def test_setup_errors_are_clear(shards, tmp_path):
    with pytest.raises(ValueError, match="raise seq_len to at least 12289"):
        _dm({"image": shards["image"]}, seq_len=4096)
    with pytest.raises(ValueError, match="even seq_len"):
        _dm({"audio": shards["audio"]}, seq_len=4097)
    with pytest.raises(ValueError, match="manifest says modality 'text'"):
        _dm({"audio": shards["text"]})
    _bad_image_shard(tmp_path / "x.tar", good=1, bad=0)
    with pytest.raises(ValueError, match=r"name it after its modality: text=.*image="):
        _dm({"pics": tmp_path})
    with pytest.raises(ValueError, match="weights for unknown sources"):
        _dm({"text": shards["text"]}, weights={"txt": 1.0})


def test_bench_data_reports_throughput_on_synthetic_data(capsys):
    from polybyte.pipelines import bench

    assert bench.main(["--what", "data", "--batches", "3", "--workers", "0", "--shuffle-buffer", "4"]) == 0
    out = capsys.readouterr().out
    assert "bytes/s" in out and "samples/s" in out and "skipped 0" in out
    assert bench.main(["--what", "train", "--model", "no/such/config.yaml"]) == 2
    assert "config not found: no/such/config.yaml" in capsys.readouterr().err
