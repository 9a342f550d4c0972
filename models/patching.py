"""Patchers: split each row of a byte grid into contiguous patches (BLT, Pagnoni et al. 2024).

A patching is given three equivalent ways, with conversions below:

* ``starts``     bool [B, T]: True where a byte begins a new patch (``starts[:, 0]`` is True);
* ``lengths``    long [B, P_max]: patch lengths in order, right-padded with 0 (rows sum to T);
* ``patch_ids``  long [B, T]: 0-based index of the patch each byte belongs to.

Causality: BLT's decoder predicts byte ``p`` from the latent state of the patch *before* the one
``p`` belongs to, so whether ``p`` starts a patch must be decided from bytes ``< p`` only. Every
rule here obeys that (the entropy of byte ``p`` is the entropy model's prediction of ``p`` from
bytes ``< p``), so changing bytes ``>= p`` never moves a boundary at or before ``p``.

Rules (all vectorised on the tensor's device; rows are independent):

* ``strided``: a patch starts every ``patch_size`` bytes (a fixed grid aligned with the payload's
  first byte, so patches line up with pixels / pcm16 samples). Only ``max_patch_len`` applies.
* ``space`` (SpaceByte, Slagle 2024, as used by BLT): byte ``p`` starts a patch iff byte ``p-1`` is
  space-like and byte ``p-2`` is not — a patch ends after the first byte of every run of
  space-like bytes, so ``"a  b"`` splits as ``"a " | " b"``. Space-like bytes are the ASCII bytes
  (< 0x80) that are not letters or digits: space, punctuation, newline, control bytes. Every byte
  >= 0x80 counts as a word byte; the rule cannot look at byte ``p`` itself (causality), so this is
  what keeps UTF-8 continuation bytes (0b10xxxxxx) with their word: in valid UTF-8 they follow a
  lead or continuation byte, never a space-like one. (SpaceByte calls lead bytes space-like, which
  would cut "é" in two.)
* ``entropy`` (global threshold): byte ``p`` starts a patch iff ``entropies[:, p] > threshold``.
* ``entropy_relative`` (approximate monotonic constraint): byte ``p`` starts a patch iff
  ``entropies[:, p] - entropies[:, p-1] > threshold``.

  For both, ``thresholds`` may hold one threshold per modality tag (a row's tag picks its own):
  images and audio are high-entropy almost everywhere, so one text-calibrated threshold would cut
  them into 1-byte patches.

Shared by the content-based kinds (space, entropy, entropy_relative), applied in this order:

* specials: the byte after a special id other than PAD (EOS, in-stream tags; ids >= 256) starts a
  patch (``split_after_special``), so packed documents and their first payload byte start fresh;
* first patch of length 1: byte 0 is a patch on its own, byte 1 starts the next one
  (``first_patch_len_one``; the official BLT's convention for dynamic patching);
* padding: no patch starts right after a PAD, so a trailing PAD run is one patch (it begins after
  the EOS that ends the sample) instead of thousands of useless ones.

Then ``max_patch_len`` (any kind) cuts longer patches into pieces of that length, counted from the
patch start (again not inside a PAD run for the content-based kinds). Position-based cuts (first
patch, max length) may fall inside a multi-byte character: they cannot look at the byte they cut.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .tokens import FIRST_TAG, NUM_BYTES, PAD, VOCAB_SIZE

KINDS = ("strided", "space", "entropy", "entropy_relative")


@dataclasses.dataclass
class PatcherConfig:
    """How BLT cuts a byte grid into patches (see module docstring for the exact rules)."""

    kind: str = "entropy"  # "strided" | "space" | "entropy" | "entropy_relative"
    # strided: the patch length. Other kinds: the expected mean patch length — used by
    # flops_per_byte before a batch has been seen and as find_threshold's default target.
    patch_size: int = 4
    # entropy: global threshold θ in nats; entropy_relative: θ_r on the entropy increase. Depends
    # on the entropy model: pick it with find_threshold for a target mean patch length.
    threshold: float = 1.335
    # Per modality tag (258 text, 259 image, 260 audio): that tag's rows use this threshold
    # instead of ``threshold``. BLT.calibrate_thresholds sets it; it travels with the config
    # (checkpoint, export), so training, scoring and sampling patch alike. None: one threshold.
    thresholds: dict[int, float] | None = None
    max_patch_len: int | None = None  # cut patches longer than this (None: no limit)
    first_patch_len_one: bool = True  # byte 0 alone in patch 0 (content-based kinds)
    split_after_special: bool = True  # the byte after EOS / a tag starts a patch (content-based)
    pad_id: int = PAD  # padding id: never starts a patch after itself (content-based kinds)
    # Fixed patch capacity for the full forward (training, scoring): every row gets
    # ceil(max_patches_ratio · T / patch_size) patch slots, rounded up to a multiple of 64 and at
    # most T, so shapes never depend on the data (no host sync; torch.compile compiles once).
    # Slots a row does not fill are empty patches; a row with more patches than slots has its
    # last ones merged into the final slot (still causal). None: exactly the batch's largest
    # patch count (reads it back to the host, and recompiles per new count under torch.compile).
    max_patches_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown patcher kind {self.kind!r}; choose one of {KINDS}")
        if int(self.patch_size) != self.patch_size or self.patch_size < 1:
            raise ValueError(f"patch_size must be a positive integer, got {self.patch_size}")
        if self.max_patch_len is not None and self.max_patch_len < 1:
            raise ValueError(f"max_patch_len must be >= 1 or None, got {self.max_patch_len}")
        if self.kind.startswith("entropy") and not math.isfinite(self.threshold):
            raise ValueError(f"{self.kind} patching needs a finite threshold, got {self.threshold}")
        if self.thresholds is not None:  # JSON keys arrive as strings
            self.thresholds = {int(tag): float(t) for tag, t in self.thresholds.items()}
            bad = {t: v for t, v in self.thresholds.items() if not (FIRST_TAG <= t < VOCAB_SIZE and math.isfinite(v))}
            if bad:
                raise ValueError(
                    f"thresholds must map tag ids {FIRST_TAG}..{VOCAB_SIZE - 1} to finite values, got {bad}"
                )
        if self.max_patches_ratio is not None and not self.max_patches_ratio > 0:
            raise ValueError(f"max_patches_ratio must be > 0 or None, got {self.max_patches_ratio}")

    def capacity(self, seq_len: int) -> int | None:
        """Patch slots per row of a seq_len-byte grid (see max_patches_ratio); None = data-dependent."""
        if self.max_patches_ratio is None:
            return None
        slots = math.ceil(self.max_patches_ratio * seq_len / self.patch_size)
        return min(seq_len, 64 * math.ceil(slots / 64))

    @property
    def needs_entropies(self) -> bool:
        return self.kind in ("entropy", "entropy_relative")

    def row_thresholds(self, modality: torch.Tensor | None) -> torch.Tensor | float:
        """The threshold of each row, [B] float on modality's device, from its tag [B]; the one
        ``threshold`` (a float) when there are no per-tag thresholds or no tags."""
        if not self.thresholds or modality is None:
            return self.threshold
        # from scalars only (no host tensor to copy, so it runs inside CUDA-graph capture)
        out = torch.full(modality.shape, float(self.threshold), dtype=torch.float32, device=modality.device)
        for tag, value in self.thresholds.items():
            out = torch.where(modality == tag, float(value), out)
        return out


# --- the patchers -----------------------------------------------------------------------------
def patch(
    ids: torch.Tensor,
    config: PatcherConfig,
    entropies: torch.Tensor | None = None,
    modality: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] (+ entropies [B, T] for entropy kinds; + the rows' tags [B] for per-tag
    thresholds) -> (lengths [B, P], patch_ids [B, T]).

    P is ``config.capacity(T)`` when set (patch ids past it are merged into the last slot), else
    the batch's largest patch count."""
    patch_ids = patch_starts(ids, config, entropies, modality).long().cumsum(dim=1) - 1  # starts[:, 0] is True
    slots = config.capacity(ids.shape[1])
    if slots is not None:
        patch_ids = patch_ids.clamp(max=slots - 1)
    return patch_ids_to_lengths(patch_ids, slots), patch_ids


def patch_starts(
    ids: torch.Tensor,
    config: PatcherConfig,
    entropies: torch.Tensor | None = None,
    modality: torch.Tensor | None = None,
) -> torch.Tensor:
    """ids [B, T] -> starts bool [B, T] (True where a byte begins a patch): ``start_rule`` and
    ``max_len_cut`` at every position of the row at once."""
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"ids must be [B, T] with T >= 1, got shape {tuple(ids.shape)}")
    B, T = ids.shape
    pos = torch.arange(T, device=ids.device)
    prev = _shift_right(ids, 1, fill=-1)  # prev[:, p] = ids[:, p-1]; -1 before the row
    prev2 = _shift_right(ids, 2, fill=-1)
    score, threshold = None, None
    if config.needs_entropies:
        if entropies is None:
            raise ValueError(f"{config.kind} patching needs entropies [B, T] from the entropy model")
        if entropies.shape != ids.shape:
            raise ValueError(f"entropies shape {tuple(entropies.shape)} != ids shape {tuple(ids.shape)}")
        score = entropies.float()
        if config.kind == "entropy_relative":  # H[p] - H[p-1]; p = 0 is a start anyway
            score = score - _shift_right(score, 1, fill=0.0)
        threshold = config.row_thresholds(modality)
        if isinstance(threshold, torch.Tensor):
            threshold = threshold[:, None]  # [B, 1] against scores [B, T]
    starts = torch.broadcast_to(start_rule(config, pos, prev, prev2, score, threshold), (B, T)).contiguous()
    if config.max_patch_len is None:
        return starts
    last_start = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values  # [B, T]
    return starts | max_len_cut(config, pos, last_start, prev)


def start_rule(
    config: PatcherConfig,
    pos: torch.Tensor,
    prev: torch.Tensor,
    prev2: torch.Tensor,
    score: torch.Tensor | None = None,
    threshold: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Whether position ``pos`` starts a patch by every rule but the max-length cut.

    The one statement of the rules (module docstring), used for a whole row by ``patch_starts``
    and for one position at a time by BLT's decoding (``blt_decoding``): ``pos`` the position(s),
    ``prev`` / ``prev2`` the ids at pos-1 / pos-2 (-1 before the row), ``score`` the entropy of
    the byte at pos (entropy) or its increase over pos-1 (entropy_relative), ``threshold`` the
    rows' thresholds (``row_thresholds``; None: ``config.threshold``). Shapes broadcast:
    [T] positions with [B, T] ids, or a 0-dim position with [B] ids. It reads no byte >= pos.
    """
    if config.kind == "strided":
        return pos % config.patch_size == 0
    if config.kind == "space":
        starts = is_space_like(prev) & ~is_space_like(prev2)
    else:
        if score is None:
            raise ValueError(f"{config.kind} patching needs entropies from the entropy model")
        starts = score > (config.threshold if threshold is None else threshold)
    if config.split_after_special:
        starts = starts | ((prev >= NUM_BYTES) & (prev != config.pad_id))
    if config.first_patch_len_one:
        starts = starts | (pos == 1)
    return (starts & (prev != config.pad_id)) | (pos == 0)


def max_len_cut(config: PatcherConfig, pos: torch.Tensor, last_start: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """The max-length cut at ``pos``: ``max_patch_len`` positions after ``last_start``, the last
    start by ``start_rule`` at or before pos (content-based kinds: not right after a PAD)."""
    cut = (pos - last_start) % config.max_patch_len == 0
    if config.kind != "strided":
        cut = cut & (prev != config.pad_id)
    return cut


def is_space_like(ids: torch.Tensor) -> torch.Tensor:
    """True for ASCII bytes (< 0x80) that are not letters or digits; False for bytes >= 0x80 and specials."""
    digit = (ids >= ord("0")) & (ids <= ord("9"))
    upper = (ids >= ord("A")) & (ids <= ord("Z"))
    lower = (ids >= ord("a")) & (ids <= ord("z"))
    return (ids >= 0) & (ids < 0x80) & ~(digit | upper | lower)


def _shift_right(x: torch.Tensor, k: int, fill) -> torch.Tensor:
    """[B, T] -> [B, T] with out[:, p] = x[:, p-k] and ``fill`` for p < k."""
    out = torch.full_like(x, fill)
    if k < x.shape[1]:
        out[:, k:] = x[:, :-k]
    return out


# --- conversions ------------------------------------------------------------------------------
def starts_to_patch_ids(starts: torch.Tensor) -> torch.Tensor:
    """starts bool [B, T] (starts[:, 0] True) -> patch_ids long [B, T]."""
    if not bool(starts[:, 0].all()):
        raise ValueError("every row's first byte must start a patch (starts[:, 0] all True)")
    return starts.long().cumsum(dim=1) - 1


def starts_to_lengths(starts: torch.Tensor) -> torch.Tensor:
    """starts bool [B, T] -> lengths long [B, P_max], right-padded with 0."""
    return patch_ids_to_lengths(starts_to_patch_ids(starts))


def patch_ids_to_lengths(patch_ids: torch.Tensor, num_patches: int | None = None) -> torch.Tensor:
    """patch_ids [B, T] -> lengths [B, P] (P = num_patches or the largest id + 1)."""
    P = int(patch_ids.max()) + 1 if num_patches is None else num_patches
    lengths = torch.zeros(patch_ids.shape[0], P, dtype=torch.long, device=patch_ids.device)
    return lengths.scatter_add_(1, patch_ids, torch.ones_like(patch_ids))


def lengths_to_patch_ids(lengths: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
    """lengths [B, P] (every row summing to T; zero-length patches own no byte) -> patch_ids [B, T]."""
    T = int(lengths[0].sum()) if seq_len is None else seq_len
    if lengths.dim() != 2 or (lengths < 0).any() or (lengths.sum(dim=1) != T).any():
        raise ValueError(f"lengths must be [B, P], non-negative, every row summing to T={T}")
    ends = lengths.cumsum(dim=1)  # [B, P] exclusive end of each patch
    pos = torch.arange(T, device=lengths.device).expand(lengths.shape[0], T).contiguous()
    return torch.searchsorted(ends, pos, right=True)  # number of patches ending at or before p


def patch_ids_to_starts(patch_ids: torch.Tensor) -> torch.Tensor:
    """patch_ids [B, T] -> starts bool [B, T]."""
    starts = torch.ones_like(patch_ids, dtype=torch.bool)
    starts[:, 1:] = patch_ids[:, 1:] != patch_ids[:, :-1]
    return starts


def lengths_to_starts(lengths: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
    """lengths [B, P] -> starts bool [B, T]."""
    return patch_ids_to_starts(lengths_to_patch_ids(lengths, seq_len))


# --- statistics and threshold search ----------------------------------------------------------
def patch_counts(patch_ids: torch.Tensor, ids: torch.Tensor, pad_id: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """(number of patches holding at least one non-PAD byte, number of non-PAD bytes), as 0-dim tensors.

    Their ratio is the mean patch length that BLT logs and find_threshold targets. No host sync:
    patch ids are < T, so T slots per row hold every patch.
    """
    real = (ids != pad_id).long()
    per_patch = torch.zeros_like(real).scatter_add_(1, patch_ids, real)  # [B, T] real bytes per patch id
    return (per_patch > 0).sum(), real.sum()


def find_threshold(
    entropies: torch.Tensor,
    target_mean_patch_len: float | None = None,
    ids: torch.Tensor | None = None,
    config: PatcherConfig | None = None,
    iters: int = 60,
) -> float:
    """Threshold that gives ``target_mean_patch_len`` on the given data (rows of entropies [B, T]).

    Bisects the threshold with the full patcher of ``config`` (kind ``entropy`` or
    ``entropy_relative``, with its special/first-patch/max-length rules), measuring the mean
    patch length as non-PAD bytes per patch holding a non-PAD byte. The mean length is a step
    function of the threshold; the threshold returned gives the closest mean found. ``ids``
    (same shape) lets PAD/special rules apply; without it every position counts as a byte.
    ``target_mean_patch_len`` defaults to ``config.patch_size``.
    """
    config = config or PatcherConfig(kind="entropy")
    if not config.needs_entropies:
        raise ValueError(f"find_threshold needs an entropy patcher, got kind {config.kind!r}")
    target = float(config.patch_size if target_mean_patch_len is None else target_mean_patch_len)
    if entropies.dim() != 2:
        raise ValueError(f"entropies must be [B, T], got shape {tuple(entropies.shape)}")
    if ids is None:
        ids = torch.zeros(entropies.shape, dtype=torch.long, device=entropies.device)

    def mean_len(threshold: float) -> float:
        _, patch_ids = patch(ids, dataclasses.replace(config, threshold=threshold, thresholds=None), entropies)
        n_patches, n_bytes = patch_counts(patch_ids, ids, config.pad_id)
        return n_bytes.item() / max(n_patches.item(), 1)

    e = entropies.float()
    span = (e.max() - e.min()).item() if config.kind == "entropy" else 2 * (e.max() - e.min()).item()
    lo = (e.min().item() if config.kind == "entropy" else -span) - 1.0
    hi = e.max().item() + span + 1.0
    m_lo, m_hi = mean_len(lo), mean_len(hi)
    if not m_lo <= target <= m_hi:
        raise ValueError(
            f"target mean patch length {target} is outside what this data allows with these rules: "
            f"[{m_lo:.3f}, {m_hi:.3f}]"
        )
    for _ in range(iters):
        mid = (lo + hi) / 2
        m = mean_len(mid)
        if m < target:
            lo, m_lo = mid, m
        else:
            hi, m_hi = mid, m
    return lo if target - m_lo < m_hi - target else hi
