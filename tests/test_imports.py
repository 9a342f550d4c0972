"""The import structure of models/ (DESIGN.md §1), read from the source with ast, nothing imported.

models/ imports no other package of polybyte and no Lightning; inside it there is no import
circle, the package's ``__init__`` (the registry) imports the backbones but no module imports
it, and the ByteLM interface (base.py) imports none of its implementations. ``module_imports``
walks any of the three packages, and the API's folder polybyte/, which models/ never imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "modalities", "pipelines")  # installed as polybyte.<name>
API = "polybyte"  # the folder of the import package's own modules (the Python API)


def module_imports(package: str) -> dict[str, set[str]]:
    """{module: every module it imports}, as dotted names ("models.base", "torch", ...) for each
    .py file of ``package``; imports inside functions and under TYPE_CHECKING count too."""
    folder = REPO / package
    modules = {p.stem for p in folder.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in sorted(folder.glob("*.py")):
        me = f"{package}.{path.stem}"
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {_local(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    base = _local(node.module)
                    # `from polybyte.models import x`: the module x if there is one, else the package
                    names = [a.name for a in node.names]
                    subs = [f"{base}.{n}" for n in names if _is_module(base, n)]
                    found |= set(subs) if len(subs) == len(names) else {f"{base}.__init__", *subs}
                else:
                    if node.level > 1:
                        raise AssertionError(f"{me}: imports from above its package ({'.' * node.level})")
                    if node.module:  # from .x import y
                        found.add(f"{package}.{node.module}")
                    else:  # from . import x, y: modules, or names of the package's __init__
                        for a in node.names:
                            found.add(f"{package}.{a.name}" if a.name in modules else f"{package}.__init__")
        found.discard(me)
        graph[me] = found
    return graph


def _local(name: str) -> str:
    """polybyte.models.base -> models.base; polybyte.models -> models.__init__; the API's own
    modules: polybyte -> polybyte.__init__, polybyte.api -> polybyte.api; others unchanged."""
    parts = name.split(".")
    if parts[0] == API and (len(parts) == 1 or parts[1] not in PACKAGES + ("configs",)):
        return f"{API}.{parts[1] if len(parts) > 1 else '__init__'}"
    if parts[0] == "polybyte" and len(parts) > 1:
        return ".".join(parts[1:]) if len(parts) > 2 else f"{parts[1]}.__init__"
    return name


def _is_module(base: str, name: str) -> bool:
    package = base.removesuffix(".__init__")
    return package in PACKAGES and (REPO / package / f"{name}.py").exists()


def package_of(module: str) -> str:
    return module.split(".")[0]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle among the graph's own modules, as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if n not in graph:
                continue
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_models_imports_no_other_package_and_no_lightning():
    """Pure torch: models/ never imports modalities/, pipelines/ or the API (vocabulary ids come
    from models/tokens.py, sizes through configs), nor Lightning or webdataset."""
    forbidden = ("modalities", "pipelines", API, "lightning", "pytorch_lightning", "webdataset")
    bad = sorted((m, n) for m, deps in module_imports("models").items() for n in deps if package_of(n) in forbidden)
    assert not bad, f"models/ imports what it must not: {bad}"


def test_models_has_no_import_circle_and_no_module_imports_the_registry():
    graph = module_imports("models")
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"
    into_init = sorted(m for m, deps in graph.items() if "models.__init__" in deps and m != "models.__init__")
    assert not into_init, f"models/__init__.py is the registry: no module imports it, but {into_init} do"


def test_the_bytelm_interface_imports_no_implementation():
    graph = module_imports("models")
    own = {n for n in graph["models.base"] if package_of(n) == "models"}
    assert own <= {"models.tokens"}, f"models/base.py imports {sorted(own)}"
    # and the registry imports every backbone
    assert {"models.transformer", "models.megabyte", "models.blt"} <= graph["models.__init__"]


def test_find_cycle_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "torch"}, "b": set()}) is None


def test_module_imports_reads_the_api_folder():
    graph = module_imports(API)
    assert graph["polybyte.__init__"] == {"polybyte.api", "importlib.metadata.__init__"}  # (from X import: X.__init__)
    assert {"pipelines", "modalities", "torch"} <= {package_of(n) for n in graph["polybyte.api"]}
    assert _local("polybyte") == "polybyte.__init__" and _local("polybyte.models.base") == "models.base"
