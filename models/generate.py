"""Batched autoregressive sampling with caches, for every backbone.

``generate(model, modality, prompts, max_bytes, ...)`` returns each row's new ids. Rows are
left-aligned: every row of the batch sits at the same byte position ``t``. The common prefix of
the prompts goes through the backbone's ``prefill`` in one call; after it, a row whose prompt is
longer is teacher-forced (its prompt byte is fed instead of the sample) while the other rows
sample. Rows never see each other, so this equals decoding each row on its own.

Every backbone decodes through the protocol of ``models/base.py``, wrapped in a small decoder
object with two calls, ``prefill(ids [B, n]) -> logits [B, n+1, V]`` and ``step(prev [B]) ->
logits [B, V]``:

* every backbone: ``new_state`` / ``prefill`` / ``step`` on the model (flat transformer: per-layer
  KV caches; MEGABYTE: global model once per patch, local model once per byte; BLT: every stage
  once per byte, the latent step kept only by the rows that close a patch; see their modules);
* block decoders (``decode_block_size`` set: every shipped backbone), once no row is inside its
  prompt (and at a multiple of the block): ``new_block_state`` / ``prepare_block`` /
  ``decode_block``, a block of bytes per call with sampling inside (MEGABYTE: one patch; BLT and
  the flat transformer: 16 bytes), which on CUDA is one replay of a captured CUDA graph;
* ``use_cache=False``: every step reruns the full forward over the whole prefix — the reference
  that tests compare the caches against and ``polybyte bench --what sample`` times.

Sampling forbids PAD and the modality tags (only bytes 0..255 and EOS can be produced; EOS only
while ``stop_at_eos``, so fixed-size payloads such as images always come out whole).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from .base import ByteLM
from .tokens import EOS, NUM_BYTES

# Only bytes and EOS are ever sampled: PAD and the tags never are
CHECK_EVERY = 32  # steps between host syncs that test whether every row has stopped at EOS


def generate(
    model: ByteLM,
    modality: torch.Tensor | int,
    prompts: Sequence[bytes | Sequence[int]] | None = None,
    max_bytes: int = 256,
    *,
    num: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eos: bool = True,
    use_cache: bool = True,
    cuda_graphs: bool = True,
    progress: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Sample up to ``max_bytes`` new ids after each prompt.

    model: any ByteLM backbone (eval mode is the caller's choice; sampling runs without grad).
    modality: the tag id (258 text, 259 image, 260 audio) for every row, or a LongTensor [B].
    prompts: one prompt per row (bytes or ids, lengths may differ, may be empty); None means
      ``num`` empty prompts.
    temperature: softmax temperature; 0 is greedy (argmax), as is ``top_k=1``.
    top_k / top_p: keep the k most likely ids / the smallest set whose probability reaches p.
    seed: seeds a generator of its own (reproducible samples); None uses torch's global RNG.
    stop_at_eos: a row stops after sampling EOS (not included in its output); False forbids EOS,
      so every row gets exactly ``max_bytes`` bytes.
    cuda_graphs: on CUDA, decode a block at a time (MEGABYTE: a patch; BLT, flat transformer: 16
      bytes) from one captured CUDA graph (same numbers, one launch per block instead of
      thousands of kernel launches).
    progress: called now and then with the number of bytes generated since its last call.
    Returns one list of new ids (0..255) per row. Runs under autocast if the caller enables it.
    """
    if prompts is None:
        if num is None:
            raise ValueError("pass prompts (one per row) or num (that many empty prompts)")
        prompts = [b""] * num
    elif num is not None and num != len(prompts):
        raise ValueError(f"num={num} but {len(prompts)} prompts given")
    if not prompts:
        raise ValueError("need at least one row: pass a non-empty list of prompts or num >= 1")
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    rows = [list(p) for p in prompts]
    for i, r in enumerate(rows):
        if r and not 0 <= min(r) <= max(r) < vocab:
            raise ValueError(f"prompt {i} holds ids outside 0..{vocab - 1}")
        if model.config.pad_id in r:  # BLT's decoding state bounds patch lengths, which PAD breaks
            raise ValueError(f"prompt {i} holds PAD ({model.config.pad_id}): padding is never inside a stream")
    B = len(rows)
    modality = _modality_tensor(modality, B, device)
    lengths = [len(r) for r in rows]
    shortest, longest = min(lengths), max(lengths)
    total = longest + max_bytes  # positions the batch runs through
    if max_bytes == 0:
        return [[] for _ in rows]

    # ids[:, t] = prompt byte (forced) or sample; PAD beyond each prompt until sampled
    ids = torch.full((B, total), model.config.pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    ids = ids.to(device)
    prompt_len = torch.tensor(lengths, device=device)
    row_end = prompt_len + max_bytes  # a row is done at this position, or after sampling EOS
    allowed = torch.zeros(vocab, dtype=torch.bool, device=device)
    allowed[:NUM_BYTES] = True
    allowed[EOS] = stop_at_eos
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    sample = _Sampler(allowed, temperature, top_k, top_p, generator)

    with torch.no_grad():
        dec = make_decoder(model, modality, total, use_cache=use_cache, cuda_graphs=cuda_graphs, sample=sample)
        finished = torch.zeros(B, dtype=torch.bool, device=device)  # sampled EOS already
        reported = shortest  # position up to which progress was reported
        block = dec.block  # bytes per decode_block call (MEGABYTE: one patch); 0: none

        def checkpoint(t: int) -> bool:
            """Report progress up to position t; True when every row is done."""
            nonlocal reported
            if progress is not None:
                progress(_active_until(lengths, max_bytes, t) - _active_until(lengths, max_bytes, reported))
            reported = t
            return t >= total or (stop_at_eos and bool((finished | (row_end <= t)).all()))

        # byte by byte: prompts (forced bytes) and up to the first multiple of the block
        logits = dec.prefill(ids[:, :shortest])[:, -1]  # [B, V]: distribution of byte `shortest`
        t = shortest  # position of the next byte to fix
        done = False
        while not done:
            nxt = sample(logits)
            if t < longest:  # some rows are still inside their prompt: feed that byte instead
                nxt = torch.where(prompt_len > t, ids[:, t], nxt)
            ids[:, t] = nxt
            if stop_at_eos:
                finished |= (nxt == EOS) & (prompt_len <= t)
            t += 1
            done = (t == total or (t - shortest) % CHECK_EVERY == 0) and checkpoint(t)
            if done or (block and t >= longest and t % block == 0):
                break
            logits = dec.step(nxt)
        # a whole block per call (sampling included), once no row is inside its prompt
        while not done:
            for _ in range(-(-CHECK_EVERY // block)):
                out = dec.decode_block(nxt)  # [B, block]: bytes t .. t+block-1
                nxt = out[:, -1]
                n = min(block, total - t)  # the last block may run past total: dropped
                ids[:, t : t + n] = out[:, :n]
                if stop_at_eos:
                    finished |= (out == EOS).any(-1)
                t += n
                if t == total:
                    break
            done = checkpoint(t)

    out = []
    for i, row in enumerate(ids[:, :t].tolist()):
        new = row[lengths[i] : lengths[i] + max_bytes]
        if EOS in new:
            new = new[: new.index(EOS)]
        out.append(new)
    return out


def _active_until(lengths: list[int], max_bytes: int, t: int) -> int:
    """Bytes generated over all rows once positions < t are done (EOS early stops not subtracted)."""
    return sum(min(max(t - n, 0), max_bytes) for n in lengths)


def _modality_tensor(modality: torch.Tensor | int, B: int, device) -> torch.Tensor:
    if isinstance(modality, int):
        return torch.full((B,), modality, dtype=torch.long, device=device)
    modality = torch.as_tensor(modality, dtype=torch.long, device=device)
    if modality.dim() == 0:
        return modality.expand(B).clone()
    if modality.shape != (B,):
        raise ValueError(f"modality must be an int or a tensor [B]=[{B}], got shape {tuple(modality.shape)}")
    return modality


# --- sampling ---------------------------------------------------------------------------------
class _Sampler:
    """logits [B, V] -> next ids [B] with specials masked, temperature, top-k and top-p.

    Draws by the Gumbel-max trick, argmax(logits/T + Gumbel noise), which samples softmax(logits/T)
    exactly with device-only kernels: no host sync (torch.multinomial has one), so a CUDA graph
    can hold it. The uniform noise [B, V] comes from the sampler's generator, or from the caller
    (a graph's static buffer, refilled before each replay with ``refill``).
    """

    def __init__(self, allowed: torch.Tensor, temperature: float, top_k, top_p, generator) -> None:
        self.blocked = ~allowed
        self.greedy = temperature == 0 or top_k == 1
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator

    def refill(self, noise: torch.Tensor) -> None:
        """New uniform noise in place (nothing to do when greedy)."""
        if not self.greedy:
            noise.uniform_(generator=self.generator)

    def __call__(self, logits: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        logits = logits.float().masked_fill(self.blocked, -torch.inf)
        if self.greedy:
            return logits.argmax(-1)
        logits = logits / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]  # [B, 1]
            logits = logits.masked_fill(logits < kth, -torch.inf)
        if self.top_p is not None and self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            # drop an id once the more likely ones already reach p (the most likely always stays)
            drop_sorted = probs.cumsum(-1) - probs >= self.top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
            logits = logits.masked_fill(drop, -torch.inf)
        if noise is None:
            noise = torch.rand(logits.shape, device=logits.device, generator=self.generator)
        gumbel = -(-noise.clamp_min(torch.finfo(torch.float32).tiny).log()).log()
        return (logits + gumbel).argmax(-1)


# --- per-backbone incremental decoders ----------------------------------------------------------
def make_decoder(
    model: ByteLM,
    modality: torch.Tensor,
    max_len: int,
    use_cache: bool = True,
    cuda_graphs: bool = False,
    sample: _Sampler | None = None,
):
    """A decoder for B = len(modality) rows able to run ``max_len`` positions (prompt included).

    Returns an object with ``prefill(ids [B, n]) -> logits [B, n+1, V]`` (call once, first; n may
    be 0) and ``step(prev [B]) -> logits [B, V]`` (the next position, given the byte just fixed).
    Block decoders (``model.decode_block_size`` set), given a sampler ``sample``,
    also decode a block of bytes per call (sampling included): ``block`` = the model's
    ``decode_block_size`` (0 for the others) and ``decode_block(prev [B]) -> bytes [B, block]``,
    from a CUDA graph on CUDA when ``cuda_graphs``.
    """
    if not use_cache:
        return _FullForward(model, modality, max_len)
    if model.decode_block_size is not None and sample is not None:
        if cuda_graphs and modality.device.type == "cuda":
            return _BlockGraph(model, modality, max_len, sample)
        return _Blocks(model, modality, max_len, sample)
    return _Stateful(model, modality, max_len)


def _cache_dtype(model: ByteLM) -> torch.dtype:
    """Caches hold what attention computes in: the autocast dtype if autocast is on."""
    device_type = next(model.parameters()).device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return next(model.parameters()).dtype


class _Stateful:
    """Any backbone, one position per call: ``new_state``, ``prefill(state, ids)``, ``step(state, prev)``."""

    block = 0  # no block decoding

    def __init__(self, model: ByteLM, modality: torch.Tensor, max_len: int) -> None:
        self.model = model
        self.state = self._new_state(model, modality, max_len)

    @staticmethod
    def _new_state(model: ByteLM, modality: torch.Tensor, max_len: int):
        return model.new_state(modality, max_len, dtype=_cache_dtype(model))

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.prefill(self.state, ids)

    def step(self, prev: torch.Tensor) -> torch.Tensor:
        return self.model.step(self.state, prev)


class _Blocks(_Stateful):
    """A block decoder after the prompt: ``decode_block_size`` bytes per ``decode_block`` call
    (the model's ``prepare_block`` then ``decode_block``, sampling included; MEGABYTE: one
    patch). The state is sized to whole blocks: the last one may run past ``max_len``
    (dropped), and it is the model's ``new_block_state``, whose caches have fixed shapes (what
    CUDA graphs and torch.compile need). The block's sampling noise [n, B, V] is drawn at once into a buffer
    (a CUDA graph's input)."""

    def __init__(self, model, modality: torch.Tensor, max_len: int, sample: _Sampler) -> None:
        self.block = n = model.decode_block_size
        super().__init__(model, modality, -(-max_len // n) * n)
        self.sample = sample
        self.noise = torch.zeros(n, len(modality), model.config.vocab_size, device=modality.device, dtype=torch.float32)

    @staticmethod
    def _new_state(model: ByteLM, modality: torch.Tensor, max_len: int):
        return model.new_block_state(modality, max_len, dtype=_cache_dtype(model))

    def decode_block(self, prev: torch.Tensor) -> torch.Tensor:
        # host-side checks and cache growth before anything runs (a graph replay does neither)
        moved = self.model.prepare_block(self.state)
        self.sample.refill(self.noise)
        return self._run(prev, moved)

    def _run(self, prev: torch.Tensor, moved: bool = False) -> torch.Tensor:
        return self.model.decode_block(self.state, prev, lambda logits, j: self.sample(logits, self.noise[j]))


class _BlockGraph(_Blocks):
    """On CUDA: ``decode_block`` (MEGABYTE: global step, P local steps and P samplings, ~1,000
    small kernels for the base model; BLT: 16 bytes of entropy model, encoder, latent step and
    decoder) captured once as a CUDA graph and replayed for every later block; the host then
    launches one graph per block instead of every kernel, which otherwise bounds decoding. The
    caches keep their fill level on the device so that the same graph serves every block;
    inputs (the previous byte, the noise) and the output live in static buffers. The first
    block runs eagerly (warm-up: cuBLAS handles, workspaces), the second is captured. When the
    model reallocates its caches (BLT's latent caches grow), the graph is dropped and the same
    two steps repeat."""

    def __init__(self, model, modality: torch.Tensor, max_len: int, sample: _Sampler) -> None:
        super().__init__(model, modality, max_len, sample)
        self.prev = torch.zeros(len(modality), dtype=torch.long, device=modality.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        self.warmed_up = False

    def _block(self) -> torch.Tensor:
        """What the graph holds: one block from the static buffers, its last byte fed back."""
        out = super()._run(self.prev)
        self.prev.copy_(out[:, -1])
        return out

    def _run(self, prev: torch.Tensor, moved: bool = False) -> torch.Tensor:
        state, t = self.state, self.state.pos
        self.prev.copy_(prev)
        if moved:  # the graph reads buffers that no longer exist
            self.graph, self.out, self.warmed_up = None, None, False
        if not self.warmed_up:
            self.warmed_up = True
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), _autocast_without_cache():  # as captured (compile guards)
                out = self._block()
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with _autocast_without_cache(), torch.cuda.graph(self.graph):
                self.out = self._block()
            state.pos = t  # the capture recorded this block without running it: replayed below
        self.graph.replay()
        state.pos = t + self.block
        return self.out


def _autocast_without_cache():
    """Autocast's cast cache would hold weights cast outside the graph: capture without it."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


class _FullForward:
    """No cache: every position reruns ``model(ids, modality)`` over the whole prefix.

    The prefix is PAD-filled up to a multiple of the backbone's ``seq_multiple`` (MEGABYTE needs
    whole patches); causality makes the padding invisible to the logits read.
    """

    block = 0  # no block decoding

    def __init__(self, model, modality: torch.Tensor, max_len: int) -> None:
        self.model, self.modality = model, modality
        self.multiple = model.seq_multiple
        padded = -(-max_len // self.multiple) * self.multiple
        self.ids = torch.full((len(modality), padded), model.config.pad_id, dtype=torch.long, device=modality.device)
        self.t = 0  # position whose logits the next call returns

    def _forward(self, n: int) -> torch.Tensor:
        """Logits [B, n, V] of positions 0..n-1."""
        L = -(-n // self.multiple) * self.multiple
        return self.model(self.ids[:, :L], self.modality)[:, :n]

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        self.ids[:, :n] = ids
        self.t = n
        return self._forward(n + 1)

    def step(self, prev: torch.Tensor) -> torch.Tensor:
        self.ids[:, self.t] = prev
        self.t += 1
        return self._forward(self.t + 1)[:, -1]
