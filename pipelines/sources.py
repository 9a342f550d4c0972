"""Where samples come from: source specs, their shards and splits, the manifest, and the adapter
settings each source is read with (DESIGN.md §4). Used by training and validation (data.py)
and by ``polybyte eval``; reading shards and counting lost samples is reading.py. Nothing here
imports Lightning.

Locations. A source is a folder written by ``polybyte shard`` (``train-*.tar``, ``val-*.tar``,
``manifest.json``), any folder of ``.tar`` shards, or a brace pattern/glob of shards (or one
shard file). Splits never come from a guess:

- a folder: ``train-*.tar`` train and ``val-*.tar`` validate. A folder with neither name trains
  on all its ``.tar`` files (with a notice), unless one of them is named like a held-out split
  (``imagenet-val-000000.tar``, ``test-0.tar``): that is refused, naming the globs to give;
- a pattern names the shards of one split, whatever their names: training shards in
  ``sources``, validation shards in ``val_sources``, the shards to score in ``polybyte eval``;
- ``val_sources`` replaces the val shards of the sources it names (the others keep their
  folder's ``val-*.tar``), and a shard named there is never trained on.

Settings. The properties a member determines (image ``size``, audio ``sample_rate``) come from
``adapter_settings`` when given there (members are then cropped and resized or resampled to
them), else from the manifest, else from ``defaults`` (the checkpoint's, in eval), else from the
first member (a one-line notice). Then the first member of the training and validation shards is
checked: one that differs is one error naming the setting. Later members that differ are
skipped and counted (``mismatch``), as the adapter is ``strict``.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path

import webdataset as wds

from polybyte.modalities import TAGS, SettingMismatchError, get_modality
from polybyte.modalities.base import Modality

from .reading import member, shard_key

MANIFEST = "manifest.json"  # written by `polybyte shard` (shards.py) into each shard folder
# a shard file name that reads like a held-out split: never trained on by guess
HELD_OUT = re.compile(r"(?<![a-z])(val|valid|validation|test|dev|eval|heldout|holdout)(?![a-z])")


# --- sources ----------------------------------------------------------------------------------
@dataclass
class Source:
    """One shard source: where its shards are and how to turn members into payloads."""

    name: str  # source name (a key of `weights`), e.g. "text" or "shakespeare"
    modality: str  # adapter name: text, image, audio
    settings: dict  # adapter settings (manifest's, checkpoint's or the first member's, plus overrides)
    train: list[str]  # training shard paths
    val: list[str] = field(default_factory=list)  # validation shard paths, in read order
    manifest: bool = False  # written by `polybyte shard`: members carry .json metadata
    # samples per shard as its manifest lists them ({absolute path: count}), so a shard that
    # ends early (truncated on a member boundary) or is gone is counted as "missing" samples
    expected: dict[str, int] = field(default_factory=dict)
    # the manifest's val sample count, when val is its whole val split but it has no per-shard counts
    val_total: int | None = None
    # members whose image size / sample rate differ from the settings are refused (not converted):
    # False only when adapter_settings gave that setting explicitly
    strict: bool = True
    origin: dict[str, str] = field(default_factory=dict)  # property -> where its value came from
    notes: list[str] = field(default_factory=list)  # one-line notices for the user (callers print them)
    location: str = ""  # the spec's location, for messages

    def adapter(self) -> Modality:
        try:
            adapter = get_modality(self.modality, **self.settings)
        except TypeError as e:
            raise ValueError(f"source {self.name!r}: bad {self.modality} settings {self.settings}: {e}") from None
        adapter.strict = self.strict
        return adapter


def parse_specs(spec) -> list[tuple[str | None, str]]:
    """``{"name": loc}``, ``["name=loc", "loc", ...]`` or ``"name=loc"`` -> [(name|None, loc)]."""
    if isinstance(spec, Mapping):
        return [(str(k), str(v)) for k, v in spec.items()]
    if isinstance(spec, str):
        spec = [spec]
    out = []
    for item in spec:
        name, sep, loc = str(item).partition("=")
        if not sep or "/" in name or not name:
            name, loc = None, str(item)
        out.append((name, loc))
    return out


def _expand(pattern: str) -> list[str]:
    """Brace pattern and/or glob -> sorted existing files."""
    files: list[str] = []
    for part in wds.shardlists.expand_urls(pattern):
        files += sorted(glob(part)) if any(c in part for c in "*?[") else [part]
    return files


@dataclass
class _Location:
    folder: Path  # where manifest.json may be
    files: list[str] | None  # a pattern's (or file's) shards; None for a folder
    train: list[str] = field(default_factory=list)  # a folder's train-*.tar
    val: list[str] = field(default_factory=list)  # a folder's val-*.tar
    other: list[str] = field(default_factory=list)  # a folder's other *.tar


def _locate(name: str | None, loc: str) -> _Location:
    path = Path(loc).expanduser()
    if path.is_dir():
        tars = sorted(str(p) for p in path.glob("*.tar"))
        where = _Location(path, None)
        for t in tars:
            stem = Path(t).name
            (
                where.train if stem.startswith("train-") else where.val if stem.startswith("val-") else where.other
            ).append(t)
        return where
    files = _expand(str(path))
    missing = [f for f in files if not Path(f).is_file()]
    if not files or missing:
        raise ValueError(
            f"source {name or loc!r}: {loc!r} is neither a shard folder nor a pattern of existing "
            f"shards (missing: {missing[:3] or 'no match'}); give DIR or DIR/train-{{000000..000009}}.tar"
        )
    return _Location(Path(files[0]).parent, files)


def _held_out(paths: list[str]) -> list[str]:
    return [p for p in paths if HELD_OUT.search(Path(p).stem.lower())]


def _train_shards(name: str, loc: str, where: _Location, notes: list[str]) -> tuple[list[str], bool]:
    """The training shards of a ``sources`` location (see the module docstring), and whether they
    are all the ``.tar`` files of a folder that names no split (checked by `_refuse_held_out`)."""
    if where.files is not None:
        return where.files, False
    if where.train or where.val:
        return where.train, False
    if not where.other:
        raise ValueError(f"source {name!r}: no .tar shards in folder {loc}")
    notes.append(
        f"source {name!r}: folder {loc} names no train-*/val-* shards: all {len(where.other)} .tar files "
        f"are training shards (val_sources names validation shards)"
    )
    return where.other, True


def _refuse_held_out(name: str, loc: str, train: list[str]) -> None:
    """A folder naming no split must not train on a shard named like a held-out split."""
    held = _held_out(train)
    if held:
        token = HELD_OUT.search(Path(held[0]).stem.lower()).group(1)
        raise ValueError(
            f"source {name!r}: folder {loc} has no train-*/val-* shards and {Path(held[0]).name} is named "
            f"like a held-out split, so its shards are not trained on by guess; name the splits with "
            f"patterns, e.g. sources {{{name}: '{loc}/*train*.tar'}} and val_sources {{{name}: '{loc}/*{token}*.tar'}}"
        )


def _val_shards(name: str, loc: str, where: _Location) -> list[str]:
    """The shards of a ``val_sources`` location: a pattern's, a folder's ``val-*.tar``, or all the
    ``.tar`` files of a folder that names no split."""
    if where.files is not None:
        return where.files
    if where.val or where.other and not where.train:
        return where.val or where.other
    raise ValueError(
        f"val source {name!r}: folder {loc} holds no val-*.tar shards; name the shards to validate on "
        f"with a pattern, e.g. {name}: '{(where.train or [f'{loc}/x.tar'])[-1]}'"
    )


def _no_score_shards(name: str, loc: str, where: _Location) -> ValueError:
    candidates = _held_out(where.other)
    example = (
        f"{loc}/*{HELD_OUT.search(Path(candidates[0]).stem.lower()).group(1)}*.tar"
        if candidates
        else (where.train or where.other or [f"{loc}/*.tar"])[-1]
    )
    return ValueError(
        f"source {name!r} has no val shards (val-*.tar) in {loc}; shard it with --val-fraction > 0, "
        f"or name the shards to score: {name}='{example}'"
    )


def read_manifest(folder: str | Path, required: bool = True) -> dict | None:
    """The ``manifest.json`` of a shard folder written by ``polybyte shard``; when it is missing,
    an error if ``required``, else None."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        if required:
            raise ValueError(f"no {MANIFEST} in {folder}; is it a folder written by `polybyte shard`?")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable manifest {path}: {e}") from None


def _strip(settings: Mapping | None) -> dict:
    return {k: v for k, v in dict(settings or {}).items() if k != "name"}


def resolve_sources(
    sources,
    val_sources=None,
    adapter_settings: Mapping[str, Mapping] | None = None,
    *,
    defaults: Mapping[str, Mapping] | None = None,
    score: bool = False,
    flag: str = "adapter_settings",
) -> list[Source]:
    """Turn source specs into `Source`s (see the module docstring and `ByteDataModule`).

    The modality comes from the folder's ``manifest.json`` or, for webdatasets without one,
    from the source name (``image=DIR``). ``defaults`` (``{modality: settings}``, the
    checkpoint's) stand in for a missing manifest. ``score`` (``polybyte eval``): each
    location names the shards to score, kept in ``val``. ``flag`` is how the caller's users
    give ``adapter_settings``, for messages.
    """
    specs = parse_specs(sources or [])
    if not specs:
        raise ValueError("no data sources given; pass e.g. sources={'text': 'shards/text'} or ['text=DIR']")
    overrides = {k: dict(v) for k, v in (adapter_settings or {}).items()}
    val_specs = dict(parse_specs(val_sources)) if val_sources is not None else {}
    if None in val_specs:
        raise ValueError("val_sources must name the source each location validates, e.g. {image: 'DIR/*.tar'}")
    out: list[Source] = []
    guessed: dict[str, str] = {}  # sources training on every shard of a folder naming no split
    for name, loc in specs:
        where = _locate(name, loc)
        manifest = read_manifest(where.folder, required=False)
        modality = _modality(name, loc, manifest)
        if name is None:
            name = modality if all(s.name != modality for s in out) else f"{modality}{len(out)}"
        if any(s.name == name for s in out):
            raise ValueError(f"two sources are named {name!r}; give each a distinct name (name=DIR)")
        source = Source(name, modality, {}, [], manifest=manifest is not None, location=loc)
        if score:  # the shards to score only (train stays empty: nothing else is read or checked)
            source.val = where.files if where.files is not None else where.val
        else:
            source.train, guess = _train_shards(name, loc, where, source.notes)
            if guess:
                guessed[name] = loc
            source.val = where.val if where.files is None and name not in val_specs else []
        if manifest is not None:
            _manifest_counts(source, manifest, where.folder, own_val=where.files is None and name not in val_specs)
        if score and not source.val:
            raise _no_score_shards(name, loc, where)
        _settings(source, manifest, (defaults or {}).get(modality), overrides.pop(name, {}))
        out.append(source)
    if overrides:
        raise ValueError(f"adapter_settings for unknown sources {sorted(overrides)}; sources: {[s.name for s in out]}")
    by_name = {s.name: s for s in out}
    for name, loc in val_specs.items():
        if name not in by_name:
            raise ValueError(f"val source {name!r} matches no training source {sorted(by_name)}")
        _set_val(by_name[name], name, loc)
    for name, loc in guessed.items():  # after val_sources took their shards out of training
        _refuse_held_out(name, loc, by_name[name].train)
    for source in out:
        _check_properties(source, flag)
    return out


def _modality(name: str | None, loc: str, manifest: dict | None) -> str:
    if manifest is not None:
        modality = manifest.get("modality")
        if name in TAGS and name != modality:
            raise ValueError(f"source {name}={loc}: its manifest says modality {modality!r}")
    elif name in TAGS:
        modality = name
    else:
        raise ValueError(
            f"source {name or loc!r} has no manifest.json, so its modality is unknown; "
            f"name it after its modality: text={loc}, image={loc} or audio={loc}"
        )
    if modality not in TAGS:
        raise ValueError(f"source {name or loc!r}: unknown modality {modality!r}; known: {sorted(TAGS)}")
    return modality


def _settings(source: Source, manifest: dict | None, default: Mapping | None, explicit: dict) -> None:
    """Fill ``source.settings``, ``origin`` and ``strict`` (see the module docstring)."""
    properties = get_modality(source.modality).properties
    if manifest is not None:
        settings, origin = _strip(manifest.get("settings")), "its manifest"
    else:
        settings, origin = _strip(default), "the checkpoint"
    source.origin = {p: origin for p in properties if p in settings}
    settings.update(explicit)
    source.origin.update({p: "adapter_settings" for p in properties if p in explicit})
    source.settings = settings
    source.strict = not any(p in explicit for p in properties)


def _set_val(source: Source, name: str, loc: str) -> None:
    """Validation shards from ``val_sources``; the shards they name leave the training list."""
    where = _locate(name, loc)
    source.val = _val_shards(name, loc, where)
    manifest = read_manifest(where.folder, required=False)
    if manifest is not None:
        if manifest.get("modality") != source.modality:
            raise ValueError(
                f"val source {name!r}: {loc} holds {manifest.get('modality')} shards, the source is {source.modality}"
            )
        _manifest_counts(source, manifest, where.folder, own_val=where.files is None)
    keys = {shard_key(u) for u in source.val}
    kept = [u for u in source.train if shard_key(u) not in keys]
    if len(kept) < len(source.train):
        gone = len(source.train) - len(kept)
        source.notes.append(
            f"source {name!r}: {gone} of its {len(source.train)} training shards are its validation "
            f"shards ({loc}) and are left out of training"
        )
        source.train = kept


def _manifest_counts(source: Source, manifest: dict, folder: Path, own_val: bool) -> None:
    """Fill ``source.expected`` from the manifest's samples per shard (``shard_samples``; a split
    of one shard without them: the split's count). With ``own_val`` (val shards are the folder's
    own), val shards the manifest lists but the folder lacks are read too, so their samples are
    counted as lost instead of vanishing."""
    splits = manifest.get("splits") or {}
    for split in ("train", "val"):
        info = splits.get(split) or {}
        names = [str(n) for n in info.get("shards") or []]
        counts = info.get("shard_samples")
        if counts is None and len(names) == 1 and isinstance(info.get("samples"), int):
            counts = [info["samples"]]
        if isinstance(counts, list) and len(counts) == len(names):
            source.expected.update({shard_key(str(folder / n)): int(c) for n, c in zip(names, counts)})
        if split == "val" and own_val and names:
            listed = [str(folder / n) for n in names]
            have = {shard_key(u) for u in source.val}
            source.val = sorted(source.val + [u for u in listed if shard_key(u) not in have])
            if counts is None and isinstance(info.get("samples"), int):
                source.val_total = info["samples"]


# --- properties from the data -----------------------------------------------------------------
PROBE_SHARDS, PROBE_SAMPLES = 3, 5  # shards and samples tried before a probe gives up


def _probe(urls: list[str], adapter: Modality) -> tuple[dict | SettingMismatchError | None, str]:
    """``(properties, where)`` of the first member of ``urls`` whose header reads: a dict, or the
    `SettingMismatchError` of a member that has none (a non-square image); ``(None, first
    failure)`` when none reads within a few shards and samples."""
    failure = "no shard to read"
    for url in urls[:PROBE_SHARDS]:
        try:
            with contextlib.closing(wds.tarfile_samples([{"url": url}], handler=wds.reraise_exception)) as samples:
                for _, sample in zip(range(PROBE_SAMPLES), samples):
                    try:
                        ext, data = member(sample, adapter.extensions)
                        where = f"{url}: {sample['__key__']}{ext}"
                        return adapter.native(data), where
                    except SettingMismatchError as e:
                        return e, where
                    except ValueError as e:
                        failure = f"{url} {sample.get('__key__')}: {e}"
        except Exception as e:  # noqa: BLE001 — an unreadable shard: the loaders count it; try the next
            failure = f"{url}: {type(e).__name__}: {str(e).split(' @ ', 1)[0]}"
    return None, failure


def _describe(modality: str, prop: str, value) -> str:
    return {"size": f"{value}x{value} pixels", "sample_rate": f"{value} Hz"}.get(prop, f"{prop} {value!r}")


def _check_properties(source: Source, flag: str) -> None:
    """Read missing properties from the first member; check the first training and validation
    members against the settings (see the module docstring)."""
    adapter = source.adapter()  # also checks the settings given so far
    if not adapter.properties:
        return
    probes = []
    for split, urls in (("training", source.train), ("validation", source.val)):
        if urls:
            found, where = _probe(urls, adapter)
            probes.append((split, found, where))
    unknown = [p for p in adapter.properties if p not in source.settings]
    if unknown:
        found = next(((f, w) for _, f, w in probes if f is not None), None)
        example = json.dumps({source.name: {unknown[0]: 64 if unknown[0] == "size" else 16000}})
        if found is None or isinstance(found[0], SettingMismatchError):
            why = found[1] + ": " + str(found[0]) if found else (probes[0][2] if probes else "no shards")
            raise ValueError(
                f"source {source.name!r} has no manifest.json, and its {' and '.join(unknown)} cannot be read "
                f"from its first member ({why}); give it with {flag} '{example}'"
            )
        props, where = found
        for p in unknown:
            source.settings[p] = props[p]
            source.origin[p] = f"its first member ({where})"
            source.notes.append(
                f"source {source.name!r} has no manifest.json: {source.modality} {p} {props[p]} read from "
                f"its first member ({where}); {flag} sets another"
            )
    for split, found, where in probes:
        if found is None:
            continue  # unreadable: the loaders count the losses
        if isinstance(found, SettingMismatchError):
            if source.strict:
                raise ValueError(f"source {source.name!r}: {where}: {found}")
            continue
        for p, value in found.items():
            want = source.settings.get(p)
            if value == want:
                continue
            if not source.strict:
                source.notes.append(
                    f"source {source.name!r}: {split} members are {_describe(source.modality, p, value)} "
                    f"({where}); converted to {_describe(source.modality, p, want)} as {flag} asks"
                )
                continue
            fix = json.dumps({source.name: {p: want}})
            raise ValueError(
                f"source {source.name!r}: its {split} members are {_describe(source.modality, p, value)} "
                f"({where}), but the {source.modality} {p} is {want} (from {source.origin.get(p, 'the defaults')}); "
                f"to convert every member to {want}, set it explicitly: {flag} '{fix}'"
            )
