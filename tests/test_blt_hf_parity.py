"""Parity with transformers' own ``BltForCausalLM``: small randomly initialised models are saved
with ``save_pretrained``, imported with ``polybyte import blt`` and compared with the library on
real bytes (tinyshakespeare and an ImageNet 64x64 payload): the same patch boundaries, the same
logits (fp32, max abs diff <= 1e-4) and the same greedy continuation as its ``generate``.

Its ``generate`` runs only without its KV cache (``use_cache=False``: with the cache it fails in
5.17.0, see models/blt_hf.py), i.e. one full forward per byte; ours samples with our caches.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from polybyte.modalities.image import to_order  # noqa: E402
from polybyte.models.blt_hf import HF_OFFSET, OUTPUT_OF_HF_ROW  # noqa: E402
from polybyte.models.generate import generate  # noqa: E402
from polybyte.models.patching import patch_ids_to_lengths  # noqa: E402
from polybyte.pipelines.blt_import import main as import_main  # noqa: E402
from polybyte.pipelines.export import load_exported  # noqa: E402

TEXT = 258
TOL = 1e-4

# Two shapes: (a) the released models' layout (encoder cross-attention after its last layer only,
# decoder before every layer, a k·D_E -> D_G projection, grouped-query latent, max patch length
# unset); (b) encoder cross-attention in every layer, decoder only before its first, k·D_E = D_G
# (transformers' identity projection), one hash function.
VARIANTS = {
    "released-layout": dict(
        k=2, enc_layers=1, enc_all=False, dec_all=True, latent=48, kv=2, functions=2, sizes=[3, 4, 5, 6]
    ),
    "all-encoder-layers": dict(
        k=2, enc_layers=2, enc_all=True, dec_all=False, latent=64, kv=4, functions=1, sizes=[3, 5]
    ),
}


def hf_config(v: dict, threshold: float):
    local = dict(hidden_size=32, num_attention_heads=2, cross_attn_k=v["k"], hidden_size_global=v["latent"])
    local["max_position_embeddings"] = 512
    return transformers.BltConfig(
        max_position_embeddings=512,
        patch_size=4,
        patching_threshold=threshold,
        cross_attn_k=v["k"],
        encoder_hash_byte_group_size=v["sizes"],
        encoder_hash_byte_group_vocab=113,
        encoder_hash_byte_group_nb_functions=v["functions"],
        patcher_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=80,
                            max_position_embeddings=512),
        encoder_config=dict(local, num_hidden_layers=v["enc_layers"], cross_attn_all_layers=v["enc_all"]),
        decoder_config=dict(local, num_hidden_layers=2, cross_attn_all_layers=v["dec_all"], intermediate_size=88),
        global_config=dict(hidden_size=v["latent"], num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=v["kv"], intermediate_size=128, max_position_embeddings=512),
    )  # fmt: skip


def hf_stream(payload: bytes) -> torch.Tensor:
    """transformers' input ids for a payload: BOS, then byte + 4."""
    return torch.tensor([[1, *(b + HF_OFFSET for b in payload)]])


@pytest.fixture(scope="module")
def payloads(shared_data) -> dict[str, bytes]:
    text = (shared_data / "text" / "tinyshakespeare.txt").read_bytes()[:160]
    pixels = np.load(shared_data / "image" / "imagenet64_sample.npz")["data"][0]  # planar [3·64·64]
    image = to_order(pixels.reshape(3, 64, 64).transpose(1, 2, 0).copy(), "raster")[:160]
    return {"text": text, "image": image}


def randomise_norms(hf) -> None:
    """RMSNorm weights off 1 (transformers initialises them to 1), so that a norm mapped to the
    wrong place changes the logits."""
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.5 * torch.randn_like(param))


def clear_threshold(hf, payload: bytes, q: float) -> float:
    """A patching threshold near the ``q`` quantile of the entropies of ``payload``, midway between
    two neighbouring entropies at least 1e-3 apart: its strict ``>`` and ours (entropies equal to
    ~1e-6) then cut at the same positions."""
    with torch.no_grad():
        entropies, _, _ = hf.model.patcher(hf_stream(payload))
    values = entropies[0, 1:].sort().values
    gaps = [i for i in range(len(values) - 1) if values[i + 1] - values[i] > 1e-3]
    i = min(gaps, key=lambda i: abs(i - q * len(values)))
    threshold = float(values[i] + values[i + 1]) / 2
    assert (entropies[0, 1:] - threshold).abs().min() > 4e-4
    return threshold


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory, payloads):
    """(transformers model, our imported model, name): random weights from seed 0 (norms too), the
    patching threshold near the median entropy of the text so that patches of several lengths occur."""
    v = VARIANTS[request.param]
    torch.manual_seed(0)
    hf = transformers.BltForCausalLM(hf_config(v, threshold=0.0)).eval()
    randomise_norms(hf)
    hf.config.patching_threshold = clear_threshold(hf, payloads["text"], 0.5)
    src, out = tmp_path_factory.mktemp("hf") / request.param, tmp_path_factory.mktemp("polybyte") / request.param
    hf.save_pretrained(src)
    assert import_main(["blt", str(src), "--out", str(out)]) == 0
    net, _ = load_exported(out)
    return hf, net, request.param


def hf_patch_lengths(hf, stream: torch.Tensor) -> list[int]:
    c = hf.config
    with torch.no_grad():
        _, lengths, _ = hf.model.patcher(stream, patch_size=c.patch_size, threshold=c.patching_threshold)
    return lengths[0].tolist()


@pytest.mark.parametrize("kind", ["text", "image"])
def test_same_patches_and_logits(pair, payloads, kind):
    hf, net, _ = pair
    payload = payloads[kind]
    ids = torch.tensor([list(payload)])
    stream = hf_stream(payload[:-1])  # its inputs: BOS and every byte but the last (ours: the targets)
    # patches: its lengths are BOS's patch, ours (over the targets), and an empty patch when the
    # position after its last input starts one (ours: that target starts its own patch)
    theirs = hf_patch_lengths(hf, stream)
    with torch.no_grad():
        _, patch_ids = net.patch(ids, torch.tensor([TEXT]))
    ours = patch_ids_to_lengths(patch_ids)[0].tolist()
    # its position T (after its last input) is our last target: in a patch of its own when it
    # starts one (its empty patch), else in its last patch
    assert theirs[0] == 1
    tail = [1] if theirs[-1] == 0 else [theirs[-1] + 1]
    assert ours == theirs[1:-1] + tail
    assert len(set(ours)) >= 2, "the threshold should give patches of several lengths"
    # logits: ours at our ids of its 260 outputs; our four others are -inf
    with torch.no_grad():
        expected = hf(stream, use_cache=False).logits[0]
        got = net(ids, torch.tensor([TEXT]))[0]
    diff = (got[:, list(OUTPUT_OF_HF_ROW)] - expected).abs().max().item()
    assert diff <= TOL, f"max abs logit diff {diff:.2e}"
    others = sorted(set(range(got.shape[-1])) - set(OUTPUT_OF_HF_ROW))
    assert torch.isneginf(got[:, others]).all()


def test_batched_rows_as_one_at_a_time(pair, payloads):
    hf, net, _ = pair
    rows = [payloads["text"][:80], payloads["text"][80:160]]  # different patch counts
    with torch.no_grad():
        expected = hf(torch.cat([hf_stream(r[:-1]) for r in rows]), use_cache=False).logits
        got = net(torch.tensor([list(r) for r in rows]), torch.tensor([TEXT, TEXT]))[:, :, list(OUTPUT_OF_HF_ROW)]
    assert (got - expected).abs().max().item() <= TOL


def test_max_patch_length_differs_only_at_the_last_position(tmp_path, payloads):
    """The one difference left (models/blt_hf.py): with max_patch_length set, its last position
    never starts a patch; every other position agrees."""
    torch.manual_seed(0)
    hf = transformers.BltForCausalLM(hf_config(VARIANTS["released-layout"], threshold=0.0)).eval()
    randomise_norms(hf)
    hf.config.patching_threshold = clear_threshold(hf, payloads["text"], 0.8)  # long patches, to cut
    hf.config.max_patch_length = 3
    hf.save_pretrained(tmp_path / "hf")
    assert import_main(["blt", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    net, _ = load_exported(tmp_path / "ours")
    assert net.config.patcher.max_patch_len == 3
    last = []
    for n in range(100, 108):
        payload = payloads["text"][:n]
        with torch.no_grad():
            expected = hf(hf_stream(payload[:-1]), use_cache=False).logits[0]
            got = net(torch.tensor([list(payload)]), torch.tensor([TEXT]))[0][:, list(OUTPUT_OF_HF_ROW)]
        diff = (got - expected).abs().max(-1).values
        assert diff[:-1].max().item() <= TOL
        last.append(diff[-1].item())
    assert min(last) <= TOL < max(last)  # its last position: equal only where no cut falls after it


def test_same_greedy_continuation(pair, payloads, one_thread):
    hf, net, _ = pair
    prompt = payloads["text"][:48]
    # greedy over the 256 bytes: its specials (BOE, BOS, EOS, BPE) suppressed, as ours never
    # samples a tag and stops at no EOS here
    with torch.no_grad():
        out = hf.generate(
            hf_stream(prompt), max_new_tokens=64, do_sample=False, use_cache=False, suppress_tokens=[0, 1, 2, 3]
        )
    theirs = [t - HF_OFFSET for t in out[0, 1 + len(prompt) :].tolist()]
    ours = generate(net, TEXT, [prompt], max_bytes=64, top_k=1, stop_at_eos=False)[0]
    assert len(theirs) == 64 and ours == theirs


def test_export_config_records_the_options(pair, tmp_path):
    _, net, _ = pair
    c = net.config
    assert c.hash_ngrams.style == "transformers" and c.cross_attn_double_residual and not c.latent_norm
    assert not c.patcher.first_patch_len_one and not c.patcher.split_after_special
    assert c.entropy_model.window is None and c.entropy_model.unused_outputs == c.unused_outputs


def test_import_errors(tmp_path, pair, capsys):
    hf, _, name = pair
    if name != "released-layout":
        pytest.skip("once")
    # not a BLT
    other = tmp_path / "gpt"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert import_main(["blt", str(other), "--out", str(tmp_path / "o1")]) == 2
    assert "not a transformers BLT folder (config.json model_type 'gpt2'" in capsys.readouterr().err
    # no config at all
    assert import_main(["blt", str(tmp_path), "--out", str(tmp_path / "o0")]) == 2
    assert "no config.json" in capsys.readouterr().err
    # no entropy model
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    hf.save_pretrained(src)
    state = load_file(str(src / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("model.patcher.")}, str(src / "model.safetensors"))
    capsys.readouterr()  # save_pretrained's progress bar
    assert import_main(["blt", str(src), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "no entropy model" in err and err.count("\n") == 1
    # shapes unlike the config
    hf.save_pretrained(src)
    config = json.loads((src / "config.json").read_text())
    config["encoder_hash_byte_group_vocab"] = 100
    (src / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert import_main(["blt", str(src), "--out", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err
    assert "tensor shapes do not match its config.json" in err and "hash_embed" in err and err.count("\n") == 1
    assert not (tmp_path / "o3").exists()
    # more settings its weights or our BLT do not take: each one line, exit status 2, no traceback
    hf.save_pretrained(src)
    good = json.loads((src / "config.json").read_text())
    widths = {**good, **{p: {**good[p], "hidden_size": 48} for p in ("encoder_config", "decoder_config")}}
    eps = {**good, "decoder_config": {**good["decoder_config"], "rms_norm_eps": 1e-6}}
    typed = {**good, "global_config": {**good["global_config"], "num_hidden_layers": "2"}}
    part = {**good, "encoder_config": "x"}
    for bad, expected in (
        (widths, "tensor shapes do not match its config.json"),
        (eps, "rms_norm_eps differs"),
        (typed, "settings our BLT cannot take"),
        (part, "config.json encoder_config: expected an object of settings"),
    ):
        (src / "config.json").write_text(json.dumps(bad))
        capsys.readouterr()
        assert import_main(["blt", str(src), "--out", str(tmp_path / "o4")]) == 2, expected
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err
    # an --out under a file
    (src / "config.json").write_text(json.dumps(good))
    (tmp_path / "file").write_text("")
    assert import_main(["blt", str(src), "--out", str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("polybyte import: error:") and err.count("\n") == 1, err


def test_parts_keep_their_own_rope_base():
    """A top-level rope_parameters (save_pretrained writes one) is not the parts' own: the
    entropy model keeps its 10,000 as transformers' BltPatcherConfig does."""
    from polybyte.pipelines.blt_import import blt_config

    with torch.device("meta"):
        hf = transformers.BltForCausalLM(transformers.BltConfig())
    config = {"model_type": "blt", "rope_parameters": {"rope_type": "default", "rope_theta": 123.0}}
    cfg = blt_config(config, hf.state_dict())
    assert cfg["entropy_model"]["rope_theta"] == hf.config.patcher_config.rope_parameters["rope_theta"] == 10000
    assert cfg["rope_theta"] == hf.config.global_config.rope_parameters["rope_theta"] == 500000


def test_transformers_defaults_map_as_the_library_fills_them():
    """``save_pretrained`` writes only what differs from the defaults: a config.json holding just
    ``model_type`` must map like the library's full default config (BLT-1B's shapes), and every
    tensor of that model must land in ours with its shape (meta tensors: no memory, no time)."""
    from polybyte.models import build_model
    from polybyte.pipelines.blt_import import blt_config, convert_state

    with torch.device("meta"):
        hf = transformers.BltForCausalLM(transformers.BltConfig())
    state = hf.state_dict()
    cfg = blt_config({"model_type": "blt"}, state)
    assert cfg == blt_config(hf.config.to_dict(), state)
    assert (cfg["encoder"]["dim"], cfg["latent"]["n_layers"], cfg["entropy_model"]["n_layers"]) == (1024, 25, 14)
    with torch.device("meta"):
        net = build_model(dict(cfg))
    net.load_state_dict(convert_state(state, cfg), assign=True)  # strict: every key, every shape
