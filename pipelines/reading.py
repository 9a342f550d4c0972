"""Reading shards and counting the samples lost on the way (DESIGN.md §4), for training and
validation (data.py) and ``polybyte eval``; nothing here imports Lightning.

Members are decoded from raw bytes by the modality adapters (PNG/JPEG/WAV/FLAC/TXT); nothing
is ever unpickled. A sample that fails to decode, is above one of its adapter's resource limits
(``max_pixels``, ``max_seconds``, ...: checked before decoding) or whose own image size or sample
rate differs from its strict adapter's setting is skipped and counted by reason
(`SKIP_REASONS`: ``undecodable``, ``over_limit``, ``mismatch``, ``shard_error`` for a shard that
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
from dataclasses import dataclass

import webdataset as wds

from polybyte.modalities import ResourceLimitError, SettingMismatchError

log = logging.getLogger(__name__)


def shard_key(url: str) -> str:
    """A shard's key in ``Source.expected``: its absolute path."""
    return os.path.abspath(url)


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
# image size or sample rate differs from the source's (strict adapters: see Modality.strict); its
# shard could not be read (open, tar or grouping error: the sample being read is lost); the shard
# holds fewer samples than its manifest lists (truncated on a member boundary, or gone).
SKIP_REASONS = ("undecodable", "over_limit", "mismatch", "shard_error", "missing")


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
        yield from _read_shard(tally, counter, (expected or {}).get(shard_key(url)), count_losses)
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
def member(sample: dict, extensions: tuple[str, ...]) -> tuple[str, bytes]:
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


def decode_payloads(samples: Iterable[dict], source, counter: SkipCounter) -> Iterator[bytes]:
    """Decode each sample's member into payload bytes through the adapter of ``source`` (a
    `sources.Source`); count failures."""
    adapter = source.adapter()
    for sample in samples:
        tally = sample.get("__read__")
        try:
            ext, data = member(sample, adapter.extensions)
            meta = json.loads(sample["json"]) if source.manifest and "json" in sample else {}
            payload = adapter.encode(data, {**meta, "extension": ext})
        except Exception as e:  # noqa: BLE001 — any decoder failure is a counted skip by design
            if sample.get("__damaged__"):
                continue  # cut short by a read error of its shard, which was counted for it
            url = sample.get("__url__")
            what = f"{url} {sample.get('__key__')}: {type(e).__name__}: {e}"
            reason = (
                "over_limit"
                if isinstance(e, ResourceLimitError)
                else "mismatch"
                if isinstance(e, SettingMismatchError)
                else "undecodable"
            )
            counter.skip(what, reason=reason, shard=url)
            if tally is not None:
                tally.skipped += 1
            continue
        counter.ok()
        if tally is not None:
            tally.ok += 1
        yield payload
