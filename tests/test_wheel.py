"""The wheel (issue 17): built from pyproject.toml alone, installed into a fresh venv outside the
checkout, it holds the API, the three code packages and the configs, and from it `polybyte
--help`, `polybyte fit --config debug.yaml` and the reduced demo test run (so `polybyte demo`
finds its shipped config too).

Offline: the wheel is built with `pip wheel --no-deps` (pip fetches the build backend,
setuptools, from the configured index exactly as the editable install does); the venv is made
without pip and the wheel installed into it by this venv's pip (``--python``), with no index. The
new venv then sees this venv's packages (torch, Lightning, pytest, ...) through a .pth line, which
adds the folder but does not run the .pth files in it, so this venv's editable polybyte stays
out of sight and every `polybyte` module comes from the wheel.
"""

from __future__ import annotations

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
REDUCED_DEMO = "tests/test_demo.py::test_reduced_demo_learns_end_to_end"
# the reduced demo trains 800 steps: ~1.5 min on an idle 2-core CPU, many times that on a loaded one
DEMO_TIMEOUT = 3600


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


def test_the_reduced_demo_test_passes_from_the_wheel(venv, outside, tmp_path):
    """tests/test_demo.py's reduced demo, its code imported from the wheel: polybyte is imported
    before pytest starts, so every test module gets the installed package."""
    code = (
        "import sys, pytest, polybyte\n"
        "assert polybyte.__file__.startswith(sys.prefix), polybyte.__file__\n"
        "status = pytest.main(sys.argv[1:])\n"
        "import polybyte.pipelines.demo as demo\n"
        "assert demo.__file__.startswith(sys.prefix), demo.__file__\n"
        "sys.exit(status)\n"
    )
    args = ["-q", "-s", "-p", "no:cacheprovider", "--basetemp", tmp_path / "pytest", f"--rootdir={REPO}"]
    log = tmp_path / "reduced-demo.log"  # streamed, so a timeout still shows how far it got
    with open(log, "w") as f:
        try:
            status = subprocess.run(
                [str(a) for a in (venv / "bin" / "python", "-c", code, *args, REPO / REDUCED_DEMO)],
                stdout=f,
                stderr=subprocess.STDOUT,
                cwd=outside["cwd"],
                env=outside["env"],
                timeout=DEMO_TIMEOUT,
            ).returncode
        except subprocess.TimeoutExpired:
            status = "timeout"
    out = log.read_text()
    assert status == 0 and "1 passed" in out, f"exit {status}; {log}:\n{out[-3000:]}"
