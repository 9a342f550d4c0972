"""The train/val split of `polybyte shard` (shards.py) and the writers of each split's shards.

Each sample belongs to a group (a document, an image, a recording whose clips stay together).
The split is a 64-bit hash of the group salted with the seed: val gets the groups whose hash
falls under ``val_fraction``, topped up with the groups of next-lowest hash until val holds
``min_val`` groups (never more than half of all groups), so a small corpus still gets a val
split that means something. Same inputs, same split, byte-identical shards.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

SPLITS = ("train", "val")
FIXED_MTIME = 946684800  # 2000-01-01 UTC in every tar header: output must not depend on run time
DEFAULT_MAX_DOC_BYTES = 64 * 2**10  # the largest automatic document size, and the one without a val split
MIN_AUTO_DOC_BYTES = 4 * 2**10  # the smallest automatic document size
DEFAULT_MIN_VAL = 10  # val samples (groups) topped up to at least this many


@dataclass
class Sample:
    key: str  # webdataset key, unique, no dots
    group: str  # the split is decided by a hash of this
    ext: str  # payload member extension without the dot: txt / png / flac
    data: bytes  # member bytes
    meta: dict  # written as the .json member
    payload_bytes: int  # length of the payload the adapter yields for this member


@dataclass
class SplitWriter:
    """A ShardWriter opened on the first sample, so a split without samples leaves no file."""

    out_dir: Path
    split: str
    maxcount: int
    maxsize: int
    samples: int = 0
    payload_bytes: int = 0
    shards: list[str] = field(default_factory=list)
    shard_samples: list[int] = field(default_factory=list)  # samples in each of `shards`
    _writer: wds.ShardWriter | None = None

    def _closed(self, fname: str) -> None:
        self.shards.append(Path(fname).name)
        self.shard_samples.append(self.samples - sum(self.shard_samples))

    def write(self, sample: Sample) -> None:
        if self._writer is None:
            self._writer = wds.ShardWriter(
                str(self.out_dir / f"{self.split}-%06d.tar"),
                maxcount=self.maxcount,
                maxsize=self.maxsize,
                post=self._closed,
                verbose=0,
                encoder=False,  # members are bytes already; never pickle
                user="polybyte",
                group="polybyte",
                mtime=FIXED_MTIME,
            )
        meta = json.dumps(sample.meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
        self._writer.write({"__key__": sample.key, sample.ext: sample.data, "json": meta})
        self.samples += 1
        self.payload_bytes += sample.payload_bytes

    def close(self) -> dict:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return {
            "samples": self.samples,
            "payload_bytes": self.payload_bytes,
            "shards": self.shards,
            "shard_samples": self.shard_samples,
        }


# --- the split ---------------------------------------------------------------------------------
def _hash(group: str, seed: int) -> int:
    """A 64-bit hash of the group, salted with the seed: the split's only input."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{group}".encode(), digest_size=8).digest(), "big")


class Splitter:
    """Sends each sample to its split's writer: val when its group's hash is under
    ``val_fraction``; the ``min_val`` other groups of lowest hash are held back, and at the end as
    many as val needs to hold ``min_val`` groups (at most half of all groups) go to val, the rest
    to train. Producers emit a group's samples together (the clips of one recording)."""

    def __init__(self, writers: dict, val_fraction: float, min_val: int, seed: int) -> None:
        self.writers, self.seed = writers, seed
        self.cut = val_fraction * 2**64
        self.capacity = min_val if 0 < val_fraction < 1 else 0
        self.held: dict[str, tuple[int, list[Sample]]] = {}  # group -> (hash, samples)
        self.heap: list[tuple[int, str]] = []  # (-hash, group): the held group of highest hash on top
        self.groups, self.val_groups, self.topped_up = 0, 0, 0
        self._last: str | None = None

    def add(self, sample: Sample) -> None:
        group = sample.group
        h = _hash(group, self.seed)
        if group != self._last:
            self.groups += 1
            self.val_groups += h < self.cut
            self._last = group
        if h < self.cut:
            self.writers["val"].write(sample)
        elif group in self.held:
            self.held[group][1].append(sample)
        elif len(self.heap) < self.capacity:
            heapq.heappush(self.heap, (-h, group))
            self.held[group] = (h, [sample])
        elif self.heap and h < -self.heap[0][0]:
            _, evicted = heapq.heapreplace(self.heap, (-h, group))
            self._flush(evicted, "train")
            self.held[group] = (h, [sample])
        else:
            self.writers["train"].write(sample)

    def _flush(self, group: str, split: str) -> None:
        for sample in self.held.pop(group)[1]:
            self.writers[split].write(sample)

    def close(self) -> None:
        """Top val up from the held groups (lowest hash first); the others go to train."""
        need = max(0, min(self.capacity, self.groups // 2) - self.val_groups)
        by_hash = sorted(self.held, key=lambda g: self.held[g][0])
        for i, group in enumerate(by_hash):
            self._flush(group, "val" if i < need else "train")
        self.topped_up = min(need, len(by_hash))
        self.heap = []


def auto_doc_bytes(total_bytes: int, val_fraction: float, min_val: int) -> int:
    """The document size that makes ``val_fraction`` of ``total_bytes`` of text about ``min_val``
    documents, within 4..64 KiB (64 KiB without a val split to fill)."""
    if not 0 < val_fraction < 1 or min_val < 1:
        return DEFAULT_MAX_DOC_BYTES
    return int(min(DEFAULT_MAX_DOC_BYTES, max(MIN_AUTO_DOC_BYTES, total_bytes * val_fraction / min_val)))
