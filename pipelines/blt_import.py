"""`polybyte import blt SRC --out DIR`: a transformers ``BltForCausalLM`` folder (config.json +
*.safetensors, as ``save_pretrained`` writes it or the hub holds it once downloaded) -> a polybyte
export (model.safetensors + config.json + README.md) that `polybyte.load`, `eval`, `sample` and
`fit --model.init_from` read.

Only local files are read: nothing is downloaded and transformers need not be installed. The
model becomes our BLT with the options of ``models/blt_hf.py`` (whose docstring lists every
difference and how it is handled) and its patcher our frozen entropy model. config.json may leave
out any field at transformers 5.17.0's default (``save_pretrained`` writes only what differs):
those defaults are ``DEFAULTS`` below. Errors are one line, exit status 2: a folder that is not a
transformers BLT, one without its entropy model (patcher) weights, tensors whose shapes disagree
with its config, and the few settings our BLT cannot reproduce.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch

from polybyte.models import build_model
from polybyte.models.blt_hf import HF_ROW_OF_INPUT, HF_VOCAB_SIZE, OUTPUT_OF_HF_ROW, UNUSED_OUTPUTS
from polybyte.models.tokens import VOCAB_SIZE

from .checkpoints import one_line

# transformers 5.17.0's defaults (models/blt/configuration_blt.py) for what config.json leaves out
DEFAULTS: dict[str, dict[str, Any]] = {
    "top": dict(
        vocab_size=260,
        max_position_embeddings=4096,
        patch_in_forward=True,
        patch_size=4,
        patching_mode="entropy",
        patching_threshold=1.335442066192627,
        max_patch_length=None,
        cross_attn_k=2,
        encoder_hash_byte_group_size=[3, 4, 5, 6, 7, 8],
        encoder_hash_byte_group_vocab=500002,
        encoder_hash_byte_group_nb_functions=1,
    ),
    "encoder_config": dict(hidden_size=1024, num_attention_heads=16, num_hidden_layers=1, rms_norm_eps=1e-5,
                           cross_attn_all_layers=False, max_position_embeddings=24576, theta=500000.0),
    "decoder_config": dict(hidden_size=1024, num_attention_heads=16, num_hidden_layers=9, rms_norm_eps=1e-5,
                           cross_attn_all_layers=True, max_position_embeddings=24576, theta=500000.0),
    "global_config": dict(hidden_size=2048, num_attention_heads=16, num_hidden_layers=25, rms_norm_eps=1e-5,
                          max_position_embeddings=4096, theta=500000.0),
    "patcher_config": dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=14, rms_norm_eps=1e-5,
                           max_position_embeddings=8192, theta=10000.0),
}  # fmt: skip


class BLTImportError(ValueError):
    """A source folder that cannot become a polybyte BLT (one line)."""


# --- reading the source -------------------------------------------------------------------------
def read_source(src: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json as a dict and every tensor of the folder's *.safetensors (CPU)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not src.is_dir():
        raise BLTImportError(f"{src}: not a folder (pass the folder holding config.json and *.safetensors)")
    config_file = src / "config.json"
    if not config_file.is_file():
        raise BLTImportError(f"{src}: not a transformers BLT folder (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BLTImportError(f"{config_file}: not valid JSON ({one_line(e)})") from None
    if not isinstance(config, dict) or config.get("model_type") != "blt":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise BLTImportError(f"{src}: not a transformers BLT folder (config.json model_type {kind!r}, not 'blt')")
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise BLTImportError(f"{src}: no *.safetensors weights (only safetensors are read, never pickles)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise BLTImportError(f"{f}: unreadable safetensors file ({one_line(e)})") from None
    return config, state


def _part(config: dict[str, Any], name: str) -> dict[str, Any]:
    """A sub-config with transformers' defaults filled in; ``theta`` its RoPE base."""
    given = config.get(name) or {}
    if not isinstance(given, dict):
        raise BLTImportError(f"config.json {name}: expected an object of settings, got {type(given).__name__}")
    part = {**DEFAULTS[name], **{k: v for k, v in given.items() if v is not None}}
    rope = given.get("rope_parameters") or {}  # each part's own (the top-level one is not inherited)
    if given.get("rope_theta") is not None:  # configs written before rope_parameters
        rope = {"rope_theta": given["rope_theta"], **rope}
    if rope.get("rope_type", "default") != "default" or given.get("rope_scaling"):
        raise BLTImportError(f"{name}: RoPE type {rope.get('rope_type')!r} is not supported (only 'default')")
    part["theta"] = float(rope.get("rope_theta", DEFAULTS[name]["theta"]))
    part["num_key_value_heads"] = given.get("num_key_value_heads") or part["num_attention_heads"]
    return part


def _top(config: dict[str, Any]) -> dict[str, Any]:
    return {**DEFAULTS["top"], **{k: v for k, v in config.items() if k in DEFAULTS["top"] and v is not None}}


# --- the mapping --------------------------------------------------------------------------------
def blt_config(config: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Our BLT config (a dict for ``build_model``) for a transformers BLT config.json; sizes that
    config.json does not fix (MLP widths) are read from the tensors."""
    top = _top(config)
    enc, dec, glob = _part(config, "encoder_config"), _part(config, "decoder_config"), _part(config, "global_config")
    if (
        not top["patch_in_forward"]
        or top["patching_mode"] != "entropy"
        or not any(k.startswith("model.patcher.") for k in state)
    ):
        raise BLTImportError(
            "no entropy model: this BLT has no patcher weights (model.patcher.*) or patches without one "
            f"(patch_in_forward {top['patch_in_forward']}, patching_mode {top['patching_mode']!r}); "
            "polybyte imports BLTs with their entropy patcher"
        )
    pat = _part(config, "patcher_config")
    if top["vocab_size"] != HF_VOCAB_SIZE:
        raise BLTImportError(f"vocab_size {top['vocab_size']}: only transformers' byte vocabulary of {HF_VOCAB_SIZE}")
    if enc["hidden_size"] != dec["hidden_size"]:
        raise BLTImportError(f"encoder width {enc['hidden_size']} != decoder width {dec['hidden_size']}")
    if len({enc["theta"], dec["theta"], glob["theta"]}) > 1:
        raise BLTImportError(
            f"RoPE bases differ (encoder {enc['theta']}, decoder {dec['theta']}, global {glob['theta']})"
        )
    for name, part in (("encoder_config", enc), ("decoder_config", dec)):
        if part["num_key_value_heads"] != part["num_attention_heads"]:
            raise BLTImportError(f"{name}: grouped-query attention in a local model is not supported")
        if part.get("cross_attn_k", top["cross_attn_k"]) != top["cross_attn_k"]:
            raise BLTImportError(
                f"{name}: cross_attn_k {part['cross_attn_k']} differs from the top-level {top['cross_attn_k']}"
            )
    for name, part in (("encoder_config", enc), ("decoder_config", dec), ("global_config", glob)):
        if part.get("hidden_act", "silu") != "silu":
            raise BLTImportError(f"{name}: hidden_act {part['hidden_act']!r} is not supported (only 'silu')")
    if len({enc["rms_norm_eps"], dec["rms_norm_eps"], glob["rms_norm_eps"]}) > 1:
        raise BLTImportError(
            f"rms_norm_eps differs (encoder {enc['rms_norm_eps']}, decoder {dec['rms_norm_eps']}, "
            f"global {glob['rms_norm_eps']}): our BLT takes one"
        )
    T = int(top["max_position_embeddings"])

    def hidden(prefix: str) -> int:
        key = f"{prefix}.layers.0.mlp.gate_proj.weight"
        if key not in state:
            raise BLTImportError(f"missing tensor {key}")
        return int(state[key].shape[0])

    def stack(part, prefix, **extra):  # one transformer part's sizes, its MLP width from the tensors
        return dict(
            dim=part["hidden_size"],
            n_layers=part["num_hidden_layers"],
            n_heads=part["num_attention_heads"],
            mlp_hidden=hidden(prefix),
            **extra,
        )

    pl = top["max_patch_length"]
    return dict(
        backbone="blt",
        max_seq_len=T,
        patcher=dict(
            kind="entropy",
            patch_size=int(top["patch_size"]),
            threshold=float(top["patching_threshold"]),
            max_patch_len=None if pl is None else int(pl),
            first_patch_len_one=False,
            split_after_special=False,
        ),
        hash_ngrams=dict(
            sizes=list(top["encoder_hash_byte_group_size"]),
            table_size=int(top["encoder_hash_byte_group_vocab"]),
            num_functions=int(top["encoder_hash_byte_group_nb_functions"]),
            style="transformers",
        ),
        encoder=stack(enc, "model.local_encoder", window=T),
        latent=stack(glob, "model.global_transformer", n_kv_heads=glob["num_key_value_heads"]),
        decoder=stack(dec, "model.local_decoder", window=T),
        cross_attn_k=int(top["cross_attn_k"]),
        cross_attn_all_layers=True,
        encoder_cross_all_layers=False,  # only its last cross-attention reaches the output (blt_hf.py)
        decoder_cross_all_layers=bool(dec["cross_attn_all_layers"]),
        cross_attn_double_residual=True,
        latent_norm=False,
        unused_outputs=list(UNUSED_OUTPUTS),
        entropy_model=stack(
            pat,
            "model.patcher",
            n_kv_heads=pat["num_key_value_heads"],
            rope_theta=pat["theta"],
            max_seq_len=int(pat["max_position_embeddings"]),
            window=None,
            norm_eps=float(pat["rms_norm_eps"]),
            unused_outputs=list(UNUSED_OUTPUTS),
        ),
        rope_theta=enc["theta"],
        norm_eps=float(enc["rms_norm_eps"]),
    )


def _rope_rows(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Query/key rows [H·Dh, D] of interleaved-pair RoPE reordered for rotate-half RoPE: in every
    head, the even rows, then the odd ones (attention scores unchanged)."""
    perm = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return w.view(-1, head_dim, w.shape[-1])[:, perm].reshape(w.shape)


def convert_state(hf: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """transformers BLT tensors -> our BLT's state dict keys (projections apart: wq/wk/wv and
    w1/w3, which our modules fuse on load). Raises BLTImportError for a missing tensor."""
    used: set[str] = set()

    def get(key: str) -> torch.Tensor:
        if key not in hf:
            raise BLTImportError(f"missing tensor {key}")
        used.add(key)
        return hf[key]

    out: dict[str, torch.Tensor] = {}

    def block(dst: str, src: str, head_dim: int) -> None:
        a = f"{src}.self_attn"
        out[f"{dst}.attn.wq.weight"] = _rope_rows(get(f"{a}.q_proj.weight"), head_dim)
        out[f"{dst}.attn.wk.weight"] = _rope_rows(get(f"{a}.k_proj.weight"), head_dim)
        out[f"{dst}.attn.wv.weight"] = get(f"{a}.v_proj.weight")
        out[f"{dst}.attn.wo.weight"] = get(f"{a}.o_proj.weight")
        out[f"{dst}.mlp.w1.weight"] = get(f"{src}.mlp.gate_proj.weight")
        out[f"{dst}.mlp.w3.weight"] = get(f"{src}.mlp.up_proj.weight")
        out[f"{dst}.mlp.w2.weight"] = get(f"{src}.mlp.down_proj.weight")
        out[f"{dst}.attn_norm.weight"] = get(f"{src}.input_layernorm.weight")
        out[f"{dst}.mlp_norm.weight"] = get(f"{src}.post_attention_layernorm.weight")

    def cross(dst: str, src: str) -> None:
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            out[f"{dst}.attn.{ours}.weight"] = get(f"{src}.{theirs}.weight")
        out[f"{dst}.q_norm.weight"] = get(f"{src}.q_norm.weight")
        out[f"{dst}.kv_norm.weight"] = get(f"{src}.k_norm.weight")

    rows_in = torch.tensor(HF_ROW_OF_INPUT)
    rows_out = torch.zeros(VOCAB_SIZE, dtype=torch.long)
    rows_out[list(OUTPUT_OF_HF_ROW)] = torch.arange(HF_VOCAB_SIZE)

    def head(w: torch.Tensor) -> torch.Tensor:  # our 264 output rows; unused ones are masked to -inf
        full = w[rows_out].clone()
        full[list(UNUSED_OUTPUTS)] = 0.0
        return full

    E, Dd, G, P = cfg["encoder"], cfg["decoder"], cfg["latent"], cfg["entropy_model"]
    enc, dec, glob, pat = "model.local_encoder", "model.local_decoder", "model.global_transformer", "model.patcher"
    out["embed.byte_embed.weight"] = get(f"{enc}.embed_tokens.weight")[rows_in]
    out["embed.hash_embed.weight"] = get("model.encoder_hash_tok_embedding.weight")
    for i in range(E["n_layers"]):
        block(f"enc_blocks.{i}", f"{enc}.layers.{i}", E["dim"] // E["n_heads"])
    out["pool_proj.weight"] = get(f"{enc}.patch_embedding_projection.weight")
    n_enc_cross = sum(1 for k in hf if k.startswith(f"{enc}.cross_attn_layers.") and k.endswith(".q_proj.weight"))
    for k in [k for k in hf if k.startswith(f"{enc}.cross_attn_layers.")]:
        used.add(k)  # all but the last are overwritten inside its encoder: dead weights (blt_hf.py)
    cross("enc_cross.0", f"{enc}.cross_attn_layers.{max(n_enc_cross - 1, 0)}")
    proj = f"{glob}.token_embedding_projection.weight"
    k_dim = cfg["cross_attn_k"] * E["dim"]
    identity = proj not in hf and k_dim == G["dim"]  # its projection is nn.Identity then
    out["to_latent.weight"] = torch.eye(k_dim) if identity else get(proj)
    for i in range(G["n_layers"]):
        block(f"latent_blocks.{i}", f"{glob}.layers.{i}", G["dim"] // G["n_heads"])
    out["to_decoder.weight"] = get(f"{dec}.patch_embedding_projection.weight")
    n_dec_cross = Dd["n_layers"] if cfg["decoder_cross_all_layers"] else 1
    for i in range(n_dec_cross):
        cross(f"dec_cross.{i}", f"{dec}.cross_attn_layers.{i}")
    for i in range(Dd["n_layers"]):
        block(f"dec_blocks.{i}", f"{dec}.layers.{i}", Dd["dim"] // Dd["n_heads"])
    out["dec_norm.weight"] = get(f"{dec}.norm.weight")
    out["head.weight"] = head(get("lm_head.weight"))
    out["entropy_model.embed.weight"] = get(f"{pat}.embed_tokens.weight")[rows_in]
    for i in range(P["n_layers"]):
        block(f"entropy_model.blocks.{i}", f"{pat}.layers.{i}", P["dim"] // P["n_heads"])
    out["entropy_model.norm.weight"] = get(f"{pat}.norm.weight")
    out["entropy_model.head.weight"] = head(get(f"{pat}.lm_head.weight"))
    stray = sorted(set(hf) - used)
    if stray:
        raise BLTImportError(
            f"{len(stray)} tensors this config does not use, e.g. {stray[0]} (a config unlike its weights)"
        )
    return {k: v.float() for k, v in out.items()}


def import_blt(src, out) -> Path:
    """Convert the transformers BLT folder ``src`` into a polybyte export at ``out``; returns it."""
    from polybyte.modalities import get_modality

    from .export import save_exported

    src = Path(src)
    config, hf = read_source(src)
    cfg = blt_config(config, hf)
    try:
        model = build_model(dict(cfg))
    except (ValueError, TypeError) as e:  # TypeError: a setting of the wrong type, e.g. "2" for 2
        raise BLTImportError(f"{src}/config.json: settings our BLT cannot take ({one_line(e)})") from None
    try:
        model.load_state_dict(convert_state(hf, cfg))
    except RuntimeError as e:  # shapes unlike the config's (in the RoPE row permutation or the load)
        raise BLTImportError(f"{src}: tensor shapes do not match its config.json ({_shape_error(e)})") from None
    info_extra = {"source": {"format": "transformers BltForCausalLM", "path": str(src.resolve())}}
    licence = _licence(src)
    if licence:
        info_extra["license"] = licence
    settings = {"text": get_modality("text").settings_dict()}
    return save_exported(out, model, settings, info_extra)


def _shape_error(e: RuntimeError) -> str:
    found = re.search(r"size mismatch for [^\n]*", str(e))
    return found.group(0).strip().rstrip(".") if found else one_line(e)


def _licence(src: Path) -> str | None:
    """The licence named in the source's model card front matter (README.md), if any:
    ``license_name`` when ``license`` is ``other`` (facebook/blt: fair-noncommercial-research-license)."""
    card = src / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(errors="replace")
    front = re.match(r"---\n(.*?)\n---", text, re.S)
    if not front:
        return None
    fields = dict(re.findall(r"^(license(?:_name)?):\s*(\S+)\s*$", front.group(1), re.M))
    licence = fields.get("license")
    return fields.get("license_name", licence) if licence == "other" else licence


PARTS = ("encoder", "latent", "decoder", "entropy_model")  # widths x depths printed after an import


# --- command line -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polybyte import", description=__doc__.split("\n\n")[0])
    p.add_argument("format", choices=["blt"], help="what SRC holds: blt = a transformers BltForCausalLM folder")
    p.add_argument("src", type=Path, help="the folder: config.json + *.safetensors (local files only)")
    p.add_argument("--out", type=Path, required=True, help="the polybyte export folder to write")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = import_blt(args.src, args.out)
    except (ValueError, OSError) as e:  # OSError: an --out that cannot be written, e.g. under a file
        print(f"polybyte import: error: {one_line(e)}", file=sys.stderr)
        return 2
    info = json.loads((out / "config.json").read_text())
    m = info["model"]
    shape = ", ".join(f"{part} {m[part]['dim']}x{m[part]['n_layers']}" for part in PARTS)
    print(f"polybyte import: {args.src} -> {out} (BLT: {shape}; threshold {m['patcher']['threshold']:.4g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
