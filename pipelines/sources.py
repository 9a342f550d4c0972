"""Where samples come from: source specs, shard folders and their manifest, reading shards, and
counting the samples lost on the way (DESIGN.md §4). Used by training and validation
(data.py) and by ``polybyte eval``; nothing here imports Lightning.

A source is a folder written by ``polybyte shard`` (``train-*.tar``, ``val-*.tar``,
``manifest.json``), any folder of ``.tar`` shards, or a brace pattern/glob of shards. Its
``manifest.json`` is read here only (`read_manifest`): modality, adapter settings and the
samples per shard, so a shard that ends early is counted.

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
import multiprocessing
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path

import webdataset as wds

from polybyte.modalities import TAGS, ResourceLimitError, get_modality
from polybyte.modalities.base import Modality

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"  # written by `polybyte shard` (shards.py) into each shard folder


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


def parse_specs(spec) -> list[tuple[str | None, str]]:
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


def read_manifest(folder: str | Path, required: bool = True) -> dict | None:
    """The ``manifest.json`` of a shard folder written by ``polybyte shard``; when it is missing,
    an error if ``required``, else None."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        if required:
            raise ValueError(f"no {MANIFEST} in {folder}; is it a folder written by `polybyte shard`?")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
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
    specs = parse_specs(sources or [])
    if not specs:
        raise ValueError("no data sources given; pass e.g. sources={'text': 'shards/text'} or ['text=DIR']")
    overrides = {k: dict(v) for k, v in (adapter_settings or {}).items()}
    out: list[Source] = []
    for name, loc in specs:
        train, folder = _locate(name, loc, "train")
        val = _locate(name, loc, "val")[0] if val_sources is None and Path(loc).expanduser().is_dir() else []
        if not train and not val:
            raise ValueError(f"source {name or loc!r}: no .tar shards in folder {loc}")
        manifest = read_manifest(folder, required=False)
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
        for name, loc in parse_specs(val_sources):
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
        self,
        what: str,
        over_limit: bool = False,
        *,
        reason: str | None = None,
        shard: str | None = None,
        count: int = 1,
    ) -> None:
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
    urls: Iterable[str],
    counter: SkipCounter,
    expected: Mapping[str, int] | None = None,
    expected_total: int | None = None,
    count_losses: bool = True,
) -> Iterator[dict]:
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
            counter.skip(
                f"{where}: {lost} of the {expected_total} val samples the manifest lists are missing",
                reason="missing",
                shard=reads[0].url if reads else None,
                count=lost,
            )


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
            counter.skip(
                f"{url}: {lost} of the {expected} samples its manifest lists are missing "
                f"(the shard ends after {tally.read})",
                reason="missing",
                shard=url,
                count=lost,
            )


# --- decoding ---------------------------------------------------------------------------------
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
