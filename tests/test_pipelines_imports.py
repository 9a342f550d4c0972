"""How pipelines/ imports (issue 13): `eval`, `sample` and `shard` never load Lightning, the
modules of pipelines/ import each other without a circle, and imports go one way between the
three packages (pipelines/ -> models/, modalities/; those two never import each other or
pipelines/). The Python API, the folder polybyte/ (issue 17), sits on top: it may import the
three, none of them imports it, and neither it nor `polybyte.load` loads Lightning."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("modalities", "models", "pipelines")
API = "polybyte"  # the folder holding the import package's own modules: __init__.py, api.py


@pytest.mark.parametrize("module", ["evaluate", "sample", "shards", "blt_import"])
def test_eval_sample_and_shard_never_import_lightning(module):
    """Imported in a fresh interpreter, as `polybyte eval|sample|shard|import` load them (through cli.py)."""
    code = (
        "import sys\n"
        "from polybyte.pipelines import cli\n"
        f"import polybyte.pipelines.{module}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", f"polybyte.pipelines.{module} imports Lightning: {out.stdout[:300]}"


def test_the_api_never_imports_lightning():
    code = (
        "import sys\n"
        "import polybyte\n"
        "polybyte.load\n"  # imports polybyte/api.py and, through it, what generate/score/save use
        "assert 'polybyte.api' in sys.modules and 'polybyte.pipelines.sample' in sys.modules\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", f"polybyte.api imports Lightning: {out.stdout[:300]}"


def _imports(package: str, root: Path = REPO) -> dict[str, set[str]]:
    """``{module: {modules of the three packages and of the API it imports}}`` for every module
    of ``package`` (one of them, or the API's folder), lazy imports inside functions included,
    named ``package.module`` (``package.__init__`` for the package itself; the API's modules
    ``polybyte.__init__``, ``polybyte.api``)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((root / package).glob("*.py")):
        name = f"{package}.{path.stem}"
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from .x import y / from . import x
                    base = package if not node.module else f"{package}.{node.module}"
                    targets = [base] if node.module else [f"{package}.{a.name}" for a in node.names]
                else:
                    base = node.module or ""
                    targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                api = target.split(".")[:2]
                if api[0] == API and (len(api) == 1 or api[1] not in PACKAGES):  # polybyte, polybyte.api
                    module = api[1] if len(api) > 1 and (REPO / API / f"{api[1]}.py").is_file() else "__init__"
                    found.add(f"{API}.{module}")
                    continue
                target = target.removeprefix("polybyte.")
                if target in PACKAGES:
                    found.add(f"{target}.__init__")
                elif target.split(".")[0] in PACKAGES and (REPO / (target.replace(".", "/") + ".py")).is_file():
                    found.add(target)
        graph[name] = found - {name}
    return graph


def test_pipelines_modules_import_each_other_without_a_circle():
    graph = {m: {t for t in ts if t.startswith("pipelines.")} for m, ts in _imports("pipelines").items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                circle = path[path.index(target) :] + [target] if target in path else [module, target]
                pytest.fail("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("models", ("modalities", "pipelines", API)),
        ("modalities", ("models", "pipelines", API)),
        ("pipelines", (API,)),
    ],
)
def test_imports_go_one_way(package, forbidden):
    wrong = sorted(f"{m} -> {t}" for m, ts in _imports(package).items() for t in ts if t.split(".")[0] in forbidden)
    assert not wrong, f"{package}/ must not import {' or '.join(forbidden)}/: {wrong}"


def test_the_api_uses_the_pipelines_and_imports_them_only_on_first_use(tmp_path):
    graph = _imports(API)
    assert set(graph) == {"polybyte.__init__", "polybyte.api"}
    assert graph["polybyte.__init__"] == {"polybyte.api"}  # lazily, in __getattr__
    assert {"pipelines.sample", "pipelines.evaluate", "pipelines.export"} <= graph["polybyte.api"]
    # the walk sees the API when a module imports it (the check above has something to find)
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "probe.py").write_text("import polybyte\nfrom polybyte.api import load\n")
    assert _imports("pipelines", tmp_path)["pipelines.probe"] == {"polybyte.__init__", "polybyte.api"}
