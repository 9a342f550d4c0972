"""Reading shards back in tests: the shard paths a manifest lists and every sample's payload."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import webdataset as wds

from polybyte.modalities import Modality, get_modality
from polybyte.pipelines.sources import read_manifest


def shard_paths(out_dir: str | Path, split: str) -> list[Path]:
    """The shard files of one split (``train``/``val``) as listed in the folder's manifest."""
    names = read_manifest(out_dir)["splits"][split]["shards"]
    return [Path(out_dir) / name for name in names]


def iter_samples(paths: Iterable[str | Path], modality: str | Modality) -> Iterator[tuple[str, bytes, dict]]:
    """Yield ``(key, payload bytes, meta)`` for every sample of the given shard files, in order.

    Members are read as raw bytes (no pickle decoding); the payload member is the first of the
    adapter's extensions present, encoded by ``adapter.encode(member, meta)``.
    """
    adapter = modality if isinstance(modality, Modality) else get_modality(modality)
    pipeline = wds.DataPipeline(wds.SimpleShardList([str(p) for p in paths]), wds.tarfile_to_samples())
    for sample in pipeline:
        key = sample["__key__"]
        meta = json.loads(sample["json"]) if "json" in sample else {}
        ext = next((e for e in adapter.extensions if e[1:] in sample), None)
        if ext is None:
            raise ValueError(f"sample {key!r} in {sample['__url__']} has no {'/'.join(adapter.extensions)} member")
        yield key, adapter.encode(sample[ext[1:]], {**meta, "extension": ext}), meta
