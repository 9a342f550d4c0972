"""The reference implementations `polybyte bench --peers` times beside ours. `--what train`: at
the shapes of a polybyte config, lucidrains' MEGABYTE (PyPI ``megabyte-pytorch``) and
transformers' ``BltForCausalLM``, each wrapped to take ``(ids, modality)`` and return logits, as
our models do. `--what sample`: a transformers BLT (a folder, or random weights at BLT-1B's
shapes) and its own ``generate`` beside our import of it. The packages come with the ``bench``
extra (transformers with the ``test`` extra too) and are imported only here, on use.
"""

from __future__ import annotations

import time

import torch

PEER_MODULES = {"megabyte": "MEGABYTE_pytorch", "blt": "transformers"}  # import names of the peers
PEER_NAMES = {"megabyte": "lucidrains MEGABYTE", "blt": "transformers BLT"}


def missing_peers() -> list[str]:
    """Import names of the peer packages (the ``bench`` extra) that are not installed."""
    import importlib.util

    return [m for m in PEER_MODULES.values() if importlib.util.find_spec(m) is None]


def lucidrains_megabyte(config) -> torch.nn.Module:
    """lucidrains' ``MEGABYTE`` (PyPI megabyte-pytorch) at a polybyte MEGABYTE config's shapes:
    global width P·D_G over seq_len/P patches, local width D_L over P bytes, the same depths, head
    dim of the global model (its heads for both stages), a 4x MLP (the parameters of our SwiGLU).
    ``forward(ids)`` returns logits [B, T, V] (flash attention, SDPA)."""
    from MEGABYTE_pytorch import MEGABYTE

    c = config
    Wg = c.patch_size * c.global_dim
    net = MEGABYTE(
        num_tokens=c.vocab_size,
        dim=(Wg, c.local_dim),
        depth=(c.global_layers, c.local_layers),
        max_seq_len=(c.max_seq_len // c.patch_size, c.patch_size),
        dim_head=Wg // c.global_heads,
        heads=c.global_heads,
        ff_mult=4,
        pad_id=c.pad_id,
        flash_attn=True,
    )

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, ids, modality):
            return self.net(ids)

    return Logits()


def transformers_blt(config) -> torch.nn.Module:
    """transformers' ``BltForCausalLM`` at a polybyte BLT config's shapes (encoder, latent and
    decoder widths, depths, heads and MLP widths; hash n-gram sizes and table size; k), SDPA
    attention. Its patcher is off: ``forward`` passes strided patch lengths of
    ``patcher.patch_size`` (our entropy threshold is calibrated to that mean), so its entropy
    model never runs — ours does, inside our step."""
    from transformers import BltConfig, BltForCausalLM

    from polybyte.models.layers import swiglu_hidden

    c, T, k = config, config.max_seq_len, config.cross_attn_k

    def local(m, **extra):
        return dict(
            hidden_size=m.dim,
            num_attention_heads=m.n_heads,
            num_hidden_layers=m.n_layers,
            intermediate_size=m.mlp_hidden or swiglu_hidden(m.dim),
            max_position_embeddings=T,
            vocab_size=c.vocab_size,
            cross_attn_k=k,
            hidden_size_global=c.latent.dim,
            **extra,
        )

    G = c.latent
    hf = BltConfig(
        vocab_size=c.vocab_size,
        max_position_embeddings=T,
        patch_in_forward=False,
        patch_size=c.patcher.patch_size,
        cross_attn_k=k,
        encoder_hash_byte_group_size=list(c.hash_ngrams.sizes),
        encoder_hash_byte_group_vocab=c.hash_ngrams.table_size,
        encoder_hash_byte_group_nb_functions=c.hash_ngrams.num_functions,
        encoder_config=local(c.encoder),
        decoder_config=local(c.decoder),
        global_config=dict(
            hidden_size=G.dim,
            num_attention_heads=G.n_heads,
            num_hidden_layers=G.n_layers,
            intermediate_size=G.mlp_hidden or swiglu_hidden(G.dim),
            max_position_embeddings=T,
        ),
    )
    hf._attn_implementation = "sdpa"
    net = BltForCausalLM(hf)
    P = c.patcher.patch_size

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, ids, modality):
            B, T = ids.shape
            lengths = torch.full((B, -(-T // P)), P, dtype=torch.long, device=ids.device)
            lengths[:, -1] = T - P * (lengths.shape[1] - 1)
            return self.net(input_ids=ids, patch_lengths=lengths, use_cache=False).logits

    return Logits()


# --- sampling: an imported transformers BLT beside its own generate() ----------------------------
TRANSFORMERS_BLT = "transformers-blt"  # bench spec: random weights at transformers' default BltConfig (BLT-1B's shapes)


def is_transformers_blt(spec: str) -> bool:
    """``spec`` names a transformers BLT: ``TRANSFORMERS_BLT`` or a folder whose config.json says ``blt``."""
    import json
    from pathlib import Path

    config = Path(spec) / "config.json"
    if spec == TRANSFORMERS_BLT:
        return True
    try:
        return config.is_file() and json.loads(config.read_text()).get("model_type") == "blt"
    except (ValueError, AttributeError):  # not JSON, or not an object: not one
        return False


def transformers_blt_pair(spec: str, device: torch.device):
    """``(ours, theirs)``: transformers' ``BltForCausalLM`` for ``spec`` (see ``is_transformers_blt``)
    and our BLT with its weights, converted in memory as `polybyte import blt` converts them."""
    from pathlib import Path

    import transformers

    from polybyte.models import build_model

    from .blt_import import blt_config, convert_state, read_source

    torch.manual_seed(0)
    if spec == TRANSFORMERS_BLT:
        with torch.device(device):  # initialised where it runs: BLT-1B's 4.5B parameters in seconds
            hf = transformers.BltForCausalLM(transformers.BltConfig())
        config, state = hf.config.to_dict(), hf.state_dict()
    else:
        config, state = read_source(Path(spec))
        hf = transformers.BltForCausalLM.from_pretrained(spec, local_files_only=True).to(device)
    cfg = blt_config(config, state)
    with torch.device(device):
        ours = build_model(dict(cfg))
    ours.load_state_dict(convert_state(state, cfg))
    return ours.eval(), hf.eval()


def time_transformers_generate(hf, batch_size: int, n: int) -> float:
    """Seconds for transformers' greedy ``generate`` of ``n`` bytes for ``batch_size`` rows from BOS
    (``use_cache=False``: its cached path fails in 5.17.0; its specials suppressed, as ours never
    samples them), after a 2-byte warm-up."""
    ids = torch.ones(batch_size, 1, dtype=torch.long, device=hf.device)  # its BOS
    cuda = hf.device.type == "cuda"

    def run(k: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(
                ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, use_cache=False, suppress_tokens=[0, 1, 2, 3]
            )
        if cuda:
            torch.cuda.synchronize()
        assert out.shape == (batch_size, 1 + k), out.shape
        return time.perf_counter() - start

    run(2)
    return run(n)
