"""Training and validation streams of byte windows, and `ByteDataModule` (DESIGN.md §2 and §4).

Batches are ``(ids LongTensor[B, seq_len], modality LongTensor[B])``. The modality tag of a
row travels outside the byte grid, so the first payload byte sits at grid position 0. How
samples become windows is windows.py; where they come from, and how lost samples are counted,
sources.py.

Training reads every source ``resampled`` (an endless, seeded random shard sequence per rank
and worker), mixes sources by weight and shuffles windows in a buffer. Validation reads the
fixed val shards (``val-*.tar``, or those ``val_sources`` names) once, in the same order every
time, each sample exactly once, and windows every sample on its own. Those are exactly the
windows `polybyte eval` scores, so both report the same BPB, whatever the number of workers or
ranks. Validation batches take turns between the sources (each batch holds one source's
windows), so a pass cut short by ``limit_val_batches`` still scores every modality.

Multi-GPU / multi-node: with resampling, every rank (and every DataLoader worker) draws its
own shard sequence from the *full* shard list, seeded by (seed, rank, worker); the
``split_by_node``/``split_by_worker`` stages only thin these endless streams, so no rank can
end up with zero shards, however few shards there are. Validation gives each rank
``val shards[rank::world]`` when there are at least as many shards as ranks, and otherwise
lets every rank read all val shards and keep every ``world``-th sample; workers then take
``shards[worker::num_workers]``. Either way each val sample is read by exactly one worker of
exactly one rank.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping

import lightning
import numpy as np
import torch
import webdataset as wds
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, IterableDataset

from polybyte.modalities import TAGS

from .checkpoints import STOP_SIGNALS
from .demo_data import DEMO_SOURCES, ensure_demo_shards
from .reading import SKIP_REASONS, SkipCounter, decode_payloads, read_shards
from .sources import Source, resolve_sources
from .windows import sample_windows, train_windows

log = logging.getLogger(__name__)


# --- streams ----------------------------------------------------------------------------------
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


def source_windows(
    source: Source,
    urls: Iterable[str],
    counter: SkipCounter,
    seq_len: int,
    augment: Callable[[bytes, random.Random], bytes] | None = None,
    rng: random.Random | None = None,
) -> Iterator[np.ndarray]:
    """Training windows of ``source`` read from the shards ``urls``: members -> payloads
    (-> ``augment(payload, rng)``) -> windows."""
    payloads = decode_payloads(read_shards(urls, counter, source.expected), source, counter)
    if augment is not None:
        payloads = (augment(p, rng) for p in payloads)
    return train_windows(payloads, source.modality, seq_len)


class TrainStream(IterableDataset):
    """Endless training batches: per source resampled shards -> windows -> shuffle; sources
    mixed by weight; batched inside the worker."""

    def __init__(self, sources, weights, seq_len, batch_size, shuffle_buffer, seed, counter, augment=None) -> None:
        super().__init__()
        self.sources, self.weights = sources, weights
        self.augment = augment or {}  # source name -> augmentation options (built in each worker)
        self.seq_len, self.batch_size, self.shuffle_buffer = seq_len, batch_size, shuffle_buffer
        self.seed, self.counter = seed, counter

    def _source(self, i: int, source: Source, rank: int, worker: int) -> Iterator[tuple[np.ndarray, int]]:
        # seed: ResampledShards mixes in (rank, worker) itself
        shards = wds.ResampledShards(source.train, seed=wds.utils.make_seed(self.seed, i), deterministic=True)
        urls = wds.split_by_worker(wds.split_by_node(iter(shards)))  # thin endless per-rank streams
        augment = source.adapter().augmenter(self.augment.get(source.name, {}))
        aug_rng = random.Random(wds.utils.make_seed(self.seed, i, rank, worker, 11))
        windows = source_windows(source, (u["url"] for u in urls), self.counter, self.seq_len, augment, aug_rng)
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


def round_robin(streams: list[Iterator]) -> Iterator:
    """One item of each stream in turn, skipping the streams that have ended, until all have."""
    live = list(streams)
    while live:
        for stream in list(live):
            try:
                yield next(stream)
            except StopIteration:
                live.remove(stream)


class ValStream(IterableDataset):
    """Validation batches: each source's val shards once, in a fixed order, every sample read
    by exactly one (rank, worker) and windowed on its own (`stream_windows`). Each batch holds
    one source's windows, and the sources take turns (`round_robin`), so the first batches of
    a pass cover every source."""

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
        samples = read_shards(
            shards,
            self.counter,
            source.expected,
            source.val_total if alone else None,
            count_losses=keep_every == 1 or rank == 0,
        )
        if keep_every > 1:
            samples = _keep_every(samples, keep_every, rank)
        tag = TAGS[source.modality]
        return ((w, tag) for w in sample_windows(decode_payloads(samples, source, self.counter), tag, self.seq_len))

    def __iter__(self):
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        return round_robin(
            [
                _batched(self._source(source, rank, world, worker, workers), self.batch_size, partial=True)
                for source in self.sources
            ]
        )


# --- the DataModule ---------------------------------------------------------------------------
def _example_val(source: Source) -> str:
    """A val_sources location to suggest for a source without val shards: its last training
    shard when it has several (a shard named there is no longer trained on)."""
    return source.train[-1] if len(source.train) > 1 else "SHARDS"


def ignore_stop_signals(worker_id: int) -> None:
    """A loader worker ignores SIGINT, SIGUSR1 and every SIGTERM but its parent's.

    Sent to the whole process group (`timeout`, SLURM, Ctrl-C), these would kill the workers
    mid-batch and the fit would die with a traceback instead of saving `last`. The parent's SIGTERM
    is how torch and multiprocessing stop workers (at the end of a loader, at exit), so a worker
    still obeys it, exiting 0 as torch's own handler does. Python's signal handlers cannot see the
    sender, hence SIGTERM blocked and read by a thread with ``sigwaitinfo``.
    """
    for signum in STOP_SIGNALS:
        if signum != signal.SIGTERM:
            signal.signal(signum, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS: SIGTERM keeps torch's handler
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # before any other thread starts

    def obey_parent() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)

    threading.Thread(target=obey_parent, name="sigterm-from-parent", daemon=True).start()


class ByteDataModule(lightning.LightningDataModule):
    """Byte windows from webdataset shard sources, as ``(ids [B, seq_len], modality [B])``.

    Args:
        sources: shard sources. A mapping ``{name: location}`` or a list of ``"name=location"``
            (or bare ``location`` for folders with a manifest). A location is a folder written
            by ``polybyte shard`` (``train-*.tar``, ``val-*.tar``, ``manifest.json``), any folder
            of ``.tar`` shards (all trained on; one named like a held-out split is refused), or
            a brace pattern/glob of training shards. Without a manifest the name must be the
            modality (``image=DIR``), members are read by extension (.txt / .png .jpg .jpeg /
            .wav .flac ...) and the image size or sample rate is read from the first member.
            ``"demo"``: the embedded demo shards (text, image, audio), built once into the
            cache by `polybyte.pipelines.demo_data`.
        val_sources: validation shards for the sources it names (mapping or list, same syntax;
            a pattern, a shard, or a folder's ``val-*.tar``), e.g.
            ``{"image": "cifar10/train-000009.tar"}``; shards named here are left out of
            training. Sources it does not name keep their folder's ``val-*.tar``.
        weights: sampling weight per source (mapping by name, or a list in source order);
            default equal. Weights count windows, i.e. grid bytes.
        adapter_settings: adapter settings per source name, overriding the manifest's or the
            first member's, e.g. ``{"image": {"size": 32}}``. An image size or sample rate given
            here is an instruction: members are cropped and resized or resampled to it (without
            it, a member unlike the source's setting is refused and counted as ``mismatch``).
        augment: training-time augmentation options per source name, applied to each training
            payload before windowing (never to validation, eval or sampling), e.g.
            ``{"audio": {"invert": 0.5, "gain_db": 6}}`` (``modalities/audio.py`` `AudioAugment`);
            text and image sources have none.
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
        augment: dict[str, dict] | None = None,
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
        self.weight_spec, self.adapter_settings, self.augment = weights, adapter_settings, augment or {}
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
        sources = resolve_sources(self._specs(), self.val_specs, self.adapter_settings, flag="--data.adapter_settings")
        for s in sources:
            self._check_fits(s)
        self._check_augment(sources)
        self._notify(sources, stage)
        self.weights = self._resolve_weights(sources)
        self.sources = sources
        self._counter = SkipCounter(self.max_skip_fraction, self.min_seen)
        self._val_counter = SkipCounter(self.max_skip_fraction, self.min_seen)

    @staticmethod
    @rank_zero_only
    def _notify(sources: list[Source], stage: str | None) -> None:
        """The sources' notices, and one line when some source (or every one) has no val shards."""
        for s in sources:
            for note in s.notes:
                print(f"polybyte data: {note}", file=sys.stderr)
        missing = [s for s in sources if not s.val]
        if not missing or (stage == "validate" and len(missing) == len(sources)):
            return  # validate without any val data is an error (val_dataloader)
        which = ", ".join(f"{s.name} at {s.location}" for s in missing)
        example = f"--data.val_sources '{{{missing[0].name}: {_example_val(missing[0])}}}'"
        if len(missing) == len(sources):
            head = f"no validation data: no source has val shards ({which}); training runs without validation"
        else:
            covered = ", ".join(s.name for s in sources if s.val)
            head = f"validation covers {covered} only: no val shards for {which}"
        print(f"polybyte data: {head}; name val shards with {example}", file=sys.stderr)

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

    def _check_augment(self, sources: list[Source]) -> None:
        """``augment`` names known sources and options their modality has (clear errors at start-up)."""
        by_name = {s.name: s for s in sources}
        unknown = sorted(set(self.augment) - set(by_name))
        if unknown:
            raise ValueError(f"--data.augment names sources {unknown}, but the sources are {sorted(by_name)}")
        for name, options in self.augment.items():
            try:
                by_name[name].adapter().augmenter(options)
            except ValueError as e:
                raise ValueError(f"--data.augment source {name!r}: {e}") from None

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
            worker_init_fn=ignore_stop_signals,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        active = [(s, w) for s, w in zip(self.sources, self.weights) if w > 0]
        empty = [s.name for s, _ in active if not s.train]
        if empty:
            raise ValueError(
                f"sources {empty} have no training shards (train-*.tar, or none left once the shards "
                f"val_sources names are left out); give them weight 0"
            )
        base = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        seed = wds.utils.make_seed(base, self._restarts)
        stream = TrainStream(
            [s for s, _ in active],
            [w for _, w in active],
            self.seq_len,
            self.batch_size,
            self.shuffle_buffer,
            seed,
            self._counter,
            self.augment,
        )
        return self._loader(stream, persistent=False)

    def calibration_batch(self, modalities: list[str], per_source: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [N, seq_len], tags [N]): the first ``per_source`` training windows of every source
        of these modalities, in shard order (the same on every rank), for calibrating patching."""
        self.setup("fit")
        missing = sorted(set(modalities) - {s.modality for s in self.sources})
        if missing:
            raise ValueError(f"model.patch_targets names {missing} but no data source holds that modality")
        rows = []
        for source in self.sources:
            if source.modality in modalities:
                counter = SkipCounter(1.0, 0)  # counted only while calibrating; training counts its own
                windows = source_windows(source, source.train, counter, self.seq_len)
                rows += [(w, TAGS[source.modality]) for _, w in zip(range(per_source), windows)]
        return collate(rows)

    def val_dataloader(self) -> DataLoader | list:
        """The validation loader; none (an empty list: Lightning then skips validation) when no
        source has val shards, which `polybyte validate` refuses."""
        self.setup("validate")
        sources = [s for s in self.sources if s.val]
        if not sources:
            trainer = getattr(self, "trainer", None)
            if trainer is not None and trainer.state.fn == "validate":
                names = ", ".join(f"{s.name} at {s.location}" for s in self.sources)
                raise ValueError(
                    f"nothing to validate: no source has val shards ({names}); name them with --data.val_sources"
                )
            # Lightning would add a warning of its own to the one line _notify printed
            warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")
            return []
        self._check_limit(sources)
        stream = ValStream(sources, self.seq_len, self.val_batch_size, self._val_counter)
        return self._loader(stream, persistent=True)

    def _check_limit(self, sources: list[Source]) -> None:
        """One line when fit's ``limit_val_batches`` may stop before every val source is scored.
        Each loader worker takes turns between its sources, the DataLoader between its workers,
        and worker 0 holds a shard of every source: ``sources x workers`` batches reach them all."""
        trainer = getattr(self, "trainer", None)
        limit = getattr(trainer, "limit_val_batches", None)
        need = len(sources) * max(1, self.num_workers)
        if trainer is None or trainer.state.fn != "fit" or type(limit) is not int or not 0 < limit < need:
            return
        if rank_zero_only.rank == 0:
            print(
                f"polybyte data: limit_val_batches {limit} is fewer than {len(sources)} val sources x "
                f"{max(1, self.num_workers)} loader workers, so validation during fit may not reach every "
                f"source; raise trainer.limit_val_batches to at least {need}",
                file=sys.stderr,
            )

    # reporting ----------------------------------------------------------------------------
    def _counters(self, split: str | None) -> list[SkipCounter]:
        if split not in (None, "train", "val"):
            raise ValueError(f"split must be 'train', 'val' or None, got {split!r}")
        picked = (
            [self._counter]
            if split == "train"
            else [self._val_counter]
            if split == "val"
            else [self._counter, self._val_counter]
        )
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
