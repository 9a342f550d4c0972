"""models/hash_ngrams.py: the rolling n-gram hashes BLT embeds."""

import torch

from polybyte.models.hash_ngrams import hash_ngram_ids


def test_hash_ngram_ids_deterministic_in_range_and_causal():
    sizes, table = (3, 4, 5, 6, 7, 8), 1000
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 264, (3, 50), generator=g)
    h = hash_ngram_ids(ids, sizes, table, num_functions=2)
    assert h.shape == (3, 50, 12) and h.dtype == torch.long
    assert torch.equal(h, hash_ngram_ids(ids.clone(), sizes, table, num_functions=2))
    assert h.min() >= 0 and h.max() < table
    # the same n bytes hash to the same row wherever they occur, and only those n bytes matter
    row = torch.tensor([list(b"xxabcdefgh__abcdefgh")])
    hr = hash_ngram_ids(row, sizes, table)
    for s in range(len(sizes)):
        assert hr[0, 9, s] == hr[0, 19, s]  # "…gh" at 9 and 19: same last 8 bytes
    assert hr[0, 11, 0] != hr[0, 10, 0]  # different trigrams (collision odds 1/1000 for this fixed pair)
    # never looks ahead: changing bytes >= t leaves every position < t unchanged
    for t in (1, 7, 30):
        ids2 = ids.clone()
        ids2[:, t:] = torch.randint(0, 264, (3, 50 - t), generator=g)
        assert torch.equal(hash_ngram_ids(ids2, sizes, table)[:, :t], h[:, :t, :6])
    # the row start is padded consistently: a short prefix differs from the same bytes mid-row
    assert hash_ngram_ids(row[:, 2:5], sizes, table)[0, 2, 0] == hr[0, 4, 0]  # full trigram "abc"
    assert hash_ngram_ids(row[:, 2:5], sizes, table)[0, 2, 1] != hr[0, 4, 1]  # 4-gram needs 1 pad
