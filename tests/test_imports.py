"""The package's imports point down its floors and never run in a circle.

Floors, bottom to top (the README's layout): sharding / objectives / flops -> models -> pretrained, data ->
tasks -> training, evaluation, aot -> main, forecast. A module may import its own floor and those below.
Every `import` of the package is read with `ast` (also those inside functions: a late import is still an
import); nothing of the package is run. Relative imports are resolved against the importing module.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

FLOORS = (
    ("sharding", "objectives", "flops"),
    ("models",),
    ("pretrained", "data"),
    ("tasks",),
    ("training", "evaluation", "aot"),
    ("main", "forecast"),
)


def package_modules(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
    """{dotted module name: file} of every .py under root/package (a package is its __init__.py)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(path: pathlib.Path, module: str, package: str, known: set[str]) -> set[str]:
    """The package's modules that `path` (module `module`) imports. `from pkg import name` counts as
    importing pkg.name when that is a module, else pkg itself."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == package)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]  # a module's own package
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != package:
                continue
            for alias in node.names:
                name = f"{target}.{alias.name}"
                found.add(name if name in known else target)
    # `import a.b.c` also runs a and a.b, but those are packages whose own imports are checked themselves.
    return {name for name in found if name in known}


def floor_of(module: str, package: str) -> int:
    head = module[len(package) + 1:].split(".")[0] if module != package else ""
    for floor, names in enumerate(FLOORS):
        if head in names:
            return floor
    raise ValueError(f"{module}: no floor for {head!r}; add it to FLOORS (tests/test_imports.py)")


def import_graph(root: pathlib.Path, package: str) -> dict[str, set[str]]:
    modules = package_modules(root, package)
    known = set(modules)
    return {name: imported_modules(path, name, package, known) - {name} for name, path in modules.items()}


def upward_imports(graph: dict[str, set[str]], package: str) -> list[str]:
    """'a (floor i) imports b (floor j > i)' for every import that points up. The package's own __init__
    sits at the top (it may gather anything) and nothing may import it."""
    problems = []
    for module, targets in sorted(graph.items()):
        if module == package:
            continue
        for target in sorted(targets):
            if target == package:
                problems.append(f"{module} imports the package root {package}")
            elif floor_of(target, package) > floor_of(module, package):
                problems.append(f"{module} (floor {floor_of(module, package)}) imports {target} "
                                f"(floor {floor_of(target, package)})")
    return problems


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per strongly connected set of modules that import each other (Tarjan's algorithm)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_circle_and_no_upward_import():
    graph = import_graph(ROOT, "deltaworld_jax")
    assert len(graph) > 40  # the walk found the package
    assert "deltaworld_jax.tasks.deltaworld" in graph["deltaworld_jax.tasks"]  # it reads imports at all
    assert circles(graph) == []
    assert upward_imports(graph, "deltaworld_jax") == []


def _fake_package(tmp_path: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for name, text in files.items():
        path = tmp_path / "deltaworld_jax" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_a_circle_is_found(tmp_path):
    root = _fake_package(tmp_path, {
        "__init__.py": "",
        "training/__init__.py": "",
        "training/trainer.py": "from deltaworld_jax.training import recipe\n",
        # a late import inside a function closes the circle all the same
        "training/recipe.py": "def run():\n    from deltaworld_jax.training import trainer\n",
        "models/__init__.py": "",
        "models/layers.py": "import numpy\n",
    })
    graph = import_graph(root, "deltaworld_jax")
    assert circles(graph) == [["deltaworld_jax.training.recipe", "deltaworld_jax.training.trainer"]]
    assert upward_imports(graph, "deltaworld_jax") == []


def test_an_upward_import_is_found(tmp_path):
    root = _fake_package(tmp_path, {
        "__init__.py": "",
        "data/__init__.py": "",
        # data (floor 2) reaching up to tasks (floor 3) through a relative import
        "data/token_cache.py": "from ..tasks import deltaworld\n",
        "tasks/__init__.py": "",
        "tasks/deltaworld.py": "from deltaworld_jax.models import layers\nfrom deltaworld_jax import sharding\n",
        "models/__init__.py": "",
        "models/layers.py": "",
        "sharding.py": "",
    })
    graph = import_graph(root, "deltaworld_jax")
    assert graph["deltaworld_jax.data.token_cache"] == {"deltaworld_jax.tasks.deltaworld"}
    assert upward_imports(graph, "deltaworld_jax") == [
        "deltaworld_jax.data.token_cache (floor 2) imports deltaworld_jax.tasks.deltaworld (floor 3)"]
    assert circles(graph) == []


def test_a_module_outside_every_floor_is_an_error(tmp_path):
    root = _fake_package(tmp_path, {"__init__.py": "", "bench/__init__.py": "", "bench/step.py": "",
                                    "models/__init__.py": "from deltaworld_jax.bench import step\n"})
    with pytest.raises(ValueError, match="no floor for 'bench'"):
        upward_imports(import_graph(root, "deltaworld_jax"), "deltaworld_jax")
