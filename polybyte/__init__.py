"""polybyte: byte-level language models (flat transformer, MEGABYTE, BLT) over text, images and audio.

    import polybyte
    model = polybyte.load("polybyte-demo/run/checkpoints/last")
    model.generate("text", "Once upon a time", max_bytes=200)

This file runs before every ``import polybyte.models`` / ``.modalities`` / ``.pipelines``, so it
imports nothing itself: `load` and `Model` (polybyte/api.py, which imports torch and the
pipelines) and ``__version__`` (from the installed metadata: pyproject.toml's version) are looked
up on first use.
"""

__all__ = ["Model", "__version__", "load"]


def __getattr__(name: str):
    if name == "__version__":  # looked up on first use: importlib.metadata costs ~30 ms to import
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("polybyte")  # pyproject.toml's version, as installed
        except PackageNotFoundError:  # a source tree on sys.path that was never installed
            return "0+unknown"
    if name in ("load", "Model"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'polybyte' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
