"""The model card: ``README.md`` beside an export's model.safetensors and config.json.

`save_exported` writes it into the same temporary folder as the other two files, so the three
appear together in one rename. It is built from config.json alone (the backbone, the adapter
settings and the run facts a fit records: step, window, data sources, last validation) plus the
parameter count, in the layout of a Hugging Face model card (YAML front matter, then Markdown),
written by hand: huggingface_hub is pinned in constraints.txt only for the `bench` extra
(transformers), the base install does not install it, and a local card needs no hub client.
An export without a card (written before cards existed) loads as before; nothing reads it back.

`training_facts` and `validation_record` gather those run facts from a Lightning trainer
(duck-typed: this module imports no Lightning), for `ExportCheckpoint` to put in config.json.
"""

from __future__ import annotations

import json
import os
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from polybyte.modalities.audio import ENCODINGS

CARD = "README.md"

# config fields shown as the model's sizes: widths, depths, heads, patch sizes, windows
SIZE_FIELD = re.compile(r"(^|_)(dim|layers|heads|hidden|seq_len|window|patch_size|patch_len)$")


# --- run facts, recorded in config.json by ExportCheckpoint ------------------------------------
def validation_record(trainer) -> dict | None:
    """The per-modality ``val/bpb_*`` a validation pass just logged, with the step it ran at;
    None during the sanity check or when none was logged. ``limit_val_batches`` is kept when
    the pass scored only part of the val set."""
    if getattr(trainer, "sanity_checking", False):
        return None
    metrics = getattr(trainer, "callback_metrics", {}) or {}
    bpb = {k.removeprefix("val/bpb_"): float(v) for k, v in sorted(metrics.items()) if k.startswith("val/bpb_")}
    if not bpb:
        return None
    limit = getattr(trainer, "limit_val_batches", 1.0)
    whole = type(limit) is float and limit == 1.0
    return {"step": int(trainer.global_step), "bpb": bpb, "limit_val_batches": None if whole else limit}


def training_facts(trainer, validation: dict | None) -> dict[str, Any]:
    """``{"data": [...], "val": validation}`` for config.json: each training source (name,
    modality, shard folder, train shard count, sampling weight, its ``data.augment`` options if
    any) and the last validation."""
    dm = getattr(trainer, "datamodule", None)
    sources, weights = getattr(dm, "sources", None) or [], getattr(dm, "weights", None) or []
    augment = getattr(dm, "augment", None) or {}
    data = [
        {
            "name": s.name,
            "modality": s.modality,
            "shards": _folder(s.train),
            "train_shards": len(s.train),
            "weight": float(w),
            **({"augment": augment[s.name]} if s.name in augment else {}),
        }
        for s, w in zip(sources, weights)
    ]
    facts: dict[str, Any] = {"data": data} if data else {}
    if validation:
        facts["val"] = validation
    return facts


def _folder(paths: list[str]) -> str | None:
    """The folder holding a source's shards (their common parent)."""
    if not paths:
        return None
    try:
        return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    except ValueError:  # different drives
        return os.path.dirname(paths[0])


# --- the card ------------------------------------------------------------------------------------
def model_card(info: dict[str, Any], params: int, entropy_params: int = 0, path=None) -> str:
    """The Markdown card of an export whose config.json holds ``info``; ``params`` counts the
    trained weights, ``entropy_params`` those of BLT's frozen entropy model beside them (as
    `num_params` and README's preset table count); ``path``: the folder, for the loading example."""
    model = info["model"]
    backbone = model["backbone"]
    modalities = info.get("modalities") or {}
    licence = info.get("license")
    front = ["---", "library_name: polybyte"] + ([f"license: {licence}"] if licence else [])
    front += ["tags:", "- polybyte", "- byte-level", f"- {backbone}"] + [f"- {m}" for m in modalities] + ["---"]
    count = f"{params:,}" + (f" (+{entropy_params:,} in the frozen entropy model)" if entropy_params else "")
    step = info.get("step")
    rows = [
        ("backbone", f"`{backbone}`"),
        ("parameters", count),
        ("sizes", _sizes(model)),
        ("window", f"{info['seq_len']:,} ids (`seq_len`)" if info.get("seq_len") else "not recorded"),
        ("modalities", "; ".join(_modality(n, s) for n, s in modalities.items()) or "none recorded"),
        ("training steps", f"{step:,}" if step is not None else "not recorded"),
        ("data", _data(info.get("data"))),
        ("val bits/byte", _val(info.get("val"))),
        ("licence", licence or "none recorded; the weights derive from the data above, whose terms apply"),
    ]
    title = f"# polybyte {backbone}, {params / 1e6:.2f}M parameters"
    what = (
        f"A byte-level language model for {_join(list(modalities)) or 'bytes'}: it models each sample as a "
        "stream of raw bytes, with no tokenizer."
    )
    table = ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    return "\n".join(
        [
            *front,
            "",
            title,
            "",
            what,
            "",
            *table,
            "",
            "## Use",
            "",
            "```python",
            *_example(path, modalities),
            "```",
            "",
            f"Files: `model.safetensors` (weights), `config.json` (backbone config, adapter settings, run facts), "
            f"this `{CARD}`; written by polybyte {_version()}.",
            "",
        ]
    )


def write_card(folder: Path, info: dict[str, Any], params: int, entropy_params: int = 0, path=None) -> Path:
    out = Path(folder) / CARD
    out.write_text(model_card(info, params, entropy_params, path))
    return out


def _sizes(model: dict, prefix: str = "") -> str:
    """The integer size fields of a backbone config, nested parts as ``encoder.dim``."""
    parts = []
    for key, value in model.items():
        if isinstance(value, dict):
            inner = _sizes(value, f"{prefix}{key}.")
            parts += [inner] if inner else []
        elif isinstance(value, int) and not isinstance(value, bool) and SIZE_FIELD.search(key):
            parts.append(f"{prefix}{key} {value:,}")
    return ", ".join(parts)


def _modality(name: str, s: dict) -> str:
    if name == "image":
        return f"image ({s.get('size')}x{s.get('size')} RGB, {s.get('order')} order)"
    if name == "audio":
        clip = f", {s['clip_seconds']:g} s clips" if s.get("clip_seconds") else ""
        return f"audio ({s.get('sample_rate')} Hz, {s.get('encoding')}{clip})"
    return "text (UTF-8 bytes as stored)" if name == "text" else name


def _data(data: list[dict] | None) -> str:
    if not data:
        return "not recorded"
    return "; ".join(
        f"`{d['name']}` ({d['modality']}): {d['train_shards']} train shard{'s' * (d['train_shards'] != 1)} "
        f"in `{d['shards']}`, weight {d['weight']:g}"
        + (f", augmented with {json.dumps(d['augment'])}" if d.get("augment") else "")
        for d in data
    )


def _val(val: dict | None) -> str:
    if not val:
        return "not measured"
    scores = ", ".join(f"{m} {b:.3f}" for m, b in val["bpb"].items())
    limit = val.get("limit_val_batches")
    part = f", on `limit_val_batches: {limit}` of the val set" if limit else ""
    return f"{scores} (validation at step {val['step']:,}{part})"


def _example(path, modalities: dict) -> list[str]:
    lines = ["import polybyte", "", f"model = polybyte.load({json.dumps(str(path or 'path/to/this/folder'))})"]
    if "text" in modalities:
        lines.append('print(model.generate("text", "Once upon a time", max_bytes=200))  # str')
    if "image" in modalities:
        lines.append('model.generate("image").save("sample.png")  # PIL image')
    if "audio" in modalities:
        audio = modalities["audio"]
        half = int(audio.get("sample_rate", 16000)) * ENCODINGS.get(audio.get("encoding"), 2) // 2
        lines.append(f'wave, rate = model.generate("audio", max_bytes={half})  # 0.5 s: float32 waveform, rate')
    first = next(iter(modalities), "text")
    lines.append(f'print(model.score(b"some bytes", modality="{first}"), "bits/byte")')
    return lines


def _join(names: list[str]) -> str:
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)


def _version() -> str:
    try:
        return version("polybyte")
    except PackageNotFoundError:
        return "(version unknown)"
