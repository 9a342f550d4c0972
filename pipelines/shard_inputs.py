"""The inputs of `polybyte shard` (shards.py): files, folders and globs expanded to files, their
key stems, and the adapter settings the inputs themselves determine.

An image size or audio sample rate not given on the command line is read from the inputs'
headers (nothing decoded): every recording's rate, every image's size (the first row of an
``.npz`` batch). Inputs that agree give the setting; inputs that disagree are one error asking
for the setting, which then converts them all (crop and resize, resample). Unreadable inputs are
left to the writer, which skips and counts them.
"""

from __future__ import annotations

import glob
import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
from PIL import Image

from polybyte.modalities import Modality
from polybyte.modalities.image import read_npz_batch
from polybyte.modalities.text import JSON_EXTENSIONS

MAX_SLUG = 64  # longer names are shortened with a hash: tar (ustar) member names stay < 100 chars
# the shard command's flag for each setting the inputs determine
PROPERTY_FLAGS = {"size": "--size", "sample_rate": "--sample-rate"}


@dataclass
class ShardInput:
    path: Path
    name: str  # name relative to the input argument (file name, or path under a folder)


def input_extensions(adapter: Modality) -> tuple[str, ...]:
    """File extensions read from folders: the adapter's members plus JSON (text) / .npz (image)."""
    extra = {"text": JSON_EXTENSIONS, "image": (".npz",)}.get(adapter.name, ())
    return tuple(adapter.extensions) + tuple(extra)


def expand_inputs(inputs: Iterable[str | Path], extensions: Sequence[str]) -> list[ShardInput]:
    """Files, folders (recursive, by extension) and glob patterns -> sorted, de-duplicated files.

    A named file is always taken; folders contribute only files with ``extensions``.
    Raises ValueError for a path that does not exist or a pattern/folder with nothing to read.
    """
    found: list[ShardInput] = []
    seen: set[Path] = set()

    def add(path: Path, name: str) -> None:
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            found.append(ShardInput(path, name))

    def add_folder(folder: Path, spec: str) -> None:
        files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in extensions)
        if not files:
            raise ValueError(f"folder {spec} holds no {'/'.join(extensions)} files")
        for f in files:
            add(f, f.relative_to(folder).as_posix())

    for spec in map(str, inputs):
        path = Path(spec)
        if path.is_dir():
            add_folder(path, spec)
        elif path.is_file():
            add(path, path.name)
        elif re.search(r"[*?\[]", spec):
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
            if not matches:
                raise ValueError(f"no file matches {spec!r}")
            for m in matches:
                if m.is_dir():
                    add_folder(m, str(m))
                else:
                    add(m, m.name)
        else:
            raise ValueError(f"input not found: {spec} (give files, folders or glob patterns)")
    return found


def slug(name: str) -> str:
    """A file name -> a key stem of ``[A-Za-z0-9_]`` (dots and ``-`` become ``_``)."""
    stem = Path(name).with_suffix("").as_posix()
    out = re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_") or "sample"
    if len(out) > MAX_SLUG:
        digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).hexdigest()
        out = f"{out[: MAX_SLUG - 17]}_{digest}"
    return out


def _file_property(adapter: Modality, path: Path):
    """The size (image: (width, height)) or sample rate (audio) in a file's header; None when the
    header does not read (the writer skips and counts that file)."""
    try:
        if adapter.name == "audio":
            return sf.info(str(path)).samplerate
        if path.suffix.lower() == ".npz":
            _, pixels, _ = next(read_npz_batch(path, max_pixels=adapter.settings.max_pixels))
            return pixels.shape[1], pixels.shape[0]
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001 — an unreadable input is the writer's counted skip
        return None


def _describe(modality: str, value) -> str:
    return f"{value[0]}x{value[1]}" if modality == "image" else f"{value} Hz"


def input_properties(adapter: Modality, files: list[ShardInput], given: Iterable[str]) -> dict[str, tuple]:
    """``{setting: (value, how many inputs)}`` for the adapter properties not in ``given``, read
    from the inputs' headers. Raises ValueError when the inputs disagree (or, for images, are not
    square), naming the flag that sets it."""
    missing = [p for p in adapter.properties if p not in given]
    if not missing:
        return {}
    (prop,) = missing  # one property per modality: image size, audio sample rate
    counts = Counter(v for v in (_file_property(adapter, f.path) for f in files) if v is not None)
    if not counts:
        return {}  # nothing readable: every input is skipped, with its reason
    flag = PROPERTY_FLAGS[prop]
    square = all(w == h for w, h in counts) if adapter.name == "image" else True
    if len(counts) > 1 or not square:
        seen = ", ".join(f"{_describe(adapter.name, v)}: {n} file{'s' * (n != 1)}" for v, n in counts.most_common(4))
        more = f" and {len(counts) - 4} more" if len(counts) > 4 else ""
        what = "square images of one size" if adapter.name == "image" else "recordings at one sample rate"
        verb = "centre-cropped and resized" if adapter.name == "image" else "resampled"
        raise ValueError(
            f"the inputs are not all {what} ({seen}{more}), so they give no {prop}; pick the one they are "
            f"all {verb} to with {flag}"
        )
    [(value, n)] = counts.items()
    return {prop: (value[0] if adapter.name == "image" else value, n)}
