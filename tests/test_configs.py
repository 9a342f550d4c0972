"""Every shipped YAML in configs/: a comment on every setting, LightningCLI parses it as shipped,
its full-size model builds (on the meta device: no memory, no time), and a shrunk copy —
tiny widths, data pointed at the demo shards — instantiates model + data on CPU and computes
a finite loss on a real batch."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from polybyte.modalities import TAGS
from polybyte.models import build_model
from polybyte.models.transformer import TransformerConfig
from polybyte.pipelines.data import ByteDataModule
from polybyte.pipelines.demo import DEMO_SETTINGS
from polybyte.pipelines.export import save_exported
from polybyte.pipelines.lit import ByteLMModule, PolybyteCLI

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))  # whatever ships, new files included
RUNS = [p for p in CONFIGS if p.name != "defaults.yaml"]  # defaults.yaml sits under every other one
IMAGE_SIZE_DEFAULT = 64  # the image adapter's default size (DESIGN.md §3)


def test_configs_found():
    names = {p.name for p in CONFIGS}
    assert {
        "defaults.yaml",
        "debug.yaml",
        "entropy-model.yaml",
        "text-transformer.yaml",
        "text-megabyte.yaml",
        "imagenet64-megabyte.yaml",
        "audio-megabyte.yaml",
    } <= names


# --- a comment on every key -------------------------------------------------------------------
def uncommented_keys(text: str) -> list[str]:
    """Keys holding a value (scalar or flow list) with no ``# comment`` after it on its line.
    Keys opening a block of keys (``trainer:``, ``init_args:``) carry theirs on the keys inside."""
    lines = text.splitlines()
    missing = []

    def walk(node, path):
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{path}[{i}]")
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                here = f"{path}.{key.value}" if path else key.value
                block = isinstance(value, (yaml.MappingNode, yaml.SequenceNode)) and not value.flow_style
                if block:
                    walk(value, here)
                    continue
                tail = lines[value.end_mark.line][value.end_mark.column :]
                if not tail.strip().startswith("#"):
                    missing.append(f"line {key.start_mark.line + 1}: {here}")

    walk(yaml.compose(text), "")
    return missing


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_setting_has_a_comment(path):
    assert uncommented_keys(path.read_text()) == []


def test_comment_check_catches_a_bare_key():
    text = "trainer:\n  max_steps: 5  # steps\n  devices: 1\nmodel:\n  sizes: [1, 2]\n"
    assert uncommented_keys(text) == ["line 3: trainer.devices", "line 5: model.sizes"]


# --- parsed as shipped ------------------------------------------------------------------------
class ParseOnly(PolybyteCLI):
    """LightningCLI that parses and validates the config but instantiates nothing."""

    def instantiate_classes(self) -> None:
        pass


def expand(model: dict) -> dict:
    """Every field of a ``model.model`` mapping, its ``preset`` filled in."""
    from polybyte.models import config_from_dict, config_to_dict

    rest = dict(model)
    return config_to_dict(config_from_dict(rest.pop("backbone"), rest))


def parse(path: Path, monkeypatch) -> dict:
    monkeypatch.setattr("sys.argv", ["polybyte"])
    return ParseOnly(ByteLMModule, ByteDataModule, run=False, args=["--config", str(path)]).config.as_dict()


@pytest.mark.parametrize("path", RUNS, ids=lambda p: p.name)
def test_config_parses_and_is_consistent(path, monkeypatch):
    cfg = parse(path, monkeypatch)
    model, data, trainer = expand(cfg["model"]["model"]), cfg["data"], cfg["trainer"]
    with torch.device("meta"):  # the full-size model as shipped: validates every field
        net = build_model(dict(model))
    assert net.num_params() > 0
    assert data["seq_len"] == model["max_seq_len"], "model.model.max_seq_len should equal data.seq_len"
    if model["backbone"] == "megabyte":
        assert data["seq_len"] % model["patch_size"] == 0
    if data["sources"] != "demo" and "image" in data["sources"]:
        size = ((data.get("adapter_settings") or {}).get("image") or {}).get("size", IMAGE_SIZE_DEFAULT)
        assert data["seq_len"] >= 3 * size * size + 1, "an image + EOS must fit one window"
    # one run folder: no logger or checkpoint callback names a folder of its own
    assert trainer["default_root_dir"] == f"runs/{path.stem}" and trainer.get("logger") is None
    assert not trainer.get("callbacks")  # the run's ExportCheckpoint is the `checkpoint:` group
    assert cfg["checkpoint"].get("dirpath") is None and cfg["checkpoint"]["save_last"] is True
    if cfg["model"].get("entropy_model"):  # BLT with entropy patching loads the entropy run's export
        run = cfg["model"]["entropy_model"].removesuffix("/checkpoints/last")
        assert run.startswith("runs/"), "entropy_model should name a shipped config's run export"
        entropy = yaml.safe_load((REPO / "configs" / f"{run.removeprefix('runs/')}.yaml").read_text())
        assert entropy["trainer"]["default_root_dir"] == run
        trained = {k: v for k, v in expand(entropy["model"]["model"]).items() if k not in ("backbone", "max_seq_len")}
        mine = {k: v for k, v in model["entropy_model"].items() if k != "max_seq_len"}
        assert mine == trained, f"model.model.entropy_model must match the config of {run}"


# --- instantiated, shrunk ---------------------------------------------------------------------
TINY = {"dim": 16, "layers": 1, "heads": 2, "table_size": 64, "window": 16}


def shrink(model: dict, seq_len: int) -> dict:
    """Same structure and options, tiny widths/depths, ``max_seq_len = seq_len``."""
    out = {}
    for k, v in model.items():
        if isinstance(v, dict):
            out[k] = shrink(v, seq_len)
        elif k == "max_seq_len":
            out[k] = seq_len
        elif k in ("n_kv_heads", "mlp_hidden"):
            out[k] = None
        elif k == "dim" or k.endswith("_dim"):
            out[k] = TINY["dim"]
        elif k.endswith("layers"):
            out[k] = TINY["layers"]
        elif k.endswith("heads"):
            out[k] = TINY["heads"]
        elif k in ("table_size", "window"):
            out[k] = v if v is None else min(v, TINY[k])
        else:
            out[k] = v
    return out


def modality_of(name: str, location: str) -> str:
    for modality in TAGS:
        if modality == name or modality in location:
            return modality
    raise AssertionError(f"cannot tell the modality of source {name}={location}; name it text/image/audio")


def tiny_config(path: Path, tmp: Path, demo_shards: dict[str, Path]) -> tuple[Path, set[str]]:
    """The config with tiny model dims, data from the demo shards, outputs under ``tmp``."""
    cfg = yaml.safe_load(path.read_text())
    data = cfg["data"]
    if data["sources"] == "demo":
        modalities = set(demo_shards)
    else:
        named = {n: modality_of(n, str(loc)) for n, loc in data["sources"].items()}
        data["sources"] = {n: str(demo_shards[m]) for n, m in named.items()}
        data.pop("val_sources", None)
        modalities = set(named.values())
    need = 96
    if "image" in modalities:  # the demo images are 16x16 unless the config resizes them
        size = ((data.get("adapter_settings") or {}).get("image") or {}).get("size", DEMO_SETTINGS["image"]["size"])
        need = max(need, 3 * size * size + 1)
    cfg["model"]["model"] = expand(cfg["model"]["model"])
    multiple = math.lcm(2, cfg["model"]["model"].get("patch_size", 1))  # pcm16 and MEGABYTE patches
    seq_len = -(-need // multiple) * multiple
    data.update(seq_len=seq_len, batch_size=2, num_workers=0, shuffle_buffer=4)
    cfg["model"]["model"] = shrink(cfg["model"]["model"], seq_len)
    if cfg["model"].get("entropy_model"):  # export a tiny entropy model of the shrunk shape
        entropy = TransformerConfig(**{k: v for k, v in cfg["model"]["model"]["entropy_model"].items()})
        cfg["model"]["entropy_model"] = str(save_exported(tmp / "entropy", build_model(entropy), {}))
    trainer = cfg["trainer"]
    trainer["default_root_dir"] = str(tmp / "run")  # logs and checkpoints follow it
    out = tmp / path.name
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out, modalities


@pytest.mark.parametrize("path", RUNS, ids=lambda p: p.name)
def test_config_instantiates_and_computes_a_loss(path, demo_shards, tmp_path, monkeypatch):
    config, modalities = tiny_config(path, tmp_path, demo_shards)
    monkeypatch.setattr("sys.argv", ["polybyte"])
    cli = PolybyteCLI(ByteLMModule, ByteDataModule, run=False, args=["--config", str(config)])
    module, dm = cli.model, cli.datamodule
    assert isinstance(module, ByteLMModule) and isinstance(dm, ByteDataModule)
    assert module.model.backbone == yaml.safe_load(path.read_text())["model"]["model"]["backbone"]
    assert module.model.num_params() < 5_000_000  # shrunk: this test stays fast
    dm.setup("fit")
    assert {s.modality for s in dm.sources} == modalities
    ids, modality = next(iter(dm.train_dataloader()))
    assert ids.shape == (2, dm.seq_len) and set(modality.tolist()) <= {TAGS[m] for m in modalities}
    with torch.no_grad():
        loss, nll = module.model.loss(ids, modality)
    assert math.isfinite(float(loss)) and nll.shape == ids.shape


def test_entropy_model_of_the_wrong_shape_is_a_clear_error(tmp_path):
    entropy = dict(dim=16, n_layers=1, n_heads=2, window=16, max_seq_len=64)
    blt = dict(
        backbone="blt",
        max_seq_len=64,
        patcher=dict(kind="entropy", threshold=1.0),
        hash_ngrams=dict(table_size=64),
        encoder=dict(dim=16, n_heads=2, window=16),
        latent=dict(dim=16, n_layers=1, n_heads=2),
        decoder=dict(dim=16, n_layers=1, n_heads=2, window=16),
        entropy_model=entropy,
    )
    other = save_exported(tmp_path / "other", build_model(TransformerConfig(**dict(entropy, dim=32))), {})
    with pytest.raises(ValueError, match=r"does not match model.model.entropy_model \(dim: config 16 vs file 32\)"):
        ByteLMModule(copy.deepcopy(blt), entropy_model=str(other))
    same = save_exported(tmp_path / "same", build_model(TransformerConfig(**dict(entropy, max_seq_len=128))), {})
    module = ByteLMModule(copy.deepcopy(blt), entropy_model=str(same))
    saved, got = load_file(same / "model.safetensors"), module.model.entropy_model.state_dict()
    assert saved.keys() == got.keys() and all(torch.equal(got[k], v) for k, v in saved.items())
    assert not any(p.requires_grad for p in module.model.entropy_model.parameters())


def test_preset_plus_overrides_is_the_preset_with_only_those_keys_changed():
    """``preset: base`` starts from the shipped preset; a nested override (BLT's patcher) changes
    only the keys it names; an unknown preset names the known ones."""
    import dataclasses

    from polybyte.models import config_from_dict
    from polybyte.models.blt import blt_preset

    model = dict(yaml.safe_load((REPO / "configs" / "text-blt.yaml").read_text())["model"]["model"])
    assert model.pop("backbone") == "blt" and model["preset"] == "base"
    cfg = config_from_dict("blt", model)
    base = blt_preset("base")
    assert cfg.patcher == dataclasses.replace(base.patcher, max_patches_ratio=1.25)
    assert dataclasses.replace(cfg, patcher=base.patcher) == base
    cfg = config_from_dict("blt", {"preset": "base", "encoder": {"window": 256}})
    assert cfg.encoder == dataclasses.replace(base.encoder, window=256) and cfg.latent == base.latent
    with pytest.raises(ValueError, match=r"unknown megabyte preset 'huge'; known: \['base', 'small', 'tiny'\]"):
        config_from_dict("megabyte", {"preset": "huge"})
    module = ByteLMModule(model={"backbone": "transformer", "preset": "tiny", "n_layers": 1})  # fit's path
    assert module.model.config.n_layers == 1 and module.model.config.dim == 128  # the rest from "tiny"


def _leaves(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("path", RUNS, ids=lambda p: p.name)
def test_config_states_only_what_differs_from_defaults(path, monkeypatch):
    """A shipped config repeats no value of configs/defaults.yaml, and parsing puts the defaults
    under it (e.g. the clipping no config sets, the checkpoint group)."""
    defaults = _leaves(yaml.safe_load((REPO / "configs" / "defaults.yaml").read_text()))
    own = _leaves(yaml.safe_load(path.read_text()))
    assert [k for k, v in own.items() if k in defaults and defaults[k] == v] == []
    parsed = _leaves(parse(path, monkeypatch))
    for key, value in defaults.items():
        assert parsed[key] == own.get(key, value), key
