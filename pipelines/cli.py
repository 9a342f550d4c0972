"""`polybyte` console entry point: dispatches each subcommand to its module's ``main(argv)``.

Subcommand modules are imported lazily so `polybyte shard` never pays for Lightning's import.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module under polybyte.pipelines, one-line help)
COMMANDS = {
    "shard": ("shards", "turn text/image/audio files into webdataset byte shards"),
    "fit": ("lit", "train a model (LightningCLI; --config configs/X.yaml)"),
    "validate": ("lit", "validate a checkpoint (LightningCLI)"),
    "eval": ("evaluate", "bits-per-byte report per modality, optionally against codecs"),
    "sample": ("sample", "sample text, images (PNG) or audio (WAV) from a checkpoint"),
    "import": ("blt_import", "convert downloaded weights (a transformers BLT folder) into a polybyte export"),
    "plot": ("plot", "learning curves: val bits/byte against training time and FLOPs, codecs beside"),
    "bench": ("bench", "measure training, sampling or data-loading throughput"),
    "demo": ("demo", "build a small dataset, train, evaluate and sample on this machine"),
}


# the stack whose versions `polybyte --version` reports: a break is diagnosed from one line
STACK = ("torch", "torchaudio", "lightning", "webdataset", "numpy", "pillow", "soundfile")


def version_line() -> str:
    """``polybyte X (torch A, torchaudio B, ...)`` from the installed metadata: nothing is
    imported, so it works even when a dependency cannot load."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def get(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "missing"

    stack = ", ".join(f"{name} {get(name)}" for name in STACK)
    return f"polybyte {get('polybyte')} ({stack}, python {platform.python_version()})"


def usage() -> str:
    lines = ["usage: polybyte COMMAND [ARGS...] | polybyte --version", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`polybyte COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv_is_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        print(version_line())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"polybyte: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    from polybyte.modalities.audio import AudioStackError

    try:
        module = importlib.import_module(f"polybyte.pipelines.{COMMANDS[command][0]}")
        if command in {"fit", "validate"}:  # LightningCLI reads sys.argv itself when given None
            result = module.main(None if argv_is_sys else [command, *rest])
        else:
            result = module.main(rest)
    except AudioStackError as e:  # a broken install: one line, not a traceback
        print(f"polybyte {command}: error: {e}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
