"""The byte stream's vocabulary as models see it (DESIGN.md §2).

models/ never imports modalities/ (dependencies run one way), so the ids are declared here once
for every model module; ``tests/test_tokens.py`` checks that they equal ``modalities.base``.
"""

NUM_BYTES = 256  # ids 0..255 are byte values; every id >= NUM_BYTES is a special
PAD = 256  # padding only: never a target, never counted, never sampled
EOS = 257  # end of one sample
FIRST_TAG = 258  # the first modality tag (258 text, 259 image, 260 audio)
NUM_TAGS = 6  # tag ids FIRST_TAG .. FIRST_TAG + NUM_TAGS - 1: the three tags and 261..263 reserved
VOCAB_SIZE = 264  # bytes + PAD + EOS + tags
