"""transformers' ``BltForCausalLM`` (transformers 5.17.0, models/blt/modeling_blt.py) as options of
our BLT: the vocabulary map and the hash n-gram ids it uses. ``pipelines/blt_import.py`` turns a
transformers BLT folder into a polybyte export with these settings; ``tests/test_blt_hf_parity.py``
checks patches, logits and greedy continuations against the library itself.

Every difference found in its source, and how our BLT reproduces it (the option set by the import):

* Vocabulary: 260 ids, byte b is b + 4, BOE 0, BOS 1, EOS 2, BPE 3 (Meta's BLT tokenizer; no PAD).
  Ours has 264 (bytes, PAD, EOS, six tags). The import permutes embedding and head rows
  (``HF_ROW_OF_INPUT``, ``OUTPUT_OF_HF_ROW``): every modality tag reads BOS's embedding (a tag is
  our stream's first input, where its tokenizer puts BOS), BOS's logit is the text tag's (258),
  BOE and BPE go to the reserved 261 and 262, and our four ids it cannot predict (PAD, 259, 260,
  263) get logit -inf (``unused_outputs``), so softmax, loss and entropies equal its own over 260.
  Packed text's in-stream tag (258) is then read and predicted as its BOS, as documents start in
  its own streams; sampling never draws it (only bytes and EOS), nor does the greedy test.
* Hash n-gram ids (``HashNgramConfig.style = "transformers"``, ``transformers_hash_ids``): the
  n bytes ending at t, oldest first, summed as ``Σ_j id[t-n+1+j]·prime^j`` in wrapping int64
  arithmetic, then ``% table_size`` (torch's non-negative remainder); positions before the
  stream read id 0 (BOE); its own ids (above), not ours; primes ``TRANSFORMERS_PRIMES``, one per
  hash function (at most 11: ``HashNgramConfig`` refuses more); table f·len(sizes)+s at offset index·table_size
  (our layout). The byte embedding and the n-gram embeddings are summed, not divided by K+1.
* Entropy patching (``PatcherConfig``): a patch starts at byte p iff the entropy of byte p given
  the bytes before it exceeds ``patching_threshold`` (strict ``>``, one global threshold, no
  monotonicity rule): kind ``entropy``. BOS is patch 0 on its own and the first byte always starts
  patch 1 — our tag patch and byte 0's start, so ``first_patch_len_one`` is off; no rule splits
  after EOS or tags (``split_after_special`` off). A start decided for the position after the last
  input (an entropy above the threshold there) gives it an empty last patch that nothing reads;
  ours decides that byte's start the same way. Its ``max_patch_length`` cuts a patch into pieces
  of that length from the patch start (our ``max_patch_len``), except at a forward's last input,
  where it drops that empty patch (see below).
* Entropy model (``BltPatcher``): a flat transformer with full causal attention (no window), its
  own RoPE base (10,000 by default), full softmax entropy over its 260 outputs: our Transformer
  with ``window`` None and the same ``unused_outputs``.
* Cross-attention residual (``BLTConfig.cross_attn_double_residual``): ``BltCrossAttention``
  returns ``o_proj(attn) + queries`` and both the encoder and the decoder add the queries again,
  so every cross-attention computes ``2·q + attn(norm(q), norm(kv))``.
* Cross-attention layers (``encoder_cross_all_layers`` / ``decoder_cross_all_layers``): separate
  flags (its defaults: encoder last layer only, decoder every layer). With the encoder's flag on,
  it pools and projects every layer's states afresh and overwrites the previous layer's result, so
  only the last layer's cross-attention reaches the output: the import keeps that one (the
  others are dead weights) and sets the flag off.
* Pooling: max over each patch of the encoder states (0 for an empty patch), one projection to k
  queries per patch; the decoder reads the k slots of the patch before its target's. Ours.
* Latent transformer: no final norm (``BLTConfig.latent_norm`` off); its input projection
  ``token_embedding_projection`` is the identity when k·D_E equals D_G (the import writes an
  identity matrix into ``to_latent``).
* Decoder input: the encoder's last states, with no projection (its encoder and decoder widths
  are equal; ours adds one only when they differ).
* MLP widths: ``intermediate_size`` as stored (its default int(8·D/3), not rounded to a multiple):
  the import sets every ``mlp_hidden`` explicitly.
* RoPE: base 500,000 by default for the encoder, decoder and latent (ours: ``rope_theta``, one
  for the three, so the import refuses different ones), rotating interleaved pairs (2i, 2i+1)
  where ours rotates halves (i, i + D/2): the import permutes the query and key rows of every
  self-attention head (even rows first, then odd), which leaves every attention score unchanged.
* Local attention: full causal over the whole stream (no window): the import sets each local
  model's ``window`` to ``max_seq_len`` (its top-level ``max_position_embeddings``), equal below
  that many bytes; beyond it our local models slide that window (the entropy model and the latent
  keep every position, as its own do).
* Norms: RMSNorm, eps from its config, computed in fp32: ours (torch's RMSNorm).

Known differences left as they are:

* With ``max_patch_length`` set, the position after its last input never starts a patch (its
  empty patch is dropped and no length cut falls there), so its logits at a forward's last
  position depend on where the forward ends; ours are causal at every position, and equal to its
  own at every position but that last one (``tests/test_blt_hf_parity.py`` checks both). Without
  ``max_patch_length`` the two agree everywhere, last position included.
* Batches: rows with fewer patches get sentinel patches after their real ones (empty or of
  negative length), which the causal latent model and the decoder's masks keep away from every
  real position: a batch gives each row's own logits, as ours does (checked in the tests).
* Its ``generate`` with its KV cache fails (``DynamicCache(config=BltConfig)`` has no layer
  count in 5.17.0); without the cache it reruns the whole forward per byte.
"""

from __future__ import annotations

import torch

from .tokens import EOS, FIRST_TAG, NUM_BYTES, PAD, VOCAB_SIZE

HF_VOCAB_SIZE = 260  # transformers' BLT: 4 specials, then the 256 bytes
HF_BOE, HF_BOS, HF_EOS, HF_BPE = 0, 1, 2, 3  # its special ids
HF_OFFSET = 4  # byte b is id b + 4

# One prime per hash function, in transformers' order (compute_hash_embeddings).
TRANSFORMERS_PRIMES = (
    1000000007,
    5915587277,
    1500450271,
    3267000013,
    5754853343,
    4093082899,
    9576890767,
    3628273133,
    2860486313,
    5463458053,
    3367900313,
)


def hf_id(polybyte_id: int) -> int:
    """transformers' id for one of ours: byte b -> b + 4, EOS -> EOS, every tag -> BOS, PAD and
    anything before the stream (-1) -> BOE (its left padding)."""
    if 0 <= polybyte_id < NUM_BYTES:
        return polybyte_id + HF_OFFSET
    if polybyte_id == EOS:
        return HF_EOS
    if FIRST_TAG <= polybyte_id < VOCAB_SIZE:
        return HF_BOS
    return HF_BOE


# transformers' embedding row read by each of our input ids
HF_ROW_OF_INPUT = tuple(hf_id(i) for i in range(VOCAB_SIZE))
# our id for each of its 260 output rows: its BOE and BPE onto reserved ids, BOS onto the text tag
OUTPUT_OF_SPECIAL = {HF_BOE: FIRST_TAG + 3, HF_BOS: FIRST_TAG, HF_EOS: EOS, HF_BPE: FIRST_TAG + 4}
OUTPUT_OF_HF_ROW = (*(OUTPUT_OF_SPECIAL[i] for i in range(HF_OFFSET)), *range(NUM_BYTES))
# our ids it has no output for: logit -inf
UNUSED_OUTPUTS = tuple(sorted(set(range(VOCAB_SIZE)) - set(OUTPUT_OF_HF_ROW)))
assert PAD in UNUSED_OUTPUTS and len(UNUSED_OUTPUTS) == VOCAB_SIZE - HF_VOCAB_SIZE


def to_hf_ids(ids: torch.Tensor) -> torch.Tensor:
    """Our ids (and -1 before a stream) [..] -> transformers' ids, long, same shape: ``hf_id``
    elementwise, from scalars only (no host tensor to copy, so it runs inside CUDA-graph capture)."""
    i = ids.long()
    out = torch.where((i >= 0) & (i < NUM_BYTES), i + HF_OFFSET, HF_BOE)
    out = torch.where(i == EOS, HF_EOS, out)
    return torch.where((i >= FIRST_TAG) & (i < VOCAB_SIZE), HF_BOS, out)


def _wrapped_int64(x: int) -> int:
    """x modulo 2^64 as a signed int64 (what torch's int64 arithmetic keeps of it)."""
    x %= 1 << 64
    return x - (1 << 64) if x >= 1 << 63 else x


def transformers_hash_ids(ids: torch.Tensor, sizes: tuple[int, ...], table_size: int, num_functions: int = 1):
    """transformers' hash n-gram rows: our ids [B, T] (-1 = before the stream) -> [B, T, K],
    entry ``[b, t, f·len(sizes) + s]`` = ``Σ_j hid[t-n+1+j]·prime_f^j mod table_size`` with
    ``n = sizes[s]``, ``hid`` its ids (``to_hf_ids``; 0 before the stream), in wrapping int64
    arithmetic as its ``byte_group_hash_function`` computes it."""
    B, T = ids.shape
    n_max = max(sizes)
    hid = torch.cat([ids.new_full((B, n_max - 1), -1), ids], dim=1)
    hid = to_hf_ids(hid)  # [B, n_max-1+T]
    out = []
    for f in range(num_functions):
        prime = TRANSFORMERS_PRIMES[f]
        for n in sizes:
            h = torch.zeros(B, T, dtype=torch.long, device=ids.device)
            for j in range(n):  # the j-th oldest of the n bytes ending at t: column t - n + 1 + j
                start = n_max - n + j
                h = h + hid[:, start : start + T] * _wrapped_int64(prime**j)
            out.append(torch.remainder(h, table_size))
    return torch.stack(out, dim=-1)
