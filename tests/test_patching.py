"""Patchers: exact boundaries on hand-made inputs, conversions, causality, threshold search."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from polybyte.models import patching as PT

PAD, EOS, TEXT = 256, 257, 258


def ids_of(*parts) -> torch.Tensor:
    """Build one row from str (UTF-8 bytes) and int (special id) parts -> [1, T]."""
    out: list[int] = []
    for part in parts:
        out.extend(part.encode("utf-8") if isinstance(part, str) else [part])
    return torch.tensor([out])


def lengths_of(ids, config, entropies=None) -> list[int]:
    lengths, patch_ids = PT.patch(ids, config, entropies)
    assert torch.equal(PT.lengths_to_patch_ids(lengths), patch_ids)
    return [int(n) for n in lengths[0] if n > 0]


def test_space_patching_keeps_utf8_characters_with_their_word():
    ids = ids_of("héllo wörld")  # h C3 A9 l l o ' ' w C3 B6 r l d
    assert ids.shape[1] == 13
    no_first = PT.PatcherConfig(kind="space", first_patch_len_one=False)
    assert lengths_of(ids, no_first) == [7, 6]  # "héllo " | "wörld"
    assert lengths_of(ids, dataclasses.replace(no_first, first_patch_len_one=True)) == [1, 6, 6]
    starts = PT.lengths_to_starts(PT.patch(ids, no_first)[0])
    assert not (starts & (ids >= 0x80) & (ids < 0xC0)).any()  # no continuation byte starts a patch


def test_space_patching_splits_after_first_of_a_run():
    cfg = PT.PatcherConfig(kind="space", first_patch_len_one=False)
    assert lengths_of(ids_of("a  b"), cfg) == [2, 2]  # "a " | " b"
    assert lengths_of(ids_of("ab, cd"), cfg) == [3, 3]  # "ab," | " cd"
    assert lengths_of(ids_of("x\n\n\nyz"), cfg) == [2, 4]


def test_specials_end_patches_and_padding_is_one_patch():
    ids = ids_of("hi", EOS, TEXT, "yo", EOS, PAD, PAD, PAD)
    for cfg in (
        PT.PatcherConfig(kind="space", first_patch_len_one=False),
        PT.PatcherConfig(kind="entropy", threshold=10.0, first_patch_len_one=False),
    ):
        ent = torch.zeros(ids.shape)
        assert lengths_of(ids, cfg, ent) == [3, 1, 3, 3]  # "hi<eos>" | <text> | "yo<eos>" | pads
    # even with every entropy above threshold, no patch starts inside the PAD run
    hot = PT.PatcherConfig(kind="entropy", threshold=-1.0, max_patch_len=1)
    assert lengths_of(ids, hot, torch.zeros(ids.shape)) == [1] * 7 + [3]


def test_entropy_global_and_relative_from_given_entropies():
    ids = torch.full((1, 8), ord("a"))
    ent = torch.tensor([[5.0, 0.1, 0.2, 3.0, 0.1, 0.1, 2.5, 0.3]])
    glob = PT.PatcherConfig(kind="entropy", threshold=1.0, first_patch_len_one=False)
    assert lengths_of(ids, glob, ent) == [3, 3, 2]  # starts at 0, 3, 6
    assert lengths_of(ids, dataclasses.replace(glob, first_patch_len_one=True), ent) == [1, 2, 3, 2]
    # relative: H[p] - H[p-1] > 0.5 -> p = 3 (2.8), 6 (2.4); p = 2 rises by only 0.1
    rel = PT.PatcherConfig(kind="entropy_relative", threshold=0.5, first_patch_len_one=False)
    assert lengths_of(ids, rel, ent) == [3, 3, 2]
    ramp = torch.tensor([[0.0, 1.0, 2.0, 3.0, 3.2, 3.4, 5.0, 0.0]])  # high but rising slowly
    assert lengths_of(ids, rel, ramp) == [1, 1, 1, 3, 2]  # starts 0 1 2 3 6
    assert lengths_of(ids, dataclasses.replace(glob, threshold=2.5), ramp) == [3, 1, 1, 1, 2]  # global


def test_max_patch_len_and_strided():
    ids = torch.full((1, 10), ord("a"))
    flat = torch.zeros(1, 10)
    cfg = PT.PatcherConfig(kind="entropy", threshold=1.0, max_patch_len=4)
    assert lengths_of(ids, cfg, flat) == [1, 4, 4, 1]
    assert lengths_of(ids, dataclasses.replace(cfg, first_patch_len_one=False), flat) == [4, 4, 2]
    strided = PT.PatcherConfig(kind="strided", patch_size=4)
    lengths, patch_ids = PT.patch(ids, strided)
    assert lengths.tolist() == [[4, 4, 2]]
    assert patch_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 2, 2]]
    assert lengths_of(ids, dataclasses.replace(strided, max_patch_len=3)) == [3, 1, 3, 1, 2]


def test_conversions_round_trip_and_rows_are_independent():
    g = torch.Generator().manual_seed(0)
    starts = torch.rand(5, 40, generator=g) < 0.3
    starts[:, 0] = True
    lengths = PT.starts_to_lengths(starts)
    patch_ids = PT.starts_to_patch_ids(starts)
    assert (lengths.sum(1) == 40).all()
    assert torch.equal(PT.lengths_to_patch_ids(lengths), patch_ids)
    assert torch.equal(PT.patch_ids_to_starts(patch_ids), starts)
    assert torch.equal(PT.lengths_to_starts(lengths), starts)
    assert torch.equal(PT.patch_ids_to_lengths(patch_ids), lengths)
    with pytest.raises(ValueError, match="first byte"):
        PT.starts_to_patch_ids(torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="summing to T"):
        PT.lengths_to_patch_ids(torch.tensor([[2, 2], [3, 2]]))

    text = [b"the cat sat on the mat.", b"a  b,  c\nd?!  ef ghi jklm"]
    T = max(map(len, text))
    ids = torch.full((2, T), PAD)
    for r, t in enumerate(text):
        ids[r, : len(t)] = torch.tensor(list(t))
    ent = torch.rand(2, T, generator=g) * 3
    for cfg in (
        PT.PatcherConfig(kind="space", max_patch_len=5),
        PT.PatcherConfig(kind="entropy", threshold=1.5),
        PT.PatcherConfig(kind="entropy_relative", threshold=0.5),
        PT.PatcherConfig(kind="strided", patch_size=3),
    ):
        lengths, patch_ids = PT.patch(ids, cfg, ent)
        for r in range(2):
            lr, pr = PT.patch(ids[r : r + 1], cfg, ent[r : r + 1])
            assert torch.equal(pr, patch_ids[r : r + 1])
            assert lengths[r, : lr.shape[1]].tolist() == lr[0].tolist()
            assert (lengths[r, lr.shape[1] :] == 0).all()


@pytest.mark.parametrize("kind", PT.KINDS)
def test_boundaries_depend_only_on_past_bytes(kind):
    g = torch.Generator().manual_seed(1)
    alphabet = torch.tensor(list(b"ab ,\xc3\xa9") + [EOS, TEXT])
    cfg = PT.PatcherConfig(kind=kind, threshold=1.0 if kind == "entropy" else 0.3, max_patch_len=6)
    for _ in range(20):
        ids = alphabet[torch.randint(len(alphabet), (3, 30), generator=g)]
        ent = torch.rand(3, 30, generator=g) * 2
        t = int(torch.randint(1, 30, (1,), generator=g))
        ids2, ent2 = ids.clone(), ent.clone()
        ids2[:, t:] = alphabet[torch.randint(len(alphabet), (3, 30 - t), generator=g)]
        ent2[:, t + 1 :] = torch.rand(3, 29 - t, generator=g) * 2  # entropies[:, p] see bytes < p
        s1 = PT.patch_starts(ids, cfg, ent)
        s2 = PT.patch_starts(ids2, cfg, ent2)
        assert torch.equal(s1[:, : t + 1], s2[:, : t + 1])


@pytest.mark.parametrize("kind", ["entropy", "entropy_relative"])
def test_find_threshold_hits_target_mean_patch_length(kind):
    g = torch.Generator().manual_seed(2)
    ent = torch.rand(8, 512, generator=g).pow(3) * 4  # skewed, like real next-byte entropies
    ids = torch.randint(0, 256, (8, 512), generator=g)
    ids[3, 400:] = PAD  # padding is excluded from the mean
    cfg = PT.PatcherConfig(kind=kind, max_patch_len=16)
    for target in (2.5, 4.5, 6.0):
        theta = PT.find_threshold(ent, target, ids, cfg)
        _, patch_ids = PT.patch(ids, dataclasses.replace(cfg, threshold=theta), ent)
        n_patches, n_bytes = PT.patch_counts(patch_ids, ids)
        assert abs(n_bytes.item() / n_patches.item() - target) < 0.05 * target
    with pytest.raises(ValueError, match="outside"):
        PT.find_threshold(ent, 50.0, ids, cfg)  # max_patch_len 16 caps the mean


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="unknown patcher kind"):
        PT.PatcherConfig(kind="bpe")
    with pytest.raises(ValueError, match="needs entropies"):
        PT.patch(torch.zeros(1, 4, dtype=torch.long), PT.PatcherConfig(kind="entropy"))
    with pytest.raises(ValueError, match="shape"):
        PT.patch(torch.zeros(1, 4, dtype=torch.long), PT.PatcherConfig(kind="entropy"), torch.zeros(1, 5))


@pytest.mark.parametrize("kind", ["entropy", "entropy_relative"])
def test_per_tag_thresholds_patch_each_row_with_its_own(kind):
    """A row's tag picks its threshold (``thresholds``), tags without one use ``threshold``: the
    batch patches exactly as each row alone with its own single threshold."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (3, 64), generator=g)
    ent = torch.rand(3, 64, generator=g) * 4
    tags = torch.tensor([258, 259, 260])
    per_tag = {258: 2.5, 259: 0.5}  # 260 keeps the global 1.5
    cfg = PT.PatcherConfig(kind=kind, threshold=1.5, thresholds=per_tag)
    _, got = PT.patch(ids, cfg, ent, tags)
    for row, theta in enumerate([2.5, 0.5, 1.5]):
        alone = dataclasses.replace(cfg, threshold=theta, thresholds=None)
        _, want = PT.patch(ids[row : row + 1], alone, ent[row : row + 1])
        assert torch.equal(got[row], want[0])
    assert not torch.equal(got[0], got[1])  # the thresholds do differ in effect
    _, untagged = PT.patch(ids, cfg, ent)  # no tags given: the one threshold for every row
    _, single = PT.patch(ids, dataclasses.replace(cfg, thresholds=None), ent)
    assert torch.equal(untagged, single)


def test_per_tag_thresholds_from_json_and_bad_ones_refused():
    cfg = PT.PatcherConfig(thresholds={"259": "2.0"})  # as a config.json gives them back
    assert cfg.thresholds == {259: 2.0}
    with pytest.raises(ValueError, match="tag ids 258..263"):
        PT.PatcherConfig(thresholds={65: 1.0})
    with pytest.raises(ValueError, match="finite"):
        PT.PatcherConfig(thresholds={258: float("nan")})
