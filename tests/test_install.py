"""The install itself: the pinned stack loads, matches constraints.txt, and a broken torchaudio
fails audio work with one clear line instead of tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from polybyte.pipelines import cli

REPO = Path(__file__).resolve().parents[1]
PINNED = ("torch", "torchaudio", "lightning", "webdataset")  # the pairs that drift breaks


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, ver = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = ver.strip()
    return pins


def test_torchaudio_loads_against_this_torch():
    from polybyte.modalities.audio import AudioStackError, torchaudio_dsp

    try:
        functional, _ = torchaudio_dsp()
    except AudioStackError as e:
        pytest.fail(f"the install is broken: {e}")
    codes = functional.mu_law_encoding(torch.linspace(-1, 1, 9), 256)
    assert codes.tolist() == sorted(codes.tolist()) and int(codes[4]) == 128  # the extension ran
    assert version("torchaudio").split("+")[0] == torch.__version__.split("+")[0], (
        f"torchaudio {version('torchaudio')} is not the release built for torch {torch.__version__}"
    )


def test_stack_is_the_tested_one():
    pins = constraints()
    assert all(name in pins for name in PINNED), f"constraints.txt must pin {PINNED}"
    installed = {name: version(name).split("+")[0] for name in PINNED}
    drift = {n: (installed[n], pins[n]) for n in PINNED if installed[n] != pins[n]}
    assert not drift, f"installed vs constraints.txt: {drift}; install with `pip install -c constraints.txt -e .`"


def test_every_dependency_is_pinned():
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = constraints()
    names = [d.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower() for d in deps]
    assert [n for n in names if n not in pins] == []


def test_version_line_names_the_stack(capsys):
    assert cli.main(["--version"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("polybyte ") and "\n" not in line
    for name in PINNED:
        assert f"{name} {version(name)}" in line


def test_broken_torchaudio_gives_one_line_and_exit_2(tmp_path):
    """A torchaudio whose extension cannot load (as 2.11.1 beside torch 2.11.0): shard audio
    exits 2 with one line naming the fix, while text still works in the same install."""
    fake = tmp_path / "fake" / "torchaudio"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        'raise OSError("Could not load this library: /x/torchaudio/lib/libtorchaudio.so")\n'
    )
    wav = tmp_path / "in" / "a.wav"
    wav.parent.mkdir()
    sf.write(wav, (np.sin(np.arange(8000) / 5) * 8000).astype(np.int16), 8000, subtype="PCM_16")
    (tmp_path / "in" / "a.txt").write_text("hello world\n" * 50)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "polybyte.pipelines.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )
    bad = run("shard", "audio", str(wav), "--out", str(tmp_path / "audio"), "--sample-rate", "16000")
    assert bad.returncode == 2, bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in bad.stderr
    assert "torchaudio" in lines[0] and "cannot be loaded with torch" in lines[0] and "constraints.txt" in lines[0]
    ok = run("shard", "text", str(tmp_path / "in" / "a.txt"), "--out", str(tmp_path / "text"))
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "text" / "manifest.json").is_file()


def test_readme_commands_install_through_constraints():
    readme = (REPO / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv")]
    assert len(commands) == 2, commands  # the main job and the tests, one line each
    assert all("pip install -q -c constraints.txt -e " in c for c in commands)
    assert commands[0].endswith("polybyte demo")
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert ci == [commands[1]]  # CI runs exactly the README's test command
