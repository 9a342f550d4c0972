"""The reference implementations `polybyte bench --what train --peers` times beside ours, built at
the shapes of a polybyte config: lucidrains' MEGABYTE (PyPI ``megabyte-pytorch``) and
transformers' ``BltForCausalLM``. Both come with the ``bench`` extra and are imported only here,
on use. Each is wrapped to take ``(ids, modality)`` and return logits, as our models do.
"""

from __future__ import annotations

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
