"""Bits per byte (DESIGN.md §2): one payload mask, one sum, used by training, validation and eval.

BPB = sum of -log2 p over the targets that are payload bytes (ids 0..255) / their count. Tags,
EOS and PAD never count; a real 0x00 byte is an ordinary target. `payload_bits` is the only
place that mask is written: `BPBMeter` (``train/bpb_*``, ``val/bpb_*``, ``polybyte eval``) and
eval's per-sample bits both go through it, so they cannot drift apart.
"""

from __future__ import annotations

import math

import torch

from polybyte.modalities import NUM_BYTES, TAG_NAMES, TAGS

LN2 = math.log(2.0)
# Order of the per-modality slots of BPBMeter.
MODALITY_TAGS = (TAGS["text"], TAGS["image"], TAGS["audio"])


def payload_bits(
    nll: torch.Tensor, ids: torch.Tensor, scored: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (bits, count) of the payload targets, float64 on nll's device.

    ``nll, ids [B, T]``: nats per target and the target ids. A target counts when its id is a
    byte (0..255) and, if ``scored [B, T]`` (bool) is given, it is marked there (eval's overlapping
    windows score each target once).
    """
    mask = ids.to(nll.device) < NUM_BYTES
    if scored is not None:
        mask &= scored.to(nll.device)
    bits = torch.where(mask, nll.double(), 0.0).sum(1) / LN2  # [B, T] -> [B]
    return bits, mask.sum(1).double()


class BPBMeter:
    """Per-modality BPB accumulator: sums of payload-target bits and of their count per
    modality over batches. Training, validation and ``polybyte eval`` all use it, so they agree.

    ``update(nll, ids, modality)`` takes ``nll, ids [B, T]`` (nats per target) and
    ``modality [B]`` (tag ids); the sums stay on nll's device, in float64.
    """

    def __init__(self) -> None:
        self.bits = torch.zeros(len(MODALITY_TAGS), dtype=torch.float64)
        self.count = torch.zeros(len(MODALITY_TAGS), dtype=torch.float64)

    def update(
        self,
        nll: torch.Tensor,
        ids: torch.Tensor,
        modality: torch.Tensor,
        check: bool = True,
        scored: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Add a batch; returns its bits per row ([B], float64). ``check=False`` skips the tag
        check and its host sync, for batches known to carry tag ids (the training loop's, from
        ByteDataModule). ``scored``: see `payload_bits`."""
        nll = nll.detach()
        slot = modality.to(nll.device) - MODALITY_TAGS[0]  # tag id -> 0..2
        if check and bool(((slot < 0) | (slot >= len(MODALITY_TAGS))).any()):
            raise ValueError(f"modality ids must be tag ids {MODALITY_TAGS}, got {modality.tolist()}")
        row_bits, row_count = payload_bits(nll, ids, scored)
        zeros = torch.zeros(len(MODALITY_TAGS), dtype=torch.float64, device=nll.device)
        self.bits = self.bits.to(nll.device) + zeros.index_add(0, slot, row_bits)
        self.count = self.count.to(nll.device) + zeros.index_add(0, slot, row_count)
        return row_bits

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
