"""Checkpoint files on disk: atomic writes, checking a ``.ckpt`` before use, and the run folder.

One checkpoint is a Lightning ``X.ckpt`` plus its export folder ``X/`` (model.safetensors +
config.json, see export.py). Both are written under a temporary name beside their final one and
renamed into place, the export first, so a reader never finds a half-written file. A kill between
the two renames leaves an export one save ahead of its ``.ckpt``: the steps recorded in both
differ, and `load_exported` refuses the pair when it is given the ``.ckpt``.

The run folder is ``trainer.default_root_dir``: the loggers write under it (``tb/``, ``csv/``)
and the checkpoints in ``checkpoints/``, unless a config names other places itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import zipfile
from pathlib import Path

TMP, OLD = ".tmp", ".old"  # suffixes of the hidden siblings used while writing: .NAME.tmp, .NAME.old

# Signals that stop a fit with a resumable `last` checkpoint (exit status 128 + signum): lit.py's
# ExportCheckpoint handles them in the main process; data.py's loader workers ignore them (all but
# their parent's SIGTERM, which is how torch stops them).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line: its type and whitespace-collapsed message."""
    text = " ".join(str(e).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --- atomic writes ----------------------------------------------------------------------------
def sibling(path: Path, suffix: str) -> Path:
    """The hidden working name ``.NAME<suffix>`` next to ``path``."""
    return path.with_name(f".{path.name}{suffix}")


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def fsync(path: Path, recursive: bool = True) -> None:
    """Flush a file, or every file of a folder and the folder itself, to the disk; with
    ``recursive=False`` a folder's own entry only (its list of names, after a rename into it)."""
    paths = sorted(path.rglob("*")) + [path] if path.is_dir() and recursive else [path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def prepare(final: Path) -> Path:
    """A clean working path for a new version of ``final`` (left-overs of a killed writer go)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in (sibling(final, TMP), sibling(final, OLD)):
        remove(stale)
    return sibling(final, TMP)


def commit(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` (file or folder) to ``final``. A file replaces the old one in
    one rename. A folder cannot replace a non-empty folder in one rename: the old one is moved
    aside first (for that instant ``final`` is missing, never half-written), then deleted."""
    fsync(tmp)
    if tmp.is_dir() and final.is_dir() and not final.is_symlink():
        old = sibling(final, OLD)
        remove(old)
        os.replace(final, old)
        os.replace(tmp, final)
        remove(old)
    else:
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(tmp, final)
    fsync(final.parent, recursive=False)  # the rename itself: not every file beside it (e.g. all of /tmp)


# --- reading a .ckpt ----------------------------------------------------------------------------
def check_ckpt_file(path) -> Path:
    """Refuse a ``.ckpt`` that is missing, truncated or not a torch checkpoint, naming it. A
    truncated zip loses its central directory, so this reads only the file's end, never unpickles.
    A folder (a sharded FSDP/DeepSpeed checkpoint) is left to the strategy that wrote it."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if p.is_dir():
        return p
    try:
        with zipfile.ZipFile(p) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(
            f"{path}: not a complete checkpoint, truncated or not written by torch.save "
            f"({one_line(e)}); use an earlier checkpoint"
        ) from None
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        raise ValueError(f"{path}: not a torch checkpoint (no data.pkl in the archive)")
    return p


def ckpt_step(path) -> int:
    """The ``global_step`` a Lightning ``.ckpt`` was saved at. Read through torch's weights-only
    loader with the tensors memory-mapped (not read); no arbitrary object is unpickled."""
    import torch

    check_ckpt_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(checkpoint["global_step"])
    except Exception as e:  # noqa: BLE001 — a damaged archive fails in many ways
        raise ValueError(f"{path}: unreadable checkpoint ({one_line(e)})") from None


# --- the run folder ----------------------------------------------------------------------------
def held_checkpoints(folder) -> list[Path]:
    """The ``.ckpt`` files (or sharded checkpoint folders) directly in ``folder``."""
    folder = Path(folder)
    return sorted(p for p in folder.glob("*.ckpt") if not p.name.startswith(".")) if folder.is_dir() else []


def refuse_other_run(folder, ckpt_path, why: str = "") -> None:
    """A fit may write into a checkpoint folder that is empty, or one it resumes from: the
    concrete ``ckpt_path`` (``last`` already looked up) lies in it. Otherwise the folder holds
    another run's checkpoints, which this run would mix with its own or overwrite."""
    held = held_checkpoints(folder)
    if not held or (ckpt_path is not None and Path(ckpt_path).resolve().parent == Path(folder).resolve()):
        return
    names = ", ".join(p.name for p in held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
    raise ValueError(
        f"{folder} already holds another run's checkpoints ({names}){why}; resume that run with "
        f"--ckpt_path last (or one of its .ckpt files), or write this one elsewhere with "
        f"--trainer.default_root_dir runs/NEW"
    )
