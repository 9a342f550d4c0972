"""Streaming byte windows from webdataset shards (DESIGN.md §2 and §4).

Batches are ``(ids LongTensor[B, seq_len], modality LongTensor[B])``. The modality tag of a
row travels outside the byte grid, so the first payload byte sits at grid position 0:

* image / audio: one sample per window, ``payload + [EOS] + [PAD]*...``. An audio payload of
  ``seq_len`` bytes or more is cut into consecutive windows of ``seq_len`` payload bytes; only
  the clip's last window carries the EOS. An image that does not fit is refused at set-up.
* text: documents are framed ``[TEXT] + payload + [EOS]``. Training concatenates them and
  cuts the stream into ``seq_len`` windows (packing; the stream is endless, so there is no
  final partial window to drop). The row's modality is TEXT; in-stream TEXT/EOS ids are
  targets of the loss but not of BPB.

Training reads every source ``resampled`` (an endless, seeded random shard sequence per rank
and worker), mixes sources by weight and shuffles windows in a buffer. Validation reads the
fixed ``val-*.tar`` shards once, in the same order every time, each sample exactly once, and
windows every sample on its own (`stream_windows`; a text document too, its last window padded
with PAD so no byte is lost). Those are exactly the windows `polybyte eval` scores, so both
report the same BPB, whatever the number of workers or ranks.

Multi-GPU / multi-node: with resampling, every rank (and every DataLoader worker) draws its
own shard sequence from the *full* shard list, seeded by (seed, rank, worker); the
``split_by_node``/``split_by_worker`` stages only thin these endless streams, so no rank can
end up with zero shards, however few shards there are. Validation gives each rank
``val shards[rank::world]`` when there are at least as many shards as ranks, and otherwise
lets every rank read all val shards and keep every ``world``-th sample; workers then take
``shards[worker::num_workers]``. Either way each val sample is read by exactly one worker of
exactly one rank.

Members are decoded from raw bytes by the modality adapters (PNG/JPEG/WAV/FLAC/TXT); nothing
is ever unpickled. A sample that fails to decode, or is above one of its adapter's resource
limits (``max_pixels``, ``max_seconds``, ...: checked before decoding), is skipped and counted
by reason (`SKIP_REASONS`: ``undecodable``, ``over_limit``, ``shard_error`` for a shard that
cannot be read to its end, counted once per break, and ``missing`` for the samples a shard falls
short of its manifest's count); once more than ``max_skip_fraction`` of the samples seen are
lost, one ``TooManyBadSamples`` error, naming the shard with most losses, stops the run.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path

import lightning
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from polybyte.modalities import EOS, NUM_BYTES, PAD, TAG_NAMES, TAGS, TEXT, ResourceLimitError, get_modality
from polybyte.modalities.base import Modality

log = logging.getLogger(__name__)

# Windows are int16 arrays (ids < 264): a quarter of int64's memory in the shuffle buffers.
WINDOW_DTYPE = np.int16
# Order of the per-modality slots of BPBMeter.
MODALITY_TAGS = (TAGS["text"], TAGS["image"], TAGS["audio"])
LN2 = math.log(2.0)
DEMO_SOURCES = "demo"  # `sources` value naming the embedded demo dataset


# --- windows (pure functions) -----------------------------------------------------------------
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


# --- bits per byte ----------------------------------------------------------------------------
def bpb(nll: torch.Tensor, ids: torch.Tensor) -> float:
    """Bits per payload byte: ``nll [B, T]`` (nats per target) summed over targets that are
    bytes 0..255 (tags, EOS, PAD excluded), divided by their count. NaN if there are none."""
    mask = ids < NUM_BYTES
    count = int(mask.sum())
    if count == 0:
        return float("nan")
    return float(torch.where(mask, nll.double(), 0.0).sum()) / LN2 / count


def _per_modality(
    nll: torch.Tensor, ids: torch.Tensor, modality: torch.Tensor, check: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (bits [3], payload counts [3]) per slot of MODALITY_TAGS, float64 on nll's device.
    ``check`` refuses ids that are no tag (one host sync)."""
    slot = modality.to(nll.device) - MODALITY_TAGS[0]  # tag id -> 0..2
    if check and bool(((slot < 0) | (slot >= len(MODALITY_TAGS))).any()):
        raise ValueError(f"modality ids must be tag ids {MODALITY_TAGS}, got {modality.tolist()}")
    mask = ids.to(nll.device) < NUM_BYTES
    row_bits = torch.where(mask, nll.double(), 0.0).sum(1) / LN2  # [B, T] -> [B]
    zeros = torch.zeros(len(MODALITY_TAGS), dtype=torch.float64, device=nll.device)
    bits = zeros.index_add(0, slot, row_bits)
    count = zeros.index_add(0, slot, mask.sum(1).double())
    return bits, count


class BPBMeter:
    """Per-modality BPB accumulator: sums of payload-target bits and of their count per
    modality over batches. Validation and ``polybyte eval`` both use it, so they agree.

    ``update(nll, ids, modality)`` takes ``nll, ids [B, T]`` (nats per target) and
    ``modality [B]`` (tag ids); the sums stay on nll's device, in float64.
    """

    def __init__(self) -> None:
        self.bits = torch.zeros(len(MODALITY_TAGS), dtype=torch.float64)
        self.count = torch.zeros(len(MODALITY_TAGS), dtype=torch.float64)

    def update(self, nll: torch.Tensor, ids: torch.Tensor, modality: torch.Tensor, check: bool = True) -> None:
        """Add a batch. ``check=False`` skips the tag check and its host sync, for batches known
        to carry tag ids (the training loop's, from ByteDataModule)."""
        bits, count = _per_modality(nll.detach(), ids, modality, check)
        self.bits = self.bits.to(bits.device) + bits
        self.count = self.count.to(count.device) + count

    def totals(self, device: torch.device | str | None = None) -> dict[int, torch.Tensor]:
        """``{tag: tensor([bits, count])}`` (float64) for all three tags, seen or not, so ranks
        can ``all_reduce`` every value in the same order."""
        return {
            tag: torch.stack([self.bits[i], self.count[i]]).to(device or self.bits.device)
            for i, tag in enumerate(MODALITY_TAGS)
        }

    def compute(self) -> dict[str, float]:
        """``{modality name: bits per payload byte}`` for the modalities seen."""
        return {
            TAG_NAMES[tag]: float(self.bits[i] / self.count[i])
            for i, tag in enumerate(MODALITY_TAGS)
            if float(self.count[i]) > 0
        }


# --- sources ----------------------------------------------------------------------------------
@dataclass
class Source:
    """One shard source: where its shards are and how to turn members into payloads."""

    name: str  # source name (a key of `weights`), e.g. "text" or "shakespeare"
    modality: str  # adapter name: text, image, audio
    settings: dict  # adapter settings (manifest's, or defaults, plus overrides)
    train: list[str]  # training shard paths
    val: list[str] = field(default_factory=list)  # validation shard paths, in read order
    manifest: bool = False  # written by `polybyte shard`: members carry .json metadata
    # samples per shard as its manifest lists them ({absolute path: count}), so a shard that
    # ends early (truncated on a member boundary) or is gone is counted as "missing" samples
    expected: dict[str, int] = field(default_factory=dict)
    # the manifest's val sample count, when val is its whole val split but it has no per-shard counts
    val_total: int | None = None

    def adapter(self) -> Modality:
        try:
            return get_modality(self.modality, **self.settings)
        except TypeError as e:
            raise ValueError(f"source {self.name!r}: bad {self.modality} settings {self.settings}: {e}") from None


def _parse_specs(spec) -> list[tuple[str | None, str]]:
    """``{"name": loc}``, ``["name=loc", "loc", ...]`` or ``"name=loc"`` -> [(name|None, loc)]."""
    if isinstance(spec, Mapping):
        return [(str(k), str(v)) for k, v in spec.items()]
    if isinstance(spec, str):
        spec = [spec]
    out = []
    for item in spec:
        name, sep, loc = str(item).partition("=")
        if not sep or "/" in name or not name:
            name, loc = None, str(item)
        out.append((name, loc))
    return out


def _expand(pattern: str) -> list[str]:
    """Brace pattern and/or glob -> sorted existing files."""
    files: list[str] = []
    for part in wds.shardlists.expand_urls(pattern):
        files += sorted(glob(part)) if any(c in part for c in "*?[") else [part]
    return files


def _locate(name: str | None, loc: str, split: str) -> tuple[list[str], Path]:
    """Shard location -> (shards of ``split`` ("train"/"val"), folder that may hold manifest.json).

    A folder gives its ``train-*.tar`` / ``val-*.tar``; a folder using neither name gives all
    its ``*.tar`` for training. A brace pattern or glob names the shards of one split.
    """
    path = Path(loc).expanduser()
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob(f"{split}-*.tar"))
        named = shards or any(path.glob("train-*.tar")) or any(path.glob("val-*.tar"))
        if split == "train" and not named:
            shards = sorted(str(p) for p in path.glob("*.tar"))
        return shards, path
    files = _expand(str(path))
    missing = [f for f in files if not Path(f).is_file()]
    if not files or missing:
        raise ValueError(
            f"source {name or loc!r}: {loc!r} is neither a shard folder nor a pattern of existing "
            f"shards (missing: {missing[:3] or 'no match'}); give DIR or DIR/train-{{000000..000009}}.tar"
        )
    return files, Path(files[0]).parent


def _manifest(folder: Path) -> dict | None:
    path = folder / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable manifest {path}: {e}") from None


def resolve_sources(
    sources,
    val_sources=None,
    adapter_settings: Mapping[str, Mapping] | None = None,
) -> list[Source]:
    """Turn source specs into `Source`s (see `ByteDataModule` for the accepted forms).

    The modality comes from the folder's ``manifest.json`` or, for webdatasets without one,
    from the source name (``image=DIR``), with the adapter's default settings. Validation
    shards come from each folder's ``val-*.tar`` unless ``val_sources`` (same syntax, same
    names) is given.
    """
    specs = _parse_specs(sources or [])
    if not specs:
        raise ValueError("no data sources given; pass e.g. sources={'text': 'shards/text'} or ['text=DIR']")
    overrides = {k: dict(v) for k, v in (adapter_settings or {}).items()}
    out: list[Source] = []
    for name, loc in specs:
        train, folder = _locate(name, loc, "train")
        val = _locate(name, loc, "val")[0] if val_sources is None and Path(loc).expanduser().is_dir() else []
        if not train and not val:
            raise ValueError(f"source {name or loc!r}: no .tar shards in folder {loc}")
        manifest = _manifest(folder)
        if manifest is not None:
            modality = manifest.get("modality")
            settings = {k: v for k, v in dict(manifest.get("settings") or {}).items() if k != "name"}
            if name in TAGS and name != modality:
                raise ValueError(f"source {name}={loc}: its manifest says modality {modality!r}")
        elif name in TAGS:
            modality, settings = name, {}
        else:
            raise ValueError(
                f"source {name or loc!r} has no manifest.json, so its modality is unknown; "
                f"name it after its modality: text={loc}, image={loc} or audio={loc}"
            )
        if modality not in TAGS:
            raise ValueError(f"source {name or loc!r}: unknown modality {modality!r}; known: {sorted(TAGS)}")
        if name is None:
            name = modality if all(s.name != modality for s in out) else f"{modality}{len(out)}"
        if any(s.name == name for s in out):
            raise ValueError(f"two sources are named {name!r}; give each a distinct name (name=DIR)")
        settings.update(overrides.pop(name, {}))
        source = Source(name, modality, settings, train, val, manifest is not None)
        if manifest is not None:
            _manifest_counts(source, manifest, folder, own_val=val_sources is None)
        out.append(source)
    if overrides:
        raise ValueError(f"adapter_settings for unknown sources {sorted(overrides)}; sources: {[s.name for s in out]}")
    if val_sources is not None:
        by_name = {s.name: s for s in out}
        for name, loc in _parse_specs(val_sources):
            if name not in by_name:
                raise ValueError(f"val source {name!r} matches no training source {sorted(by_name)}")
            val = _locate(name, loc, "val")[0]
            if not val:
                raise ValueError(f"val source {name!r}: no val-*.tar in {loc}; give a pattern, e.g. {loc}/*.tar")
            by_name[name].val = val
    return out


def _shard_key(url: str) -> str:
    return os.path.abspath(url)


def _manifest_counts(source: Source, manifest: dict, folder: Path, own_val: bool) -> None:
    """Fill ``source.expected`` from the manifest's samples per shard (``shard_samples``; a split
    of one shard without them: the split's count). With ``own_val`` (val shards are the folder's
    own), val shards the manifest lists but the folder lacks are read too, so their samples are
    counted as lost instead of vanishing."""
    splits = manifest.get("splits") or {}
    for split in ("train", "val"):
        info = splits.get(split) or {}
        names = [str(n) for n in info.get("shards") or []]
        counts = info.get("shard_samples")
        if counts is None and len(names) == 1 and isinstance(info.get("samples"), int):
            counts = [info["samples"]]
        if isinstance(counts, list) and len(counts) == len(names):
            source.expected.update({_shard_key(str(folder / n)): int(c) for n, c in zip(names, counts)})
        if split == "val" and own_val and names:
            listed = [str(folder / n) for n in names]
            have = {_shard_key(u) for u in source.val}
            source.val = sorted(source.val + [u for u in listed if _shard_key(u) not in have])
            if counts is None and isinstance(info.get("samples"), int):
                source.val_total = info["samples"]


# --- skip counting ----------------------------------------------------------------------------
class TooManyBadSamples(ValueError):
    """More than ``max_skip_fraction`` of the samples read could not be decoded.

    Raised in a DataLoader worker, it reaches the main process rebuilt from a message holding the
    worker's whole traceback; only the original one-line message is kept.
    """

    def __init__(self, message: str = "") -> None:
        text = str(message)
        if text.startswith("Caught ") and f"{type(self).__name__}: " in text:
            text = text.rsplit(f"{type(self).__name__}: ", 1)[1].strip()
        super().__init__(text)


# Why a sample was lost: its member did not decode; it is above an adapter resource limit; its
# shard could not be read (open, tar or grouping error: the sample being read is lost); the shard
# holds fewer samples than its manifest lists (truncated on a member boundary, or gone).
SKIP_REASONS = ("undecodable", "over_limit", "shard_error", "missing")


class SkipCounter:
    """Samples seen and skipped, by reason (`SKIP_REASONS`), shared by the main process and its
    DataLoader workers.

    ``multiprocessing.Value`` counters, created before the workers start and inherited by
    them, so the main process always reads the current totals (the ``data/skipped`` metric).
    ``over_limit`` counts the skips that were above an adapter's resource limit.
    """

    LOGGED = 10  # skips logged in full per process; later ones are only counted

    def __init__(self, max_fraction: float, min_seen: int) -> None:
        self.max_fraction = max_fraction
        self.min_seen = min_seen
        self._seen = multiprocessing.Value("q", 0)
        self._skipped = multiprocessing.Value("q", 0)
        self._reasons = {reason: multiprocessing.Value("q", 0) for reason in SKIP_REASONS}
        self._logged = 0
        self._first: str | None = None
        self._per_shard: dict[str, int] = {}  # this process's skips per shard, for the error

    @property
    def seen(self) -> int:
        return self._seen.value

    @property
    def skipped(self) -> int:
        return self._skipped.value

    @property
    def over_limit(self) -> int:
        return self._reasons["over_limit"].value

    @property
    def first(self) -> str | None:
        """The first skip this process counted (workers keep their own)."""
        return self._first

    def by_reason(self) -> dict[str, int]:
        """``{reason: skips}`` for every reason of `SKIP_REASONS` (zeros included)."""
        return {reason: value.value for reason, value in self._reasons.items()}

    def ok(self) -> None:
        with self._seen.get_lock():
            self._seen.value += 1

    def skip(
        self, what: str, over_limit: bool = False, *, reason: str | None = None, shard: str | None = None,
        count: int = 1,
    ) -> None:  # fmt: skip
        """Count ``count`` lost samples (reason: ``over_limit`` when set, else ``undecodable``)
        from ``shard``; raise `TooManyBadSamples`, naming the shard, once past the allowed fraction."""
        reason = reason or ("over_limit" if over_limit else "undecodable")
        if reason not in self._reasons:
            raise ValueError(f"unknown skip reason {reason!r}; known: {SKIP_REASONS}")
        with self._reasons[reason].get_lock():
            self._reasons[reason].value += count
        with self._seen.get_lock():
            self._seen.value += count
            seen = self._seen.value
        with self._skipped.get_lock():
            self._skipped.value += count
            skipped = self._skipped.value
        if shard is not None:
            self._per_shard[shard] = self._per_shard.get(shard, 0) + count
        self._first = self._first or what
        if self._logged < self.LOGGED:
            self._logged += 1
            tail = "; further skips are only counted" if self._logged == self.LOGGED else ""
            lost = f"{count} samples" if count > 1 else "a sample"
            log.warning("skipped %s (%s, %d so far): %s%s", lost, reason, skipped, what, tail)
        if seen >= self.min_seen and skipped > self.max_fraction * seen:
            worst = ""
            if self._per_shard:
                url, n = max(self._per_shard.items(), key=lambda kv: kv[1])
                worst = f"; shard {url}: {n} of them"
            raise TooManyBadSamples(
                f"{skipped} of {seen} samples could not be read ({skipped / seen:.1%} > "
                f"max_skip_fraction {self.max_fraction:.1%}){worst}; first failure: {self._first}. "
                "Rebuild or remove the bad shards, or raise max_skip_fraction."
            )


def skip_summary(by_reason: Mapping[str, int]) -> str:
    """``{"missing": 3, "over_limit": 1, ...}`` -> ``"3 missing, 1 over_limit"`` (zeros left out)."""
    return ", ".join(f"{n} {reason}" for reason, n in by_reason.items() if n) or "none"


def _error_text(exn: BaseException) -> str:
    """An exception's own message, without what webdataset appends (`` @ <stream>``, url args)."""
    first = str(exn.args[0]) if exn.args else str(exn)
    return first.split(" @ ", 1)[0]


# --- reading shards ---------------------------------------------------------------------------
@dataclass
class ShardRead:
    """What one pass over one shard gave: samples read from the tar and, of those, decoded,
    skipped (counted, this shard's read errors included) and left to another rank."""

    url: str
    read: int = 0
    ok: int = 0
    skipped: int = 0
    dropped: int = 0


def read_shards(
    urls: Iterable[str], counter: SkipCounter, expected: Mapping[str, int] | None = None,
    expected_total: int | None = None, count_losses: bool = True,
) -> Iterator[dict]:  # fmt: skip
    """webdataset samples of each shard in turn, every lost sample counted once in ``counter``.

    A read error (truncated member, corrupt tar, missing file) counts one ``shard_error``: the
    errors that follow it before the next sample are the same damage, and the partial sample it
    leaves is marked ``__damaged__`` so `decode_payloads` does not count it again. Where
    ``expected`` gives a shard's sample count (its manifest), the samples it falls short by are
    counted as ``missing`` once the shard has been read to its end and its samples decoded;
    ``expected_total`` does the same for all ``urls`` together. Each sample carries its
    `ShardRead` as ``__read__``. ``count_losses=False`` leaves read errors and missing samples
    to another reader of the same shards (only decode failures are then counted here).
    """
    reads: list[ShardRead] = []
    for url in urls:
        tally = ShardRead(url)
        reads.append(tally)
        yield from _read_shard(tally, counter, (expected or {}).get(_shard_key(url)), count_losses)
    if expected_total is not None and count_losses:
        lost = expected_total - sum(t.ok + t.skipped + t.dropped for t in reads)
        if lost > 0:
            where = reads[0].url if len(reads) == 1 else f"{len(reads)} shards ({reads[0].url}, ...)"
            counter.skip(f"{where}: {lost} of the {expected_total} val samples the manifest lists are missing",
                         reason="missing", shard=reads[0].url if reads else None, count=lost)  # fmt: skip


def _read_shard(tally: ShardRead, counter: SkipCounter, expected: int | None, count_losses: bool) -> Iterator[dict]:
    url = tally.url
    in_error = damaged = False

    def handler(exn: Exception) -> bool:
        nonlocal in_error, damaged
        if not in_error and count_losses:
            counter.skip(f"{url}: {type(exn).__name__}: {_error_text(exn)}", reason="shard_error", shard=url)
            tally.skipped += 1
        in_error = damaged = True
        return True

    for sample in wds.tarfile_samples([{"url": url}], handler=handler):
        in_error = False
        tally.read += 1
        sample["__read__"] = tally
        if damaged:
            sample["__damaged__"], damaged = True, False
        yield sample
    # the consumer asked past the last sample: every sample of this shard is decoded and counted
    if expected is not None and count_losses:
        lost = expected - tally.ok - tally.skipped - tally.dropped
        if lost > 0:
            counter.skip(f"{url}: {lost} of the {expected} samples its manifest lists are missing "
                         f"(the shard ends after {tally.read})", reason="missing", shard=url, count=lost)  # fmt: skip


# --- streams ----------------------------------------------------------------------------------
def _member(sample: dict, extensions: tuple[str, ...]) -> tuple[str, bytes]:
    """The member the adapter reads: first of its extensions present (``.seg.png`` counts as
    ``.png``)."""
    members = {k: v for k, v in sample.items() if not k.startswith("__")}
    for ext in extensions:
        if ext[1:] in members:
            return ext, members[ext[1:]]
    for key, value in members.items():
        ext = "." + key.rsplit(".", 1)[-1]
        if ext in extensions:
            return ext, value
    raise ValueError(f"no {'/'.join(extensions)} member (members: {sorted(members) or 'none'})")


def decode_payloads(samples: Iterable[dict], source: Source, counter: SkipCounter) -> Iterator[bytes]:
    """Decode each sample's member into payload bytes through the adapter; count failures."""
    adapter = source.adapter()
    for sample in samples:
        tally = sample.get("__read__")
        try:
            ext, data = _member(sample, adapter.extensions)
            meta = json.loads(sample["json"]) if source.manifest and "json" in sample else {}
            payload = adapter.encode(data, {**meta, "extension": ext})
        except Exception as e:  # noqa: BLE001 — any decoder failure is a counted skip by design
            if sample.get("__damaged__"):
                continue  # cut short by a read error of its shard, which was counted for it
            url = sample.get("__url__")
            what = f"{url} {sample.get('__key__')}: {type(e).__name__}: {e}"
            counter.skip(what, over_limit=isinstance(e, ResourceLimitError), shard=url)
            if tally is not None:
                tally.skipped += 1
            continue
        counter.ok()
        if tally is not None:
            tally.ok += 1
        yield payload


def _train_windows(payloads: Iterable[bytes], modality: str, seq_len: int) -> Iterator[np.ndarray]:
    """Packed text (the stream is endless: no final partial window), one clip per window else."""
    if modality == "text":
        yield from pack_text(payloads, seq_len, pad_last=False)
    else:
        for payload in payloads:
            yield from clip_windows(payload, seq_len)


def _sample_windows(payloads: Iterable[bytes], tag: int, seq_len: int) -> Iterator[np.ndarray]:
    """Each sample alone, text included: the windows `polybyte eval` scores at full stride."""
    for payload in payloads:
        for window, _ in stream_windows(sample_stream(payload, tag), seq_len):
            yield window


def collate(rows: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(window, tag)] -> (ids LongTensor[B, seq_len], modality LongTensor[B])."""
    ids = torch.from_numpy(np.stack([w for w, _ in rows])).long()  # [B, seq_len] int16 -> int64
    modality = torch.tensor([t for _, t in rows], dtype=torch.long)
    return ids, modality


def _batched(rows: Iterable, batch_size: int, partial: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if batch and partial:
        yield collate(batch)


class TrainStream(IterableDataset):
    """Endless training batches: per source resampled shards -> windows -> shuffle; sources
    mixed by weight; batched inside the worker."""

    def __init__(self, sources, weights, seq_len, batch_size, shuffle_buffer, seed, counter) -> None:
        super().__init__()
        self.sources, self.weights = sources, weights
        self.seq_len, self.batch_size, self.shuffle_buffer = seq_len, batch_size, shuffle_buffer
        self.seed, self.counter = seed, counter

    def _source(self, i: int, source: Source, rank: int, worker: int) -> Iterator[tuple[np.ndarray, int]]:
        # seed: ResampledShards mixes in (rank, worker) itself
        shards = wds.ResampledShards(source.train, seed=wds.utils.make_seed(self.seed, i), deterministic=True)
        urls = wds.split_by_worker(wds.split_by_node(iter(shards)))  # thin endless per-rank streams
        samples = read_shards((u["url"] for u in urls), self.counter, source.expected)
        windows = _train_windows(decode_payloads(samples, source, self.counter), source.modality, self.seq_len)
        rng = random.Random(wds.utils.make_seed(self.seed, i, rank, worker))
        tag = TAGS[source.modality]
        for window in wds.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)(windows):
            yield window, tag

    def _mixed(self) -> Iterator[tuple[np.ndarray, int]]:
        # Hand-written instead of wds.RandomMix, which draws from the process-global `random`
        # and so cannot be made reproducible per (seed, rank, worker).
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        streams = [self._source(i, s, rank, worker) for i, s in enumerate(self.sources)]
        rng = random.Random(wds.utils.make_seed(self.seed, rank, worker, 7))
        choices = range(len(streams))
        while True:
            yield next(streams[rng.choices(choices, self.weights)[0]])

    def __iter__(self):
        return _batched(self._mixed(), self.batch_size, partial=False)


def _keep_every(samples: Iterable[dict], every: int, rank: int) -> Iterator[dict]:
    """Every ``every``-th sample from ``rank`` on; the others are marked left to other ranks."""
    for j, sample in enumerate(samples):
        if j % every == rank:
            yield sample
        else:
            sample["__read__"].dropped += 1


class ValStream(IterableDataset):
    """Validation batches: each source's val shards once, in a fixed order, every sample read
    by exactly one (rank, worker) and windowed on its own (`stream_windows`)."""

    def __init__(self, sources, seq_len, batch_size, counter) -> None:
        super().__init__()
        self.sources, self.seq_len, self.batch_size, self.counter = sources, seq_len, batch_size, counter

    def _source(self, source: Source, rank: int, world: int, worker: int, workers: int):
        shards, keep_every = source.val, 1
        if world > 1 and len(shards) >= world:
            shards = shards[rank::world]
        elif world > 1:
            keep_every = world  # fewer shards than ranks: every rank reads all, keeps 1/world
        shards = shards[worker::workers]
        # read errors and missing samples of shards every rank reads are counted by rank 0 alone;
        # the manifest's val total is checked where one process reads all of this source's shards
        alone = world == 1 and workers == 1
        samples = read_shards(shards, self.counter, source.expected, source.val_total if alone else None,
                              count_losses=keep_every == 1 or rank == 0)  # fmt: skip
        if keep_every > 1:
            samples = _keep_every(samples, keep_every, rank)
        tag = TAGS[source.modality]
        return ((w, tag) for w in _sample_windows(decode_payloads(samples, source, self.counter), tag, self.seq_len))

    def _rows(self):
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        for source in self.sources:
            yield from self._source(source, rank, world, worker, workers)

    def __iter__(self):
        return _batched(self._rows(), self.batch_size, partial=True)


# --- the DataModule ---------------------------------------------------------------------------
class ByteDataModule(lightning.LightningDataModule):
    """Byte windows from webdataset shard sources, as ``(ids [B, seq_len], modality [B])``.

    Args:
        sources: shard sources. A mapping ``{name: location}`` or a list of ``"name=location"``
            (or bare ``location`` for folders with a manifest). A location is a folder written
            by ``polybyte shard`` (``train-*.tar``, ``val-*.tar``, ``manifest.json``), any folder
            of ``.tar`` shards, or a brace pattern/glob of shards. Without a manifest the name
            must be the modality (``image=DIR``) and members are read by extension
            (.txt / .png .jpg .jpeg / .wav .flac ...). ``"demo"``: the embedded demo shards
            (text, image, audio), built once into the cache by `polybyte.pipelines.demo`.
        val_sources: validation shards per source name (same syntax); default: each source
            folder's ``val-*.tar``.
        weights: sampling weight per source (mapping by name, or a list in source order);
            default equal. Weights count windows, i.e. grid bytes.
        adapter_settings: adapter settings per source name, overriding the manifest's or the
            defaults, e.g. ``{"image": {"size": 32}}``.
        seq_len: ids per window. Must exceed an image's payload (size*size*3) and be even for
            pcm16 audio.
        batch_size: training windows per batch (per rank).
        val_batch_size: validation windows per batch; default ``batch_size``.
        num_workers: DataLoader worker processes.
        shuffle_buffer: windows held per source and worker for shuffling.
        seed: seeds shard resampling, shuffling and mixing (combined with rank and worker);
            default: the run's ``seed_everything`` seed (``PL_GLOBAL_SEED``), else 0.
        max_skip_fraction: fraction of unreadable samples tolerated before the run stops.
        min_seen_for_skip_check: samples read before ``max_skip_fraction`` is enforced.
    """

    def __init__(
        self,
        sources: dict[str, str] | list[str] | str | None = None,
        val_sources: dict[str, str] | list[str] | None = None,
        weights: dict[str, float] | list[float] | None = None,
        adapter_settings: dict[str, dict] | None = None,
        seq_len: int = 8192,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        seed: int | None = None,
        max_skip_fraction: float = 0.05,
        min_seen_for_skip_check: int = 100,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.source_specs, self.val_specs = sources, val_sources
        self.weight_spec, self.adapter_settings = weights, adapter_settings
        self.seq_len, self.batch_size = seq_len, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.shuffle_buffer, self.seed = num_workers, shuffle_buffer, seed
        self.max_skip_fraction, self.min_seen = max_skip_fraction, min_seen_for_skip_check
        self.sources: list[Source] = []
        self.weights: list[float] = []
        self._counter: SkipCounter | None = None  # training stream
        self._val_counter: SkipCounter | None = None  # validation stream (its own fraction)
        self._restarts = 0  # bumped on resume so a resumed run does not replay the same data

    # set-up ------------------------------------------------------------------------------
    def _specs(self, quiet: bool = True):
        if self.source_specs != DEMO_SOURCES:
            return self.source_specs
        from polybyte.pipelines.demo import ensure_demo_shards  # builds the demo data once

        return {name: str(path) for name, path in ensure_demo_shards(quiet=quiet).items()}

    def prepare_data(self) -> None:
        """Build the demo shards once per node (Lightning calls this on one process only)."""
        self._specs(quiet=False)

    def setup(self, stage: str | None = None) -> None:
        """Resolve sources and check them against ``seq_len`` (clear errors at start-up)."""
        if self.sources:
            return
        if not 0 <= self.max_skip_fraction < 1:
            raise ValueError(f"max_skip_fraction must be in [0, 1), got {self.max_skip_fraction}")
        if self.batch_size < 1 or self.shuffle_buffer < 1 or self.seq_len < 2:
            raise ValueError("batch_size and shuffle_buffer must be >= 1 and seq_len >= 2")
        sources = resolve_sources(self._specs(), self.val_specs, self.adapter_settings)
        for s in sources:
            self._check_fits(s)
        self.weights = self._resolve_weights(sources)
        self.sources = sources
        self._counter = SkipCounter(self.max_skip_fraction, self.min_seen)
        self._val_counter = SkipCounter(self.max_skip_fraction, self.min_seen)

    def _check_fits(self, source: Source) -> None:
        settings = source.adapter().settings
        if source.modality == "image":
            payload = settings.size * settings.size * 3
            if payload > self.seq_len - 1:
                raise ValueError(
                    f"source {source.name!r}: a {settings.size}x{settings.size} image is {payload} bytes "
                    f"plus EOS, which does not fit seq_len={self.seq_len}; raise seq_len to at least "
                    f"{payload + 1} or lower the image size"
                )
        if source.modality == "audio" and getattr(settings, "encoding", None) == "pcm16" and self.seq_len % 2:
            raise ValueError(
                f"source {source.name!r}: pcm16 audio needs an even seq_len so windows start on a "
                f"sample boundary; got {self.seq_len}"
            )

    def _resolve_weights(self, sources: list[Source]) -> list[float]:
        spec = self.weight_spec
        names = [s.name for s in sources]
        if spec is None:
            weights = [1.0] * len(sources)
        elif isinstance(spec, Mapping):
            unknown = set(spec) - set(names)
            if unknown:
                raise ValueError(f"weights for unknown sources {sorted(unknown)}; sources: {names}")
            weights = [float(spec.get(n, 0.0)) for n in names]
        else:
            weights = [float(w) for w in spec]
            if len(weights) != len(sources):
                raise ValueError(f"{len(weights)} weights for {len(sources)} sources {names}")
        if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be finite, >= 0 and not all 0; got {dict(zip(names, weights))}")
        return weights

    # loaders ------------------------------------------------------------------------------
    def _loader(self, dataset: IterableDataset, persistent: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=None,  # batches are built inside the workers
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=persistent and self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        active = [(s, w) for s, w in zip(self.sources, self.weights) if w > 0]
        empty = [s.name for s, _ in active if not s.train]
        if empty:
            raise ValueError(f"sources {empty} have no training shards (train-*.tar); give them weight 0")
        base = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        seed = wds.utils.make_seed(base, self._restarts)
        stream = TrainStream(
            [s for s, _ in active], [w for _, w in active], self.seq_len, self.batch_size,
            self.shuffle_buffer, seed, self._counter,
        )  # fmt: skip
        return self._loader(stream, persistent=False)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        stream = ValStream([s for s in self.sources if s.val], self.seq_len, self.val_batch_size, self._val_counter)
        return self._loader(stream, persistent=True)

    # reporting ----------------------------------------------------------------------------
    def _counters(self, split: str | None) -> list[SkipCounter]:
        if split not in (None, "train", "val"):
            raise ValueError(f"split must be 'train', 'val' or None, got {split!r}")
        picked = [self._counter] if split == "train" else [self._val_counter] if split == "val" else \
            [self._counter, self._val_counter]  # fmt: skip
        return [c for c in picked if c is not None]

    @property
    def skipped(self) -> int:
        """Samples skipped so far (all loaders and workers of this process, training and validation)."""
        return sum(c.skipped for c in self._counters(None))

    @property
    def seen(self) -> int:
        """Samples read so far, skipped ones included."""
        return sum(c.seen for c in self._counters(None))

    @property
    def over_limit(self) -> int:
        """Of the skipped samples, those above an adapter's resource limit (never decoded)."""
        return sum(c.over_limit for c in self._counters(None))

    def skips(self, split: str | None = None) -> dict[str, int]:
        """Skipped samples so far by reason (`SKIP_REASONS`, zeros included) of the ``"train"``
        or ``"val"`` stream (cumulative over validation passes), or both (None)."""
        out = dict.fromkeys(SKIP_REASONS, 0)
        for counter in self._counters(split):
            for reason, n in counter.by_reason().items():
                out[reason] += n
        return out

    def modality_settings(self) -> dict[str, dict]:
        """``{modality name: adapter.settings_dict()}``, saved with checkpoints so sampling and
        eval rebuild the same adapters. With several sources of one modality the first wins."""
        self.setup()
        out: dict[str, dict] = {}
        for s in self.sources:
            settings = s.adapter().settings_dict()
            if s.modality in out and out[s.modality] != settings:
                log.warning("sources of %s disagree on settings; checkpoints record %s", s.modality, out[s.modality])
            out.setdefault(s.modality, settings)
        return out

    def state_dict(self) -> dict:
        return {"restarts": self._restarts}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restarts = int(state_dict.get("restarts", 0)) + 1
