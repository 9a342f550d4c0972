"""The wheel (issue 17): built from pyproject.toml alone, installed into a fresh venv outside the
checkout, it holds the API, the three code packages and the configs, and from it `polybyte
--help`, `polybyte fit --config debug.yaml` and a short `polybyte demo` run (so the demo finds its
shipped config and embedded dataset too).

Offline: the wheel is built with `pip wheel --no-deps` (pip fetches the build backend,
setuptools, from the configured index exactly as the editable install does); the venv is made
without pip and the wheel installed into it by this venv's pip (``--python``), with no index. The
new venv then sees this venv's packages (torch, Lightning, pytest, ...) through a .pth line, which
adds the folder but does not run the .pth files in it, so this venv's editable polybyte stays
out of sight and every `polybyte` module comes from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
WHEEL_DEMO_STEPS = 30  # enough to run every stage of the demo; tests/test_demo.py checks that it learns
DEMO_TIMEOUT = 1800  # a few seconds of training; building the embedded dataset and the codecs take longer


def run(args, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert out.returncode == 0, f"{args[:4]}... exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of what the build reads: pyproject.toml, README.md (the long
    description) and the folders pyproject maps to packages; nothing is written in the checkout."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for folder in sorted(set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", root / "dist", src], timeout=600)
    (built,) = (root / "dist").glob("polybyte-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    env = tmp_path_factory.mktemp("venv") / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", env], timeout=300)
    python = env / "bin" / "python"
    run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
        timeout=600,
    )
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (Path(site) / "test-venv-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env


@pytest.fixture
def outside(tmp_path) -> dict:
    """Where the installed commands run: a folder outside the checkout, with no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "POLYBYTE_CACHE")}
    env["POLYBYTE_CACHE"] = str(tmp_path / "cache")
    return {"cwd": tmp_path, "env": env, "timeout": 600}


def test_the_wheel_holds_the_api_the_packages_and_the_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"polybyte", f"polybyte-{VERSION}.dist-info"}
    for path in (
        "__init__.py",
        "api.py",
        "models/base.py",
        "modalities/text.py",
        "pipelines/cli.py",
        "pipelines/card.py",
    ):
        assert f"polybyte/{path}" in names, path
    configs = {Path(n).name for n in names if n.startswith("polybyte/configs/") and n.endswith(".yaml")}
    assert configs == {p.name for p in (REPO / "configs").glob("*.yaml")}


def test_installed_commands_and_imports_come_from_the_wheel(venv, outside):
    help_ = run([venv / "bin" / "polybyte", "--help"], **outside).stdout
    assert help_.startswith("usage: polybyte COMMAND") and "demo" in help_
    assert run([venv / "bin" / "polybyte", "--version"], **outside).stdout.startswith(f"polybyte {VERSION} (torch ")
    code = (
        "import sys, polybyte, polybyte.models, polybyte.modalities, polybyte.pipelines.cli\n"
        "from polybyte.pipelines.runtime import shipped_config\n"
        "assert polybyte.__version__ == sys.argv[1], polybyte.__version__\n"
        "assert callable(polybyte.load) and polybyte.Model.__module__ == 'polybyte.api'\n"
        "for m in (polybyte, polybyte.models, polybyte.modalities, polybyte.pipelines.cli, polybyte.api):\n"
        "    assert m.__file__.startswith(sys.prefix), m.__file__\n"
        "assert str(shipped_config('debug.yaml')).startswith(sys.prefix)\n"
    )
    run([venv / "bin" / "python", "-c", code, VERSION], **outside)


def test_fit_finds_a_shipped_config_by_name(venv, outside):
    printed = run([venv / "bin" / "polybyte", "fit", "--config", "debug.yaml", "--print_config"], **outside).stdout
    cfg = yaml.safe_load(printed)
    assert cfg["model"]["model"]["backbone"] == "megabyte" and cfg["data"]["sources"] == "demo"


def test_the_demo_runs_from_the_wheel(venv, outside, tmp_path):
    """The wheel's `polybyte demo`, briefly, outside the checkout: its embedded dataset, shipped
    config, codecs and samplers all come from the installed package. Learning is tested in-tree
    (tests/test_demo.py); here a short run only has to finish, write everything and report it."""
    out = tmp_path / "demo"
    args = ["demo", "--out", out, "--steps", WHEEL_DEMO_STEPS, "--minutes", "60", "--samples", "1"]
    printed = run([venv / "bin" / "polybyte", *args], **{**outside, "timeout": DEMO_TIMEOUT}).stdout
    summary = printed[printed.index("demo: done in") :]
    assert f"trained      {WHEEL_DEMO_STEPS} of {WHEEL_DEMO_STEPS} steps" in summary
    report = json.loads((out / "eval" / "report.json").read_text())
    assert sorted(report["modalities"]) == ["audio", "image", "text"]
    assert all(0 < report["modalities"][m]["bpb"] < 16 for m in report["modalities"])
    ckpt = out / "run" / "checkpoints" / "last"
    assert json.loads((ckpt / "config.json").read_text())["step"] == WHEEL_DEMO_STEPS
    for kind, pattern in (("image", "*.png"), ("audio", "*.wav"), ("text", "*.txt")):
        assert len(list((out / "samples" / kind).glob(pattern))) >= 1, kind
    assert str(ckpt) in summary and str(out / "eval" / "report.md") in summary
